from __future__ import annotations

import json
import warnings
from html import escape

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
    assert m["fpd_x1e3"]["test"]["compatible"] is not None and "kpd_x1e3" in m
    assert "no difference found (p = " in text or "differs (p " in text
    assert m["separation_summary"]["E_ratio"] < 0.25  # 400 showers in 100 bins: statistical floor ~0.1
    assert m["pointcloud"]["revoxelization"]["generated"]["n_collisions"] == 0
    html = (out / "report.html").read_text()
    assert "E_ratio.png" in html and "classifier AUC" in html
    for name in ("E_ratio", "voxel_spectrum", "E_layer_layers_0-12", "average_shower_reference", "hits"):
        assert (out / f"{name}.png").stat().st_size > 1000
        assert not (out / f"{name}.pdf").exists()  # PNG only unless --formats asks for more
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
    with pytest.raises(ValueError, match="empty"):
        evaluate(tmp_path / "empty.hdf5", tmp_path / "ds1.hdf5", tmp_path / "r", metrics=("hist",), progress=False)
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate(tmp_path / "ds1.hdf5", tmp_path / "ds1.hdf5", tmp_path / "r", metrics=("auc",), progress=False)
    assert main(["evaluate", str(tmp_path / "ds1.hdf5"), str(tmp_path / "nope.hdf5"), "-o", str(tmp_path / "r")]) == 2


# ---------------------------------------------------------------- parity with the official evaluation
def test_geometry_xml_of_an_official_dataset_behaves_as_the_dataset(tmp_path, capsys):
    from importlib import resources

    from calopc.geometry import THRESHOLDS

    g = Geometry.calochallenge("2")
    write_showers(tmp_path / "ref.hdf5", *generate(g, 120, seed=5))
    write_showers(tmp_path / "gen.hdf5", *generate(g, 120, seed=6))
    xml = tmp_path / "my_binning.xml"
    xml.write_bytes((resources.files("calopc") / "data" / "binning_dataset_2.xml").read_bytes())
    a = evaluate(tmp_path / "gen.hdf5", tmp_path / "ref.hdf5", tmp_path / "a", metrics=("hist",), progress=False)
    assert main(["evaluate", str(tmp_path / "gen.hdf5"), str(tmp_path / "ref.hdf5"), "-o", str(tmp_path / "b"),
                 "--geometry", str(xml), "--metrics", "hist", "--no-progress"]) == 0
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert a["threshold_mev"] == b["threshold_mev"] == pytest.approx(THRESHOLDS["2"])
    assert b["dataset"] == "2" and b["histogram_ranges"].startswith("official ranges of dataset 2")
    assert a["separation"] == b["separation"]
    assert b["separation"]["voxel_spectrum"] is not None and b["separation"]["E_layer_0"] is not None
    assert b["separation"]["EC_x_0"] is not None


def test_geometry_xml_of_another_detector_needs_a_threshold(tmp_path, toy_geometry, toy_xml):
    from calopc.geometry import load_geometry

    rng = np.random.default_rng(0)
    for name in ("ref", "gen"):
        shape = (40, toy_geometry.n_voxels)
        v = np.where(rng.random(shape) < 0.6, rng.exponential(1.0, shape), 0)
        write_showers(tmp_path / f"{name}.hdf5", np.full(40, 20.0), v)
    geo = load_geometry(toy_xml)
    with pytest.raises(ValueError, match="does not match any official dataset.*--threshold"):
        evaluate(tmp_path / "gen.hdf5", tmp_path / "ref.hdf5", tmp_path / "r", geometry=geo, metrics=("hist",),
                 progress=False)
    m = evaluate(tmp_path / "gen.hdf5", tmp_path / "ref.hdf5", tmp_path / "r", geometry=geo, threshold=0.05,
                 metrics=("hist",), progress=False)
    assert m["threshold_mev"] == 0.05 and "not an official dataset" in m["histogram_ranges"]
    assert "not an official dataset" in (tmp_path / "r" / "report.html").read_text()
    assert m["separation"]["voxel_spectrum"] is not None


