"""The high-granularity geometry (648,000 cells) end to end, on a few showers: synth, convert / voxelize with
bounded memory, training and generation of the point-cloud models, evaluation with the sparse metrics, and the
up-front refusal of the dense metrics that cannot fit."""

from __future__ import annotations

import shutil
import tracemalloc
from importlib import resources

import numpy as np
import pytest

from calopc.geometry import Geometry, detect_geometry, load_geometry, same_binning
from calopc.synth import _BLOCK_BYTES, block_size, generate

HG = Geometry.high_granularity()
N = 16


def _xml_copy(tmp_path):
    src = resources.files("calopc") / "data" / "binning_high_granularity.xml"
    dst = tmp_path / "my_detector.xml"
    with resources.as_file(src) as p:
        shutil.copy(p, dst)
    return dst


def test_geometry_is_ds3_with_4x_finer_alpha_and_r(tmp_path):
    ds3 = Geometry.calochallenge("3")
    assert HG.name == "hg" and HG.shape == (45, 200, 72) and HG.n_voxels == 648_000 and HG.is_regular
    assert HG.layer_ids == ds3.layer_ids and HG.threshold == ds3.threshold and HG.layer_mm == ds3.layer_mm
    np.testing.assert_allclose(HG.r_edges[0][::4], ds3.r_edges[0], atol=1e-9)  # every 4th r-edge is a ds3 edge
    assert detect_geometry(648_000) is HG and load_geometry("hg") is HG and load_geometry("high-granularity") is HG
    g = load_geometry(_xml_copy(tmp_path))  # a copy of the XML under another name is recognised
    assert g is HG and same_binning(Geometry.from_xml(_xml_copy(tmp_path))) is HG


@pytest.fixture(scope="module")
def hg_files(tmp_path_factory):
    """Two synthetic HG samples (1–20 GeV) in the official HDF5 format."""
    from calopc.io import shower_writer

    d = tmp_path_factory.mktemp("hg")
    paths = []
    for seed in (1, 2):
        e = np.geomspace(1e3, 2e4, N)
        inc, v = generate(HG, N, seed=seed, energies=e)
        p = d / f"hg{seed}.h5"
        with shower_writer(p, HG.n_voxels, dtype=np.float64) as w:
            w.append(inc, v)
        paths.append(p)
    return paths


def test_synth_is_sparser_per_cell_with_the_same_energy():
    e = np.geomspace(2e3, 1e5, 12)
    inc3, v3 = generate("3", len(e), seed=5, energies=e)
    inch, vh = generate(HG, len(e), seed=5, energies=e)
    ratio = (vh.sum(1) / inch).mean() / (v3.sum(1) / inc3).mean()
    assert abs(ratio - 1) < 0.05, ratio  # same deposited energy
    hits3, hitsh = (v3 > 0).sum(1).mean(), (vh > 0).sum(1).mean()
    assert 1.5 * hits3 < hitsh < 16 * hits3  # more, smaller hits: finer cells resolve the deposits
    assert hitsh / HG.n_voxels < 0.5 * hits3 / 40_500  # but a far smaller share of the cells
    assert (vh[vh > 0] >= HG.threshold).all()
    assert block_size(HG) * 8 * HG.n_voxels <= _BLOCK_BYTES < 256 * 8 * HG.n_voxels  # bounded per random stream
    assert block_size(Geometry.calochallenge("3")) == 256


def test_cli_synth_takes_a_geometry_file(tmp_path, capsys):
    import h5py

    from calopc.cli import main

    out = tmp_path / "s.h5"
    assert main(["synth", str(out), "-n", "2", "--geometry", str(_xml_copy(tmp_path)), "--no-progress"]) == 0
    assert "'hg' geometry (648000 cells)" in capsys.readouterr().out
    with h5py.File(out) as f:
        assert f["showers"].shape == (2, 648_000) and (f["showers"][:] > 0).any()


def test_convert_and_voxelize_stream_with_bounded_memory(hg_files, tmp_path, monkeypatch):
    """Peak memory of convert and voxelize is a + T*b showers for T = 1, 2 and 4 I/O threads, for N and 2N showers.

    One HDF5 chunk holds one HG shower (5.2 MB dense). convert: per thread the inflated chunk and its scan.
    voxelize: per thread two queued chunks and a compression buffer (3 showers); besides, the step of two
    dense showers and its bincount (4), the writer's partial-chunk buffer and one more queued chunk (2), and
    the step's points and Arrow buffers (2). A dense (N, 648k) block would be 16 showers, 2N 32.
    """
    from calopc.converters import convert_file, voxelize_file
    from calopc.io import open_showers, shower_writer

    big = tmp_path / "hg2n.h5"  # the two samples in one file: 2N showers
    with shower_writer(big, HG.n_voxels, dtype=np.float64) as w:
        for p in hg_files:
            with open_showers(p) as f:
                for e, sh in f.iterate("20 MB"):
                    w.append(e, sh)
    warm = convert_file(hg_files[1], tmp_path / "warm.parquet", step_size="12 MB")
    voxelize_file(warm, tmp_path / "warm.h5", step_size=2)  # the geometry's cell tables: computed once per process

    def peaks(src, tag):
        pq, back = tmp_path / f"{tag}.parquet", tmp_path / f"{tag}.h5"
        tracemalloc.start()
        try:
            convert_file(src, pq, step_size="12 MB")
            _, pc = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            voxelize_file(pq, back, step_size=2)
            _, pv = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return pc, pv, back

    shower = HG.n_voxels * 8
    for threads in (1, 2, 4):
        monkeypatch.setenv("CALOPC_IO_THREADS", str(threads))
        (c1, v1, _), (c2, v2, back) = peaks(hg_files[0], f"n{threads}"), peaks(big, f"2n{threads}")
        assert max(c1, c2) <= (1 + 1.5 * threads) * shower, (threads, c1 / shower, c2 / shower)
        assert max(v1, v2) <= (8 + 3 * threads) * shower, (threads, v1 / shower, v2 / shower)
    with open_showers(big) as a, open_showers(back) as b:
        assert b.geometry is HG and len(b) == 2 * N
        for (ea, sa), (eb, sb) in zip(a.iterate("20 MB"), b.iterate("20 MB")):
            np.testing.assert_array_equal(ea, eb)
            np.testing.assert_array_equal(sa, sb)


