r"""One writer per output: a lock held for the writer's lifetime.

Every output calopc writes (a file through :func:`calopc._safety.atomic_output`, a run directory of
``calopc train`` or ``calopc distill``, a report folder) is locked by :func:`output_lock` first.
The lock is a small file beside the output, ``.NAME.calopc.lock``, that holds the writer's
process id, host and start time, with an advisory ``flock`` on it:

* a second writer of the same output fails at once with one line naming the holder
  (:class:`OutputLocked`: "PID 1234 on host node7 since 22:50:03 UTC");
* a lock of a process that died (``kill -9``, a crash, a lost node) is not held any more:
  the next writer takes it over, and :func:`sweep_stale_locks` removes such files;
* file systems without ``flock`` fall back to an exclusively created file whose process id is
  checked for life (same host) before it is taken over.

The lock is re-entrant within one process (nested writers of the same output share it) and is
released and removed when the block ends, also on errors and interrupts.
"""

from __future__ import annotations

__all__ = ["OutputLocked", "lock_path", "output_lock", "sweep_stale_locks"]

import contextlib
import errno
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

SUFFIX = ".calopc.lock"
_held: dict[str, list] = {}  # absolute lock path -> [fd, depth]


class OutputLocked(ValueError):
    """Another live process writes the same output; one line to report."""


def _host() -> str:
    """This host's name as lock records and temporary file names carry it: letters, digits, ``.`` and ``-`` (64 at most)."""
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64] or "host"


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of ``target``: ``.NAME.calopc.lock`` in the same folder."""
    t = Path(os.path.abspath(target))
    return t.parent / f".{t.name}{SUFFIX}"


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _read_holder(path: Path) -> tuple[int | None, str | None, str]:
    """(pid, host, description) of the holder recorded in the lock file."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        text = ""
    m = re.match(r"^(\d+) (\S+) (\d+(?:\.\d*)?)", text)
    if not m:
        return None, None, "another process"
    pid, host, since = int(m.group(1)), m.group(2), float(m.group(3))
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since))
    return pid, host, f"PID {pid} on host {host} since {when}"


def _locked_error(target: Path, what: str, holder: str, lp: Path) -> OutputLocked:
    msg = (f"{target}: this {what} is being written by another calopc process ({holder}); wait for it to finish "
           f"or choose another {what} (lock file {lp.name})")
    return OutputLocked(msg)


def _record(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()} {_host()} {time.time():.0f}\n".encode())


def _acquire_flock(lp: Path, target: Path, what: str) -> int | None:
    """The locked file descriptor, or None when the file system does not support flock."""
    for _ in range(50):
        fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _locked_error(target, what, _read_holder(lp)[2], lp) from None
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return None
            raise
        # the holder before us may have removed the file after we opened it: lock the file that is there
        try:
            same = os.stat(lp).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            _record(fd)
            return fd
        os.close(fd)
    msg = f"{target}: could not lock the {what} ({lp}): it changes all the time"
    raise OutputLocked(msg)


def _acquire_exclusive(lp: Path, target: Path, what: str) -> int:
    """Fallback without flock: create the lock file exclusively; take over the file of a dead process."""
    for _ in range(50):
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pid, host, desc = _read_holder(lp)
            if pid is not None and host == _host() and not _pid_alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lp)
                continue
            raise _locked_error(target, what, desc, lp) from None
        _record(fd)
        return fd
    msg = f"{target}: could not lock the {what} ({lp})"
    raise OutputLocked(msg)


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, *, what: str = "output") -> Iterator[Path]:
    """Hold the lock of ``target`` (a file or a folder) for the block; yields the lock file's path.

    Raises:
        OutputLocked: another live process holds it (the message names its PID, host and start).
    """
    target = Path(target)
    lp = lock_path(target)
    key = str(lp)
    if key in _held:
        _held[key][1] += 1
        try:
            yield lp
        finally:
            _held[key][1] -= 1
        return
    lp.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire_flock(lp, target, what) if fcntl is not None else None
    flocked = fd is not None
    if fd is None:
        fd = _acquire_exclusive(lp, target, what)
    _held[key] = [fd, 1]
    try:
        yield lp
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            if os.stat(lp).st_ino == os.fstat(fd).st_ino:
                os.unlink(lp)  # while still holding it: a waiting writer then sees a new file
        with contextlib.suppress(OSError):
            if flocked:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def sweep_stale_locks(folder: str | os.PathLike) -> list[Path]:
    """Remove the lock files in ``folder`` that no live process holds (left by killed writers)."""
    removed: list[Path] = []
    if fcntl is None:
        return removed
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(".") and e.name.endswith(SUFFIX)]
    except OSError:
        return removed
    for e in entries:
        if os.path.abspath(e.path) in _held:
            continue
        try:
            fd = os.open(e.path, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        with contextlib.suppress(OSError):
            if os.stat(e.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(e.path)
                removed.append(Path(e.path))
        os.close(fd)
    return removed
