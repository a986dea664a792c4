from __future__ import annotations

import json
import math

import numpy as np
import pytest

from calopc.export.par04 import (MESH, Par04Harness, check_par04_geometry, input_vector, par04_index, par04_permutation,
                                 to_calopc_order)
from calopc.geometry import Geometry


# ------------------------------------------------------------------------------------------- Par04 conventions
def test_cell_order_matches_par04_positions():
    """Every Par04 output index names the calopc cell whose centre is the one Par04's GetPositions computes
    ((i_r + ½)·2.325 mm, (i_φ + ½)·2π/50 − π, layer i_z), looping r, then φ, then z fastest."""
    geo = Geometry.calochallenge("3")
    perm = par04_permutation(geo)
    i = 0
    r_mm, n_phi = MESH["r_mm"], MESH["n_phi"]
    for i_r in range(MESH["n_r"]):
        for i_phi in range(n_phi):
            for i_z in range(MESH["n_z"]):
                c = perm[i]
                assert geo.cell_layer[c] == i_z
                assert geo.cell_r[c] == pytest.approx((i_r + 0.5) * r_mm)
                assert geo.cell_alpha[c] == pytest.approx((i_phi + 0.5) * 2 * math.pi / n_phi - math.pi)
                i += 1
    assert sorted(perm) == list(range(geo.n_voxels))


def test_hot_cell_comes_out_at_par04_index(tmp_path):
    """A hand-made shower with one hot cell (layer 7, α bin 13, r bin 5) through an exported Par04 graph and the
    harness that reads it as GetEnergies does: the energy appears at Par04's index (5·50 + 13)·45 + 7 only."""
    import torch

    from calopc.export.graph import Par04Graph, _onnx_export

    geo = Geometry.calochallenge("3")
    hot = int(geo.flat_index(7, 13, 5))

    class HandMade(torch.nn.Module):
        latent_size = 2

        def __init__(self):
            super().__init__()
            self.geometry = geo

        def split_latent(self, z):
            return z, z, z

        def forward(self, e, zs, zx, keys):
            d = torch.zeros(e.shape[0], geo.n_voxels, dtype=torch.float32)
            return d.index_fill(1, torch.tensor([hot]), 1.0) * (0.25 * e[:, None]).to(torch.float32)

    graph = Par04Graph(HandMade(), e_max=1024000.0, angle_max=90.0).eval()
    path = tmp_path / "hot.onnx"
    _onnx_export(graph, "par04", 2, path)
    h = Par04Harness(path, latent_size=2)
    out = h.energies(np.array([1e4, 5e5]))
    idx = par04_index(5, 13, 7)
    assert idx == (5 * 50 + 13) * 45 + 7
    assert np.flatnonzero(out[0]).tolist() == [idx]
    np.testing.assert_allclose(out[:, idx], [0.25e4, 0.25 * 5e5], rtol=1e-6)
    back = to_calopc_order(out, geo)
    assert np.flatnonzero(back[1]).tolist() == [hot]


def test_input_vector_is_getenergies():
    """[latent, E/1024000, (θ/deg)/90, 0, 1] as float32, for Par04's default gun along y (θ = 90°)."""
    v = input_vector(np.zeros((1, 3)), 512000.0, math.pi / 2)
    np.testing.assert_array_equal(v, np.array([[0, 0, 0, 0.5, 1.0, 0.0, 1.0]], dtype=np.float32))


def test_geometry_other_than_par04_is_refused():
    """Dataset 2's binning (9 r x 16 alpha) is not Par04's readout mesh: one line naming what was found."""
    with pytest.raises(ValueError, match=r"geometry '2' \(45 layers, alpha bins \[16\], r bins \[9\].*not Par04's"):
        check_par04_geometry(Geometry.calochallenge("2"))
    check_par04_geometry(Geometry.calochallenge("3"))


