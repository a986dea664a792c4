"""The fidelity benchmark's table logic (benchmarks/fidelity.py): the classifier epochs of every row, snapshot
rows, the options that name them."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import numpy as np
import pytest


def _import_fidelity():
    """benchmarks/fidelity.py, with its ``models`` (benchmarks/models.py) rather than the tests' package of that name."""
    saved = sys.modules.pop("models", None)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        return importlib.import_module("fidelity")
    finally:
        sys.path.pop(0)
        sys.modules.pop("models", None)
        if saved is not None:
            sys.modules["models"] = saved


fidelity = _import_fidelity()


def _row(name: str, **kw) -> dict:
    return {"name": name, "model": "calopointflow", "dataset": "2", "budget_s": 900.0, "steps": 2059,
            "auc_low": 0.9, "auc_high": 0.7, **kw}


def test_rows_show_the_classifier_epochs_they_were_read_with():
    rows = fidelity.table_rows([
        _row("old", classifier={"hidden": 2048, "epochs": 10, "seeds": 1}),                 # written before the field
        _row("new", classifier={"hidden": 2048, "epochs": 50, "seeds": 1}, classifier_epochs=50),
        _row("no-cls", auc_low=None, auc_high=None, classifier={"epochs": 50}, classifier_epochs=None),
    ])
    assert [r["cls epochs"] for r in rows] == ["10", "50", "–"]
    md = fidelity.markdown([_row("new", classifier={"hidden": 2048, "epochs": 50, "seeds": 1}, classifier_epochs=50)])
    assert "| cls epochs |" in md.splitlines()[4] and "50 epochs" in md


def test_snapshot_rows_name_their_run_and_time():
    entry = fidelity.Entry.parse("cpf-II-thin")
    snaps = [{"seconds": 300.0, "step": 700, "elapsed": 300.4, "path": "/x/run/snapshot-300s"},
             {"seconds": 900.0, "step": 2050, "elapsed": 900.1, "path": "/x/run/snapshot-900s"}]
    subs = fidelity.snapshot_entries(entry, {"snapshots": snaps})
    assert [e.name for e in subs] == ["cpf-II-thin/300s", "cpf-II-thin/900s"]
    assert all(e.source == "cpf-II-thin" and e.model == "calopointflow" for e in subs)
    assert subs[0].snapshot == snaps[0] and fidelity.snapshot_entries(entry, {}) == []
    row = _row("cpf-II-thin/300s", budget_s=300.0, steps=700, snapshot_of="cpf-II-thin", snapshot=snaps[0],
               run_budget_s=2700.0, classifier_epochs=50, clock="process")
    t = fidelity.table_rows([row])[0]
    assert (t["entry"], t["budget s"], t["steps"], t["cls epochs"]) == ("cpf-II-thin/300s", "300 CPU", "700", "50")
    md = fidelity.markdown([row])
    assert "snapshot of the run of `cpf-II-thin` after 300 s (step 700" in md and "spans the run's 2700 s" in md


def test_snapshot_times_are_checked():
    assert fidelity._seconds_list("900, 300") == [300.0, 900.0]
    for bad in ("", "300,x", "0", "-5,10"):
        with pytest.raises(argparse.ArgumentTypeError, match="seconds"):
            fidelity._seconds_list(bad)


def test_distill_options_of_an_entry():
    """``distill.KEY=VALUE`` goes to the distillation (not the model config), needs ``post_train=distill``; a
    ``from=`` entry distils its source's teacher, not the student that generated it."""
    e = fidelity.Entry.parse("cc-mm=caloclouds:from=caloclouds-free-cm,post_train=distill,distill.moment_matching=0.1")
    assert (e.source, e.post_train, e.distill, e.config) == ("caloclouds-free-cm", "distill",
                                                             {"moment_matching": 0.1}, {})
    assert fidelity.Entry.parse("caloclouds-free-cm").distill == {}
    with pytest.raises(ValueError, match="distill.KEY options need post_train=distill"):
        fidelity.Entry.parse("x=caloclouds:distill.moment_matching=1")
    student = {"run_dir": "w/cc/run_cm", "train_run_dir": "w/cc/run", "distill": {"steps": 5}}
    assert fidelity.teacher_run(student) == Path("w/cc/run")
    assert fidelity.teacher_run({"run_dir": "w/cc/run_cm", "distill": {"steps": 5}}) == Path("w/cc/run")
    assert fidelity.teacher_run({"run_dir": "w/cc/run"}) == Path("w/cc/run")


def _import_benchmark(name: str):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_ring_profile_counts_hits_shares_and_energy_order():
    """benchmarks/ring_profile.py on hand-made dataset-2 showers: a full, ordered innermost ring and one that is
    neither."""
    from calopc.geometry import Geometry

    rp = _import_benchmark("ring_profile")
    g = Geometry.calochallenge("2")
    lay, rb = np.asarray(g.cell_layer), np.asarray(g.cell_r_bin)
    ring0, ring1 = np.flatnonzero((lay == 3) & (rb == 0)), np.flatnonzero((lay == 3) & (rb == 1))
    s = np.zeros((2, g.n_voxels))
    s[0, ring0] = 10.0                         # shower 0: ring 0 full (16 cells x 10), two ring-1 cells at 5
    s[0, ring1[:2]] = 5.0
    s[1, ring0[:4]] = [10.0, 10.0, 1.0, 1.0]   # shower 1: 4 hits, a ring-1 cell above the weakest ring-0 cell
    s[1, ring1[:1]] = 2.0
    e = np.array([1e4, 1e5])
    (row,) = rp.ring_profile(e, s, g, [3], np.array([0.0, 1e6]))[3]
    assert row["n"] == 2 and row["hits"] == [pytest.approx(10.0), pytest.approx(1.5)]
    assert row["full0"] == 0.5 and row["order"] == 0.5
    assert row["share"][0] == pytest.approx((160 / 170 + 22 / 24) / 2)
    assert row["share"][1] == pytest.approx((10 / 170 + 2 / 24) / 2)
    with pytest.raises(ValueError, match="layer 45: the geometry"):
        rp.ring_profile(e, s, g, [45], np.array([0.0, 1e6]))


def test_deeptree_cpu_recipe_is_one_literal():
    """benchmarks/models.py starts DeepTree entries from the fidelity table's CPU_CONFIG (one literal, read)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "models.py"
    spec = importlib.util.spec_from_file_location("bench_models", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_models"] = mod           # (its dataclasses look their module up)
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules["bench_models"]
    assert mod.BASE_CONFIG["deeptree"] == fidelity.CPU_CONFIG["deeptree"]
    assert mod.fidelity_cpu_config() == fidelity.CPU_CONFIG
