from __future__ import annotations

import json
import math

import numpy as np

from calopc.export.par04 import Par04Harness, input_vector, to_calopc_order
from calopc.geometry import Geometry


def _latents(n, size, seed):
    return np.random.default_rng(seed).standard_normal((n, size))


def _check_graph(path, latent):
    """onnx.checker accepts the graph; it has the one float32 input [batch, L+4] Par04 feeds and the [batch, 40500]
    float32 output it reads, opset 18."""
    import onnx

    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    assert [i.name for i in m.graph.input] == ["input"]
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims[0].dim_param and dims[1].dim_value == latent + 4
    out = m.graph.output[0].type.tensor_type
    assert out.elem_type == onnx.TensorProto.FLOAT and out.shape.dim[1].dim_value == 40500
    assert {o.domain: o.version for o in m.opset_import}[""] == 18


def _onnx_equals_torch(run, path):
    """The graph run as Par04 runs it (onnxruntime, one [1, L+4] call per shower) gives the cells of the torch
    module it was exported from, for the same latent vectors: the same hit cells, energies to float32."""
    import torch

    from calopc.export.graph import build_graph
    from calopc.models import load

    loaded = load(run)
    graph = build_graph(loaded)
    n = graph.latent_size
    e = np.array([1.5e3, 3e3, 7e3, 2e3])
    lat = _latents(e.shape[0], n, 3)
    onnx_cells = to_calopc_order(Par04Harness(path, latent_size=n).energies(e, latent=lat), loaded.geometry)
    with torch.no_grad():
        ref = graph(torch.as_tensor(input_vector(lat, e, math.pi / 2))).numpy().astype(np.float64)
    ref = to_calopc_order(ref, loaded.geometry) * e[:, None]
    assert ((onnx_cells > 0) == (ref > 0)).all()
    assert (onnx_cells > 0).sum(1).min() > 10
    np.testing.assert_allclose(onnx_cells, ref, rtol=1e-5, atol=1e-9)


def test_student_graph_passes_the_checker_with_one_input(student_onnx):
    """onnx.checker accepts the student's graph: one float32 input [batch, 97], output [batch, 40500], opset 18."""
    _check_graph(student_onnx[0], 93)


def test_student_graph_inverts_the_autoregressive_shower_flow_in_loops(student_run, student_onnx):
    """The run's default shower flow (autoregressive: 2 transforms of 90 features) is in the graph as one ONNX Loop
    per transform, not 90 unrolled copies of its network per transform."""
    import onnx

    from calopc.models import load

    cfg = load(student_run).model.config
    assert cfg.shower_passes is None and cfg.shower_transforms == 2
    m = onnx.load(str(student_onnx[0]))
    assert sum(n.op_type == "Loop" for n in m.graph.node) == 2


def test_student_onnx_equals_torch_cell_for_cell(student_run, student_onnx):
    """ONNX Runtime, fed as Par04 feeds it, gives the torch module's cells for the same latent vectors."""
    _onnx_equals_torch(student_run, student_onnx[0])


def test_cli_prints_latent_size_macro_lines_and_placement(student_onnx):
    """calopc export says L, the Par04 macro lines with it and the model path, and the placement."""
    path, text = student_onnx
    assert "latent size L = 93" in text
    assert "/Par04/inference/setSizeLatentVector 93" in text
    assert f"/Par04/inference/setModelPathName {path}" in text
    assert "/Par04/inference/setSizeConditionVector 4" in text
    assert "placement nearest-free" in text and "onnx.checker passed" in text
    assert "trained at normal incidence" in text


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



def test_max_points_below_the_training_showers_is_refused_with_the_share(student_run, tmp_path, capsys):
    """--max-points below the largest training shower: exit 2, one line with the share of training showers cut."""
    from calopc.cli import main
    from calopc.models import load

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    counts = []
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