# ------------------------------------------------------------------------------------------- exported graphs
def test_exported_graphs_pass_the_checker_with_one_input(student_onnx, cpf_onnx):
    """onnx.checker accepts both graphs; each has the one float32 input [batch, L+4] Par04 feeds and the
    [batch, 40500] float32 output it reads, opset 18."""
    import onnx

    for path in (student_onnx[0], cpf_onnx[0]):
        m = onnx.load(str(path))
        onnx.checker.check_model(m, full_check=True)
        assert [i.name for i in m.graph.input] == ["input"]
        dims = m.graph.input[0].type.tensor_type.shape.dim
        assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert dims[0].dim_param and dims[1].dim_value == 93 + (4 if path == cpf_onnx[0] else 0) + 4
        out = m.graph.output[0].type.tensor_type
        assert out.elem_type == onnx.TensorProto.FLOAT and out.shape.dim[1].dim_value == 40500
        assert {o.domain: o.version for o in m.opset_import}[""] == 18


def test_cli_prints_latent_size_macro_lines_and_placement(student_onnx):
    """calopc export says L, the Par04 macro lines with it and the model path, and the placement."""
    path, text = student_onnx
    assert "latent size L = 93" in text
    assert "/Par04/inference/setSizeLatentVector 93" in text
    assert f"/Par04/inference/setModelPathName {path}" in text
    assert "/Par04/inference/setSizeConditionVector 4" in text
    assert "placement nearest-free" in text and "onnx.checker passed" in text
    assert "trained at normal incidence" in text


def _latents(n, size, seed):
    return np.random.default_rng(seed).standard_normal((n, size))


@pytest.mark.parametrize("which", ["student", "cpf"])
def test_onnx_equals_torch_cell_for_cell(which, student_run, cpf_run, student_onnx, cpf_onnx):
    """The graph run as Par04 runs it (onnxruntime, one [1, L+4] call per shower) gives the cells of the torch
    module it was exported from, for the same latent vectors: the same hit cells, energies to float32."""
    import torch

    from calopc.export.graph import build_graph
    from calopc.models import load

    run, path = (student_run, student_onnx[0]) if which == "student" else (cpf_run, cpf_onnx[0])
    loaded = load(run)
    graph = build_graph(loaded)
    n = graph.latent_size
    e = np.array([1.5e3, 3e3, 7e3, 2e3])
    lat = _latents(e.shape[0], n, 3)
    onnx_cells = to_calopc_order(Par04Harness(path, latent_size=n).energies(e, latent=lat), loaded.geometry)
    with torch.no_grad():
        x = torch.as_tensor(input_vector(lat, e, math.pi / 2))
        ref = graph(x).numpy().astype(np.float64)
    ref = to_calopc_order(ref, loaded.geometry) * e[:, None]
    assert ((onnx_cells > 0) == (ref > 0)).all()
    assert (onnx_cells > 0).sum(1).min() > 10
    np.testing.assert_allclose(onnx_cells, ref, rtol=1e-5, atol=1e-9)


def test_student_graph_equals_calopc_generate_with_the_same_noise(student_run, student_onnx, library):
    """Fed the same noise, the exported student and calopc generate's own path (model.generate, nearest-free
    placement, float32 cells with the readout threshold) give the same showers cell for cell."""
    from calopc.export.sampler import ShowerSampler
    from calopc.models import load

    loaded = load(student_run)
    sampler = ShowerSampler(loaded, threshold=loaded.geometry.threshold)
    assert sampler.policy == "nearest-free"
    e = np.array([1.2e3, 2.5e3, 4e3, 6e3, 8e3])
    lat = _latents(e.shape[0], sampler.latent_size, 5)
    placed, dense = library(loaded, e, lat, sampler)
    assert placed.stats["n_collisions"] > 0       # the placement has work to do
    got = to_calopc_order(Par04Harness(student_onnx[0], latent_size=sampler.latent_size).energies(e, latent=lat),
                          loaded.geometry)
    assert ((got > 0) == (dense > 0)).all()
    np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-9)