@pytest.mark.parametrize(("model", "cfg"), [
    ("caloclouds", {"denoiser": "pointwise", "widths": [16, 16], "fourier": 8, "layer_embedding": 2,
                    "shower_transforms": 1, "shower_hidden": [16]}),
    ("calopointflow", {"latent": 4, "encoder_hidden": 16, "point_transforms": 2, "point_hidden": [16, 16],
                       "point_bins": 4, "latent_transforms": 1, "latent_hidden": [16], "shower_transforms": 1,
                       "shower_hidden": [16]}),
])
def test_point_cloud_models_train_and_generate(hg_files, tmp_path, model, cfg):
    pytest.importorskip("torch")
    pytest.importorskip("zuko")
    from calopc.converters import convert_file, read_points
    from calopc.models.generate import generate as gen_showers
    from calopc.models.train import TrainConfig, train

    pq = tmp_path / "train.parquet"
    convert_file(hg_files[0], pq, threshold=HG.threshold)
    run = tmp_path / "run"
    res = train(model, pq, run, model_config=cfg,
                config=TrainConfig(steps=2, batch_size=4, warmup=1, log_every=1, checkpoint_every=2, device="cpu",
                                   progress=False))
    assert np.isfinite(res["final_loss"])
    out = tmp_path / "gen.parquet"
    r = gen_showers(run, np.array([2e3, 5e3]), output=out, seed=1, batch_size=2, device="cpu")
    events, geo = read_points(out)
    assert geo == HG and len(events) == 2 and r.n_showers == 2
    cells = np.concatenate([np.asarray(c) for c in events["points", "cell"]])
    assert cells.size and cells.min() >= 0 and cells.max() < HG.n_voxels


def test_evaluate_with_the_sparse_metrics(hg_files, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    from calopc.eval.evaluate import evaluate

    res = evaluate(hg_files[0], hg_files[1], tmp_path / "ev", metrics=("hist", "cls-high", "fpd", "kpd", "cls-sparse"),
                   cls_epochs=1, cls_seeds=1, cls_batch_size=8, progress=False, device="cpu", kpd_batch_size=8,
                   cnn_options={"widths": (4, 4, 4, 4)})
    assert res["dataset"] == "hg" and res["n_voxels"] == 648_000
    assert 0 <= res["classifier"]["sparse"]["auc"] <= 1 and 0 <= res["classifier"]["high"]["auc"] <= 1
    assert np.isfinite(res["fpd_x1e3"]["value"]) and np.isfinite(res["kpd_x1e3"]["value"])


def test_dense_metrics_refuse_up_front(hg_files, tmp_path, monkeypatch):
    from calopc.eval import cnn
    from calopc.eval.cnn import check_dense_memory, dense_activation_bytes
    from calopc.eval.evaluate import evaluate

    budget = 8 << 30
    with pytest.raises(MemoryError, match=r"cls-low on geometry 'hg' \(648,000 cells\) would need about .* GB.*use "
                                          r"cls-sparse"):
        check_dense_memory(["cls-low"], HG, 2000, budget=budget)
    with pytest.raises(MemoryError, match=r"cls-cnn on geometry 'hg'.*MB of dense activations per shower.*use "
                                          r"cls-sparse"):
        check_dense_memory(["cls-cnn"], HG, 2000, batch_size=16, budget=budget)
    check_dense_memory(["cls-low", "cls-cnn", "cls-sparse"], Geometry.calochallenge("3"), 2000, batch_size=256,
                       budget=budget)
    assert dense_activation_bytes(HG) > 12 * dense_activation_bytes(Geometry.calochallenge("3"))  # 16x the cells
    # through evaluate: refused before reading the samples
    monkeypatch.setattr(cnn, "_physical_memory", lambda: budget)
    monkeypatch.setattr("calopc.eval.samples.load_sample", lambda *a, **k: pytest.fail("read before the check"))
    for m in ("cls-low", "cls-cnn"):
        with pytest.raises(MemoryError, match="use cls-sparse"):
            evaluate(hg_files[0], hg_files[1], tmp_path / "ev2", metrics=(m,), progress=False, device="cpu")