def test_low_normed_official_and_calopc_definitions(toy_geometry):
    g = toy_geometry  # layers: 8, 3, 8 voxels
    v = np.zeros((1, g.n_voxels))
    v[0, g.flat_index(0, 0, 0)] = 0.2  # layer 0: only a sub-threshold voxel -> thresholded E_layer = 0
    v[0, g.flat_index(1, 0, 0)] = 1.0
    v[0, g.flat_index(1, 0, 1)] = 0.3  # below the threshold
    off = classifier_inputs("low-normed", v, np.array([10.0]), g, threshold=0.5)
    cal = classifier_inputs("low-normed", v, np.array([10.0]), g, threshold=0.5, normed="calopc")
    col = 1 + g.flat_index(0, 0, 0)
    assert off[0, col] == pytest.approx(0.2 / 1e-16) and cal[0, col] == 0.0
    c1 = 1 + g.flat_index(1, 0, 0)
    assert off[0, c1:c1 + 2].tolist() == pytest.approx([1.0, 0.3])
    assert cal[0, c1:c1 + 2].tolist() == pytest.approx([1.0, 0.0])
    assert off[0, -3:].tolist() == pytest.approx([-8.0, 0.0, -8.0], abs=1e-7)  # log10(thresholded E_layer + 1e-8)
    with pytest.raises(ValueError, match="official, calopc"):
        classifier_inputs("low-normed", v, np.array([10.0]), g, normed="raw")


def test_official_fixed_split_counts():
    from calopc.eval.classifier import official_split

    assert official_split("2", 100_000) == (60_000, 20_000, 20_000)
    assert official_split("3", 99_999) is None
    assert official_split("1-photons", 121_000) == (80_000, 20_000, 21_000)
    assert official_split("1-pions", 120_800) == (80_000, 20_000, 20_800)
    assert official_split("toy", 10**6) is None
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 1, (70, 4)), rng.normal(0, 1, (70, 4))
    cfg = ClassifierConfig(hidden=16, epochs=1, batch_size=50, counts=(30, 10, 10))
    assert classifier_metric("high", x, y, config=cfg, device="cpu").n_train == 60
    with pytest.raises(ValueError, match="need 150 showers per class, got 70"):
        classifier_metric("high", x, y, config=ClassifierConfig(hidden=16, epochs=1, counts=(100, 30, 20)))


def test_fpd_estimator_labels_floor_and_prdc_in_metrics(tmp_path, capsys):
    g = Geometry.calochallenge("1-photons")
    write_showers(tmp_path / "ref.hdf5", *generate(g, 200, seed=1))
    inc, sh = generate(g, 200, seed=2)
    write_showers(tmp_path / "gen.hdf5", inc, np.zeros_like(sh))  # a generator that deposits nothing
    args = ["evaluate", str(tmp_path / "gen.hdf5"), str(tmp_path / "ref.hdf5"), "--fpd-min-samples", "100",
            "--kpd-batch-size", "100", "--no-progress", "--cls-hidden", "16", "--cls-epochs", "1", "--cls-seeds", "1"]
    assert main([*args, "-o", str(tmp_path / "o"), "--metrics", "fpd,kpd,prdc,cls-low-normed"]) == 0
    out = capsys.readouterr().out
    assert "PRDC (k=5)" in out
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["fpd_estimator"] == "official" and m["fpd_x1e3"]["estimator"] == "official"
    for key in ("fpd_x1e3", "kpd_x1e3"):  # every shuffle below the observed distance
        t = m[key]["test"]
        assert t["n_ref"] == t["n_gen"] == 200 and t["permutations"] == 99 and t["p_value"] == 0.01
        assert t["differs"] and t["z"] > 3 and t["reading"].startswith("differs (p <= 0.01; 200 vs 200 showers;")
        assert t["reading"] in out
    assert t["null_sd"] > 0 and m["kpd_x1e3"]["estimator"] == "official"
    assert m["classifier"]["low-normed"]["test"]["n_validation_per_class"] == 40
    assert set(m["prdc"]) >= {"precision", "recall", "density", "coverage"} and m["prdc"]["k"] == 5
    assert m["classifier"]["low-normed"]["definition"] == "official"
    assert m["classifier"]["low-normed"]["split"] == "60/20/20 % per class"
    html = (tmp_path / "o" / "report.html").read_text()
    assert "FPD/KPD estimator: official" in html and "Precision, recall, density, coverage" in html
    assert "low-normed input: official definition" in html
    assert main([*args, "-o", str(tmp_path / "c"), "--metrics", "fpd,kpd", "--fpd-estimator", "calopc"]) == 0
    c = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert c["fpd_x1e3"]["estimator"] == "calopc" and "estimator: calopc" in c["fpd_kpd_note"]
    assert c["fpd_x1e3"]["value"] != m["fpd_x1e3"]["value"]
    same = evaluate(tmp_path / "ref.hdf5", tmp_path / "ref.hdf5", tmp_path / "s", metrics=("fpd", "kpd"),
                    fpd_min_samples=100, kpd_batch_size=100, progress=False)
    for key in ("fpd_x1e3", "kpd_x1e3"):  # a sample against itself: every shuffle ties or exceeds the observed 0
        t = same[key]["test"]
        assert t["p_value"] == 1.0 and not t["differs"] and t["reading"].startswith("no difference found (p = 1;")


