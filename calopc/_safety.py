r"""Output safety shared by every writer of calopc: nothing is lost, nothing is half-written.

* :func:`deferred_interrupts` / :func:`check_interrupt`: Ctrl-C and SIGTERM honoured between
  chunks (h5py otherwise swallows them), raised as :class:`Interrupted` (which remembers the signal);
* :func:`check_writable` and :func:`check_not_input`: cheap checks before any work;
* :func:`atomic_output`: a temporary file named with the process id and host, renamed when
  complete; stale ones of dead processes swept (:func:`sweep_stale_parts`); file-system errors
  reported as one :class:`OutputError` naming the target;
* :func:`lock_output`: one writer per output (:mod:`calopc.locking`);
* :func:`json_safe` / :func:`json_dumps`: output JSON that is always valid (no bare NaN).

Depends on :mod:`calopc.locking` only.
"""

from __future__ import annotations

__all__ = [
    "Interrupted",
    "OutputError",
    "atomic_output",
    "atomic_writer",
    "check_interrupt",
    "check_not_input",
    "check_writable",
    "deferred_interrupts",
    "json_dumps",
    "json_safe",
    "lock_output",
    "missing_message",
    "sweep_stale_parts",
]

import contextlib
import errno as _errno
import fnmatch
import math
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .locking import _host, _pid_alive, output_lock, sweep_stale_locks


class OutputError(ValueError):
    """An output cannot be written (same file as an input, no permission, disk full, ...); one line to report."""


# ----------------------------------------------------------------------------- interrupts
class Interrupted(KeyboardInterrupt):
    """A ``KeyboardInterrupt`` that remembers which signal caused it (SIGINT → exit 130, SIGTERM → 143)."""

    def __init__(self, signum: int = signal.SIGINT, *args: object) -> None:
        super().__init__(*args)
        self.signum = int(signum)


_pending_signals: list[int] = []
_deferring = False


def _deferred_handler(signum: int, frame: object) -> None:
    if _pending_signals:  # a second Ctrl-C: stop now
        raise Interrupted(signum)
    _pending_signals.append(signum)


def check_interrupt() -> None:
    """Raise :class:`Interrupted` if SIGINT/SIGTERM arrived inside :func:`deferred_interrupts` (call between chunks)."""
    if _pending_signals:
        signum = _pending_signals[0]
        _pending_signals.clear()
        raise Interrupted(signum)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM only set a flag; :func:`check_interrupt` raises :class:`Interrupted`.

    h5py ignores a ``KeyboardInterrupt`` raised while it runs its own callbacks (the write then
    completes as if nothing happened), so chunked HDF5 writers defer the interrupt to the next
    chunk boundary. A second signal raises at once. Signals that are ignored (``SIG_IGN``) stay
    ignored. Outside the main thread, or nested, this does nothing.
    """
    global _deferring
    if _deferring or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        h = signal.getsignal(s)
        if h is not signal.SIG_IGN and h is not None:
            old[s] = signal.signal(s, _deferred_handler)
    _deferring = True
    _pending_signals.clear()
    try:
        yield
        check_interrupt()
    finally:
        _deferring = False
        for s, h in old.items():
            signal.signal(s, h)
        pending = list(_pending_signals)
        _pending_signals.clear()
    if pending:  # arrived after the last check (only reached when the block itself succeeded)
        raise Interrupted(pending[0])


# ----------------------------------------------------------------------------- output checks
_WRITE_ERRNOS = {_errno.ENOSPC: "no space left on device", _errno.EDQUOT: "disk quota exceeded",
                 _errno.EROFS: "read-only file system", _errno.EACCES: "permission denied",
                 _errno.EPERM: "operation not permitted", _errno.EFBIG: "file too large",
                 _errno.EISDIR: "is a folder", _errno.ENOTDIR: "a file is where a folder is expected",
                 _errno.EIO: "input/output error"}


def _write_reason(err: BaseException) -> str | None:
    """A short reason for a failed write, or None when ``err`` is not a file-system error."""
    code = getattr(err, "errno", None)
    if code is None:  # h5py (and Rust: safetensors) put the errno into the message only
        m = re.search(r"errno = (\d+)|\(os error (\d+)\)", str(err))
        code = int(m.group(1) or m.group(2)) if m else None
    if code in _WRITE_ERRNOS:
        return _WRITE_ERRNOS[code]
    text = str(err).lower()
    for key, reason in (("no space left", "no space left on device"), ("read-only", "read-only file system"),
                        ("permission denied", "permission denied"), ("quota", "disk quota exceeded")):
        if key in text:
            return reason
    return None


def _nearly_full(folder: Path) -> bool:
    """Less than 1 MB free in ``folder`` (a failed write without an errno was then most likely a full disk)."""
    try:
        return shutil.disk_usage(folder).free < 1_000_000
    except OSError:
        return False


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def missing_message(path: str | os.PathLike) -> str:
    """The one-line reason why ``path`` cannot be opened although named: no such file, a loop of links, a dangling link."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == _errno.ELOOP:
            return f"{path}: a loop of symbolic links; expected a file or folder"
        if os.path.islink(path):
            with contextlib.suppress(OSError):
                return f"{path}: a symbolic link to a missing file ({os.readlink(path)})"
    return f"{path}: no such file"


