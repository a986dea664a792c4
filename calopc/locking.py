r"""One writer per output: a lock held for the writer's lifetime.

Every output calopc writes (a file through :func:`calopc._safety.atomic_output`, a run directory of
``calopc train`` or ``calopc distill``, a report folder) is locked by :func:`output_lock` first.
The lock is a small file beside the output, ``.NAME.calopc.lock``, that holds the writer's
process id, host and start time, with an advisory ``flock`` on it:

* a second writer of the same output fails at once with one line naming the holder
  (:class:`OutputLocked`: "PID 1234 on host node7 since 22:50:03 UTC");
* a lock of a process that died (``kill -9``, a crash, a lost node) is not held any more:
  the next writer takes it over, and :func:`sweep_stale_locks` removes such files;
* file systems without ``flock`` fall back to an exclusively created file. A writer takes over
  such a file only when its holder is provably gone: a process of this host that no longer
  exists or started before the last boot, or an empty file (a writer killed between creating
  and recording it) older than :data:`EMPTY_GRACE_S`. The takeover is atomic: the stale file is
  renamed to a unique name and checked to be the one judged stale before it is removed, so two
  writers never both hold the lock. A holder on another host cannot be checked: refused.

``flock`` on some cluster file systems is local to a node (NFS mounted with ``local_lock=flock``
or ``nolock``, Lustre with ``-o localflock``): it then excludes nothing across nodes. A writer
that takes a lock whose previous record names another host and is younger than
:data:`OTHER_HOST_RECENT_S` warns, because that writer may still be running.

The lock is re-entrant within one process (nested writers of the same output share it) and is
released and removed when the block ends, also on errors and interrupts.
"""

from __future__ import annotations

__all__ = ["EMPTY_GRACE_S", "OTHER_HOST_RECENT_S", "OutputLocked", "lock_path", "output_lock", "sweep_stale_locks"]

import contextlib
import errno
import os
import re
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

SUFFIX = ".calopc.lock"
_held: dict[str, list] = {}  # absolute lock path -> [fd, depth]

#: Seconds after which an empty lock file (its writer died between creating and recording it) is stale.
EMPTY_GRACE_S = 60.0
#: A previous holder on another host recorded less than this many seconds ago may still be running (warned).
OTHER_HOST_RECENT_S = 24 * 3600.0


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


def _parse(text: str) -> tuple[int | None, str | None, float | None, str]:
    """(pid, host, start time, description) of a lock record ``"PID HOST TIME"``; Nones when it is not one."""
    m = re.match(r"^(\d+) (\S+) (\d+(?:\.\d*)?)", text.strip())
    if not m:
        return None, None, None, "another process"
    pid, host, since = int(m.group(1)), m.group(2), float(m.group(3))
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since))
    return pid, host, since, f"PID {pid} on host {host} since {when}"


def _read_holder(path: Path) -> tuple[int | None, str | None, str]:
    """(pid, host, description) of the holder recorded in the lock file."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        text = ""
    pid, host, _, desc = _parse(text)
    return pid, host, desc


def _snapshot(path: Path) -> tuple[tuple[int, int, int, int], str] | None:
    """The identity (device, inode, size, mtime in ns) and text of the file at ``path``, read through one descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        text = os.read(fd, 4096).decode(errors="replace")
    finally:
        os.close(fd)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), text


def _boot_time() -> float | None:
    """When this host booted (seconds since the epoch), or None where unknown."""
    try:
        with open("/proc/stat") as fh:
            for line in fh:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _stale(ident: tuple[int, int, int, int], text: str) -> bool:
    """Whether the lock file (identity, text) was left by a writer that is gone (see the module rule)."""
    pid, host, since, _ = _parse(text)
    if pid is None:  # empty or unreadable: a writer killed between creating and recording it, once old enough
        return time.time() - ident[3] / 1e9 > EMPTY_GRACE_S
    if host != _host():
        return False
    boot = _boot_time()
    if boot is not None and since is not None and since < boot - 1:  # a process id of an earlier boot
        return True
    return not _pid_alive(pid)


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
            _warn_other_host(fd, target, what)
            _record(fd)
            return fd
        os.close(fd)
    msg = f"{target}: could not lock the {what} ({lp}): it changes all the time"
    raise OutputLocked(msg)


def _warn_other_host(fd: int, target: Path, what: str) -> None:
    """Warn when the record we are about to replace names another host and is recent (see the module rule)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 4096).decode(errors="replace")
    except OSError:
        return
    pid, host, since, desc = _parse(text)
    if pid is None or host == _host() or since is None or time.time() - since > OTHER_HOST_RECENT_S:
        return
    warnings.warn(f"{target}: the previous writer of this {what} ran on another host ({desc}); if it still runs, "
                  "this file system's locks do not reach across hosts (NFS local_lock, Lustre localflock) and both "
                  "write at once: make sure it has stopped", stacklevel=4)


def _take_over(lp: Path, ident: tuple[int, int, int, int], text: str) -> bool:
    """Remove the stale lock file (identity, text) atomically; False when another writer got there first.

    The file is renamed to a unique name first; only if the renamed file is the one judged stale
    (same identity and text) is it removed. Otherwise a live writer's fresh lock was moved: it is
    put back (``link``, which never replaces a file), or, if a third writer has created one in the
    meantime, the takeover is refused.
    """
    aside = lp.with_name(f"{lp.name}.{os.getpid()}.{time.monotonic_ns()}.stale")
    try:
        os.rename(lp, aside)
    except FileNotFoundError:
        return False
    moved = _snapshot(aside)
    if moved is not None and moved == (ident, text):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)
        return True
    try:
        os.link(aside, lp)
    except FileExistsError:
        msg = f"{lp}: several writers are taking over this lock at once; try again"
        raise OutputLocked(msg) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)
    return False


def _acquire_exclusive(lp: Path, target: Path, what: str) -> int:
    """Fallback without flock: create the lock file exclusively; take over the file of a writer that is gone."""
    for _ in range(50):
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            snap = _snapshot(lp)
            if snap is None:  # removed meanwhile: try again
                continue
            ident, text = snap
            if _stale(ident, text):
                _take_over(lp, ident, text)
                continue
            desc = _parse(text)[3]
            if desc == "another process":
                desc = "another process that is creating it"
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
