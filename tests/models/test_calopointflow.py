from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from calopc.models import available, get_model
from calopc.models.calopointflow import CaloPointFlow, CaloPointFlowConfig
from calopc.models.data import ShowerCollate, ShowerDataset, iterate_batches
from calopc.models.preprocess import Preprocessor, layer_sums

from .conftest import TINY

#: today's variant II before the published tricks, and CaloPointFlow II as published
OLD_II = {"variant": "II", "alpha": "model", "set_summary": False, "dequantisation": "uniform"}
VARIANTS = {"I": {"variant": "I"}, "II-old": OLD_II, "II": {"variant": "II"},
            "published": {"preset": "published", "set_hidden": 8, "set_features": 4}}


@pytest.fixture(scope="module", params=list(VARIANTS))
def setup(request, toy_parquet):
    ds = ShowerDataset.from_parquet(toy_parquet)
    opts = CaloPointFlowConfig.from_dict(VARIANTS[request.param]).preprocessing()
    prep = Preprocessor.fit(ds.geometry, ds.cell, ds.energy, ds.counts, ds.e_inc, **opts)
    prep.switches = VARIANTS[request.param]
    return prep, next(iterate_batches(ds, ShowerCollate(prep, seed=0), 12))


@pytest.fixture
def batch(setup):
    return setup[1]


@pytest.fixture
def tiny_model(setup):
    prep = setup[0]

    def make(**kw) -> CaloPointFlow:
        torch.manual_seed(0)
        return CaloPointFlow(CaloPointFlowConfig.from_dict({**TINY, **prep.switches, **kw}).with_data(prep))

    return make


def test_registry():
    assert "calopointflow" in available()
    assert get_model("CaloPointFlow") == (CaloPointFlow, CaloPointFlowConfig)
    with pytest.raises(ValueError, match="available: .*calopointflow"):
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
    cfg = CaloPointFlowConfig.from_dict({**TINY, **prep.switches}).with_data(prep)
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


def test_point_subsampling_estimates_the_same_loss(setup, batch, tiny_model):
    if CaloPointFlowConfig.from_dict(setup[0].switches).set_summary:
        # the set summaries of a thinned shower differ from those sampling uses: refused, not biased
        with pytest.raises(ValueError, match="points_per_shower_loss=3 with set_summary=true"):
            tiny_model(points_per_shower_loss=3)
        return
    model = tiny_model()
    torch.manual_seed(1)
    full = model.loss_terms(batch)["points"].item()
    model_sub = tiny_model(points_per_shower_loss=3, thin_encoder=False)   # the same posterior as the full loss
    vals = []
    for s in range(30):
        torch.manual_seed(s)
        vals.append(model_sub.loss_terms(batch)["points"].item())
    assert abs(sum(vals) / len(vals) - full) < 0.25 * abs(full) + 0.5


def test_thinned_encoder_reads_the_points_of_the_loss_only(setup, batch, tiny_model):
    if CaloPointFlowConfig.from_dict(setup[0].switches).set_summary:
        return                                        # no thinned loss with the set summary (refused above)
    k = 3
    n = batch.mask.sum(1)
    for thin, expected in ((True, int(n.clamp(max=k).sum())), (False, int(n.sum()))):
        model = tiny_model(points_per_shower_loss=k, thin_encoder=thin)
        seen, scored = [], []
        model.encoder.phi[0].register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
        log_prob = model._point_log_prob
        model._point_log_prob = lambda x, ctx, sets: (scored.append(x.detach()), log_prob(x, ctx, sets))[1]
        torch.manual_seed(5)
        model.loss(batch).backward()
        assert seen[0].shape[0] == expected
        assert scored[0].shape[0] == int(n.clamp(max=k).sum())
        if thin:  # the same points, in the same order: the encoder's input starts with the flow's features
            torch.testing.assert_close(seen[0][:, :model.flow_features], scored[0], rtol=0, atol=0)


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
    f = model.flow_features
    assert f == prep.n_point_features - (CaloPointFlowConfig.from_dict(prep.switches).alpha == "free")
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
    g = model.generate(e_inc, prep)
    free = g.alpha is None
    assert free == (CaloPointFlowConfig.from_dict(prep.switches).alpha == "free")
    n, e = g.counts.numpy(), g.E.numpy()
    alpha = np.zeros_like(e) if free else g.alpha.numpy()
    zar = np.stack([g.layer.numpy(), alpha, g.r.numpy()], 1)
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