def _not_regular(path: Path) -> str | None:
    """What ``path`` is when it exists and is neither a regular file nor a folder (a device, a FIFO, ...), else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    for test, what in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else "not a regular file"


def check_writable(path: str | os.PathLike, *, expected_bytes: float = 0, folder: bool = False) -> None:
    """Raise :class:`OutputError` (naming ``path``) if it cannot be written; cheap, done before any work.

    Checks: ``path`` is not a folder (or, with ``folder=True``, not a file) and not a device, named
    pipe or socket (the finished output replaces the target: ``-o /dev/null`` would replace the
    device); not a loop of symbolic links; a file name given as a string does not end in ``/``;
    no file sits where a parent folder must be; the nearest existing parent folder is writable
    and on a writable file system; at least ``expected_bytes`` are free there (a rough estimate
    of the output size).
    """
    raw = os.fspath(path)
    path = Path(path)
    if os.path.islink(path) and not path.exists() and "loop" in missing_message(path):
        msg = f"{path}: a loop of symbolic links; expected a {'folder' if folder else 'file'} name for the output"
        raise OutputError(msg)
    special = _not_regular(path)
    if special is not None:
        msg = (f"{path}: exists and is {special}, not a folder; expected a folder for the output (or a new name)"
               if folder else f"{path}: exists and is {special}, not a regular file; the finished output would "
                              "replace it: choose a file name")
        raise OutputError(msg)
    if folder:
        if path.exists() and not path.is_dir():
            msg = f"{path}: exists and is not a folder; expected a folder for the output (or a new name)"
            raise OutputError(msg)
    elif path.is_dir():
        msg = f"{path}: is a folder; expected a file name for the output, e.g. {path / 'out'}"
        raise OutputError(msg)
    elif isinstance(raw, str) and raw.endswith(("/", os.sep)):
        msg = f"{raw}: names a folder (it ends in /); expected a file name for the output, e.g. {path / 'out'}"
        raise OutputError(msg)
    anc = path if folder else path.parent
    anc = Path(os.path.abspath(anc))
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        msg = f"{path}: cannot write: {anc} is a file, but a folder is expected there"
        raise OutputError(msg)
    if not os.access(anc, os.W_OK | os.X_OK):
        ro = False
        with contextlib.suppress(OSError, AttributeError):
            ro = bool(os.statvfs(anc).f_flag & os.ST_RDONLY)
        msg = f"{path}: cannot write in {anc} ({'read-only file system' if ro else 'permission denied'})"
        raise OutputError(msg)
    if expected_bytes > 0:
        try:
            free = shutil.disk_usage(anc).free
        except OSError:
            return
        if free < expected_bytes:
            msg = (f"{path}: not enough free space in {anc}: the output needs about {_fmt_bytes(expected_bytes)}, "
                   f"{_fmt_bytes(free)} are free")
            raise OutputError(msg)


def check_not_input(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], *,
                    folder: bool = False, names: Iterable[str] = ()) -> None:
    """Raise :class:`OutputError` if writing ``output`` would replace one of ``inputs``.

    Compares resolved paths (symbolic links followed) and, for existing files, inodes (hard links).
    With ``folder=True`` ``output`` is a folder into which files matching the glob patterns
    ``names`` (e.g. ``"*.png"``) are written: an input inside it with such a name is refused too.
    """
    out = Path(output)
    out_r = out.resolve()
    names = tuple(names)
    for inp in inputs:
        if inp is None:
            continue
        inp = Path(inp)
        inp_r = inp.resolve()
        same = out_r == inp_r
        if not same and out.exists() and inp.exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(out, inp)
        if same:
            msg = f"{out}: the output would overwrite the input {inp}; choose another output name"
            raise OutputError(msg)
        if folder and inp_r.parent == out_r and any(fnmatch.fnmatch(inp_r.name, pat) for pat in names):
            msg = f"{out}: writing into this folder would overwrite the input {inp}; choose another folder"
            raise OutputError(msg)


# ----------------------------------------------------------------------------- atomic output
#: ``.NAME.PID@HOST.XXXXXXXX.part``: HOST as :func:`calopc.locking._host` writes it (letters, digits, ``.``, ``-``)
_PART_RE = re.compile(r"^\..+\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9.-]+)\.[A-Za-z0-9_]+\.part$")


def sweep_stale_parts(folder: str | os.PathLike) -> list[Path]:
    """Remove temporary ``.NAME.PID@HOST.XXXX.part`` files of dead calopc processes of this host in ``folder``.

    Returns the removed paths. Files of other hosts (shared file systems) and of live processes
    are left alone.
    """
    removed = []
    host = _host()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _PART_RE.match(e.name)
        if not m or m.group("host") != host:
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            if e.is_dir(follow_symlinks=False):  # a temporary run directory (calopc distill)
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
            removed.append(Path(e.path))
    removed += sweep_stale_locks(folder)
    return removed


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, expected_bytes: float = 0) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    Before anything is written, :func:`check_writable` runs (with the rough output size
    ``expected_bytes`` for the free-space check), ``path`` is locked for the block
    (:func:`calopc.locking.output_lock`: a second writer of the same output fails with one line
    naming the holder) and temporary files left by killed runs are removed
    (:func:`sweep_stale_parts`; the temporary name holds the process id and host).
    An interrupted or failed write leaves nothing under the final name and removes the
    temporary file; a file-system error (disk full, read-only, permission) becomes an
    :class:`OutputError` that names ``path``, not the temporary file.
    """
    check_writable(path, expected_bytes=expected_bytes)
    with lock_output(path), _atomic_output(path) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, open_writer: Callable[[Path], Any], *, expected_bytes: float = 0
                  ) -> Iterator[Any]:
    """A chunk writer of ``path`` under :func:`atomic_output`: ``open_writer(temporary path)`` gives an object
    with ``close()`` (the file is complete) and ``abort()`` (it is about to be removed).

    Ctrl-C and SIGTERM are deferred (:func:`deferred_interrupts`) to the writer's next
    :func:`check_interrupt` and to the end of the block; the temporary file is then removed.
    """
    with deferred_interrupts(), atomic_output(path, expected_bytes=expected_bytes) as tmp:
        w = open_writer(tmp)
        ok = False
        try:
            yield w
            ok = True
        finally:
            if ok:
                w.close()
            else:
                w.abort()
        check_interrupt()


