from __future__ import annotations

import pytest
import torch

from calopc.models import available, get_model
from calopc.models.calopointflow import CaloPointFlow, CaloPointFlowConfig
from calopc.models.data import ShowerCollate, ShowerDataset, iterate_batches

from .conftest import TINY


@pytest.fixture(scope="module")
def batch(toy_parquet):
    ds = ShowerDataset.from_parquet(toy_parquet)
    prep = ds.fit_preprocessor()
    return next(iterate_batches(ds, ShowerCollate(prep, seed=0), 12))


def tiny_model(**kw) -> CaloPointFlow:
    torch.manual_seed(0)
    return CaloPointFlow(CaloPointFlowConfig.from_dict({**TINY, **kw}))


def test_registry():
    assert "calopointflow" in available()
    assert get_model("CaloPointFlow") == (CaloPointFlow, CaloPointFlowConfig)
    with pytest.raises(ValueError, match="available: calopointflow"):
        get_model("nope")
    with pytest.raises(ValueError, match="unknown CaloPointFlow config keys"):
        CaloPointFlowConfig.from_dict({"latnet": 3})


def test_loss_and_gradients_reach_every_parameter(batch):
    model = tiny_model()
    terms = model.loss_terms(batch)
    assert set(terms) == {"loss", "shower", "points", "kl"}
    assert terms["loss"].shape == () and torch.isfinite(terms["loss"])
    model.loss(batch).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_point_subsampling_estimates_the_same_loss(batch):
    model = tiny_model()
    torch.manual_seed(1)
    full = model.loss_terms(batch)["points"].item()
    model_sub = tiny_model(points_per_shower_loss=3)
    vals = []
    for s in range(30):
        torch.manual_seed(s)
        vals.append(model_sub.loss_terms(batch)["points"].item())
    assert abs(sum(vals) / len(vals) - full) < 0.25 * abs(full) + 0.5


def test_one_training_step_lowers_the_loss(batch):
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


def test_sample_shapes(batch):
    model = tiny_model().eval()
    torch.manual_seed(0)
    s = model.sample_shower(batch.cond)
    assert s.shape == (12, 2)
    n = torch.tensor([3, 0, 5] + [1] * 9)
    x, mask = model.sample(batch.cond, n, s)
    assert x.shape == (12, 5, 4) and mask.shape == (12, 5)
    assert mask.sum(1).tolist() == n.tolist()
    assert torch.isfinite(x).all() and (x[~mask] == 0).all()


def test_ddp_forward_is_the_loss(batch):
    model = tiny_model()
    torch.manual_seed(5)
    a = model(batch)
    torch.manual_seed(5)
    b = model.loss(batch)
    assert torch.equal(a, b)