def _toy_flow():
    from calopc.models.calopointflow import DeepSetFlow, PointSets

    torch.manual_seed(0)
    flow = DeepSetFlow(3, 2, transforms=3, hidden=(16,), bins=4, set_hidden=8, set_features=4).double()
    with torch.no_grad():  # away from the identity, so that the test means something
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    shower = torch.tensor([0, 0, 0, 1, 1])
    layer = torch.tensor([0, 1, 1, 0, 1])
    sets = PointSets.build(shower, 2, shower * 2 + layer, 2, dtype=torch.float64)
    ctx = torch.randn(5, 2, dtype=torch.float64)
    return flow, sets, ctx


def test_deepsetflow_log_det_is_that_of_the_whole_set():
    """Σ log_prob over all points = log N(T(X)) + log |det ∂T(X)/∂X| with the full (P·F)² Jacobian."""
    flow, sets, ctx = _toy_flow()
    x = torch.randn(5, 3, dtype=torch.float64)

    def t(flat: torch.Tensor) -> torch.Tensor:
        y = flat.reshape(5, 3)
        for c in flow.couplings:
            y, _ = c(y, ctx, sets)
        return y.reshape(-1)

    jac = torch.autograd.functional.jacobian(t, x.reshape(-1))
    z = t(x.reshape(-1))
    expect = -0.5 * (z.square().sum() + 15 * math.log(2 * math.pi)) + torch.linalg.slogdet(jac)[1]
    assert torch.allclose(flow.log_prob(x, ctx, sets).sum(), expect, atol=1e-9)
    # the points of a shower depend on each other, not on the other shower
    assert jac.reshape(5, 3, 5, 3)[0, :, 1, :].abs().sum() > 0
    assert jac.reshape(5, 3, 5, 3)[:3, :, 3:, :].abs().sum() == 0


def test_deepsetflow_inverse_is_exact():
    flow, sets, ctx = _toy_flow()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = x
    for c in flow.couplings:
        y, _ = c(y, ctx, sets)
    for c in reversed(flow.couplings):
        y = c.inverse(y, ctx, sets)
    assert torch.allclose(y, x, atol=1e-9)
    torch.manual_seed(3)
    s = flow.sample(ctx, sets)
    assert s.shape == (5, 3) and torch.isfinite(s).all()
    torch.manual_seed(3)
    assert torch.equal(flow.sample(ctx, sets), s)


def test_switches_and_old_configs():
    faithful = CaloPointFlowConfig.from_dict({})
    assert (faithful.alpha, faithful.set_summary, faithful.dequantisation, faithful.overflow) == ("free", True, "cdf",
                                                                                                 "move")
    assert faithful.preprocessing() == {"variant": "II", "dequantisation": "cdf"}
    # a config saved before the switches existed (it has the data sizes) means today's model
    old = CaloPointFlowConfig.from_dict({"variant": "II", "n_layers": 3, "point_features": 3, "shower_features": 6})
    assert (old.alpha, old.set_summary, old.dequantisation, old.overflow) == ("model", False, "uniform", "merge")
    assert old.preprocessing() == {"variant": "II"}
    assert CaloPointFlowConfig.from_dict({"set_summary": "false"}).set_summary is False
    # the thinned encoder: on for new configs (variant I too), off for a saved run that predates it
    assert CaloPointFlowConfig.from_dict({}).thin_encoder is True
    assert CaloPointFlowConfig.from_dict({"variant": "I"}).thin_encoder is True
    assert old.thin_encoder is False
    assert CaloPointFlowConfig.from_dict({"thin_encoder": "false"}).thin_encoder is False
    assert CaloPointFlowConfig.from_dict({"variant": "I"}).alpha == "model"
    for bad, match in (({"alpha": "x"}, "'alpha' must be"), ({"set_summary": "maybe"}, "true or false"),
                       ({"thin_encoder": 2}, "'thin_encoder' must be true or false"),
                       ({"dequantisation": "x"}, "'dequantisation' must be"), ({"overflow": "x"}, "'overflow' must be"),
                       ({"preset": "x"}, "preset must be one of"), ({"loss_weighting": "x"}, "'loss_weighting' must be")):
        with pytest.raises(ValueError, match=match):
            CaloPointFlowConfig.from_dict(bad)


