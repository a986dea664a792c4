from __future__ import annotations

import numpy as np
import pytest

from calopc.eval.prdc import prdc, prdc_direct, prdc_features
from calopc.geometry import Geometry
from calopc.synth import generate

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def features():
    g = Geometry.calochallenge("1-photons")
    out = []
    for seed, n in ((1, 300), (2, 250)):
        inc, sh = generate(g, n, seed=seed)
        out.append(prdc_features(np.where(sh < g.threshold, 0.0, sh)))
    return out


def test_prdc_features_official_mode():
    x = prdc_features(np.array([[0.0, 1.0, 1000.0]]))
    np.testing.assert_allclose(x, [[-1.0, 0.0, 3.0]], rtol=1e-6)  # empty voxels → 0.1 MeV → -1


@pytest.mark.parametrize("block", [7, 64, 4096])
def test_blocked_prdc_equals_direct_computation(features, block):
    real, fake = features
    ref = prdc_direct(real, fake, k=5)
    got = prdc(real, fake, k=5, block=block, device="cpu")
    assert (got.precision, got.recall, got.coverage) == (ref.precision, ref.recall, ref.coverage)
    assert got.density == pytest.approx(ref.density, rel=1e-12)
    assert 0 < ref.precision < 1 and 0 < ref.recall <= 1 and 0 < ref.coverage <= 1 and ref.density > 0
    assert (got.n_real, got.n_fake, got.k) == (300, 250, 5)


def test_prdc_other_k_float32_and_shifted_sample(features):
    real, fake = features
    for k in (1, 3):
        ref, got = prdc_direct(real, fake, k=k), prdc(real, fake, k=k, block=50, device="cpu")
        assert (got.precision, got.recall, got.density, got.coverage) == pytest.approx(
            (ref.precision, ref.recall, ref.density, ref.coverage), abs=1e-12)
    f32 = prdc(real, fake, block=100, device="cpu", dtype="float32")
    ref = prdc_direct(real, fake)
    assert (f32.precision, f32.recall, f32.coverage) == pytest.approx((ref.precision, ref.recall, ref.coverage),
                                                                      abs=0.01)
    far = prdc(real, fake + 3.0, device="cpu")  # every voxel ×1000: outside the real manifold
    assert far.precision == 0 and far.coverage == 0 and far.density == 0


def test_prdc_input_errors():
    with pytest.raises(ValueError, match="same d"):
        prdc(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="more than 5 showers"):
        prdc(np.zeros((5, 3)), np.zeros((10, 3)))
