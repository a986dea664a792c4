from __future__ import annotations

import math

import numpy as np
import pytest

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


def test_cpf_graph_passes_the_checker_with_one_input(cpf_onnx):
    """onnx.checker accepts the CaloPointFlow II graph: one float32 input [batch, 101], output [batch, 40500]."""
    _check_graph(cpf_onnx[0], 97)


def test_cpf_onnx_equals_torch_cell_for_cell(cpf_run, cpf_onnx):
    """ONNX Runtime, fed as Par04 feeds it, gives the torch module's cells for the same latent vectors."""
    _onnx_equals_torch(cpf_run, cpf_onnx[0])


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
    _same_rings(got, dense, geo)


def _same_rings(got, dense, geo, rtol=1e-5):
    """The same energies (to ``rtol``) in every (shower, layer, r) ring of the two dense samples, not the same cells."""
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
        np.testing.assert_allclose(a[k], b[k], rtol=rtol)
    assert ((got > 0) != (dense > 0)).any()       # α is drawn: not the same cells


def test_alpha_free_caloclouds_graph_equals_calopc_generate_ring_by_ring(tmp_path, cc_free_run, library):
    """CaloClouds with α free (uniform dequantisation, overflow moved by energy), its teacher exported with two Heun
    steps: with the same noise the graph and calopc generate put the same energies into every ring."""
    from calopc.export.graph import export_model
    from calopc.export.sampler import ShowerSampler
    from calopc.models import load

    run = cc_free_run
    loaded = load(run)
    assert loaded.model.config.overflow == "move" and loaded.preprocessor.dequantisation == "uniform"
    geo = loaded.geometry
    out = export_model(run, tmp_path / "cc-free.onnx", target="par04")
    sampler = ShowerSampler(loaded, threshold=geo.threshold)
    assert sampler.policy == "alpha-free" and sampler.move
    e = np.array([1.2e3, 2.5e3, 4e3, 6e3])
    lat = _latents(e.shape[0], sampler.latent_size, 11)
    _, dense = library(loaded, e, lat, sampler)
    got = to_calopc_order(Par04Harness(tmp_path / "cc-free.onnx", latent_size=sampler.latent_size).energies(e, latent=lat),
                          geo)
    assert out.latent_size == sampler.latent_size
    _same_rings(got, dense, geo, rtol=1e-4)   # two float32 Heun steps: ONNX Runtime's rounding differs from torch's


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