@contextlib.contextmanager
def lock_output(path: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """:func:`calopc.locking.output_lock` of ``path``; file-system errors as one :class:`OutputError`."""
    stack = contextlib.ExitStack()
    try:
        lp = stack.enter_context(output_lock(path, what=what))
    except OSError as err:
        msg = f"{path}: cannot write ({_write_reason(err) or err.strerror or err})"
        raise OutputError(msg) from err
    with stack:
        yield lp


@contextlib.contextmanager
def _atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_parts(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}@{_host()}.", suffix=".part", dir=path.parent)
    except OSError as err:
        msg = f"{path}: cannot write ({_write_reason(err) or err.strerror or err})"
        raise OutputError(msg) from err
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        special = _not_regular(path)
        if special is not None:  # appeared while the output was written: never replace a device or a pipe
            msg = f"{path}: exists and is {special}, not a regular file; the output was not written"
            raise OutputError(msg)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        # safetensors (Rust) reports "... (os error 28)" in its own exception type
        if (isinstance(err, (OSError, RuntimeError)) or "(os error " in str(err)) and \
                not isinstance(err, FileNotFoundError):
            reason = _write_reason(err)
            if reason is None and _nearly_full(path.parent):  # torch.save: "file write failed", no errno
                reason = "no space left on device"
            if reason is not None:
                msg = f"{path}: cannot write ({reason}); the incomplete output was removed"
                raise OutputError(msg) from err
        raise


# ----------------------------------------------------------------------------- valid JSON
def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/±inf replaced by ``None`` and numpy scalars/arrays, tuples and paths made JSON types.

    ``json.dumps(json_safe(x), allow_nan=False)`` then always gives valid JSON (bare ``NaN`` is not JSON).
    """
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def json_dumps(obj: Any, **kw: Any) -> str:
    """``json.dumps`` of :func:`json_safe` ``(obj)``: valid JSON, NaN/inf written as ``null``."""
    import json

    return json.dumps(json_safe(obj), allow_nan=False, **kw)