def test_cpf_graph_equals_calopc_generate_ring_by_ring(cpf_run, cpf_onnx, library):
    """CaloPointFlow II (α free, overflow moved): with the same noise the graph and calopc generate put the same
    energies into every (shower, layer, r) ring, one point per cell; only the α order within a ring is drawn."""
    from calopc.export.sampler import ShowerSampler
    from calopc.models import load

    loaded = load(cpf_run)
    geo = loaded.geometry
    sampler = ShowerSampler(loaded, threshold=geo.threshold)
    assert sampler.policy == "alpha-free"
    e = np.array([1.2e3, 2.5e3, 4e3, 6e3])
    lat = _latents(e.shape[0], sampler.latent_size, 7)
    placed, dense = library(loaded, e, lat, sampler)
    got = to_calopc_order(Par04Harness(cpf_onnx[0], latent_size=sampler.latent_size).energies(e, latent=lat), geo)
    ring = geo.cell_layer * 100 + geo.cell_r_bin

    def rings(d):
        out = {}
        for b, row in enumerate(d):
            for c in np.flatnonzero(row > 0):
                out.setdefault((b, int(ring[c])), []).append(float(row[c]))
        return {k: np.sort(v) for k, v in out.items()}

    a, b = rings(got), rings(dense)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5)
    assert ((got > 0) != (dense > 0)).any()       # α is drawn: not the same cells


def test_showers_match_calopc_generate_in_distribution(student_run, student_onnx, tmp_path):
    """1,000 showers from the exported student (its own latent draws) and 1,000 from calopc generate (torch's
    draws) of the same run are compatible: the permutation tests of calopc.eval find no difference in
    E_dep/E_inc, the hits, the layer energies or the mean separation power."""
    import h5py

    from calopc.eval.features import compute_features
    from calopc.eval.histograms import separation_tests, shower_histogram_specs
    from calopc.models.generate import generate

    geo = Geometry.calochallenge("3")
    n = 1000
    e = np.exp(np.random.default_rng(11).uniform(np.log(1e3), np.log(8e3), n))
    out = tmp_path / "gen.hdf5"
    generate(student_run, e, output=out, seed=2, batch_size=250, device="cpu")
    with h5py.File(out) as f:
        ref = np.asarray(f["showers"], dtype=np.float32)
    h = Par04Harness(student_onnx[0], latent_size=93)
    got = to_calopc_order(h.energies(e, seed=4, batch=100), geo).astype(np.float32)
    fr, fg = compute_features(ref, e, geo), compute_features(got, e, geo)
    specs = shower_histogram_specs(fr, fg, geo, threshold=geo.threshold)
    t = separation_tests(specs, permutations=99, seed=0)
    assert t["E_ratio"]["p_value"] > 0.01
    assert t["mean"]["p_value"] > 0.01
    assert t["per_histogram"]["n_hits"]["p_value"] > 0.01
    layers = [v["p_value"] for k, v in t["per_histogram"].items() if k.startswith("E_layer_")]
    assert min(layers) > 0.01 / len(layers)       # Bonferroni over the layers
    assert abs(fg.n_hits.mean() / fr.n_hits.mean() - 1) < 0.05


# ------------------------------------------------------------------------------------------- errors
def test_max_points_below_the_training_showers_is_refused_with_the_share(student_run, tmp_path, capsys):
    """--max-points below the largest training shower: exit 2, one line with the share of training showers cut."""
    from calopc.cli import main
    from calopc.models import load

    counts = []
    import pyarrow.parquet as pq

    import pyarrow.compute as pc

    data = json.loads((student_run / "training_options.json").read_text())["data"]
    for d in data:
        counts.append(np.asarray(pc.list_value_length(pq.read_table(d, columns=["points"]).column(0))))
    counts = np.concatenate(counts)
    cap = int(np.median(counts))
    assert main(["export", str(student_run), "-o", str(tmp_path / "x.onnx"), "--max-points", str(cap)]) == 2
    err = capsys.readouterr().err.strip()
    share = 100 * (counts > cap).mean()
    assert err.startswith("calopc export: error: --max-points") and "\n" not in err
    assert f"{share:.2f}% of the {counts.size} training showers" in err
    assert f"--max-points {load(student_run).preprocessor.n_max} or more" in err
    assert not (tmp_path / "x.onnx").exists()