def test_state_dict_of_runs_before_the_shared_shower_model_loads(setup, tiny_model):
    """Older run directories hold the shower flow's keys without the ``flow.`` level."""
    model = tiny_model()
    sd = {k.replace("shower_flow.flow.", "shower_flow."): v for k, v in model.state_dict().items()}
    assert any(k.startswith("shower_flow.transform") for k in sd)
    fresh = tiny_model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert not missing and not unexpected
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_fit_rings_leaves_no_overfull_ring(toy_geometry):
    from calopc.models.calopointflow import fit_rings
    from calopc.models.cells import GeneratedShowers, locate, place

    geo = toy_geometry  # layers: 4α×2r, 1α×3r, 4α×2r
    torch.manual_seed(0)
    # 3 showers × 3 layers; every layer as full as it can be, radii crowded into the innermost ring
    n_layer = torch.tensor([[8, 3, 8], [5, 1, 2], [8, 2, 0]])
    group = torch.repeat_interleave(torch.arange(9), n_layer.reshape(-1))
    layer = group % 3
    r = torch.rand(group.shape[0], dtype=torch.float64) * 0.9
    new_r, moved = fit_rings(geo, group, 9, layer, r)
    _, rb, _ = locate(geo, layer, new_r)
    assert (rb >= 0).all() and moved.item() > 0
    per_ring = torch.bincount(group * 3 + rb, minlength=27).reshape(9, 3)
    n_alpha = torch.tensor(geo.n_alpha)[torch.arange(9) % 3]
    assert (per_ring <= n_alpha[:, None]).all()
    for g in range(9):  # the order in r within a layer is kept
        sel = group == g
        assert (torch.diff(rb[sel][torch.argsort(r[sel])]) >= 0).all()
    # placed without a single collision
    pl = place(GeneratedShowers(n_layer.sum(1), layer, new_r, None, torch.ones(group.shape[0])), geo,
               generator=torch.Generator().manual_seed(0))
    assert pl.stats["n_collisions"] == 0 and pl.cell.shape[0] == group.shape[0]
    # nothing to move: radii untouched
    few = torch.tensor([0, 1, 2])
    r_few = torch.tensor([0.5, 0.5, 4.0], dtype=torch.float64)
    same, moved = fit_rings(geo, few, 3, few % 3, r_few)
    assert torch.equal(same, r_few) and moved.item() == 0


def test_fit_rings_with_energies_keeps_a_full_rings_most_energetic_points(toy_geometry):
    """An overfull ring passes on its least energetic points (not its outermost ones): the core keeps its energy."""
    from calopc.models.calopointflow import fit_rings
    from calopc.models.cells import locate

    geo = toy_geometry  # layer 0: 4α×2r
    layer = torch.zeros(6, dtype=torch.int64)
    group = torch.zeros(6, dtype=torch.int64)
    r = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=torch.float64)       # all in the inner ring
    _, rb0, _ = locate(geo, layer, r)
    assert (rb0 == 0).all()
    energy = torch.tensor([1.0, 50.0, 2.0, 40.0, 30.0, 20.0], dtype=torch.float64)  # outermost are energetic
    new_r, moved = fit_rings(geo, group, 1, layer, r, energy=energy)
    _, rb, _ = locate(geo, layer, new_r)
    assert moved.item() == 2
    assert rb.tolist() == [1, 0, 1, 0, 0, 0]           # the two least energetic points left the full ring
    assert torch.equal(new_r[rb == 0], r[rb == 0])     # the kept points keep their radius
    # without energies the outermost two move, whatever they carry
    by_r, _ = fit_rings(geo, group, 1, layer, r)
    _, rb_r, _ = locate(geo, layer, by_r)
    assert rb_r.tolist() == [0, 0, 0, 0, 1, 1]


def test_generation_moves_overflow_by_energy(toy_run, monkeypatch):
    """CaloPointFlow II's generation hands fit_rings each point's final energy (what decides who leaves a full ring)."""
    from calopc.models import calopointflow as cpf
    from calopc.models import load

    seen = []
    real = cpf.fit_rings

    def spy(geometry, group, n_groups, layer, r, energy=None):
        seen.append(energy)
        return real(geometry, group, n_groups, layer, r, energy=energy)

    monkeypatch.setattr(cpf, "fit_rings", spy)
    loaded = load(toy_run)
    assert loaded.model.alpha_free and loaded.model.config.overflow == "move"
    torch.manual_seed(0)
    g = loaded.model.generate(np.full(6, 3e4), loaded.preprocessor)
    assert len(seen) == 1 and seen[0] is not None
    assert torch.allclose(seen[0], g.E)                     # the energies the points are placed with


def test_published_ii_generates_at_most_one_point_per_cell(toy_run, tmp_path):
    """α free + rings filled to capacity: the voxels of every shower hold exactly its points, no collision."""
    from calopc.models import load
    from calopc.models.generate import generate

    loaded = load(toy_run)
    cfg = loaded.model.config
    assert (cfg.alpha, cfg.set_summary, cfg.overflow, loaded.preprocessor.dequantisation) == ("free", True, "move", "cdf")
    e = np.exp(np.random.default_rng(0).uniform(np.log(1e3), np.log(1e5), 24))
    res = generate(toy_run, e, output=tmp_path / "g.hdf5", seed=0, batch_size=8, device="cpu")
    c = res.collisions
    assert c["n_points"] == res.n_points > 0
    assert c["n_collisions"] == c["n_merged"] == c["n_outside"] == 0
