from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from calopc.models import available, get_model, load
from calopc.models.caloclouds import CaloClouds, CaloCloudsConfig
from calopc.models.data import ShowerCollate, ShowerDataset, iterate_batches
from calopc.models.distill import DistillConfig, distill

#: a tiny CaloClouds (fast on 2 CPU cores)
TINY_CC = {"widths": [16, 16], "fourier": 8, "layer_embedding": 2, "shower_transforms": 1, "shower_hidden": [16],
           "dim": 8, "heads": 2, "blocks": 1, "mlp": 16}


class Counter(torch.nn.Module):
    """Wraps a raw denoiser and counts its calls."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, *a, **kw):
        self.calls += 1
        return self.net(*a, **kw)


@pytest.fixture(scope="module")
def data(toy_parquet):
    ds = ShowerDataset.from_parquet(toy_parquet)
    prep = ds.fit_preprocessor(variant="II")
    return ds, prep, next(iterate_batches(ds, ShowerCollate(prep, seed=0), 12))


@pytest.fixture(scope="module")
def cc_run(tmp_path_factory, toy_parquet):
    from calopc.models.train import TrainConfig, train

    out = tmp_path_factory.mktemp("cc") / "run"
    train("caloclouds", toy_parquet, out, model_config=TINY_CC,
          config=TrainConfig(steps=6, batch_size=8, warmup=2, device="cpu", progress=False))
    return out


@pytest.fixture(scope="module")
def cm_run(cc_run):
    out = cc_run.parent / "run_cm"
    distill(cc_run, out, config=DistillConfig(steps=4, batch_size=8, device="cpu", progress=False, log_every=2))
    return out


def make(prep, **kw) -> CaloClouds:
    torch.manual_seed(0)
    return CaloClouds(CaloCloudsConfig.from_dict({**TINY_CC, **kw}).with_data(prep))


def test_registry_and_config_round_trip(data):
    prep = data[1]
    assert "caloclouds" in available()
    assert get_model("CaloClouds") == (CaloClouds, CaloCloudsConfig)
    cfg = CaloCloudsConfig.from_dict({**TINY_CC, "denoiser": "transformer", "alpha": "free"}).with_data(prep)
    back = CaloCloudsConfig.from_dict(json.loads(json.dumps(asdict(cfg))))
    assert back == cfg and back.widths == (16, 16) and (back.n_layers, back.shower_features) == (3, 6)
    assert cfg.preprocessing() == {"variant": "II", "dequantisation": cfg.dequantisation}
    with pytest.raises(ValueError, match="unknown CaloClouds config keys.*valid keys"):
        CaloCloudsConfig.from_dict({"widht": 3})
    with pytest.raises(ValueError, match="denoiser must be one of pointwise, transformer"):
        CaloCloudsConfig(denoiser="unet")
    with pytest.raises(ValueError, match="alpha must be"):
        CaloCloudsConfig(alpha="sometimes")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        CaloCloudsConfig(steps=0)
    with pytest.raises(ValueError, match="needs n_layers"):
        CaloClouds(CaloCloudsConfig())
    defaults = CaloClouds(CaloCloudsConfig().with_data(prep))
    assert sum(p.numel() for p in defaults.parameters()) < 2_000_000


@pytest.mark.parametrize("denoiser", ["pointwise", "transformer"])
def test_tiny_training_lowers_the_loss(data, denoiser):
    _, prep, batch = data
    model = make(prep, denoiser=denoiser)

    def loss() -> float:  # same σ and noise draws every time
        with torch.random.fork_rng():
            torch.manual_seed(5)
            return float(sum(model.loss(batch).detach() for _ in range(4)))

    before = loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()
    after = loss()
    assert after < 0.9 * before
    terms = model.loss_terms(batch)
    assert set(terms) == {"loss", "shower", "points"} and torch.isfinite(terms["loss"])


def test_default_preset_draws_alpha_at_placement(data):
    """The ``calopc`` preset (the default) leaves α to the placement; the published one and run directories saved
    without the key model it."""
    assert CaloCloudsConfig.from_dict({}).alpha == CaloCloudsConfig().alpha == "free"
    assert CaloCloudsConfig.from_dict({"preset": "published"}).alpha == "model"
    saved = asdict(CaloCloudsConfig.from_dict({}).with_data(data[1]))
    del saved["alpha"]
    assert CaloCloudsConfig.from_dict(saved).alpha == "model"


def test_generation_follows_the_shower_model(data):
    _, prep, _ = data
    model = make(prep, alpha="model").eval()
    e = np.array([2e3, 5e4, 1e4, 9e4])
    torch.manual_seed(1)
    _, n_layer, e_layer = model.shower.sample_layers(e, prep)
    torch.manual_seed(1)
    g = model.generate(e, prep)
    torch.testing.assert_close(g.counts, n_layer.sum(1))
    shower = torch.repeat_interleave(torch.arange(4), g.counts)
    n_got = torch.zeros(4 * 3, dtype=torch.int64).index_add_(0, shower * 3 + g.layer, torch.ones_like(g.layer))
    torch.testing.assert_close(n_got.reshape(4, 3), n_layer)
    e_got = torch.zeros(4 * 3, dtype=torch.float64).index_add_(0, shower * 3 + g.layer, g.E)
    torch.testing.assert_close(e_got.reshape(4, 3), e_layer.to(torch.float64))
    assert (g.E >= 0).all() and g.alpha is not None and (g.alpha.abs() <= np.pi).all()
    r_hi = torch.tensor([e[-1] for e in prep.geometry.r_edges], dtype=torch.float64)[g.layer]
    assert (g.r >= 0).all() and (g.r <= r_hi).all()
    # same seed, same showers; another seed, other showers
    torch.manual_seed(1)
    g2 = model.generate(e, prep)
    assert torch.equal(g.r, g2.r) and torch.equal(g.E, g2.E)
    torch.manual_seed(2)
    assert not torch.equal(model.generate(e, prep).E[:5], g.E[:5])
    # alpha-free: no angle; a sampler split in several calls gives the same structure
    free = make(prep, alpha="free", max_points=5).eval()
    torch.manual_seed(1)
    gf = free.generate(e, prep, steps=2)
    assert gf.alpha is None and torch.equal(gf.counts, g.counts)


def test_sampler_network_evaluations(data):
    _, prep, _ = data
    model = make(prep).eval()
    model.denoiser.net = Counter(model.denoiser.net)
    model.generate(np.array([1e4, 2e4]), prep)
    assert model.denoiser.net.calls == 25                     # 13 Heun steps
    model.denoiser.net.calls = 0
    model.generate(np.array([1e4, 2e4]), prep, steps=4)
    assert model.denoiser.net.calls == 7


def test_generate_run_hdf5_one_point_per_cell(cc_run, tmp_path):
    from calopc.io import open_showers
    from calopc.models.generate import generate

    loaded = load(cc_run)
    e = np.exp(np.random.default_rng(0).uniform(np.log(1e3), np.log(1e5), 20))
    out = tmp_path / "gen.h5"
    res = generate(cc_run, e, output=out, seed=3, batch_size=20, device="cpu", threshold=0.0)
    with torch.random.fork_rng():  # the per-layer counts the shower model draws first with that seed
        torch.manual_seed(3)
        _, n_layer, e_layer = loaded.model.shower.sample_layers(e, loaded.preprocessor)
    geo = loaded.geometry
    with open_showers(out, geometry=geo) as f:
        inc, vox = f.read()
    assert vox.shape == (20, geo.n_voxels)
    np.testing.assert_allclose(inc.reshape(-1), e)
    hits = np.stack([(vox[:, geo.offsets[k]:geo.offsets[k + 1]] > 0).sum(1) for k in range(geo.n_layers)], 1)
    c = res.collisions
    assert res.n_points == int(n_layer.sum()) and c["n_points"] == res.n_points and 0 <= c["collision_rate"] <= 1
    assert c["n_outside"] == 0 and c["n_dropped"] == 0
    # one point per cell: each point has a cell of its own in its layer (merged points share one)
    assert hits.sum() == res.n_points - c["n_merged"]
    assert (hits <= n_layer.numpy()).all()
    if c["n_merged"] == 0:
        np.testing.assert_array_equal(hits, n_layer.numpy())
    layer_e = np.stack([vox[:, geo.offsets[k]:geo.offsets[k + 1]].sum(1) for k in range(geo.n_layers)], 1)
    np.testing.assert_allclose(layer_e, e_layer.numpy(), rtol=1e-5)


def test_distilled_student_samples_in_one_evaluation(cm_run, cc_run):
    loaded = load(cm_run)
    model = loaded.model
    assert loaded.name == "caloclouds" and model.config.consistency and model.config.steps == 1
    teacher = load(cc_run).model
    # the shower model is the teacher's; the point network moved away from the teacher
    for k, v in teacher.shower.state_dict().items():
        torch.testing.assert_close(model.shower.state_dict()[k], v)
    assert any(not torch.equal(a, b) for a, b in zip(model.denoiser.parameters(), teacher.denoiser.parameters()))
    stats = [json.loads(s) for s in (cm_run / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [2, 4] and all(np.isfinite(s["loss"]) for s in stats)
    model.denoiser.net = Counter(model.denoiser.net)
    g = model.generate(np.array([1e4, 3e4, 5e3]), loaded.preprocessor)
    assert model.denoiser.net.calls == 1 and g.E.shape[0] == int(g.counts.sum())
    model.denoiser.net.calls = 0
    model.generate(np.array([1e4]), loaded.preprocessor, steps=2)
    assert model.denoiser.net.calls == 2
    assert not list(cm_run.parent.glob(".run_cm.tmp-*"))   # the temporary directory was renamed


def test_distill_cli_and_errors(cc_run, tmp_path, capsys):
    from calopc.cli import main

    out = tmp_path / "cm"
    assert main(["distill", str(cc_run), "-o", str(out), "--steps", "2", "--batch-size", "8", "--device", "cpu",
                 "--points-per-shower", "3",
                 "--no-progress"]) == 0
    assert "distilled" in capsys.readouterr().out and (out / "model_ema.safetensors").exists()
    assert load(out).model.config.consistency

    def err(args: list[str]) -> str:
        assert main(args) == 2
        e = capsys.readouterr().err.strip()
        assert "\n" not in e and "Traceback" not in e
        return e

    other = tmp_path / "other"                     # a run of another model
    other.mkdir()
    meta = json.loads((cc_run / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**meta, "model": "calopointflow"}))
    assert "holds a 'calopointflow' model" in err(["distill", str(other), "-o", str(tmp_path / "a"), "--no-progress"])
    assert "steps must be an integer >= 1" in err(["distill", str(cc_run), "-o", str(tmp_path / "b"), "--steps", "0"])
    assert "not empty" in err(["distill", str(cc_run), "-o", str(out), "--steps", "1", "--no-progress"])
    assert "already a distilled" in err(["distill", str(out), "-o", str(tmp_path / "c"), "--no-progress"])
    assert "no such run directory" in err(["distill", str(tmp_path / "nope"), "-o", str(tmp_path / "d")])
    broken = tmp_path / "broken"
    broken.mkdir()
    assert "not a run directory" in err(["distill", str(broken), "-o", str(tmp_path / "e"), "--no-progress"])
    (broken / "config.json").write_text((cc_run / "config.json").read_text())
    assert "no teacher weights" in err(["distill", str(broken), "-o", str(tmp_path / "f"), "--no-progress"])
    assert not (tmp_path / "f").exists()
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        load(cc_run).model.generate(np.array([1e4]), load(cc_run).preprocessor, steps=0)
    gen = ["generate", "-n", "3", "--energies", "1e4", "--device", "cpu", "--no-progress"]
    assert main([*gen, str(out), "--steps", "2"]) == 0 and "generated 3 showers" in capsys.readouterr().out
    assert "steps must be an integer >= 1" in err([*gen, str(cc_run), "--steps", "0"])


def test_train_cli_resolves_caloclouds_options(toy_parquet, capsys):
    from calopc.cli import main

    assert main(["train", "caloclouds", "--data", str(toy_parquet), "--out", "x", "--set", "model.denoiser=transformer",
                 "--set", "model.alpha=free", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)["model_config"]
    assert cfg["denoiser"] == "transformer" and cfg["alpha"] == "free" and cfg["widths"] == [128, 256, 512, 256, 128]
    assert main(["train", "caloclouds", "--data", str(toy_parquet), "--out", "x", "--set", "model.denoiser=mlp",
                 "--dry-run"]) == 2
    assert "denoiser must be one of" in capsys.readouterr().err


def test_points_per_shower_loss_subsamples(data):
    _, prep, batch = data
    model = make(prep, points_per_shower_loss=2)
    model.denoiser.net = Counter(model.denoiser.net)
    seen = []
    model.denoiser.net.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw["shower"]), with_kwargs=True)
    loss = model.loss(batch)
    loss.backward()
    per_shower = torch.bincount(seen[0], minlength=len(batch))
    assert (per_shower == batch.n.clamp(max=2)).all() and torch.isfinite(loss)


def test_distill_finds_the_teachers_data(cc_run, toy_parquet, tmp_path):
    import shutil

    run = tmp_path / "teacher"
    shutil.copytree(cc_run, run)
    shutil.copy(toy_parquet, tmp_path / "t.parquet")
    opts = json.loads((run / "training_options.json").read_text())
    (run / "training_options.json").write_text(json.dumps({**opts, "data": ["t.parquet"]}))  # relative, next to run
    cfg = DistillConfig(steps=1, batch_size=8, device="cpu", progress=False)
    distill(run, tmp_path / "cm", config=cfg)
    rec = json.loads((tmp_path / "cm" / "training_options.json").read_text())
    assert rec["data"] == [str((tmp_path / "t.parquet").resolve())]
    (run / "training_options.json").write_text(json.dumps({**opts, "data": ["gone.parquet"]}))
    with pytest.raises(ValueError, match="gone.parquet .*not found; pass the data with --data"):
        distill(run, tmp_path / "cm2", config=cfg)
    assert not (tmp_path / "cm2").exists()


def test_generate_model_kwargs_are_checked(toy_run, cc_run):
    from calopc.models.generate import generate

    with pytest.raises(ValueError, match=r"generation options \['steps'\] are not taken by the calopointflow model"):
        generate(toy_run, np.array([1e4]), device="cpu", model_kwargs={"steps": 2})
    with pytest.raises(ValueError, match=r"generation options \['stpes'\]"):
        generate(cc_run, np.array([1e4]), device="cpu", model_kwargs={"stpes": 2})
    assert generate(cc_run, np.array([1e4, 2e4]), device="cpu", model_kwargs={"steps": 2}).n_showers == 2


def test_coupling_shower_model_option(data):
    """``shower_passes=2``: the shared shower model as a coupling flow (2 passes to sample instead of 2L)."""
    prep = data[1]
    m = make(prep, shower_passes=2)
    assert m.shower.flow.transform.transforms[0].passes == 2
    assert make(prep).shower.flow.transform.transforms[0].passes == 6  # default: autoregressive over the 2L features
    cond = torch.zeros(4, 1)
    s = m.shower.sample(cond)
    assert s.shape == (4, 6) and torch.isfinite(s).all()
    assert torch.isfinite(m.shower.loss(cond, s))


def test_presets_give_the_model_keys_and_the_training_recipe():
    """``preset="published"`` is CaloClouds II as published (model keys and RAdam/EMA recipe); the default preset has
    its own recipe; the keys given override the preset's; a saved config without the newer switches keeps them off."""
    from calopc.models.caloclouds import PRESETS
    from calopc.models.train import train_config, training_defaults

    pub = CaloCloudsConfig.from_dict({"preset": "published"})
    assert (pub.alpha, pub.dequantisation, pub.sigma_data, pub.p_mean, pub.p_std, pub.steps, pub.widths) == \
        ("model", "uniform", 0.5, -1.2, 1.2, 13, (128, 256, 512, 256, 128))
    t = train_config("caloclouds", model_config={"preset": "published"})
    assert (t.optimizer, t.lr, t.schedule, t.warmup, t.ema_decay, t.ema_warmup, t.batch_size, t.grad_clip) == \
        ("radam", 1e-4, "constant", 0, 0.9999, "power", 128, 10.0)
    assert training_defaults("caloclouds") == PRESETS["calopc"]["train"] == training_defaults("caloclouds", {})
    assert training_defaults("caloclouds") != training_defaults("caloclouds", {"preset": "published"})
    mine = CaloCloudsConfig.from_dict({})
    assert all(getattr(mine, k) == (tuple(v) if isinstance(v, list) else v) for k, v in PRESETS["calopc"]["model"].items())
    assert CaloCloudsConfig.from_dict({"preset": "published", "widths": [32, 64]}).widths == (32, 64)   # given wins
    with pytest.raises(ValueError, match="preset must be one of calopc, published"):
        CaloCloudsConfig.from_dict({"preset": "fast"})
    with pytest.raises(ValueError, match="preset must be one of calopc, published"):
        training_defaults("caloclouds", {"preset": "fast"})
    with pytest.raises(ValueError, match="overflow must be one of move, merge"):
        CaloCloudsConfig(overflow="drop")
    old = {k: v for k, v in asdict(CaloCloudsConfig(n_layers=3, shower_features=6)).items()
           if k not in ("overflow", "dequantisation", "preset")}
    back = CaloCloudsConfig.from_dict(old)
    assert (back.overflow, back.dequantisation) == ("merge", "uniform")


