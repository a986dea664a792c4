"""The training recipes and their properties, each pinned by a test that fails when the property breaks
(critic hinge signs, spectral norm, EMA weight, one σ per shower, what distillation buys, the schedule of
time-limited runs, per-family defaults, presets, the empty-layer representation)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from calopc.models.caloclouds import CaloClouds, CaloCloudsConfig  # noqa: E402
from calopc.models.data import ShowerCollate, ShowerDataset, iterate_batches  # noqa: E402
from calopc.models.preprocess import Preprocessor  # noqa: E402
from calopc.models.train import TrainConfig, _lr_factor, train_config, training_defaults  # noqa: E402
from calopc.models.utils import EMA  # noqa: E402

TINY_CC = {"widths": [16, 16], "fourier": 8, "layer_embedding": 2, "shower_transforms": 1, "shower_hidden": [16]}
TINY_DT = {"branches": [2, 2, 5], "features": [8, 6, 5, 4], "n_global": 4, "gin_hidden": 16, "branch_hidden": 16,
           "cond_hidden": 8, "head_hidden": 16, "layer_embedding": 4, "critic_hidden": 16, "critic_heads": 4,
           "shower_transforms": 1, "shower_hidden": [16], "critic_dropout": 0.0}


@pytest.fixture(scope="module")
def toy(toy_parquet):
    ds = ShowerDataset.from_parquet(toy_parquet)
    prep = ds.fit_preprocessor(variant="II")
    return ds, prep, next(iterate_batches(ds, ShowerCollate(prep, seed=0), 12))


# ------------------------------------------------------------------------------------------------ DeepTree GAN
def _deeptree(prep, **over):
    pytest.importorskip("torch_geometric")
    from calopc.models.deeptree import DeepTree, DeepTreeConfig

    torch.manual_seed(0)
    return DeepTree(DeepTreeConfig.from_dict({**TINY_DT, **over}).with_data(prep))


def test_critic_hinge_scores_real_above_fake(toy):
    """After critic updates on a fixed real batch and fixed generated showers, D(real) > D(fake) by a margin
    (flipping the hinge signs makes the critic prefer the fakes)."""
    _, prep, batch = toy
    m = _deeptree(prep)
    opt = m.configure_optimizers(TrainConfig(lr=1e-3))["critic"]
    for g in opt.param_groups:
        g["lr"] = 3e-3
    cond = m.condition(batch.cond, batch.n, batch.shower)
    with torch.no_grad():
        fake, packed = m._fake(batch, cond, m.layer_counts(batch))
    for _ in range(40):
        loss = m.critic_loss(batch, (*fake, packed), cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        d_real = m.critic(batch.x, batch.layer, batch.mask, cond, batch.shower, m._real(batch))[0].mean()
        d_fake = m.critic(*fake, cond, batch.shower, packed)[0].mean()
    assert float(d_real - d_fake) > 0.5, (float(d_real), float(d_fake))


@pytest.mark.parametrize("critic", ["pool", "meanfield"])
def test_every_critic_linear_is_spectrally_normalised(toy, critic):
    """σ_max of every critic linear's effective weight is 1, even after its raw weight grows tenfold."""
    from torch.nn.utils import parametrize

    _, prep, batch = toy
    m = _deeptree(prep, critic=critic).train()
    linears = [mod for mod in m.critic.modules() if isinstance(mod, torch.nn.Linear)]
    assert linears
    with torch.no_grad():
        for lin in linears:
            if parametrize.is_parametrized(lin, "weight"):
                lin.parametrizations.weight.original.mul_(10.0)
            else:
                lin.weight.mul_(10.0)
    from calopc.models import deeptree

    mark = getattr(deeptree, "_sn_weights_changed", None)
    cond = m.condition(batch.cond, batch.n, batch.shower)
    for _ in range(20):   # power iterations, as after critic updates
        if mark is not None:
            mark(m.critic)
        with torch.no_grad():
            m.critic(batch.x, batch.layer, batch.mask, cond, batch.shower, m._real(batch))
    for lin in linears:
        sigma = torch.linalg.matrix_norm(lin.weight.detach().double(), ord=2).item()
        assert abs(sigma - 1.0) < 0.05, (lin, sigma)