def test_runs_that_cannot_export_are_refused_in_one_line(tmp_path, ds3_parquet, capsys):
    """A dataset-2 run for Par04, a deeptree run, CaloPointFlow variant I: one line each, exit 2, no file."""
    from types import SimpleNamespace

    from calopc.cli import main
    from calopc.converters import voxels_to_points, write_points
    from calopc.export.graph import _check_exportable
    from calopc.models.train import TrainConfig, train
    from calopc.synth import generate

    geo2 = Geometry.calochallenge("2")
    inc, v = generate("2", 24, seed=3)
    data2 = tmp_path / "ds2.parquet"
    write_points(data2, voxels_to_points(v, geo2, incident_energies=inc), geo2)
    tiny = {"latent": 2, "encoder_hidden": 8, "point_transforms": 1, "point_hidden": [8], "point_bins": 4,
            "set_hidden": 8, "set_features": 4, "latent_transforms": 1, "latent_hidden": [8], "shower_transforms": 1,
            "shower_hidden": [8], "shower_passes": 2}
    cfg = TrainConfig(steps=1, batch_size=8, warmup=0, device="cpu", progress=False)
    train("calopointflow", data2, tmp_path / "ds2run", model_config=tiny, config=cfg)
    assert main(["export", str(tmp_path / "ds2run"), "-o", str(tmp_path / "a.onnx")]) == 2
    err = capsys.readouterr().err
    assert "is not Par04's readout mesh" in err and "--target points" in err and err.count("\n") == 1
    train("calopointflow", ds3_parquet, tmp_path / "v1", model_config={**tiny, "variant": "I"}, config=cfg)
    assert main(["export", str(tmp_path / "v1"), "-o", str(tmp_path / "b.onnx")]) == 2
    assert "variant I run" in capsys.readouterr().err
    with pytest.raises(ValueError, match="a deeptree run cannot be exported"):
        _check_exportable(SimpleNamespace(name="deeptree", model=SimpleNamespace(config=None)), "runs/dt")
    assert main(["export", str(tmp_path / "nothing"), "-o", str(tmp_path / "c.onnx")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert not any(tmp_path.glob("*.onnx"))


def test_points_target(student_run, tmp_path):
    """The points target: padded cells (-1 after the last hit), energies most energetic first and counts, the
    same hits as the Par04 target gives for the same latent vector."""
    import onnxruntime as ort
    import torch

    from calopc.export.graph import build_graph, export_model
    from calopc.models import load

    loaded = load(student_run)
    res = export_model(student_run, tmp_path / "p.onnx", target="points")
    assert res.max_points == loaded.preprocessor.n_max
    s = ort.InferenceSession(str(tmp_path / "p.onnx"))
    e = np.array([2e3, 5e3], dtype=np.float32)
    lat = _latents(2, res.latent_size, 9).astype(np.float32)
    cells, energies, counts = s.run(None, {"energy": e, "latent": lat})
    assert cells.shape == energies.shape == (2, res.max_points)
    graph = build_graph(loaded)
    with torch.no_grad():
        dense = graph(torch.as_tensor(input_vector(lat, e, math.pi / 2))).numpy() * e[:, None]
    dense = to_calopc_order(dense, loaded.geometry)
    for b in range(2):
        k = int(counts[b])
        assert k == (dense[b] > 0).sum() and (cells[b, k:] == -1).all() and (energies[b, k:] == 0).all()
        assert np.all(np.diff(energies[b, :k]) <= 0)
        np.testing.assert_allclose(energies[b, :k], dense[b, cells[b, :k]], rtol=1e-5)