def _fixed_sampler(model: CaloClouds, seed: int = 1):
    """Replace the sampler by standard normal features (radii well inside their layers), the same for a seed."""
    def fake(cond, shower, shower_of, layer, **kw):
        return torch.randn(shower_of.shape[0], len(model.point_dims), generator=torch.Generator().manual_seed(seed))

    model.sample_points = fake
    return model


def test_overflow_move_fills_rings_without_a_second_point_per_cell(data):
    """``overflow="move"``: α is left to the placement and no (layer, r) ring of a shower holds more points than
    its α bins (the least energetic points move); the layer counts and energies are kept; ``"merge"`` keeps α."""
    from calopc.models.cells import locate, place

    _, prep, _ = data
    geo = prep.geometry
    model = _fixed_sampler(make(prep, alpha="model").eval())     # α modelled
    e = np.full(6, 9e4)
    torch.manual_seed(4)
    kept = model.generate(e, prep, overflow="merge")
    torch.manual_seed(4)
    g = model.generate(e, prep, overflow="move")
    assert kept.alpha is not None and g.alpha is None
    torch.testing.assert_close(g.counts, kept.counts)
    torch.testing.assert_close(g.E, kept.E)                        # same points, same energies: only radii change
    shower = torch.repeat_interleave(torch.arange(6), g.counts)
    inside, rb, _ = locate(geo, g.layer, g.r)
    ring = (shower * geo.n_layers + g.layer) * max(geo.n_r) + rb
    per_ring = torch.zeros(int(ring.max()) + 1, dtype=torch.int64).index_add_(0, ring, torch.ones_like(ring))
    assert inside.all() and (per_ring[ring] <= torch.as_tensor(geo.n_alpha)[g.layer]).all()
    before = locate(geo, kept.layer, kept.r)[1]
    assert int(g.n_moved_ring) == int((rb != before).sum()) > 0
    out = rb > before                        # the points a full ring passed outwards are its least energetic ones
    assert out.any()
    for key in torch.unique((ring - rb + before)[out]):
        members = (ring - rb + before) == key
        assert g.E[members & out].max() <= g.E[members & (rb == before)].min()
    pl = place(g, geo, policy="alpha-free", generator=torch.Generator().manual_seed(0))
    assert pl.stats["n_collisions"] == 0 and pl.stats["n_merged"] == 0
    with pytest.raises(ValueError, match="overflow must be one of move, merge"):
        model.generate(e, prep, overflow="spill")
    free = _fixed_sampler(make(prep, alpha="free").eval())          # α free: "move" by default
    torch.manual_seed(4)
    assert free.generate(e, prep).alpha is None and int(free.generate(e, prep).n_moved_ring) > 0