# ------------------------------------------------------------------------------------------------ EMA
@pytest.mark.parametrize("warmup", ["linear", "power"])
def test_ema_equals_the_closed_form(warmup):
    """After updates k = 0..K−1 with parameters θ_k, ema = Π d_k θ_init + Σ_k (1 − d_k) Π_{j>k} d_j θ_k with
    d_k = min(decay, warm-up(k)); without a step the decay is constant."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    decay = 0.9
    ema = EMA(net, decay, warmup=warmup)
    init = [p.detach().clone() for p in net.parameters()]
    thetas, ds = [], []
    for k in range(12):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        thetas.append([p.detach().clone() for p in net.parameters()])
        ema.update(net, k)
        ds.append(min(decay, (1 + k) / (10 + k) if warmup == "linear" else 1 - (1 + k) ** (-2 / 3)))
    for i, e in enumerate(ema.module.parameters()):
        want = init[i] * math.prod(ds)
        for k, th in enumerate(thetas):
            want = want + (1 - ds[k]) * math.prod(ds[k + 1:]) * th[i]
        torch.testing.assert_close(e, want, rtol=1e-5, atol=1e-5)
    # constant decay without a step: ema_K = d^K ema_0 + (1 − d) Σ d^{K−1−k} θ_k
    ema2 = EMA(net, decay)
    start = [p.detach().clone() for p in ema2.module.parameters()]
    seq = []
    for _ in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(0.5).add_(1.0)
        seq.append([p.detach().clone() for p in net.parameters()])
        ema2.update(net)
    for i, e in enumerate(ema2.module.parameters()):
        want = start[i] * decay**5 + sum((1 - decay) * decay ** (4 - k) * seq[k][i] for k in range(5))
        torch.testing.assert_close(e, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ CaloClouds
def test_caloclouds_draws_one_sigma_per_shower(toy, monkeypatch):
    """The training noise level is shared by the points of a shower and differs between showers."""
    from calopc.models import caloclouds

    _, prep, batch = toy
    torch.manual_seed(0)
    m = CaloClouds(CaloCloudsConfig.from_dict(TINY_CC).with_data(prep))
    seen = {}
    real = caloclouds.edm_loss

    def spy(denoiser, x, sigma, **kw):
        seen["sigma"], seen["shower"] = sigma.detach().clone(), kw["shower"].clone()
        return real(denoiser, x, sigma, **kw)

    monkeypatch.setattr(caloclouds, "edm_loss", spy)
    m.loss(batch)
    sigma, shower = seen["sigma"], seen["shower"]
    assert sigma.shape == shower.shape
    per = [sigma[shower == b] for b in shower.unique()]
    assert all(torch.all(s == s[0]) for s in per)                      # one σ per shower
    firsts = torch.stack([s[0] for s in per])
    assert firsts.unique().numel() == firsts.numel() > 3               # different showers, different σ


def test_caloclouds_alpha_free_does_not_diffuse_alpha(toy):
    _, prep, batch = toy
    torch.manual_seed(0)
    free = CaloClouds(CaloCloudsConfig.from_dict({**TINY_CC, "alpha": "free"}).with_data(prep))
    assert free.point_dims == [1, 2] and free.denoiser.net.layers[0].layer.in_features == 2
    g = free.eval().generate(np.array([2e3, 5e4]), prep, steps=2)
    assert g.alpha is None and torch.isfinite(g.r).all()
    # a run directory written before: α was diffused (3 features) and there was no time MLP
    cfg = CaloCloudsConfig.from_dict({**TINY_CC, "alpha": "free"}).with_data(prep)
    old = {k: v for k, v in json.loads(json.dumps(cfg.__dict__)).items() if k not in ("time_mlp", "diffuse_free_alpha")}
    old_cfg = CaloCloudsConfig.from_dict(old)
    assert old_cfg.diffuse_free_alpha and not old_cfg.time_mlp
    assert CaloClouds(old_cfg).denoiser.net.layers[0].layer.in_features == 3
    new = CaloClouds(cfg)
    assert new.denoiser.net.time_mlp is not None and CaloClouds(old_cfg).denoiser.net.time_mlp is None


def test_distilled_student_is_closer_to_the_teacher_than_before(tmp_path, toy_parquet):
    """The consistency student's one-step output is closer to the teacher's 25-evaluation Heun output (same
    start noise) after distillation than before it (the student starts as the teacher)."""
    from calopc.models import load
    from calopc.models.distill import DistillConfig, distill
    from calopc.models.train import train

    run = tmp_path / "cc"
    train("caloclouds", toy_parquet, run, model_config=TINY_CC,
          config=TrainConfig(steps=60, batch_size=8, lr=3e-3, warmup=5, device="cpu", progress=False, log_every=20,
                             ema_decay=0.9))
    cm = tmp_path / "cm"
    distill(run, cm, config=DistillConfig(steps=300, batch_size=8, lr=1e-3, device="cpu", progress=False, log_every=50))
    teacher = load(run).model
    student = load(cm).model
    untrained = CaloClouds(replace(teacher.config, consistency=True, steps=1))
    untrained.load_state_dict(teacher.state_dict())
    ds = ShowerDataset.from_parquet(toy_parquet)
    prep = load(run).preprocessor
    batch = next(iterate_batches(ds, ShowerCollate(prep, seed=3), 24))
    x, shower_of, layer = CaloClouds.flatten(batch)
    torch.manual_seed(5)
    z = torch.randn(x.shape[0], len(teacher.point_dims))
    ref = teacher.sample_points(batch.cond, batch.shower, shower_of, layer, steps=13, latents=z)
    d_after = (student.sample_points(batch.cond, batch.shower, shower_of, layer, latents=z) - ref).pow(2).mean()
    d_before = (untrained.eval().sample_points(batch.cond, batch.shower, shower_of, layer, latents=z) - ref).pow(2).mean()
    assert float(d_after) < 0.7 * float(d_before), (float(d_after), float(d_before))


# ------------------------------------------------------------------------------------------------ training loop
def test_time_limited_runs_decay_over_the_time_budget():
    cfg = TrainConfig(steps=10_000, warmup=0, time_limit=60.0)
    assert _lr_factor(100, cfg, elapsed=0.0) == pytest.approx(1.0, abs=1e-3)
    assert _lr_factor(100, cfg, elapsed=30.0) == pytest.approx(0.05 + 0.95 * 0.5, abs=1e-3)   # half the clock
    assert _lr_factor(100, cfg, elapsed=60.0) == pytest.approx(0.05, abs=1e-6)                # the end of the budget
    no_limit = TrainConfig(steps=10_000, warmup=0)
    assert _lr_factor(100, no_limit, elapsed=1e9) > 0.99                                      # steps decide
    assert _lr_factor(5_000, TrainConfig(steps=10_000, warmup=0, schedule="constant"), 0.0) == 1.0


def test_time_limited_run_ends_with_the_decayed_lr(tmp_path, toy_parquet):
    import time

    from calopc.models.train import train

    from .conftest import TINY

    out = tmp_path / "run"
    t0 = time.perf_counter()
    train("calopointflow", toy_parquet, out, model_config=TINY,
          config=TrainConfig(steps=100_000, batch_size=8, warmup=0, time_limit=3.0, log_every=1, device="cpu",
                             progress=False, checkpoint_every=100_000))
    assert time.perf_counter() - t0 < 60
    recs = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert recs[-1]["lr"] < 0.2 * 1e-3                  # decayed by the clock, not by the 100k steps


def test_family_training_defaults_and_cli_order(tmp_path):
    import argparse

    from calopc.cli.models import register, resolve_train_args

    assert training_defaults("calopointflow") == {}
    cc = train_config("caloclouds")
    assert (cc.optimizer, cc.lr, cc.schedule, cc.warmup, cc.ema_decay, cc.ema_warmup, cc.batch_size, cc.grad_clip) == \
        ("radam", 1e-4, "constant", 0, 0.9999, "power", 128, 10.0)
    pytest.importorskip("torch_geometric")
    dt = train_config("deeptree", steps=7)
    assert (dt.schedule, dt.warmup, dt.grad_clip, dt.ema_decay, dt.batch_size, dt.steps) == ("constant", 0, 0.0, 0.0, 40, 7)
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    data = tmp_path / "d.parquet"
    args = p.parse_args(["train", "caloclouds", "--data", str(data), "-o", str(tmp_path / "o"), "--lr", "3e-4",
                         "--set", "train.grad_clip=2"])
    _, t = resolve_train_args(args)
    assert (t["optimizer"], t["lr"], t["grad_clip"], t["batch_size"]) == ("radam", 3e-4, 2, 128)   # flags over family
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd").validate()


def test_radam_and_power_ema_train(tmp_path, toy_parquet):
    from calopc.models.train import train

    out = tmp_path / "cc"
    res = train("caloclouds", toy_parquet, out, model_config=TINY_CC,
                config=train_config("caloclouds", steps=3, batch_size=8, device="cpu", progress=False, log_every=1))
    assert res["steps"] == 3
    opts = json.loads((out / "training_options.json").read_text())["train"]
    assert opts["optimizer"] == "radam" and opts["ema_warmup"] == "power"
    state = torch.load(out / "training_state.pt", weights_only=False)
    saved = state.get("optimizers", {}).get("model") or state.get("optimizer")
    assert "param_groups" in saved and saved["param_groups"][0].get("decoupled_weight_decay") is not None  # RAdam


# ------------------------------------------------------------------------------------------------ presets
def test_deeptree_published_preset_has_the_published_generator_capacity(toy):
    pytest.importorskip("torch_geometric")
    from calopc.geometry import Geometry
    from calopc.models.deeptree import DeepTree, DeepTreeConfig

    geo = Geometry.calochallenge(2)
    prep = Preprocessor(geo, variant="II", n_max=3000, point_mean=[0.0] * 3, point_std=[1.0] * 3,
                        shower_mean=[0.0] * 90, shower_std=[1.0] * 90)
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    pub = DeepTree(DeepTreeConfig.from_dict({"preset": "published"}).with_data(prep))
    small = DeepTree(DeepTreeConfig.from_dict({"preset": "ds2"}).with_data(prep))
    assert 500_000 <= n(pub.generator) <= 560_000 and n(small.generator) < 100_000
    assert pub.generator.branches == (2, 3, 4, 5, 5, 10)
    assert DeepTreeConfig.from_dict({"preset": "published", "branch_hidden": 32}).branch_hidden == 32   # keys win


def test_calopointflow_published_preset(toy_parquet):
    from calopc.geometry import Geometry
    from calopc.models.calopointflow import CaloPointFlow, CaloPointFlowConfig

    cfg = CaloPointFlowConfig.from_dict({"preset": "published"})
    assert (cfg.variant, cfg.alpha, cfg.dequantisation, cfg.set_summary, cfg.latent, cfg.point_transforms,
            cfg.shower_bins, cfg.loss_weighting) == ("I", "free", "cdf", True, 128, 12, 12, "shower")
    assert cfg.preprocessing() == {"variant": "I", "dequantisation": "cdf", "energy_ref": "sum"}
    prep = Preprocessor(Geometry.calochallenge(2), variant="I")
    m = CaloPointFlow(cfg.with_data(prep))
    assert 13_500_000 < sum(p.numel() for p in m.parameters()) < 14_800_000
    assert m.flow_features == 3 and m.point_dims == [0, 2, 3]                          # (z, r, E/ΣE)
    assert m.shower_flow.features == 2                                                 # (n, ΣE)
    # the saved config reloads as itself (the preset does not override saved keys)
    saved = json.loads(json.dumps(cfg.with_data(prep).__dict__))
    assert CaloPointFlowConfig.from_dict(saved) == cfg.with_data(prep)


def test_published_points_round_trip_to_their_cells(toy_parquet):
    """Variant I with CDF dequantisation and energies relative to ΣE inverts exactly (cells and energy shares)."""
    ds = ShowerDataset.from_parquet(toy_parquet)
    prep = ds.fit_preprocessor(variant="I", dequantisation="cdf", energy_ref="sum")
    rng = np.random.default_rng(0)
    cell, energy = ds.cell[:200].astype(np.int64), ds.energy[:200].astype(np.float64)
    zar = prep.dequantise(cell, rng)
    e_sum = np.full(cell.shape, energy.sum())
    y = prep.forward_points(zar, energy, np.full(cell.shape, 5e4), e_sum)
    assert np.all(np.abs(y[:, :3].mean(0)) < 0.5) and np.all(np.abs(y[:, :3].std(0) - 1) < 0.5)   # probit: ~N(0, 1)
    back, e = prep.inverse_points(y, np.ones(cell.shape))
    from calopc.models.cells import locate

    inside, _, got = locate(prep.geometry, torch.from_numpy(np.floor(back[:, 0] + 0.5).astype(np.int64)),
                            torch.from_numpy(back[:, 2]), torch.from_numpy(back[:, 1]))
    assert bool(inside.all()) and np.array_equal(got.numpy(), cell)
    np.testing.assert_allclose(e * energy.sum(), energy, rtol=1e-4)
    # the device twin gives the same features
    tp = prep.to_torch("cpu")
    yt = tp.forward_points(torch.from_numpy(zar), torch.from_numpy(energy), torch.full((200,), 5e4, dtype=torch.float64),
                           torch.from_numpy(e_sum))
    np.testing.assert_allclose(yt.numpy(), y, atol=1e-5)


def test_moved_points_are_counted(toy_parquet, tmp_path):
    """CaloPointFlow's overflow="move" reports the points it moved to another ring (generation statistics)."""
    from calopc.models.cells import GeneratedShowers, place

    if "n_moved_ring" not in GeneratedShowers.__dataclass_fields__:
        pytest.skip("moved-point counting not in GeneratedShowers")
    from calopc.models.calopointflow import CaloPointFlow, CaloPointFlowConfig

    from .conftest import TINY

    ds = ShowerDataset.from_parquet(toy_parquet)
    for over in ({"variant": "II"}, {"preset": "published", **TINY, "set_hidden": 8, "set_features": 4}):
        cfg = CaloPointFlowConfig.from_dict({**TINY, **over, "overflow": "move"})
        prep = ds.fit_preprocessor(**cfg.preprocessing())
        torch.manual_seed(0)
        m = CaloPointFlow(cfg.with_data(prep)).eval()
        g = m.generate(np.full(64, 9e4), prep)
        pl = place(g, prep.geometry, policy="alpha-free", generator=torch.Generator().manual_seed(0))
        assert pl.stats["n_moved_ring"] == int(g.n_moved_ring) > 0           # an untrained model overfills rings
        assert pl.stats["n_collisions"] <= pl.stats["n_points"]


