"""calopc.locking: one writer per output; stale locks of dead processes are taken over."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import calopc.locking as lk
from calopc.locking import OutputLocked, lock_path, output_lock, sweep_stale_locks


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_lock_is_reentrant_and_removed_at_the_end(tmp_path):
    target = tmp_path / "out.hdf5"
    with output_lock(target) as lp:
        assert lp == lock_path(target) and lp.exists()
        pid, host, desc = lk._read_holder(lp)
        assert pid == os.getpid() and f"PID {os.getpid()} on host" in desc
        with output_lock(target):  # nested writers of the same output in one process share the lock
            pass
        assert lp.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_lock_file_left_by_a_killed_writer_is_taken_over_and_swept(tmp_path):
    target = tmp_path / "out.hdf5"
    lock_path(target).write_text(f"{_dead_pid()} {lk._host()} {time.time():.0f}\n")  # kill -9 leaves it unlocked
    with output_lock(target):
        assert lk._read_holder(lock_path(target))[0] == os.getpid()
    lock_path(tmp_path / "other").write_text("123 somehost 0\n")
    assert sweep_stale_locks(tmp_path) == [lock_path(tmp_path / "other")]


def test_without_flock_the_pid_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(lk, "fcntl", None)  # a file system without flock: exclusive creation + process check
    target = tmp_path / "run"
    lock_path(target).write_text(f"{_dead_pid()} {lk._host()} {time.time():.0f}\n")
    with output_lock(target, what="run directory"):  # the holder is dead: taken over
        pass
    assert not lock_path(target).exists()
    lock_path(target).write_text(f"{os.getppid()} {lk._host()} {time.time():.0f}\n")  # a live process
    with pytest.raises(OutputLocked, match=rf"run: this run directory is being written by another calopc process "
                                           rf"\(PID {os.getppid()} on host"):
        with output_lock(target, what="run directory"):
            pass
    lock_path(target).write_text(f"{os.getppid()} otherhost {time.time():.0f}\n")  # another host: cannot tell
    with pytest.raises(OutputLocked, match="on host otherhost"):
        with output_lock(target):
            pass


# ============================================================================ flock path: races
def _after_first_open(monkeypatch, lp, action):
    """Patch ``os.open`` so that ``action(fd)`` runs right after the first open of ``lp`` (before its flock);
    returns the inodes of every descriptor opened on ``lp``."""
    real_open, opened = os.open, []

    def hooked(path, flags, *a):
        fd = real_open(path, flags, *a)
        if os.fspath(path) == str(lp):
            opened.append(os.fstat(fd).st_ino)
            if len(opened) == 1:
                action(real_open)
        return fd

    monkeypatch.setattr(os, "open", hooked)
    return opened


def test_a_lock_file_removed_between_open_and_flock_is_not_held(tmp_path, monkeypatch):
    """The previous holder unlinks its file just after we opened it: we lock the file now at the path, not the old one."""
    target = tmp_path / "out.hdf5"
    lp = lock_path(target)
    lp.write_text("")
    # the holder before us releases: it removes the file while we hold a descriptor of it
    opened = _after_first_open(monkeypatch, lp, lambda real_open: os.unlink(lp))
    with output_lock(target):
        assert len(opened) == 2 and lp.exists() and os.stat(lp).st_ino == opened[1]
        assert lk._read_holder(lp)[0] == os.getpid()
    assert not lp.exists()


def test_a_writer_that_locked_a_removed_file_does_not_share_the_lock(tmp_path, monkeypatch):
    """If a third writer locks the new file meanwhile, the second one is refused instead of holding the old inode."""
    import fcntl

    target = tmp_path / "out.hdf5"
    lp = lock_path(target)
    lp.write_text("")
    other = []

    def third_writer(real_open):  # removes the file, creates and locks a new one
        os.unlink(lp)
        o = real_open(lp, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(o, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(o, f"{os.getppid()} {lk._host()} {time.time():.0f}\n".encode())
        other.append(o)

    _after_first_open(monkeypatch, lp, third_writer)
    try:
        with pytest.raises(OutputLocked, match=rf"PID {os.getppid()} on host"):
            with output_lock(target):
                pass
    finally:
        for o in other:
            os.close(o)


_CONTEND = r"""
import os, sys, time
from calopc.locking import OutputLocked, output_lock
target, marker, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
got = 0
deadline = time.monotonic() + 60
while got < n and time.monotonic() < deadline:
    try:
        with output_lock(target):
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if another holder is inside
            os.close(fd)
            os.unlink(marker)
            got += 1
    except OutputLocked:
        pass
