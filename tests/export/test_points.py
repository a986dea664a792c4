from __future__ import annotations

import math

import numpy as np

from calopc.export.par04 import input_vector, to_calopc_order


def _latents(n, size, seed):
    return np.random.default_rng(seed).standard_normal((n, size))


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
