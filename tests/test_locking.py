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
