from __future__ import annotations

import numpy as np
import pytest
import torch

from calopc.models.data import ShowerCollate, ShowerDataset, iterate_batches
from calopc.models.shower import ShowerModel, ShowerModelConfig

CFG = ShowerModelConfig(transforms=1, hidden=(16,), bins=4)


@pytest.fixture(scope="module")
def setup(toy_parquet):
    ds = ShowerDataset.from_parquet(toy_parquet)
    prep = ds.fit_preprocessor(variant="II")
    return prep, next(iterate_batches(ds, ShowerCollate(prep, seed=0), 16))


def test_config_from_dict():
    assert ShowerModelConfig.from_dict({"hidden": [8, 8]}).hidden == (8, 8)
    # coupling instead of autoregressive: same interface, different (cheaper to sample) flow
    coupling = ShowerModel(3, config=ShowerModelConfig(transforms=1, hidden=(8,), passes=2))
    assert coupling.sample(torch.zeros(2, 1)).shape == (2, 6)
    assert coupling.flow.transform.transforms[0].passes == 2
    with pytest.raises(ValueError, match="unknown shower model config keys"):
        ShowerModelConfig.from_dict({"hiden": [8]})
    with pytest.raises(ValueError, match="n_layers >= 1"):
        ShowerModel(0)


def test_loss_decreases_on_a_fixed_batch(setup):
    prep, batch = setup
    torch.manual_seed(0)
    m = ShowerModel(prep.geometry.n_layers, config=CFG)
    assert m.features == 2 * prep.geometry.n_layers == batch.shower.shape[1]
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = m.loss(batch.cond, batch.shower)
        assert loss.shape == ()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    # per feature: the loss is the mean NLL divided by 2L
    with torch.no_grad():
        nll = -m.log_prob(batch.cond, batch.shower).mean()
        assert torch.allclose(m.loss(batch.cond, batch.shower), nll / m.features)


def test_sample_and_sample_layers(setup):
    prep, _ = setup
    n_l = prep.geometry.n_layers
    torch.manual_seed(0)
    m = ShowerModel(n_l, config=CFG).eval()
    assert m.sample(torch.zeros(7, 1)).shape == (7, 2 * n_l)
    e_inc = torch.tensor([1e3, 5e3, 2e4, 9e4], dtype=torch.float64)
    s, n, e = m.sample_layers(e_inc, prep)
    assert s.shape == (4, 2 * n_l) and n.shape == (4, n_l) and e.shape == (4, n_l)
    assert n.dtype == torch.int64 and (n >= 0).all() and (n.sum(1) >= 1).all()
    assert (n <= torch.tensor(prep.geometry.voxels_per_layer)).all()
    assert torch.isfinite(e).all() and (e >= 0).all() and (e[n == 0] == 0).all()
    # the counts and energies are the preprocessing's inverse of the sampled features
    n_ref, e_ref = prep.inverse_layers(s.numpy(), e_inc.numpy())
    np.testing.assert_array_equal(n.numpy(), n_ref)
    np.testing.assert_allclose(e.numpy(), e_ref, rtol=1e-6)
    # numpy energies work too
    assert m.sample_layers(np.array([3e3]), prep)[1].shape == (1, n_l)


def test_same_seed_same_sample(setup):
    prep, _ = setup
    torch.manual_seed(0)
    m = ShowerModel(prep.geometry.n_layers, config=CFG).eval()
    e_inc = torch.tensor([1e3, 5e4])
    torch.manual_seed(11)
    a = m.sample_layers(e_inc, prep)
    torch.manual_seed(11)
    b = m.sample_layers(e_inc, prep)
    torch.manual_seed(12)
    c = m.sample_layers(e_inc, prep)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_bare_nsf_state_dict_loads():
    """Run directories written before the shared module hold the flow's own keys."""
    import zuko

    torch.manual_seed(0)
    old = zuko.flows.NSF(6, 1, bins=4, transforms=1, hidden_features=(16,))
    m = ShowerModel(3, config=CFG)
    missing, unexpected = m.load_state_dict(old.state_dict(), strict=False)
    assert not missing and not unexpected
    c, s = torch.zeros(3, 1), torch.randn(3, 6)
    assert torch.allclose(m.log_prob(c, s), old(c).log_prob(s))