def test_generation_inverts_the_runs_dequantisation(toy_parquet):
    """With ``dequantisation="cdf"`` the preprocessing is fitted with it and generation maps the sampled features
    back through the run's own inverse (not the uniform one)."""
    ds = ShowerDataset.from_parquet(toy_parquet)
    cfg = CaloCloudsConfig.from_dict({**TINY_CC, "dequantisation": "cdf", "alpha": "model"})
    prep = ds.fit_preprocessor(**cfg.preprocessing())
    assert prep.dequantisation == "cdf"
    torch.manual_seed(0)
    model = CaloClouds(cfg.with_data(prep)).eval()
    fixed = {}

    def fake(cond, shower, shower_of, layer, **kw):
        y = torch.randn(shower_of.shape[0], len(model.point_dims), generator=torch.Generator().manual_seed(1))
        fixed["y"], fixed["layer"] = y, layer
        return y

    model.sample_points = fake
    g = model.generate(np.array([2e4, 5e4]), prep, overflow="merge")
    zar, _ = prep.inverse_points_layer(fixed["y"].numpy(), fixed["layer"].numpy())
    np.testing.assert_allclose(g.r.numpy(), zar[:, 2], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(g.alpha.numpy(), zar[:, 1], rtol=1e-6, atol=1e-9)


def test_distillation_thins_the_loss_as_the_teacher_did(toy_parquet, tmp_path, monkeypatch):
    """Without ``points_per_shower`` the student's loss samples as many points per shower as the teacher's
    ``points_per_shower_loss`` (recorded resolved); an explicit value wins."""
    from calopc.models.train import TrainConfig, train

    run = tmp_path / "teacher"
    train("caloclouds", toy_parquet, run, model_config={**TINY_CC, "points_per_shower_loss": 2},
          config=TrainConfig(steps=2, batch_size=8, warmup=0, device="cpu", progress=False))
    seen = []
    real = CaloClouds.subsample
    monkeypatch.setattr(CaloClouds, "subsample", staticmethod(lambda so, b, k: seen.append(k) or real(so, b, k)))
    for given, want in ((None, 2), (0, 0)):
        seen.clear()
        out = tmp_path / f"cm{given}"
        distill(run, out, config=DistillConfig(steps=2, batch_size=8, device="cpu", progress=False,
                                               points_per_shower=given))
        assert json.loads((out / "distill_options.json").read_text())["distill"]["points_per_shower"] == want
        assert seen == ([2, 2] if want else [])


@pytest.mark.parametrize("alpha", ["free", "model"])
def test_distill_moment_matching_adds_the_layer_moment_term_of_one_step_showers(toy_parquet, tmp_path, monkeypatch,
                                                                                alpha):
    """``moment_matching``: the student's one-step showers (same showers, layers and counts, from pure noise)
    against the batch; the real side reads the radius and energy-share columns whether or not α is diffused,
    the logged loss grows by exactly weight × the logged term, and the gradient reaches the student."""
    import calopc.models.moments as moments
    from calopc.models.train import TrainConfig, train

    run = tmp_path / "teacher"
    train("caloclouds", toy_parquet, run, model_config={**TINY_CC, "alpha": alpha},
          config=TrainConfig(steps=2, batch_size=8, warmup=0, device="cpu", progress=False))
    prep = load(run).preprocessor
    flat, calls = [], []
    real_flatten, real_moments = CaloClouds.flatten, moments.layer_moments
    monkeypatch.setattr(CaloClouds, "flatten", staticmethod(lambda b: flat.append(real_flatten(b)) or flat[-1]))
    monkeypatch.setattr(moments, "layer_moments", lambda u, w, *a: calls.append((u, w, *a)) or real_moments(u, w, *a))
    logs = {}
    for weight in (0.0, 2.0):
        flat.clear(), calls.clear()
        out = tmp_path / f"cm{weight}"
        distill(run, out, config=DistillConfig(steps=1, batch_size=8, device="cpu", progress=False, log_every=1,
                                               points_per_shower=0, moment_matching=weight))
        logs[weight] = json.loads((out / "stats.jsonl").read_text().splitlines()[0])
    assert "moment_matching" not in logs[0.0]
    assert logs[2.0]["loss"] == pytest.approx(logs[0.0]["loss"] + 2.0 * logs[2.0]["moment_matching"], rel=1e-5)
    assert logs[2.0]["moment_matching"] > 0
    assert json.loads((tmp_path / "cm2.0" / "distill_options.json").read_text())["distill"]["moment_matching"] == 2.0
    # two calls: the real points (no gradient) and the student's (gradient), same layers and showers
    (u_r, w_r, lay, so, b, n_l), (u_f, w_f, *rest) = calls
    assert not u_r.requires_grad and u_f.requires_grad and w_f.requires_grad
    assert all(torch.equal(p, q) for p, q in zip(rest[:2], (lay, so))) and rest[2:] == [b, n_l]
    x, shower_of, layer = flat[0]
    assert torch.equal(layer, lay) and torch.equal(shower_of, so)
    y = x.double() * torch.as_tensor(prep.point_std) + torch.as_tensor(prep.point_mean)
    assert torch.allclose(u_r.double(), torch.sigmoid(y[:, 1]), atol=1e-6)          # the radius column
    share = torch.zeros(b * n_l, dtype=torch.float64).index_add_(0, so * n_l + lay, w_r.double())
    assert torch.allclose(share[share > 0], torch.ones((), dtype=torch.float64), atol=1e-3)   # shares of a layer
    with pytest.raises(ValueError, match="moment_matching must be >= 0"):
        DistillConfig(moment_matching=-1.0)
    # moment_condition: the same first step plus the moments' covariance with log E_inc (a non-negative part)
    out = tmp_path / "cm-cond"
    distill(run, out, config=DistillConfig(steps=1, batch_size=8, device="cpu", progress=False, log_every=1,
                                           points_per_shower=0, moment_matching=2.0, moment_condition=True))
    cond_log = json.loads((out / "stats.jsonl").read_text().splitlines()[0])
    assert cond_log["moment_matching"] > logs[2.0]["moment_matching"]
    assert cond_log["loss"] == pytest.approx(logs[0.0]["loss"] + 2.0 * cond_log["moment_matching"], rel=1e-5)


def test_distill_cli_moment_options(cc_run, capsys):
    from calopc.cli import main

    args = ["distill", str(cc_run), "-o", "x", "--dry-run"]
    assert main([*args, "--moment-matching", "0.5", "--moment-condition"]) == 0
    d = json.loads(capsys.readouterr().out)["distill"]
    assert (d["moment_matching"], d["moment_condition"]) == (0.5, True)
    assert main(args) == 0
    d = json.loads(capsys.readouterr().out)["distill"]
    assert (d["moment_matching"], d["moment_condition"]) == (0.0, False)


def test_distill_moment_matching_needs_the_uniform_dequantisation(toy_parquet, tmp_path):
    from calopc.models.train import TrainConfig, train

    run = tmp_path / "teacher"
    train("caloclouds", toy_parquet, run, model_config={**TINY_CC, "dequantisation": "cdf"},
          config=TrainConfig(steps=1, batch_size=8, warmup=0, device="cpu", progress=False))
    with pytest.raises(ValueError, match="moment_matching reads radii .* dequantisation='cdf'"):
        distill(run, tmp_path / "cm", config=DistillConfig(steps=1, batch_size=8, device="cpu", progress=False,
                                                          moment_matching=1.0))
    assert not (tmp_path / "cm").exists()
