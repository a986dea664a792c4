from __future__ import annotations

import json
import math

import numpy as np
import pytest

from calopc.cli import main
from calopc.converters import convert_file
from calopc.eval.compare import MultiClassConfig, compare, log_posterior_matrix, multiclass_inputs, parse_generated
from calopc.geometry import Geometry
from calopc.io import write_showers
from calopc.synth import generate

pytest.importorskip("torch")

SMALL = MultiClassConfig(hidden=(64, 64), epochs=25, batch_size=60, lr=2e-3)


@pytest.fixture(scope="module")
def ds1():
    g = Geometry.calochallenge("1-photons")
    return g, generate(g, 300, seed=3)


def test_log_posterior_diagonal_dominant_on_different_samples(ds1):
    _, (inc, sh) = ds1
    xs = [multiclass_inputs(sh * f, inc) for f in (1.0, 0.5, 2.0)]  # clearly different energy scales
    lp = log_posterior_matrix(xs, ["ref", "low", "high"], config=SMALL, runs=2, device="cpu")
    assert lp.mean.shape == (3, 3) and len(lp.runs) == 2 and np.isfinite(lp.std).all()
    for j in range(3):
        others = [lp.mean[j, i] for i in range(3) if i != j]
        assert lp.mean[j, j] > max(others) + 1.0
        assert lp.mean[j, j] > math.log(1 / 3) + 0.5
    assert lp.n_per_class == 300 and lp.n_validation == 60


def test_log_posterior_flat_on_identical_samples(ds1):
    _, (inc, sh) = ds1
    x = multiclass_inputs(sh, inc)
    lp = log_posterior_matrix([x, x.copy(), x.copy()], ["a", "b", "c"], config=SMALL, runs=1, device="cpu")
    assert np.allclose(lp.mean, math.log(1 / 3), atol=0.05)
    assert np.isnan(lp.std).all()
    with pytest.raises(ValueError, match="at least 10 showers"):
        log_posterior_matrix([x[:4], x[:4]], ["a", "b"], config=SMALL, runs=1, device="cpu")


def test_parse_generated_names():
    g = parse_generated(["out/flow.hdf5", "gan=x/y.parquet"])
    assert list(g) == ["flow", "gan"] and str(g["gan"]) == "x/y.parquet"
    with pytest.raises(ValueError, match="used twice"):
        parse_generated(["a/s.h5", "b/s.h5"])


