from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from calopc.export import noise as rnd  # noqa: E402


def _lowbias32(x: int) -> int:
    m = (1 << 32) - 1
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_hash_is_lowbias32_on_the_whole_32_bit_range():
    """The int64 formulation (split products, float64 shifts) equals lowbias32 on values up to 2^32 - 1."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.integers(0, 1 << 32, 2000, dtype=np.int64), [0, 1, (1 << 32) - 1, 1 << 31]])
    got = rnd._mix(torch.as_tensor(x)).numpy()
    assert got.tolist() == [_lowbias32(int(v)) for v in x]


def test_uniform_and_normal_draws():
    """Counter-based draws of one key: uniform in (0, 1) (chi² of 64 bins, no lag-1 correlation), normals with
    mean 0 and variance 1; another key or stream gives other numbers; the same inputs the same numbers."""
    keys = rnd.keys_from_latent(torch.tensor([[0.3, -1.2, 2.5], [0.3, -1.2, 2.6]]))
    k = rnd.shower_key(keys)
    assert k[0] != k[1]
    i = torch.arange(100_000)
    u = rnd.uniform(k[0].expand(i.shape[0]), i, 1).numpy()
    assert 0 < u.min() and u.max() < 1
    h, _ = np.histogram(u, 64, (0, 1))
    assert ((h - h.mean()) ** 2 / h.mean()).sum() / 63 < 1.5
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.015
    z = rnd.normal(k[1].expand(i.shape[0]), i, 1).numpy()
    assert abs(z.mean()) < 0.015 and abs(z.std() - 1) < 0.015
    v = rnd.uniform(k[1].expand(i.shape[0]), i, 1).numpy()
    w = rnd.uniform(k[0].expand(i.shape[0]), i, 2).numpy()
    assert abs(np.corrcoef(u, v)[0, 1]) < 0.015 and abs(np.corrcoef(u, w)[0, 1]) < 0.015
    np.testing.assert_array_equal(u, rnd.uniform(k[0].expand(i.shape[0]), i, 1).numpy())
