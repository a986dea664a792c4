r"""Reports built beside their folder and swapped in when complete.

``calopc evaluate`` and ``calopc compare`` write many files (plots, ``metrics.json``,
``report.html``, one sub-folder per generator). Written in place, an interrupted or failed run left
a folder that mixed the new run's plots with the old run's metrics. :func:`staged_folder` gives the
run a temporary sibling folder, ``.NAME.PID@HOST.XXXX.part`` (the scheme of
:func:`calopc.io.atomic_output`, so :func:`calopc.io.sweep_stale_parts` removes the folder of a
killed run), and moves its contents into the report folder only when the run has finished:

* a new report folder is the temporary folder renamed;
* into an existing one, each new entry replaces the entry of that name, old report files that the
  new report does not have (``stale``) are removed, and every other file (notes, inputs, sub-folders
  of the user) stays; a sub-folder that exists on both sides is merged the same way;
* the moves run with Ctrl-C and SIGTERM deferred (:func:`calopc.io.deferred_interrupts`); if a move
  fails, or a signal arrived meanwhile, the moves are undone, so the folder holds either the old
  report or the new one;
* on any failure or interrupt before that, the temporary folder is removed and the report folder
  is untouched.
"""

from __future__ import annotations

__all__ = ["staged_folder"]

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

#: ``stale(folder, new_names)``: names of entries in ``folder`` that belong to its old report and are not replaced
StaleRule = Callable[[Path, set[str]], Iterable[str]]
_REPLACED = ".calopc-replaced"  # inside the temporary folder: the entries the new report replaced, until it is done


@contextlib.contextmanager
def staged_folder(folder: str | os.PathLike, *, stale: StaleRule | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``folder``; move its contents into ``folder`` when the block succeeds.

    Args:
        folder: the report folder (created if missing, with its parents).
        stale: old report files to remove from ``folder`` (and from merged sub-folders) when the new
            contents arrive; default: none.

    Raises:
        calopc.io.OutputError: the temporary folder cannot be created (naming ``folder``); errors
            raised inside the block that name the temporary folder are re-raised naming ``folder``.
    """
    from ..io import OutputError, _host, sweep_stale_parts

    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_parts(folder.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}@{_host()}.", suffix=".part",
                                    dir=folder.parent))
    except OSError as err:
        msg = f"{folder}: cannot write ({(err.strerror or str(err)).lower()})"
        raise OutputError(msg) from err
    try:
        try:
            yield tmp
        except OutputError as err:  # name the report folder, not its temporary twin
            if str(tmp) not in str(err):
                raise
            raise OutputError(str(err).replace(str(tmp), str(folder))) from err
        _swap_in(tmp, folder, stale)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, folder: Path, stale: StaleRule | None) -> None:
    """Move the contents of ``tmp`` into ``folder`` as one step (undone on error or interrupt)."""
    from ..io import check_interrupt, deferred_interrupts

    undo: list[tuple[Path, Path]] = []  # (moved to, came from), in order
    with deferred_interrupts():
        try:
            if not folder.exists() and not folder.is_symlink():
                umask = os.umask(0)
                os.umask(umask)
                tmp.chmod(0o777 & ~umask)  # mkdtemp made it private
                os.rename(tmp, folder)
                undo.append((folder, tmp))
            else:
                backup = tmp / _REPLACED
                backup.mkdir()
                _merge(tmp, folder, backup, stale, undo)
            check_interrupt()  # a signal during the moves: undo them, then stop
        except BaseException:
            for moved, origin in reversed(undo):
                with contextlib.suppress(OSError):
                    os.rename(moved, origin)
            raise


def _merge(src: Path, dst: Path, backup: Path, stale: StaleRule | None, undo: list[tuple[Path, Path]]) -> None:
    """Entries of ``src`` replace those of ``dst`` (the replaced ones and ``stale`` ones go to ``backup``)."""
    names = {e.name for e in os.scandir(src)} - ({_REPLACED} if backup.parent == src else set())
    old = sorted(set(stale(dst, names) if stale else ()) - names)  # before the old report's index is replaced
    for name in sorted(names):
        s, d = src / name, dst / name
        if s.is_dir() and not s.is_symlink() and d.is_dir() and not d.is_symlink():
            (backup / name).mkdir()
            _merge(s, d, backup / name, stale, undo)
            continue
        if d.exists() or d.is_symlink():
            os.rename(d, backup / name)
            undo.append((backup / name, d))
        os.rename(s, d)
        undo.append((d, s))
    for name in old:
        d = dst / name
        if d.exists() or d.is_symlink():
            os.rename(d, backup / name)
            undo.append((backup / name, d))
