"""Reports are built beside their folder and swapped in whole: an interrupted or failed run changes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from calopc.cli import main
from calopc.eval import staging
from calopc.eval.report import stale_plots
from calopc.eval.staging import staged_folder
from calopc.io import Interrupted, OutputError, write_showers
from calopc.synth import generate


def _tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (the lock and temporary files of calopc excluded)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _old_report(folder: Path) -> None:
    """A finished report (its index lists two figures) with the user's files beside it."""
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"plots": {"a": ["a.png"], "old": ["old.png"]}}))
    for name in ("report.html", "a.png", "old.png", "E_ratio.png", "notes.txt", "gen.hdf5"):
        (folder / name).write_text(f"old {name}")
    (folder / "sub").mkdir()
    (folder / "sub" / "data.txt").write_text("mine")


def _new_report(work: Path) -> None:
    (work / "metrics.json").write_text(json.dumps({"plots": {"a": ["a.png"], "b": ["b.png"]}}))
    for name in ("report.html", "a.png", "b.png"):
        (work / name).write_text(f"new {name}")


def _parts(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.endswith(".part")]


def test_a_new_folder_appears_whole_with_the_usual_permissions(tmp_path):
    out = tmp_path / "deep" / "rep"
    with staged_folder(out) as work:
        assert work.parent == out.parent and work.name.startswith(".rep.") and not out.exists()
        _new_report(work)
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "metrics.json", "report.html"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask and _parts(out.parent) == []


def test_the_new_report_replaces_the_old_one_and_user_files_stay(tmp_path):
    out = tmp_path / "rep"
    _old_report(out)
    with staged_folder(out, stale=stale_plots) as work:
        _new_report(work)
    tree = {k: v for k, v in ((k, (out / k).read_text()) for k in _tree(out))}
    assert tree == {"a.png": "new a.png", "b.png": "new b.png", "metrics.json": tree["metrics.json"],
                    "report.html": "new report.html", "notes.txt": "old notes.txt", "gen.hdf5": "old gen.hdf5",
                    "sub/data.txt": "mine"}  # old.png (listed) and E_ratio.png (a calopc figure name) went
    assert json.loads(tree["metrics.json"])["plots"]["b"] == ["b.png"] and _parts(tmp_path) == []


def test_sub_folders_on_both_sides_are_merged(tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    _old_report(out / "gen")
    with staged_folder(out, stale=stale_plots) as work:
        (work / "gen").mkdir()
        _new_report(work / "gen")
        (work / "compare.json").write_text("{}")
    assert sorted(_tree(out)) == ["compare.json", "gen/a.png", "gen/b.png", "gen/gen.hdf5", "gen/metrics.json",
                                  "gen/notes.txt", "gen/report.html", "gen/sub/data.txt"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, ValueError])
def test_a_failure_or_interrupt_inside_changes_nothing(tmp_path, exc):
    out = tmp_path / "rep"
    _old_report(out)
    before = _tree(out)
    with pytest.raises(exc), staged_folder(out, stale=stale_plots) as work:
        _new_report(work)
        raise exc
    assert _tree(out) == before and _parts(tmp_path) == []
    with pytest.raises(exc), staged_folder(tmp_path / "new") as work:
        _new_report(work)
        raise exc
    assert not (tmp_path / "new").exists() and _parts(tmp_path) == []


def test_errors_name_the_report_folder_not_its_temporary_twin(tmp_path):
    out = tmp_path / "rep"
    with pytest.raises(OutputError, match=r"^.*/rep/metrics.json: cannot write \(no space left on device\)$") as err, \
            staged_folder(out) as work:
        raise OutputError(f"{work / 'metrics.json'}: cannot write (no space left on device)")
    assert ".part" not in str(err.value) and not out.exists()