def test_evaluate_logs_its_stages_outside_a_terminal(tmp_path, capsys, monkeypatch):
    """Outside a terminal evaluate writes a plain line with its stage every interval (here 0.05 s
    instead of 30 s) to stderr, and nothing on a quiet run (--no-progress)."""
    monkeypatch.setenv("CALOPC_LOG_INTERVAL", "0.05")
    g = Geometry.calochallenge("1-photons")
    write_showers(tmp_path / "ref.hdf5", *generate(g, 300, seed=1))
    write_showers(tmp_path / "gen.hdf5", *generate(g, 300, seed=2))
    args = ["evaluate", str(tmp_path / "gen.hdf5"), str(tmp_path / "ref.hdf5"), "--metrics", "hist,fpd,kpd",
            "--fpd-min-samples", "20000", "--kpd-batch-size", "5000"]
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("calopc evaluate: ")]
    assert lines and "Traceback" not in err
    assert any(s in err for s in ("FPD", "KPD", "fpd test", "kpd test")) and "elapsed" in lines[-1]
    assert main([*args, "-o", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "calopc evaluate: " not in capsys.readouterr().err


def test_small_samples_get_a_warning_with_the_calibrated_readouts(tmp_path, capsys):
    g = Geometry.calochallenge("1-photons")
    write_showers(tmp_path / "ref.hdf5", *generate(g, 120, seed=1))
    write_showers(tmp_path / "gen.hdf5", *generate(g, 120, seed=2))
    args = [str(tmp_path / "gen.hdf5"), str(tmp_path / "ref.hdf5")]
    with pytest.warns(UserWarning, match=r"40 generated with 40 reference showers \(fewer than 100.*says little"):
        m = evaluate(*args, tmp_path / "a", metrics=("hist", "fpd"), max_showers=40, progress=False,
                     test_permutations=19, fpd_min_samples=20, plot_workers=1)
    assert "fewer showers than features" not in m["small_sample_note"]  # 30 features for dataset 1-photons
    assert escape(m["small_sample_note"]) in (tmp_path / "a" / "report.html").read_text()
    assert main(["evaluate", *args, "-o", str(tmp_path / "b"), "--metrics", "hist", "--no-progress",
                 "--test-permutations", "19", "--max-showers", "25"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("calopc evaluate: warning: the calibrated readouts compare 25")
    assert "fewer showers than features (30)" not in err[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = evaluate(*args, tmp_path / "c", metrics=("hist",), progress=False, test_permutations=19)
    assert "small_sample_note" not in m


def test_small_sample_note_names_the_covariance_problem():
    from calopc.eval.permutation import small_sample_note

    assert small_sample_note(100, 5000) is None
    assert "fewer showers than features" in small_sample_note(50, 300, 362)
    assert "fewer showers than features" not in small_sample_note(50, 300, 30)


def test_classifiers_take_equal_sizes_from_samples_of_different_sizes(tmp_path, capfd):
    """10,000 generated against 5,000 reference showers (scaled down): the classifiers use the first showers of the
    larger sample, as many as the smaller has, with one line saying so; the other metrics use every shower."""
    g = Geometry.calochallenge("1-photons")
    write_showers(tmp_path / "gen.hdf5", *generate(g, 240, seed=1))
    write_showers(tmp_path / "ref.hdf5", *generate(g, 120, seed=2))
    args = ["evaluate", str(tmp_path / "gen.hdf5"), str(tmp_path / "ref.hdf5"), "-o", str(tmp_path / "r"),
            "--metrics", "hist,cls-high,cls-low", "--cls-epochs", "1", "--cls-hidden", "16", "--cls-seeds", "1",
            "--test-permutations", "19", "--no-progress"]
    assert main(args) == 0
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [("calopc evaluate: warning: the classifiers compare samples of equal size (the official set-up): "
                    "they use the first 120 showers of each sample (240 generated, 120 reference); the other metrics "
                    "use all; --max-showers N sets N for every metric")]
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["n_generated"] == 240 and m["separation_test"]["n_gen"] == 240
    for kind in ("low", "high"):
        c = m["classifier"][kind]
        assert c["n_train"] == 2 * 72 and c["test"]["n_validation_per_class"] == 24
    assert "the first 120 showers" in m["classifier_sizes_note"]
    assert escape(m["classifier_sizes_note"]) in (tmp_path / "r" / "report.html").read_text()


def test_overflowing_cell_energies_give_one_line_not_numpy_warnings(tmp_path, capfd):
    """A shower with a 1e308 MeV cell: its features overflow float64. Two warnings name the file (the reader's
    scale check, then the shower that every metric leaves out);
    no numpy warning reaches the user (plots drawn by worker processes included); every metric uses the others."""
    g = Geometry.calochallenge("1-photons")
    inc, sh = generate(g, 120, seed=3)
    sh = np.array(sh, dtype=np.float64)
    sh[7, 10] = 1e308
    write_showers(tmp_path / "huge.hdf5", inc, sh)
    write_showers(tmp_path / "ref.hdf5", *generate(g, 120, seed=4))
    args = ["evaluate", str(tmp_path / "huge.hdf5"), str(tmp_path / "ref.hdf5"), "-o", str(tmp_path / "r"),
            "--metrics", "hist,fpd,kpd,cls-high,cls-low,pointcloud,plots", "--cls-epochs", "1", "--cls-hidden", "16",
            "--cls-seeds", "1", "--fpd-min-samples", "100", "--kpd-batch-size", "100", "--test-permutations", "19",
            "--no-progress", "--plot-workers", "2"]
    assert main(args) == 0
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [(f"calopc evaluate: warning: {tmp_path / 'huge.hdf5'}: a cell holds 1e+308 MeV, more than 1e+09 MeV "
                    "(1 PeV): corrupt or wrongly scaled energies?"),
                   (f"calopc evaluate: warning: {tmp_path / 'huge.hdf5'}: 1 of 120 generated showers (first: shower 7) "
                    "hold cell energies (up to 1e+308 MeV) that overflow the features' float64 sums or the classifiers' "
                    "float32 inputs; every metric uses the other 119")]
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["unusable_showers"] == {"generated": {"count": 1, "first": 7}} and m["n_generated"] == 119
    assert escape(m["unusable_note"]) in (tmp_path / "r" / "report.html").read_text()
    n_val = 119 - int(119 * 0.6) - int(119 * 0.2)  # the 60/20/20 split of the 119 usable showers
    assert m["fpd_x1e3"]["test"]["n_gen"] == 119 and m["classifier"]["high"]["test"]["n_validation_per_class"] == n_val
    assert m["fpd_x1e3"]["value"] is not None and m["classifier"]["low"]["auc"] is not None
    with warnings.catch_warnings(record=True) as seen:  # the library: two UserWarnings, nothing from numpy
        warnings.simplefilter("always")
        evaluate(tmp_path / "ref.hdf5", tmp_path / "huge.hdf5", tmp_path / "s", metrics=("hist", "kpd", "plots"),
                 kpd_batch_size=100, progress=False, test_permutations=19, plot_workers=1)
    assert [(w.category, "1 of 120 reference showers (first: shower 7)" in str(w.message)) for w in seen] == [
        (UserWarning, False), (UserWarning, True)]
    assert "a cell holds 1e+308 MeV" in str(seen[0].message)