# ------------------------------------------------------------------------------------------------ empty layers
def test_empty_layers_do_not_squeeze_the_occupied_layer_energies(toy_geometry):
    """With empty layers drawn from the occupied distribution, the standardised energy feature of a
    partly empty layer keeps (about) unit spread over its occupied showers; the old floor squeezed it."""
    rng = np.random.default_rng(0)
    n_sh, n_l = 2000, toy_geometry.n_layers
    e_inc = np.exp(rng.uniform(np.log(1e3), np.log(1e5), n_sh))
    occupied = rng.random((n_sh, n_l)) < np.array([0.95, 0.5, 0.2])
    n_layer = np.where(occupied, rng.integers(1, 4, (n_sh, n_l)), 0)          # the middle layer has 3 cells
    e_layer = np.where(occupied, e_inc[:, None] * np.exp(rng.normal(-3, 0.7, (n_sh, n_l))), 0.0)
    spreads = {}
    for mode in ("floor", "occupied"):
        p = Preprocessor(toy_geometry, variant="II", empty_energy=mode)
        p.shower_mean, p.shower_std = [0.0] * 2 * n_l, [1.0] * 2 * n_l
        if mode == "occupied":
            p._fit_empty(n_layer, e_layer, e_inc)
        s = p.forward_layers(n_layer, e_layer, e_inc, np.random.default_rng(1)).astype(np.float64)
        s = (s - s.mean(0)) / s.std(0)
        spreads[mode] = [s[occupied[:, l], n_l + l].std() for l in range(n_l)]
        # the inverse: empty layers get no energy, occupied ones their energy
        p.shower_mean = (s * 0).mean(0).tolist()
        raw = p.forward_layers(n_layer, e_layer, e_inc)
        n_back, e_back = p.inverse_layers(raw, e_inc)
        keep = n_layer.sum(1) > 0
        np.testing.assert_array_equal(n_back[keep], n_layer[keep])
        np.testing.assert_allclose(e_back[keep], e_layer[keep], rtol=1e-4 if mode == "occupied" else 1e-2, atol=1e-3)
    assert max(spreads["floor"][1:]) < 0.5                      # the squeeze of the old representation
    assert min(spreads["occupied"]) > 0.85                     # gone
    # the device twin agrees (same noise)
    p = Preprocessor(toy_geometry, variant="II", empty_energy="occupied",
                     shower_mean=[0.0] * 2 * n_l, shower_std=[1.0] * 2 * n_l)
    p._fit_empty(n_layer, e_layer, e_inc)
    u, v = rng.random((n_sh, n_l)), rng.random((n_sh, n_l))
    tp = p.to_torch("cpu")
    t = tp.forward_layers(torch.from_numpy(n_layer), torch.from_numpy(e_layer), torch.from_numpy(e_inc),
                          torch.from_numpy(u), torch.from_numpy(v)).numpy()
    assert np.isfinite(t).all() and abs(t[:, n_l:][~occupied].mean() - t[:, n_l:][occupied].mean()) < 0.3


def test_old_preprocessing_loads_with_the_floor(toy):
    _, prep, _ = toy
    assert prep.empty_energy == "occupied" and len(prep.empty_mean) == prep.geometry.n_layers
    d = json.loads(json.dumps(prep.to_dict()))
    old = {k: v for k, v in d.items() if k not in ("empty_energy", "empty_mean", "empty_std")}
    assert Preprocessor.from_dict(old, prep.geometry).empty_energy == "floor"
    assert Preprocessor.from_dict(d, prep.geometry) == prep
