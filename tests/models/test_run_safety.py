"""Run directories and generation that physicists can trust: locks, typed options, the training energy range,
full disks during checkpoints, interrupts that are honoured at once and say what they kept, resumed runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from calopc.cli import main
from calopc.io import Interrupted, OutputError, deferred_interrupts
from calopc.locking import OutputLocked, lock_path
from calopc.models import MODELS
from calopc.models.checkpoint import load, load_training_state
from calopc.models.guards import add_interrupt_checks, count_over_incident, typed_options
from calopc.models.train import TrainConfig, train

from .conftest import TINY

CFG = TrainConfig(steps=4, batch_size=8, warmup=1, log_every=1, checkpoint_every=2, device="cpu", progress=False,
                  ema_decay=0.0)
_CHILD = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
          "from calopc.cli import main; sys.exit(main())")


def _one_line(err: str, cmd: str) -> str:
    lines = [x for x in err.strip().splitlines() if x]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"calopc {cmd}: ") and "Traceback" not in err
    return lines[0]


@dataclass(frozen=True)
class ToyConfig:
    features: int = 3
    interrupt_at: int = 0      # KeyboardInterrupt at this call (0: never)
    crash_at: int = 0          # RuntimeError at this call (0: never): a crash that writes no checkpoint

    @classmethod
    def from_dict(cls, d: dict) -> ToyConfig:
        return cls(**d)

    def preprocessing(self) -> dict:
        return {"variant": "II"}

    def with_data(self, prep) -> ToyConfig:
        return replace(self, features=prep.n_point_features)


class Toy(nn.Module):
    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.a = nn.Parameter(torch.zeros(config.features))
        self.calls = 0

    def forward(self, batch) -> torch.Tensor:
        self.calls += 1
        if self.config.interrupt_at and self.calls == self.config.interrupt_at:
            raise KeyboardInterrupt
        if self.config.crash_at and self.calls == self.config.crash_at:
            raise RuntimeError("crash")
        return ((batch.x[batch.mask] - self.a) ** 2).mean()


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(MODELS, "toy", (__name__, "Toy", "ToyConfig"))


class _Holder:
    """Another process that holds the lock of an output."""

    def __init__(self, target: Path) -> None:
        code = ("import sys, time; from calopc.locking import output_lock\n"
                "with output_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)")
        self.p = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "held"

    def kill(self) -> None:
        self.p.kill()
        self.p.wait(timeout=30)


# ============================================================================ locks
def test_a_second_training_into_one_run_directory_is_refused(toy, toy_parquet, tmp_path, capsys):
    run = tmp_path / "race"
    holder = _Holder(run)
    try:
        with pytest.raises(OutputLocked, match=rf"race: this run directory is being written by another calopc "
                                               rf"process \(PID {holder.p.pid} on host \S+ since "):
            train("toy", toy_parquet, run, config=CFG)
        assert not run.exists()  # nothing was written
        argv = ["train", "calopointflow", "--data", str(toy_parquet), "-o", str(run), "--device", "cpu"]
        assert main(argv) == 2
        assert f"PID {holder.p.pid}" in _one_line(capsys.readouterr().err, "train")
    finally:
        holder.kill()
    # the holder died (kill -9): its lock is stale and taken over; the lock file goes when the run ends
    assert lock_path(run).exists()
    train("toy", toy_parquet, run, config=CFG)
    assert load_training_state(run)["step"] == 4 and not lock_path(run).exists()


def test_every_file_output_is_locked(tmp_path, capsys):
    out = tmp_path / "s.hdf5"
    holder = _Holder(out)
    try:
        assert main(["synth", str(out), "-n", "3", "--no-progress"]) == 2
        line = _one_line(capsys.readouterr().err, "synth")
        assert f"s.hdf5: this output is being written by another calopc process (PID {holder.p.pid}" in line
        assert not out.exists()
    finally:
        holder.kill()
    assert main(["synth", str(out), "-n", "3", "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.hdf5"]  # stale lock swept


# ============================================================================ --set types
@pytest.mark.parametrize(("item", "match"), [
    ("train.steps=2.5", "train.steps=2.5: expected an integer (train.steps is an integer)"),
    ("train.amp=no", "train.amp=no: expected true or false (train.amp is true or false); write true or false"),
    ("train.amp=1", "train.amp=1: expected true or false"),
    ("train.lr=abc", "train.lr=abc: expected a number"),
    ("model.latent=abc", "model.latent=abc: expected an integer >= 0"),
    ("model.point_hidden=[-5,3]", "model.point_hidden=[-5,3]: expected a list of integers (each >= 1)"),
    ("model.kl_weight=" + "x" * 100_000, "model.kl_weight=xxxxxxxxxx"),
])
def test_set_values_are_checked_against_the_field_types_before_any_work(tmp_path, capsys, item, match):
    # the data file does not exist: the option error comes first, before anything is read or written
    argv = ["train", "calopointflow", "--data", str(tmp_path / "nope.parquet"), "-o", str(tmp_path / "r"), "--set", item]
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err, "train")
    assert match in line and len(line) < 300, line
    assert not (tmp_path / "r").exists()


def test_set_values_convert_to_the_field_types(toy_parquet, capsys):
    import json

    argv = ["train", "calopointflow", "--data", str(toy_parquet), "-o", "r", "--dry-run", "--set", "train.steps=1e2",
            "--set", "train.amp=true", "--set", "model.point_hidden=[8,8]", "--set", "train.time_limit=60",
            "--set", "model.alpha=free"]
    assert main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["train"]["steps"] == 100 and isinstance(d["train"]["steps"], int) and d["train"]["amp"] is True
    assert d["model_config"]["point_hidden"] == [8, 8] and d["train"]["time_limit"] == 60.0


def test_typed_options_direct():
    assert typed_options(TrainConfig, {"steps": 3.0, "lr": 1, "max_showers": None}, section="train") == \
        {"steps": 3, "lr": 1.0, "max_showers": None}
    with pytest.raises(ValueError, match=r"train.max_showers=x: expected an integer or null"):
        typed_options(TrainConfig, {"max_showers": "x"}, section="train")


@pytest.mark.parametrize("argv", [["--time-limit", "-5"], ["--max-showers", "-5"], ["--steps", "0"],
                                  ["--lr", "nan"], ["--ema-decay", "2"]])
def test_numeric_train_flags_are_range_checked(toy_parquet, capsys, argv):
    with pytest.raises(SystemExit) as err:
        main(["train", "calopointflow", "--data", str(toy_parquet), "-o", "r", *argv])
    assert err.value.code == 2 and "expected" in capsys.readouterr().err


def test_time_limit_option_is_validated_in_the_library():
    with pytest.raises(ValueError, match="time_limit=-5"):
        TrainConfig(time_limit=-5).validate()


# ============================================================================ training energy range
def test_generate_warns_outside_the_training_range_and_strict_refuses(toy_run, tmp_path, capsys):
    lo, hi = load(toy_run).meta["train"]["incident_energy_range"]
    assert 1e3 <= lo < hi <= 1e5  # the toy data: log-uniform 1e3-1e5 MeV
    out = tmp_path / "g.hdf5"
    argv = ["generate", str(toy_run), "--energies", "1e9,2e3", "-o", str(out), "--no-progress", "--device", "cpu"]
    assert main([*argv, "--strict"]) == 2
    line = _one_line(capsys.readouterr().err, "generate")
    assert "1 of 2 incident energies lie outside the training range" in line and "--strict" in line
    assert not out.exists()
    assert main([*argv, "--threshold", "0"]) == 0
    err = capsys.readouterr().err
    assert "calopc generate: warning: --energies: 1 of 2 incident energies lie outside the training range" in err
    # inside the range (with the margin for the sample's extremes): no warning
    assert main(["generate", str(toy_run), "--energies", f"{lo},{hi}", "--no-progress", "--device", "cpu"]) == 0
    assert "outside the training range" not in capsys.readouterr().err


def test_showers_above_their_incident_energy_are_counted(toy_run, tmp_path):
    from calopc.models.generate import generate

    out = tmp_path / "o.hdf5"
    e = np.array([1e3, 2e3, 5e3, 1e4] * 4)
    res = generate(toy_run, e, output=out, threshold=0.0, device="cpu", seed=3)
    with h5py.File(out) as f:
        dep = f["showers"][:].astype(np.float64).sum(axis=1)
    assert res.collisions["n_over_incident"] == int((dep > e * (1 + 1e-6)).sum())
    counts = torch.tensor([2, 0, 1])
    energy = torch.tensor([0.7, 0.5, 3.0], dtype=torch.float32)
    assert int(count_over_incident(counts, energy, np.array([1.0, 1.0, 2.0]))) == 2


# ============================================================================ full disk during a checkpoint
def test_full_disk_during_a_checkpoint_keeps_the_last_good_one(toy, toy_parquet, tmp_path, monkeypatch, capsys):
    import calopc.models.checkpoint as ckpt

    run = tmp_path / "run"
    real = ckpt.save_file
    calls = {"n": 0}

    class SafetensorError(Exception):  # what safetensors raises (a Rust I/O error)
        pass

    def full(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] >= 2:  # the second checkpoint
            Path(path).write_bytes(b"partial")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(OutputError) as err:
        train("toy", toy_parquet, run, config=replace(CFG, steps=6))
    msg = str(err.value)
    assert "checkpoint of step 4:" in msg and "no space left on device" in msg
    assert f"the last good checkpoint (step 2) is kept in {run}" in msg
    assert load_training_state(run)["step"] == 2  # whole: weights, state and config of step 2
    assert load(run, ema=False).meta["train"]["steps"] == 6
    assert not list(run.glob(".*.part"))


def test_too_little_space_for_a_checkpoint_is_refused_before_training(toy, toy_parquet, tmp_path, monkeypatch):
    import collections

    import calopc._safety as safety

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(safety.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 100, 100))
    with pytest.raises(OutputError, match=r"run: not enough free space .* 100 B are free"):
        train("toy", toy_parquet, tmp_path / "run", config=CFG)
    assert not (tmp_path / "run").exists()


# ============================================================================ interrupts
def test_interrupt_before_the_first_step_leaves_no_half_run_directory(toy, toy_parquet, tmp_path):
    run = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt) as err:
        train("toy", toy_parquet, run, model_config={"interrupt_at": 1}, config=CFG)
    assert str(err.value) == ""  # the command line says "no output was written", and that is true
    assert not run.exists()
    train("toy", toy_parquet, run, config=CFG)  # the same command again works (no --resume/--overwrite loop)
    assert load_training_state(run)["step"] == 4


def test_resuming_after_a_crash_keeps_one_record_per_step(toy, toy_parquet, tmp_path):
    """Records written after the last checkpoint (and a line cut short by the crash) are dropped on resume."""
    import json

    run = tmp_path / "run"
    cfg = replace(CFG, steps=20, checkpoint_every=10, log_every=5)
    with pytest.raises(RuntimeError, match="crash"):
        train("toy", toy_parquet, run, model_config={"crash_at": 17}, config=cfg)
    stats = run / "stats.jsonl"
    with open(stats, "a") as f:
        f.write('{"step": 16, "lo')                         # a record torn by a kill
    assert load_training_state(run)["step"] == 10
    train("toy", toy_parquet, run, config=cfg, resume=True)
    assert [json.loads(x)["step"] for x in stats.read_text().splitlines()] == [5, 10, 15, 20]


def test_resuming_a_finished_run_says_there_is_nothing_to_do(toy_run, toy_parquet, tmp_path, capsys):
    import shutil

    run = tmp_path / "done"
    shutil.copytree(toy_run, run)
    argv = ["train", "calopointflow", "--data", str(toy_parquet), "-o", str(run), "--resume", "--steps", "4",
            "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "already holds 4 steps" in out and "nothing to do" in out and "nan" not in out


def test_deferred_interrupt_stops_inside_a_model_call():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    handles = add_interrupt_checks(model)
    with pytest.raises(Interrupted) as err, deferred_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        model(torch.zeros(2, 3))  # the first module call raises: no waiting for the end of a batch
        pytest.fail("the model call did not stop")
    assert err.value.signum == signal.SIGTERM
    for h in handles:
        h.remove()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads a process's CPU time from /proc")
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_generate_honours_a_signal_within_seconds(toy_run, tmp_path, sig, code):
    """A signal inside one big sampling batch stops generation within a model call: the child spends a few CPU
    seconds after the signal, not the minutes the batch needs (CPU time, so a loaded machine does not matter)."""
    import resource

    out = tmp_path / "g.hdf5"
    argv = ["generate", str(toy_run), "-n", "200000", "--batch-size", "200000", "--energies", "log-uniform:2e3:5e4",
            "-o", str(out), "--device", "cpu", "--no-progress"]
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.Popen([sys.executable, "-c", _CHILD, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    t = time.time()
    while not list(tmp_path.glob(".g.hdf5.*.part")) and p.poll() is None and time.time() - t < 300:
        time.sleep(0.02)
    cpu0 = _cpu_seconds(p.pid)
    while p.poll() is None and _cpu_seconds(p.pid) - cpu0 < 1.0:   # one CPU second inside the sampling batch
        time.sleep(0.02)
    assert p.poll() is None, p.communicate()
    at_signal = _cpu_seconds(p.pid)
    p.send_signal(sig)
    try:
        _, err = p.communicate(timeout=300)        # a deadline, not the measurement
    finally:
        p.kill()
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    assert p.returncode == code, err
    assert "interrupted" in _one_line(err, "generate") and "no output was written" in err
    # typically 1-3 CPU s after the signal; the whole batch of 200000 showers takes minutes of CPU
    assert total - at_signal < 15, (total, at_signal)
    assert sorted(tmp_path.iterdir()) == []


# ============================================================================ inputs: --energies, train's advice
def test_generate_energies_from_a_parquet_file_without_metadata(toy_run, toy_parquet, tmp_path, capsys):
    import pyarrow.parquet as pq

    bare = tmp_path / "nometa.parquet"
    pq.write_table(pq.read_table(toy_parquet).replace_schema_metadata(None), bare)
    assert main(["generate", str(toy_run), "--energies", str(bare), "-n", "3", "--dry-run"]) == 0
    assert '"n": 3' in capsys.readouterr().out
    # train cannot take such a file, and says what to do without naming a flag it lacks
    argv = ["train", "calopointflow", "--data", str(bare), "-o", str(tmp_path / "r"), "--device", "cpu"]
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err, "train")
    assert "no calopc geometry metadata" in line and "--geometry" not in line and "calopc convert" in line
    assert not (tmp_path / "r").exists()


def test_infinite_energy_range_is_refused_before_any_work(toy_run, capsys):
    assert main(["generate", str(toy_run), "-n", "3", "--energies", "log-uniform:1e3:inf", "--dry-run"]) == 2
    assert "need 0 < LO <= HI < inf" in _one_line(capsys.readouterr().err, "generate")


# ============================================================================ distill
@pytest.fixture(scope="module")
def cc_teacher(tmp_path_factory, toy_parquet):
    from .test_caloclouds import TINY_CC

    out = tmp_path_factory.mktemp("cc") / "teacher"
    train("caloclouds", toy_parquet, out, model_config=TINY_CC,
          config=TrainConfig(steps=2, batch_size=8, warmup=1, device="cpu", progress=False))
    return out


def _distill_cfg(**kw):
    from calopc.models.distill import DistillConfig

    return DistillConfig(**{"steps": 6, "batch_size": 8, "device": "cpu", "progress": False, "log_every": 1, **kw})


def test_interrupted_distill_says_what_it_wrote(cc_teacher, tmp_path, monkeypatch):
    import calopc.models.diffusion as diff
    from calopc.models.distill import distill

    real, calls = diff.consistency_loss, {"n": 0}

    def stop_at_3(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Interrupted(signal.SIGTERM)
        return real(*a, **kw)

    monkeypatch.setattr(diff, "consistency_loss", stop_at_3)
    out = tmp_path / "cm"
    with pytest.raises(Interrupted) as err:
        distill(cc_teacher, out, config=_distill_cfg())
    assert err.value.signum == signal.SIGTERM and str(err.value) == f"the student of step 2 was written to {out}"
    assert load(out).meta["train"]["steps"] == 2
    # the student carries the teacher's training energy range: generate checks it too
    assert load(out).meta["train"]["incident_energy_range"] == load(cc_teacher).meta["train"]["incident_energy_range"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm"]  # no temporary folder, no lock left


def test_full_disk_in_distill_names_the_output(cc_teacher, tmp_path, monkeypatch):
    import calopc.models.checkpoint as ckpt
    from calopc.models.distill import distill

    def full(tensors, path, metadata=None):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", full)
    out = tmp_path / "cm"
    with pytest.raises(OutputError) as err:
        distill(cc_teacher, out, config=_distill_cfg(steps=1))
    assert str(err.value).startswith(f"{out}/model.safetensors: cannot write (no space left on device)")
    assert ".part" not in str(err.value) and list(tmp_path.iterdir()) == []


def test_distill_temporary_folders_of_killed_runs_are_swept(cc_teacher, tmp_path):
    from calopc.io import _host
    from calopc.models.distill import distill

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    stale = tmp_path / f".cm.{dead}@{_host()}.x1y2.part"
    (stale / "sub").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    distill(cc_teacher, tmp_path / "cm", config=_distill_cfg(steps=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm"]


def test_distill_into_a_read_only_folder_names_the_output(tmp_path):
    from calopc.models.distill import distill

    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    mounted = False
    if os.access(ro, os.W_OK):  # root: permissions are not enforced; a read-only tmpfs instead
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], capture_output=True)
        if r.returncode:
            pytest.skip("root without mount: cannot make a read-only folder")
        mounted = True
    try:
        with pytest.raises(OutputError, match=rf"{ro}/cm: cannot write in {ro} \((permission denied|read-only file system)\)"):
            distill(tmp_path / "teacher", ro / "cm")
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(ro)], check=False)


# ============================================================================ training inputs
def test_the_same_training_file_twice_is_refused(toy_parquet, tmp_path, capsys):
    link = tmp_path / "same.parquet"
    link.symlink_to(toy_parquet)
    assert main(["train", "calopointflow", "--data", str(toy_parquet), str(link), "-o", str(tmp_path / "r")]) == 2
    assert "given twice" in _one_line(capsys.readouterr().err, "train")


def test_a_corrupt_training_file_is_named(toy, toy_parquet, tmp_path):
    import pyarrow.parquet as pq

    bad = tmp_path / "zeroed.parquet"
    data = bytearray(toy_parquet.read_bytes())
    meta = pq.ParquetFile(toy_parquet).metadata
    col = meta.row_group(0).column(1)  # a data page of the points: overwrite it, keep the footer
    start = col.data_page_offset
    data[start + 20:start + 20 + min(200, col.total_compressed_size - 40)] = b"\0" * min(200, col.total_compressed_size - 40)
    bad.write_bytes(bytes(data))
    with pytest.raises(Exception, match=r"zeroed.parquet") as err:
        train("toy", bad, tmp_path / "r", config=CFG)
    assert "internal" not in str(err.value)


# ============================================================================ progress outside a terminal
def test_train_and_generate_log_progress_lines_outside_a_terminal(toy, toy_parquet, toy_run, tmp_path, monkeypatch,
                                                                 capsys):
    from calopc.models.generate import generate

    monkeypatch.setenv("CALOPC_LOG_INTERVAL", "0.01")
    train("toy", toy_parquet, tmp_path / "r", config=replace(CFG, progress=True, steps=6))
    err = capsys.readouterr().err  # not a terminal under pytest: plain lines, no bar
    lines = [x for x in err.splitlines() if x.startswith("calopc train toy: step ")]
    assert lines and "\r" not in err
    assert lines[-1].startswith("calopc train toy: step 6/6 (100.0%), loss ") and "showers/s" in lines[-1]
    generate(toy_run, np.full(64, 5e3), batch_size=8, device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "calopc generate: shower 64/64 (100.0%)" in err
