"""The NumPy :class:`Preprocessor` and its torch twin agree on the same inputs and noise, for every
transform the twin has, in every preprocessing configuration: the model features (float32) to the bit,
the inverses (float64) to 4 units in the last place of each coordinate's largest value (NumPy's and
torch's float64 ``exp`` and sigmoid are different implementations: one unit of a sigmoid in (0, 1),
scaled by 2π, is 3 units of π)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from calopc.models.preprocess import Preprocessor, TorchPreprocessor, layer_sums

CONFIGS = {
    "I-uniform": {"variant": "I"},
    "I-uniform-sum": {"variant": "I", "energy_ref": "sum"},
    "I-cdf-sum": {"variant": "I", "dequantisation": "cdf", "energy_ref": "sum"},     # CaloPointFlow II published
    "II-occupied": {"variant": "II"},
    "II-floor": {"variant": "II", "empty_energy": "floor"},
    "II-cdf": {"variant": "II", "dequantisation": "cdf"},
}
#: every public method of TorchPreprocessor; each is compared with its NumPy method below
COMPARED = {"dequantise", "forward_points", "forward_points_layer", "forward_shower", "forward_layers",
            "inverse_points_layer", "inverse_layers", "forward_cond", "encode"}


@pytest.fixture(scope="module")
def showers(toy_geometry):
    """60 showers of the toy geometry, some with empty layers (flat cells, energies, counts, incident energies)."""
    geo = toy_geometry
    rng = np.random.default_rng(5)
    counts = rng.integers(1, 12, 60)
    cell = rng.integers(0, geo.n_voxels, int(counts.sum()))
    energy = rng.exponential(2.0, cell.shape[0])
    e_inc = np.exp(rng.uniform(np.log(1e3), np.log(1e5), 60))
    return cell, energy, counts, e_inc


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def preps(request, toy_geometry, showers):
    cell, energy, counts, e_inc = showers
    prep = Preprocessor.fit(toy_geometry, cell, energy, counts, e_inc, seed=1, **CONFIGS[request.param])
    return prep, prep.to_torch("cpu")


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _same(t: torch.Tensor, a: np.ndarray) -> None:
    """Equal bits: dtype, shape and every value."""
    got = t.numpy()
    assert got.dtype == a.dtype and got.shape == a.shape
    np.testing.assert_array_equal(got, a)


def _close(t: torch.Tensor, a: np.ndarray, ulp: int = 4) -> None:
    """Same dtype and shape; values at most ``ulp`` units in the last place of the column's largest value apart."""
    got = t.numpy()
    assert got.dtype == a.dtype and got.shape == a.shape
    tol = ulp * np.spacing(np.abs(a).max(axis=0, keepdims=True))
    bad = np.abs(got - a) > tol
    assert not bad.any(), f"{bad.sum()} values differ by more than {ulp} ulp: {got[bad][:4]} vs {a[bad][:4]}"


def test_every_torch_transform_is_compared():
    public = {n for n in vars(TorchPreprocessor) if not n.startswith("_") and callable(getattr(TorchPreprocessor, n))}
    assert public == COMPARED


def test_point_transforms_agree_to_the_bit(preps, showers):
    prep, tp = preps
    cell, energy, counts, e_inc = showers
    shower_of = np.repeat(np.arange(len(counts)), counts)
    u = np.random.default_rng(9).random((cell.shape[0], 3))
    zar = prep.dequantise(cell, np.random.default_rng(9))
    _same(tp.dequantise(_t(cell), _t(u)), zar)
    _, e_layer = layer_sums(prep.geometry, cell, energy, counts)
    if prep.variant == "I":
        e_sum = e_layer.sum(1)[shower_of]
        y = prep.forward_points(zar, energy, e_inc[shower_of], e_sum)
        _same(tp.forward_points(_t(zar), _t(energy), _t(e_inc[shower_of]), _t(e_sum)), y)
    else:
        layer = np.asarray(prep.geometry.cell_layer)[cell]
        e_l = e_layer[shower_of, layer]
        y = prep.forward_points_layer(zar, energy, e_l, layer)
        _same(tp.forward_points_layer(_t(zar), _t(energy), _t(e_l), _t(layer)), y)
        back, w = prep.inverse_points_layer(y, layer)
        bt, wt = tp.inverse_points_layer(_t(y), _t(layer))
        _close(bt, back)
        _close(wt, w)


def test_shower_transforms_agree_to_the_bit(preps, showers):
    prep, tp = preps
    cell, energy, counts, e_inc = showers
    n_layer, e_layer = layer_sums(prep.geometry, cell, energy, counts)
    _same(tp.forward_cond(_t(e_inc)), prep.forward_cond(e_inc))
    if prep.variant == "I":
        _same(tp.forward_shower(_t(counts), _t(e_layer.sum(1)), _t(e_inc)),
              prep.forward_shower(counts, e_layer.sum(1), e_inc))
        return
    assert (n_layer == 0).any()                      # empty layers are part of the comparison
    rng = np.random.default_rng(4)
    uv = rng.random(n_layer.shape), rng.random(n_layer.shape)
    s = prep.forward_layers(n_layer, e_layer, e_inc, np.random.default_rng(4))
    _same(tp.forward_layers(_t(n_layer), _t(e_layer), _t(e_inc), _t(uv[0]), _t(uv[1])), s)
    _same(tp.forward_layers(_t(n_layer), _t(e_layer), _t(e_inc)), prep.forward_layers(n_layer, e_layer, e_inc))
    # the inverse, on the encoded features and on features far outside the training range
    wild = np.random.default_rng(6).normal(0.0, 3.0, s.shape).astype(np.float32)
    for feats in (s, wild):
        n, e = prep.inverse_layers(feats, e_inc)
        nt, et = tp.inverse_layers(_t(feats), _t(e_inc))
        _same(nt, n)
        _close(et, e)


def test_encode_is_the_numpy_path_in_order(preps, showers):
    """``encode`` = dequantise, per-layer sums, point and shower features, condition (noise drawn in that order)."""
    prep, tp = preps
    cell, energy, counts, e_inc = showers
    shower_of = np.repeat(np.arange(len(counts)), counts)
    g = np.random.default_rng(11)

    def rand(shape):
        return _t(g.random(shape))

    y_t, s_t, c_t, layer_t = tp.encode(_t(cell), _t(energy), _t(shower_of), _t(e_inc), rand)
    rng = np.random.default_rng(11)                  # the same stream, drawn by the NumPy methods
    zar = prep.dequantise(cell, rng)
    n_layer, e_layer = layer_sums(prep.geometry, cell, energy, counts)
    layer = np.asarray(prep.geometry.cell_layer)[cell]
    if prep.variant == "I":
        y = prep.forward_points(zar, energy, e_inc[shower_of], e_layer.sum(1)[shower_of])
        s = prep.forward_shower(counts, e_layer.sum(1), e_inc)
    else:
        y = prep.forward_points_layer(zar, energy, e_layer[shower_of, layer], layer)
        s = prep.forward_layers(n_layer, e_layer, e_inc, rng)
    _same(y_t, y)
    _same(s_t, s)
    _same(c_t, prep.forward_cond(e_inc))
    _same(layer_t, layer.astype(np.int64))