@pytest.mark.parametrize("fail_at", [1, 2, 4])
def test_a_move_that_fails_during_the_swap_is_undone(tmp_path, monkeypatch, fail_at):
    out = tmp_path / "rep"
    _old_report(out)
    before = _tree(out)
    calls = []
    real = os.rename

    def rename(a, b):
        calls.append(a)
        if len(calls) == fail_at:
            raise OSError(28, "No space left on device")
        real(a, b)

    monkeypatch.setattr(staging.os, "rename", rename)
    with pytest.raises(OSError, match="No space"), staged_folder(out, stale=stale_plots) as work:
        _new_report(work)
    monkeypatch.undo()
    assert _tree(out) == before and _parts(tmp_path) == []


def test_a_signal_during_the_swap_undoes_it(tmp_path, monkeypatch):
    out = tmp_path / "rep"
    _old_report(out)
    before = _tree(out)
    real = os.rename
    calls = []

    def rename(a, b):
        calls.append(a)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # deferred: the swap finishes, then is undone
        real(a, b)

    monkeypatch.setattr(staging.os, "rename", rename)
    with pytest.raises(Interrupted) as err, staged_folder(out, stale=stale_plots) as work:
        _new_report(work)
    assert err.value.signum == signal.SIGTERM and len(calls) > 3
    monkeypatch.undo()
    assert _tree(out) == before and _parts(tmp_path) == []


_BLOCK_AT_REPORT = """
import sys, time, pathlib
import calopc.eval.report as report

def blocked(path, res, *args, **kwargs):  # every figure and metrics.json are written: wait here to be stopped
    pathlib.Path(sys.argv[1]).write_text("at report.html")
    time.sleep(600)

report.write_report = blocked
from calopc.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_during_evaluate_leaves_the_earlier_report_whole(tmp_path):
    """SIGTERM once every new figure is drawn, into a folder that holds a finished report and the user's notes:
    exit 143 and the folder byte for byte as it was."""
    g = "1-photons"
    write_showers(tmp_path / "ref.hdf5", *generate(g, 80, seed=1))
    write_showers(tmp_path / "gen.hdf5", *generate(g, 80, seed=2))
    write_showers(tmp_path / "other.hdf5", *generate(g, 60, seed=3))
    rep = tmp_path / "rep"
    args = ["--metrics", "hist,plots", "--no-progress", "--test-permutations", "19", "--plot-workers", "1"]
    assert main(["evaluate", str(tmp_path / "gen.hdf5"), str(tmp_path / "ref.hdf5"), "-o", str(rep), *args]) == 0
    (rep / "notes.txt").write_text("my notes")
    before = _tree(rep)
    assert len([k for k in before if k.endswith(".png")]) > 5
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", _BLOCK_AT_REPORT, str(marker), "evaluate",
                             str(tmp_path / "other.hdf5"), str(tmp_path / "ref.hdf5"), "-o", str(rep), *args],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "no marker before the deadline"
        staged = [p for p in tmp_path.iterdir() if p.name.startswith(".rep.") and p.name.endswith(".part")]
        assert len(staged) == 1 and (staged[0] / "metrics.json").exists()  # the new report is all there, beside
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    finally:
        proc.kill()
        proc.wait()
    assert "interrupted (SIGTERM)" in proc.stderr.read()
    assert _tree(rep) == before and _parts(tmp_path) == []


def test_a_failed_evaluate_names_the_folder_and_keeps_the_earlier_report(tmp_path, monkeypatch):
    from calopc.eval import evaluate, report

    write_showers(tmp_path / "ref.hdf5", *generate("1-photons", 40, seed=1))
    rep = tmp_path / "rep"
    _old_report(rep)
    before = _tree(rep)

    def full(path, res, *args, **kwargs):
        raise OutputError(f"{path}: cannot write (no space left on device); the incomplete output was removed")

    monkeypatch.setattr(report, "write_report", full)
    with pytest.raises(OutputError, match=r"/rep/report.html: cannot write \(no space left on device\)") as err:
        evaluate(tmp_path / "ref.hdf5", tmp_path / "ref.hdf5", rep, metrics=("hist",), progress=False,
                 test_permutations=19)
    assert ".part" not in str(err.value) and _tree(rep) == before and _parts(tmp_path) == []