print(got)
"""


def test_flock_contention_never_gives_the_lock_to_two_writers(tmp_path):
    """Four processes take and release one output's lock in a loop; the critical section is never entered twice."""
    target, marker = tmp_path / "out.hdf5", tmp_path / "inside"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(lk.Path(lk.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", _CONTEND, str(target), str(marker), "100"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert int(out) == 100
    assert not lock_path(target).exists() and not marker.exists()


def test_a_recent_record_of_another_host_warns(tmp_path):
    """Node-local flock (NFS local_lock, Lustre localflock) excludes nothing across hosts: a recent foreign record warns."""
    target = tmp_path / "out.hdf5"
    lock_path(target).write_text(f"4242 othernode7 {time.time():.0f}\n")
    with pytest.warns(UserWarning, match=r"out.hdf5: the previous writer of this output ran on another host "
                                         r"\(PID 4242 on host othernode7"):
        with output_lock(target):
            pass
    lock_path(target).write_text(f"4242 othernode7 {time.time() - 2 * lk.OTHER_HOST_RECENT_S:.0f}\n")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with output_lock(target):  # an old record: a lost node, taken over silently
            pass


# ============================================================================ fallback without flock
@pytest.fixture
def no_flock(monkeypatch):
    monkeypatch.setattr(lk, "fcntl", None)


def test_without_flock_a_takeover_race_leaves_one_holder(tmp_path, monkeypatch, no_flock):
    """B judges a dead writer's lock stale, A takes it over first: B must not remove A's fresh lock."""
    target = tmp_path / "run"
    lp = lock_path(target)
    lp.write_text(f"{_dead_pid()} {lk._host()} {time.time():.0f}\n")
    real_snapshot, fds = lk._snapshot, []

    def snapshot_then_a_takes_over(path):
        snap = real_snapshot(path)
        if not fds and snap is not None and path == lp:
            monkeypatch.setattr(lk, "_snapshot", real_snapshot)
            fds.append(lk._acquire_exclusive(lp, target, "run directory"))  # A, between B's read and B's takeover
        return snap

    monkeypatch.setattr(lk, "_snapshot", snapshot_then_a_takes_over)
    try:
        with pytest.raises(OutputLocked, match=rf"PID {os.getpid()} on host"):
            lk._acquire_exclusive(lp, target, "run directory")  # B
        assert os.stat(lp).st_ino == os.fstat(fds[0]).st_ino  # A's file is in place, A still holds the lock
        assert lk._read_holder(lp)[0] == os.getpid()
        assert sorted(p.name for p in tmp_path.iterdir()) == [lp.name]  # nothing renamed aside is left
    finally:
        for fd in fds:
            os.close(fd)


def test_without_flock_an_empty_lock_is_stale_only_when_old(tmp_path, no_flock):
    """A writer killed between creating and recording its lock leaves an empty file: taken over after a grace period."""
    target = tmp_path / "out"
    lp = lock_path(target)
    lp.write_text("")
    with pytest.raises(OutputLocked, match="another process that is creating it"):
        with output_lock(target):
            pass
    old = time.time() - 2 * lk.EMPTY_GRACE_S
    os.utime(lp, (old, old))
    with output_lock(target):
        assert lk._read_holder(lp)[0] == os.getpid()
    assert not lp.exists()


def test_without_flock_a_process_id_of_an_earlier_boot_is_stale(tmp_path, no_flock):
    """A live process id recorded before the last boot is another process: the lock is taken over."""
    if lk._boot_time() is None:
        pytest.skip("boot time unknown on this system")
    target = tmp_path / "out"
    lock_path(target).write_text(f"{os.getppid()} {lk._host()} {lk._boot_time() - 3600:.0f}\n")
    with output_lock(target):
        assert lk._read_holder(lock_path(target))[0] == os.getpid()
