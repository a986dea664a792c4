from __future__ import annotations

import json

import numpy as np
import pytest

from calopc.cli import main
from calopc.converters import convert_file
from calopc.eval import (
    ClassifierConfig,
    classifier_inputs,
    classifier_metric,
    compute_features,
    evaluate,
    high_level_vector,
)
from calopc.geometry import Geometry
from calopc.io import write_showers
from calopc.synth import generate

pytest.importorskip("torch")
pytest.importorskip("sklearn")

SMALL = ClassifierConfig(hidden=128, epochs=12, batch_size=200)


def _distort(inc, sh, g):
    """Energies ×1.1 and every hit moved one layer deeper."""
    L, A, R = g.shape
    v = sh.reshape(-1, L, A, R) * 1.1
    out = np.zeros_like(v)
    out[:, 1:] = v[:, :-1]
    return inc, out.reshape(sh.shape)


@pytest.fixture(scope="module")
def ds2_pair():
    g = Geometry.calochallenge("2")
    a = generate("2", 800, seed=10)
    b = generate("2", 800, seed=11)
    return g, a, b


def _x(kind, sample, g):
    inc, sh = sample
    sh = np.where(sh < g.threshold, 0.0, sh)
    hl = high_level_vector(compute_features(sh, inc, g)) if kind == "high" else None
    return classifier_inputs(kind, sh, inc, g, high_level=hl)


@pytest.mark.parametrize("kind", ["low", "high"])
def test_classifier_same_distribution_is_chance(ds2_pair, kind):
    g, a, b = ds2_pair
    r = classifier_metric(kind, _x(kind, a, g), _x(kind, b, g), config=SMALL, seeds=2, device="cpu")
    assert 0.4 < r.auc < 0.6
    assert r.jsd < 0.1
    assert len(r.aucs) == 2 and r.auc_err >= 0


@pytest.mark.parametrize("kind", ["low", "low-normed", "high"])
def test_classifier_detects_distortion(ds2_pair, kind):
    g, a, b = ds2_pair
    cfg = ClassifierConfig(hidden=128, epochs=30, batch_size=200)
    r = classifier_metric(kind, _x(kind, _distort(*b, g), g), _x(kind, a, g), config=cfg, seeds=1, device="cpu")
    assert r.auc > 0.7
    assert r.jsd > 0.1


def test_classifier_needs_equal_sizes():
    with pytest.raises(ValueError, match="as many generated as reference"):
        classifier_metric("high", np.zeros((20, 3)), np.zeros((30, 3)), config=SMALL)
    with pytest.raises(ValueError, match="kind must be one of"):
        classifier_inputs("mid", np.zeros((2, 368)), np.ones(2), Geometry.calochallenge("1-photons"))


def test_evaluate_end_to_end_ds1(tmp_path, capsys):
    g = Geometry.calochallenge("1-photons")
    ref, gen = tmp_path / "ref.hdf5", tmp_path / "gen.hdf5"
    write_showers(ref, *generate(g, 400, seed=1))
    write_showers(gen, *generate(g, 400, seed=2))
    pq = convert_file(gen, tmp_path / "gen.parquet", progress=False)
    out = tmp_path / "report"
    rc = main(["evaluate", str(pq), str(ref), "-o", str(out), "--cls-epochs", "3", "--cls-seeds", "2",
               "--cls-hidden", "64", "--fpd-min-samples", "100", "--kpd-batch-size", "150", "--no-progress",
               "--metrics", "hist,cls-low,cls-high,fpd,kpd,pointcloud,plots"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "classifier low" in text and "FPD x1e3" in text
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "1-photons" and m["n_generated"] == 400
    assert set(m["classifier"]) == {"low", "high"}
    assert 0.3 < m["classifier"]["high"]["auc"] < 0.7
    assert m["fpd_x1e3"]["ref_floor"] is not None and "kpd_x1e3" in m
    assert m["separation_summary"]["E_ratio"] < 0.25  # 400 showers in 100 bins: statistical floor ~0.1
    assert m["pointcloud"]["revoxelization"]["generated"]["n_collisions"] == 0
    html = (out / "report.html").read_text()
    assert "E_ratio.png" in html and "classifier AUC" in html
    for name in ("E_ratio", "voxel_spectrum", "E_layer_per_layer", "average_shower_reference", "hits"):
        assert (out / f"{name}.png").stat().st_size > 1000
        assert (out / f"{name}.pdf").exists()
    assert not list(out.glob("*.part"))


def test_identical_samples_separate_nothing(tmp_path):
    g = Geometry.calochallenge("2")
    p = tmp_path / "a.hdf5"
    write_showers(p, *generate(g, 200, seed=3))
    m = evaluate(p, p, tmp_path / "r", metrics=("hist", "pointcloud"), progress=False)
    assert all(v == 0.0 for v in m["separation"].values() if v is not None)
    assert m["pointcloud"]["hits_separation"] == 0.0


def test_evaluate_detects_distortion_in_separation(tmp_path):
    g = Geometry.calochallenge("2")
    inc, sh = generate(g, 300, seed=4)
    write_showers(tmp_path / "ref.hdf5", inc, sh)
    write_showers(tmp_path / "gen.hdf5", *_distort(inc, sh, g))
    m = evaluate(tmp_path / "gen.hdf5", tmp_path / "ref.hdf5", tmp_path / "r", metrics=("hist",), progress=False)
    same = evaluate(tmp_path / "ref.hdf5", tmp_path / "ref.hdf5", tmp_path / "s", metrics=("hist",), progress=False)
    assert m["separation"]["E_ratio"] > 0.15 and same["separation"]["E_ratio"] == 0.0
    assert m["separation_summary"]["E_layer"] > 0.05
    assert m["separation_summary"]["EC_r"] > 0


def test_bad_inputs(tmp_path):
    write_showers(tmp_path / "ds1.hdf5", *generate("1-photons", 20, seed=0))
    write_showers(tmp_path / "ds1b.hdf5", *generate("1-photons", 30, seed=1))
    write_showers(tmp_path / "ds2.hdf5", *generate("2", 20, seed=0))
    write_showers(tmp_path / "empty.hdf5", np.zeros(0), np.zeros((0, 368)))
    with pytest.raises(ValueError, match="geometries differ"):
        evaluate(tmp_path / "ds1.hdf5", tmp_path / "ds2.hdf5", tmp_path / "r", metrics=("hist",), progress=False)
    with pytest.raises(ValueError, match="equal size.*20 generated and 30 reference.*max_showers"):
        evaluate(tmp_path / "ds1.hdf5", tmp_path / "ds1b.hdf5", tmp_path / "r", metrics=("cls-high",), progress=False)
    with pytest.raises(ValueError, match="empty"):
        evaluate(tmp_path / "empty.hdf5", tmp_path / "ds1.hdf5", tmp_path / "r", metrics=("hist",), progress=False)
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate(tmp_path / "ds1.hdf5", tmp_path / "ds1.hdf5", tmp_path / "r", metrics=("auc",), progress=False)
    assert main(["evaluate", str(tmp_path / "ds1.hdf5"), str(tmp_path / "nope.hdf5"), "-o", str(tmp_path / "r")]) == 2
