from __future__ import annotations

import numpy as np
import pytest
import torch

from calopc.models import available, get_model
from calopc.models.calopointflow import CaloPointFlow, CaloPointFlowConfig
from calopc.models.data import ShowerCollate, ShowerDataset, iterate_batches
from calopc.models.preprocess import layer_sums

from .conftest import TINY


@pytest.fixture(scope="module", params=["I", "II"])
def setup(request, toy_parquet):
    ds = ShowerDataset.from_parquet(toy_parquet)
    prep = ds.fit_preprocessor(variant=request.param)
    return prep, next(iterate_batches(ds, ShowerCollate(prep, seed=0), 12))


@pytest.fixture
def batch(setup):
    return setup[1]


@pytest.fixture
def tiny_model(setup):
    prep = setup[0]

    def make(**kw) -> CaloPointFlow:
        torch.manual_seed(0)
        return CaloPointFlow(CaloPointFlowConfig.from_dict({**TINY, "variant": prep.variant, **kw}).with_data(prep))

    return make


def test_registry():
    assert "calopointflow" in available()
    assert get_model("CaloPointFlow") == (CaloPointFlow, CaloPointFlowConfig)
    with pytest.raises(ValueError, match="available: calopointflow"):
        get_model("nope")
    with pytest.raises(ValueError, match="unknown CaloPointFlow config keys"):
        CaloPointFlowConfig.from_dict({"latnet": 3})
    with pytest.raises(ValueError, match="variant must be"):
        CaloPointFlowConfig.from_dict({"variant": "III"})
    assert CaloPointFlowConfig.from_dict({}).variant == "II"
    with pytest.raises(ValueError, match="needs n_layers"):
        CaloPointFlow(CaloPointFlowConfig())  # variant II before with_data


def test_config_takes_sizes_from_data(setup):
    prep, batch = setup
    cfg = CaloPointFlowConfig.from_dict({**TINY, "variant": prep.variant}).with_data(prep)
    assert cfg.n_layers == prep.geometry.n_layers == 3
    assert (cfg.point_features, cfg.shower_features) == ((4, 2) if prep.variant == "I" else (3, 6))
    assert batch.x.shape[-1] == cfg.point_features and batch.shower.shape[-1] == cfg.shower_features


def test_loss_and_gradients_reach_every_parameter(batch, tiny_model):
    model = tiny_model()
    terms = model.loss_terms(batch)
    assert set(terms) == {"loss", "shower", "points", "kl"}
    assert terms["loss"].shape == () and torch.isfinite(terms["loss"])
    model.loss(batch).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_point_subsampling_estimates_the_same_loss(batch, tiny_model):
    model = tiny_model()
    torch.manual_seed(1)
    full = model.loss_terms(batch)["points"].item()
    model_sub = tiny_model(points_per_shower_loss=3)
    vals = []
    for s in range(30):
        torch.manual_seed(s)
        vals.append(model_sub.loss_terms(batch)["points"].item())
    assert abs(sum(vals) / len(vals) - full) < 0.25 * abs(full) + 0.5


def test_one_training_step_lowers_the_loss(batch, tiny_model):
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:
        torch.manual_seed(123)  # same latent noise for both evaluations
        return model.loss(batch)

    before = loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after.item() < before.item()


def test_sample_shapes(setup, batch, tiny_model):
    prep = setup[0]
    model = tiny_model().eval()
    torch.manual_seed(0)
    s = model.sample_shower(batch.cond)
    f = prep.n_point_features
    assert s.shape == (12, prep.n_shower_features)
    n = torch.tensor([3, 0, 5] + [1] * 9)
    layer = torch.arange(5).remainder(3)[None, :].expand(12, 5)
    x, mask = model.sample(batch.cond, n, s, layer)
    assert x.shape == (12, 5, f) and mask.shape == (12, 5)
    assert mask.sum(1).tolist() == n.tolist()
    assert torch.isfinite(x).all() and (x[~mask] == 0).all()


def test_generate_in_physical_units(setup, tiny_model):
    prep = setup[0]
    geo = prep.geometry
    model = tiny_model().eval()
    torch.manual_seed(0)
    e_inc = np.array([2e3, 5e4, 9e4])
    n, zar, e = model.generate(e_inc, prep)
    assert n.shape == (3,) and (n >= 1).all() and zar.shape == (n.sum(), 3) and e.shape == (n.sum(),)
    assert np.isfinite(zar).all() and (e > 0).all()
    cell = geo.locate(zar[:, 2], zar[:, 1], zar[:, 0])
    if prep.variant == "II":
        assert (cell >= 0).all()  # every point inside its layer
        # per-layer counts and energies are those of the shower flow, exactly
        torch.manual_seed(0)
        cond = torch.from_numpy(prep.forward_cond(e_inc))
        n_layer, e_layer = prep.inverse_layers(model.sample_shower(cond).numpy(), e_inc)
        shower_of = np.repeat(np.arange(3), n)
        got_n, got_e = layer_sums(geo, cell, e, n)
        np.testing.assert_array_equal(got_n, n_layer)
        np.testing.assert_allclose(got_e, e_layer, rtol=1e-9)
        assert (zar[:, 0] == np.round(zar[:, 0])).all() and shower_of.shape == e.shape


def test_ddp_forward_is_the_loss(batch, tiny_model):
    model = tiny_model()
    torch.manual_seed(5)
    a = model(batch)
    torch.manual_seed(5)
    b = model.loss(batch)
    assert torch.equal(a, b)