def test_compare_cli_end_to_end_and_library(tmp_path, ds1, capsys):
    g, (inc, sh) = ds1
    n = 150
    write_showers(tmp_path / "ref.hdf5", *generate(g, n, seed=10))
    write_showers(tmp_path / "good.hdf5", *generate(g, n, seed=11), attrs={"generation_time_s": 1.5})
    write_showers(tmp_path / "hot.hdf5", inc[:n], sh[:n] * 1.6)
    pq = convert_file(tmp_path / "good.hdf5", tmp_path / "cloud.parquet", progress=False)
    out = tmp_path / "cmp"
    rc = main(["compare", str(tmp_path / "ref.hdf5"), str(tmp_path / "good.hdf5"), f"twice={tmp_path / 'hot.hdf5'}",
               str(pq), "-o", str(out), "--runs", "2", "--epochs", "4", "--hidden", "32", "--batch-size", "100",
               "--cls-epochs", "1", "--cls-seeds", "1", "--cls-hidden", "16", "--fpd-min-samples", "100",
               "--kpd-batch-size", "100",
               "--metrics", "hist,cls-low,kpd,pointcloud", "--no-progress", "--device", "cpu"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "log-posterior matrix" in text and "twice" in text
    res = json.loads((out / "compare.json").read_text())
    rows = {r["name"]: r for r in res["leaderboard"]}
    assert list(rows) == ["good", "twice", "cloud"]
    assert rows["good"]["time_per_shower_ms"] == pytest.approx(1.5e3 / n)
    assert rows["cloud"]["collision_share"] == 0.0 and rows["good"]["collision_share"] is None
    for r in rows.values():
        assert r["auc_low"] is not None and r["kpd_x1e3"] is not None and r["separation_mean"] is not None
        assert r["fpd_x1e3"] is None and (out / r["name"] / "metrics.json").exists()
    assert rows["twice"]["separation_e_ratio"] > rows["good"]["separation_e_ratio"]
    lp = res["log_posterior"]
    assert lp["names"] == ["reference", "good", "twice", "cloud"] and np.array(lp["mean"]).shape == (4, 4)
    assert rows["twice"]["log_p_self"] == lp["mean"][2][2]
    html = (out / "report.html").read_text()
    assert "class='sortable'" in html and "<script>" in html and "twice/report.html" in html
    assert (out / "log_posterior.png").stat().st_size > 1000
    assert not list(out.glob("*.part"))
    # library call without leaderboard metrics, generation time passed by the caller
    lib = compare(tmp_path / "ref.hdf5", {"hot": tmp_path / "hot.hdf5"}, tmp_path / "lib", runs=1, metrics=(),
                  multiclass=MultiClassConfig(hidden=(16, 16), epochs=2), extra={"hot": {"time_per_shower_ms": 2.5}},
                  device="cpu", progress=False)
    assert lib["leaderboard"][0]["time_per_shower_ms"] == 2.5 and lib["leaderboard"][0]["report"] is None
    assert lib["leaderboard"][0]["n_showers"] == n
    with pytest.raises(FileNotFoundError, match="nope.hdf5"):
        compare(tmp_path / "ref.hdf5", {"x": tmp_path / "nope.hdf5"}, tmp_path / "e", runs=1, progress=False)


def _tiny(tmp_path):
    g = Geometry.calochallenge("1-photons")
    write_showers(tmp_path / "ref.hdf5", *generate(g, 60, seed=1))
    write_showers(tmp_path / "good.hdf5", *generate(g, 60, seed=2))
    return ["compare", str(tmp_path / "ref.hdf5"), str(tmp_path / "good.hdf5"), "--runs", "1", "--epochs", "1",
            "--hidden", "8", "--batch-size", "30", "--metrics", "hist", "--device", "cpu"]


def test_a_second_compare_into_one_folder_is_refused(tmp_path, capsys):
    import subprocess
    import sys

    out = tmp_path / "cmp"
    code = ("import sys, time; from calopc.locking import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main([*_tiny(tmp_path), "-o", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("calopc compare: error: ")
        assert f"this comparison folder is being written by another calopc process (PID {holder.pid}" in err[0]
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


def test_an_interrupted_compare_leaves_the_folder_as_it_was(tmp_path, monkeypatch, capsys):
    import calopc.eval.compare as cmp

    def interrupted(*args, **kwargs):  # after every generator's report: the multi-class stage is stopped
        raise KeyboardInterrupt

    monkeypatch.setattr(cmp, "log_posterior_matrix", interrupted)
    out = tmp_path / "cmp"
    assert main([*_tiny(tmp_path), "-o", str(out), "--no-progress"]) == 130
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([*_tiny(tmp_path), "-o", str(out), "--no-progress"]) == 130
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert "interrupted (Ctrl-C)" in capsys.readouterr().err


def test_compare_names_itself_in_its_log_and_labels_the_matrix(tmp_path, capsys, monkeypatch):
    import calopc.progress

    class FiresAtOnce:  # every Progress writes its first log line when it starts: no race with a fast run
        def __init__(self, tick, interval, stop):
            tick()

        def join(self, timeout=None):
            pass

    monkeypatch.setattr(calopc.progress, "_ThreadTimer", FiresAtOnce)
    out = tmp_path / "cmp"
    assert main([*_tiny(tmp_path), "-o", str(out)]) == 0
    cap = capsys.readouterr()
    logs = [x for x in cap.err.splitlines() if x.startswith("calopc ") and ": warning: " not in x]
    assert logs and all(x.startswith("calopc compare: good: ") for x in logs), logs
    assert "calopc evaluate" not in cap.err
    lines = cap.out.splitlines()
    head = lines.index(next(x for x in lines if x.startswith("log-posterior matrix")))
    assert "one run" in lines[head] and "runs" not in lines[head]
    assert lines[head + 1].split() == ["showers", "from", "reference", "good"]
    assert [x.split()[0] for x in lines[head + 2:head + 4]] == ["reference", "good"]
    html = (out / "report.html").read_text()
    assert "one training" in html and "1 trainings" not in html
