from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_geometric")

from calopc.models.data import ShowerCollate, ShowerDataset  # noqa: E402
from calopc.models.deeptree import PRESETS, DeepTree, DeepTreeConfig  # noqa: E402
from calopc.models.preprocess import Preprocessor  # noqa: E402

#: a tiny DeepTree (20 leaves, fast on 2 CPU cores); the toy showers have at most 19 points
TINY = {"branches": [2, 2, 5], "features": [8, 6, 5, 4], "n_global": 4, "gin_hidden": 16, "branch_hidden": 16,
        "cond_hidden": 8, "head_hidden": 16, "layer_embedding": 4, "critic_hidden": 16, "critic_heads": 4,
        "meanfield_blocks": 2, "meanfield_tokens": 2, "shower_transforms": 1, "shower_hidden": [16]}


@pytest.fixture(scope="module")
def toy(toy_parquet):
    ds = ShowerDataset.from_parquet(toy_parquet)
    prep = ds.fit_preprocessor(variant="II")
    batch = ShowerCollate(prep, seed=1)([ds[i] for i in range(8)])
    return ds, prep, batch


def _model(prep: Preprocessor, **over) -> DeepTree:
    torch.manual_seed(0)
    return DeepTree(DeepTreeConfig.from_dict({**TINY, **over}).with_data(prep))


def test_tree_shapes_and_pruning(toy):
    _, prep, batch = toy
    m = _model(prep)
    gen = m.generator
    assert gen.leaves == 20
    b = 3
    cond = torch.randn(b, 3 + 2 * prep.geometry.n_layers)
    noise = torch.randn(b, 8)
    full = gen.grow(cond, noise)
    assert full.shape == (b * 20, 4)
    # leaves see only their ancestors: pruning before the last message passing gives the same leaves
    keep = torch.rand(b * 20, generator=torch.Generator().manual_seed(0)) < 0.4
    assert torch.allclose(gen.grow(cond, noise, keep), full[keep], atol=1e-6)
    # ancestors by index arithmetic: node j of level 2 has ancestors j // 4 (root) and j // 2 (level 1)
    offsets = [0, b, b + 2 * b]
    e = gen.ancestor_edges(2, b, offsets)
    assert e.shape == (2, 2 * b * 4)
    for j in range(b * 4):
        assert sorted(e[0, e[1] == j].tolist()) == [j // 4, b + j // 2]
    # pruning to n and the layers from the per-layer counts
    n_layer = torch.tensor([[3, 0, 2], [0, 1, 0], [7, 6, 7]])
    shower = torch.randn(b, 2 * 3)
    x, layer, shower_of = gen.points(cond, shower, n_layer)
    assert x.shape == (int(n_layer.sum()), 3)
    assert torch.bincount(shower_of, minlength=b).tolist() == [5, 1, 20]
    got = torch.zeros(b, 3, dtype=torch.int64).index_put_((shower_of, layer), torch.ones_like(layer), accumulate=True)
    assert torch.equal(got, n_layer)
    with pytest.raises(ValueError, match="leaves"):
        gen.points(cond, shower, torch.tensor([[10, 10, 1], [0, 1, 0], [1, 1, 1]]))


def test_energy_shares_sum_to_one_per_layer(toy):
    _, prep, batch = toy
    m = _model(prep)
    cond = m.condition(batch.cond, batch.n, batch.shower)
    x, layer, mask = m.fake(batch, cond, m.layer_counts(batch))
    mean, std = m.config.point_mean[2], m.config.point_std[2]
    w = torch.exp(x[..., 2] * std + mean) * mask
    per_layer = torch.zeros(len(batch), m.config.n_layers).scatter_add_(1, layer, w)
    used = m.layer_counts(batch) > 0
    assert torch.allclose(per_layer[used], torch.ones(int(used.sum())), atol=1e-4)
    assert torch.equal(mask.sum(1), batch.n)
    # without the rescaling the shares are free
    m = _model(prep, energy_rescale=False)
    x, layer, mask = m.fake(batch, cond, m.layer_counts(batch))
    w = torch.exp(x[..., 2] * std + mean) * mask
    per_layer = torch.zeros(len(batch), m.config.n_layers).scatter_add_(1, layer, w)
    assert not torch.allclose(per_layer[used], torch.ones(int(used.sum())), atol=1e-2)


@pytest.mark.parametrize("critic", ["pool", "pool+points", "meanfield"])
def test_critic_is_permutation_invariant(toy, critic):
    _, prep, batch = toy
    m = _model(prep, critic=critic.split("+")[0], critic_point_level=critic.endswith("points")).eval()
    levels = {"pool": 3, "pool+points": 4, "meanfield": 1}[critic]  # one score per sub-critic
    cond = m.condition(batch.cond, batch.n, batch.shower)
    assert m.critic(batch.x, batch.layer, batch.mask, cond, batch.shower)[0].shape == (len(batch), levels)
    d0, f0 = m.critic(batch.x, batch.layer, batch.mask, cond, batch.shower)
    # permute the points within each shower (the padding stays behind them)
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.cat([torch.randperm(int(n), generator=g), torch.arange(int(n), batch.x.shape[1])])
                       for n in batch.n])
    x = torch.gather(batch.x, 1, idx[..., None].expand_as(batch.x))
    lay = torch.gather(batch.layer, 1, idx)
    assert not torch.equal(x, batch.x)
    d1, f1 = m.critic(x, lay, batch.mask, cond, batch.shower)
    assert torch.allclose(d0, d1, atol=1e-5) and torch.allclose(f0, f1, atol=1e-5)
    # and it does look at the points
    d2, _ = m.critic(batch.x + 1.0, batch.layer, batch.mask, cond, batch.shower)
    assert not torch.allclose(d0, d2, atol=1e-4)


@pytest.mark.parametrize("critic", ["pool", "meanfield"])
def test_one_critic_and_one_generator_step_lower_their_losses(toy, critic):
    _, prep, batch = toy
    m = _model(prep, critic=critic, lr_generator=1e-4, lr_critic=1e-4).eval()  # eval: no dropout, fixed σ(W)
    opts = m.configure_optimizers(None)
    assert set(opts) == {"generator", "critic", "shower"}
    assert opts["generator"].param_groups[0]["lr"] == 1e-4

    def backward(loss, name):
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()

    cond = m.condition(batch.cond, batch.n, batch.shower)
    n_layer = m.layer_counts(batch)
    noise = torch.randn(len(batch), m.config.features[0], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fake = m.fake(batch, cond, n_layer, noise)
    before = m.critic_loss(batch, fake, cond)
    backward(before, "critic")
    with torch.no_grad():
        assert float(m.critic_loss(batch, fake, cond)) < float(before)
    m.critic.requires_grad_(False)
    torch.manual_seed(3)  # the same leaf noise before and after
    before, _ = m.generator_loss(batch, m.fake(batch, cond, n_layer, noise), cond)
    backward(before, "generator")
    torch.manual_seed(3)
    with torch.no_grad():
        after, _ = m.generator_loss(batch, m.fake(batch, cond, n_layer, noise), cond)
    assert float(after) < float(before.detach())


def test_training_step_updates_all_three_networks(toy):
    _, prep, batch = toy
    m = _model(prep, critic_steps=2, shower_steps=2).train()
    opts = m.configure_optimizers(None)
    calls = []

    def backward(loss, name):
        calls.append(name)
        opts[name].zero_grad(set_to_none=True)
        critic_grads = [None if p.grad is None else p.grad.clone() for p in m.critic.parameters()]
        loss.backward()
        if name == "generator":  # the critic is frozen while the generator learns
            assert all(p.requires_grad is False for p in m.critic.parameters())
            assert all(torch.equal(a, p.grad) for a, p in zip(critic_grads, m.critic.parameters()) if a is not None)
        opts[name].step()

    before = {k: [p.detach().clone() for p in getattr(m, k).parameters()] for k in ("generator", "critic", "shower_model")}
    out = m.training_step(batch, 0, backward)
    assert calls == ["shower", "shower", "critic", "critic", "generator"]
    assert {"loss", "critic", "generator", "shower", "feature_matching"} <= set(out)
    assert all(v.dim() == 0 and torch.isfinite(v) and not v.requires_grad for v in out.values())
    for k, ps in before.items():
        assert any(not torch.equal(a, b) for a, b in zip(ps, getattr(m, k).parameters())), k
    assert all(p.requires_grad for p in m.critic.parameters())


@pytest.mark.parametrize("critic_steps", [1, 2])
def test_training_step_shows_one_draw_of_showers_to_both_updates(toy, critic_steps):
    """A step runs the generator once per critic update; the last draw (with the generator's graph) is shown to
    the critic for its update and then, after it, for the generator's; the real batch is seen once per
    critic update and its features there are the feature-matching target (three critic passes per step
    with one critic update, not four)."""
    _, prep, batch = toy
    m = _model(prep, critic_steps=critic_steps).train()
    opts = m.configure_optimizers(None)
    seen, draws = [], []
    critic_forward, points = m.critic.forward, m.generator.points

    def spy_critic(x, layer, mask, cond, shower, packed=None):
        d, f = critic_forward(x, layer, mask, cond, shower, packed)
        seen.append(("real" if x is batch.x else "fake", packed[0].data_ptr(), f.detach().clone()))
        return d, f

    def spy_points(*a, **k):
        out = points(*a, **k)
        draws.append(out[0].data_ptr())
        return out

    def backward(loss, name):
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()

    m.critic.forward, m.generator.points = spy_critic, spy_points
    fm_targets = []
    generator_loss = m._generator_loss
    m._generator_loss = lambda *a: (fm_targets.append(a[3]), generator_loss(*a))[1]
    m.training_step(batch, 0, backward)
    assert [k for k, *_ in seen] == ["real", "fake"] * critic_steps + ["fake"]
    assert len(draws) == critic_steps
    assert seen[-1][1] == seen[-2][1] == draws[-1]          # the same generated points for both updates
    assert torch.equal(fm_targets[0], seen[-3][2])            # the real features of the last critic update


def test_packed_chunked_attention_is_the_padded_attention():
    """Attention of shared queries to the real entries packed, in chunks that each hold one shower's entries,
    gives the masked attention over the padded layout: values and gradients, for showers over several
    chunks, of one entry, filling a chunk exactly, and with spare chunks."""
    from calopc.models.deeptree.critics import _Attention, chunk_layout

    torch.manual_seed(0)
    att = _Attention(8, 2, sn=False)
    n = torch.tensor([5, 1, 9, 4])
    b, n_max, total = len(n), int(n.max()), int(n.sum())
    owner, valid, src = chunk_layout(n, total, size=4)
    assert owner.tolist() == [0, 0, 1, 2, 2, 2, 3, 4, 4]      # ceil(19 / 4) + 4 = 9 chunks, 2 spare ones
    assert valid.sum(1).tolist() == [4, 1, 1, 4, 4, 1, 4, 0, 0]
    assert src.view(-1, 4)[valid].tolist() == list(range(total))
    mask = torch.arange(n_max)[None] < n[:, None]
    packed = torch.randn(total, 8, requires_grad=True)
    padded = torch.zeros(b, n_max, 8).index_put(torch.nonzero(mask, as_tuple=True), packed)
    seeds = torch.randn(3, 8)
    weight = torch.randn(b, 3, 8)
    want = att(seeds, padded, mask)
    got = att.forward_packed(seeds, packed, (owner, valid, src), b)
    assert torch.allclose(got, want, atol=1e-5)
    params = [packed, *att.parameters()]
    g_want = torch.autograd.grad((want * weight).sum(), params, allow_unused=True)
    g_got = torch.autograd.grad((got * weight).sum(), params, allow_unused=True)
    for p, gw, gg in zip(params, g_want, g_got):
        if p is att.k.bias:      # a key bias shifts every logit of a query alike: no effect, zero gradient
            assert float(gw.abs().max()) < 1e-5 and float(gg.abs().max()) < 1e-5
            continue
        assert torch.allclose(gg, gw, atol=1e-5), p.shape


def test_packed_attention_gives_an_empty_shower_nothing_to_attend_to():
    """A shower without entries attends to nothing: its attended values are 0 (no value bias), as the padded
    attention's masked sum gives, whatever the other showers hold."""
    torch.manual_seed(0)
    from calopc.models.deeptree.critics import _Attention, chunk_layout

    att = _Attention(16, 4)
    with torch.no_grad():
        att.v.bias.fill_(0.7)
    n = torch.tensor([5, 0, 70])
    q, kv = torch.randn(3, 16), torch.randn(int(n.sum()), 16)
    out = att.forward_packed(q, kv, chunk_layout(n, int(n.sum())), 3)
    h = q + att.o(torch.zeros(3, 16))
    assert torch.allclose(out[1], h + att.ff(h), atol=1e-6)
    assert not torch.allclose(out[0], h + att.ff(h), atol=1e-3)


def test_packed_attention_folds_a_linear_layer_before_keys_and_values():
    """``forward_packed(..., pre=layer)`` on the layer's input is the attention to the layer's output: values and
    gradients of the entries and of every weight (the folded layer's included)."""
    from calopc.models.deeptree.critics import _Attention, chunk_layout

    torch.manual_seed(1)
    att = _Attention(8, 2, sn=False)
    pre = torch.nn.Linear(8, 8)
    n = torch.tensor([3, 7, 1])
    chunks = chunk_layout(n, int(n.sum()), size=4)
    x = torch.randn(int(n.sum()), 8, requires_grad=True)
    seeds = torch.randn(5, 8)
    weight = torch.randn(len(n), 5, 8)
    want = att.forward_packed(seeds, pre(x), chunks, len(n))
    got = att.forward_packed(seeds, x, chunks, len(n), pre)
    assert torch.allclose(got, want, atol=1e-5)
    params = [x, *att.parameters(), *pre.parameters()]
    g_want = torch.autograd.grad((want * weight).sum(), params, allow_unused=True)
    g_got = torch.autograd.grad((got * weight).sum(), params, allow_unused=True)
    for p, gw, gg in zip(params, g_want, g_got):
        if p is att.k.bias:
            continue
        assert gg is not None and torch.allclose(gg, gw, atol=1e-5), p.shape


def test_pool_critic_folds_the_point_output_layer(toy):
    """The pool critic with the points' output layer folded into the first level's keys and values scores as the
    critic that embeds the points first (the point-level sub-critic, which needs them, turns the fold off)."""
    from calopc.models.deeptree.critics import chunk_layout

    _, prep, batch = toy
    m = _model(prep).eval()
    crit = m.critic
    cond = m.condition(batch.cond, batch.n, batch.shower)
    scores, feats = crit(batch.x, batch.layer, batch.mask, cond, batch.shower)
    h, _, _ = crit.inp.embed(batch.x, batch.layer, batch.mask, cond, batch.shower)       # with the output layer
    first = crit.pool[0].forward_packed(crit.seeds[0], h, chunk_layout(batch.mask.sum(1), h.shape[0]), len(batch.n))
    s0, f0 = crit.sub[0](first, cond)
    assert torch.allclose(scores[:, 0], s0, atol=1e-5)
    assert torch.allclose(feats[:, :f0.shape[1]], f0, atol=1e-5)


def test_critic_point_embedding_is_the_first_layer_on_the_concatenated_inputs(toy):
    """The per-point critic input (summed per (shower, layer) and gathered) is the first linear layer applied to
    the point features, r·(cos α, sin α), layer embedding and position, the layer's shower features and the
    condition projection."""
    _, prep, batch = toy
    m = _model(prep).eval()
    inp = m.critic.inp
    cond = m.condition(batch.cond, batch.n, batch.shower)
    h, shower_of, idx = inp.embed(batch.x, batch.layer, batch.mask, cond, batch.shower)
    n_l = m.config.n_layers
    xm, lay = batch.x[batch.mask], batch.layer[batch.mask]
    u = torch.sigmoid(xm[:, :2] * inp.std + inp.mean)
    ang = (2 * u[:, 0] - 1) * math.pi
    xy = torch.stack([u[:, 1] * torch.cos(ang), u[:, 1] * torch.sin(ang)], -1)
    pos = 2 * lay.float() / (n_l - 1) - 1
    per_layer = torch.stack([batch.shower[shower_of, lay], batch.shower[shower_of, n_l + lay]], -1)
    first = inp.point(torch.cat([xm, xy, inp.layer_embed(lay), pos[:, None], per_layer], -1))
    want = inp.out(torch.nn.functional.leaky_relu(first + inp.cond(cond)[shower_of], 0.2))
    assert torch.allclose(h, want, atol=1e-5)
    assert torch.equal(idx, batch.mask.reshape(-1).nonzero().squeeze(1))


def test_generate_counts_layers_energies_and_rotation(toy, monkeypatch):
    ds, prep, _ = toy
    m = _model(prep).eval()
    n_layer = torch.tensor([[3, 1, 2], [0, 4, 5]])
    e_layer = torch.tensor([[10.0, 5.0, 2.0], [0.0, 7.0, 1.0]], dtype=torch.float64)
    e_inc = np.array([1e4, 2e4])
    shower = torch.as_tensor(prep.forward_layers(n_layer.numpy(), e_layer.numpy(), e_inc))
    monkeypatch.setattr(m.shower_model, "sample_layers", lambda e, p: (shower, n_layer, e_layer))
    g = m.generate(e_inc, prep)
    assert g.counts.tolist() == [6, 9]
    shower_of = torch.arange(2).repeat_interleave(g.counts)
    got = torch.zeros(2, 3, dtype=torch.float64).index_put_((shower_of, g.layer), g.E, accumulate=True)
    assert torch.allclose(got, e_layer)                                          # energy_rescale (default)
    assert g.alpha is not None and float(g.alpha.abs().max()) <= math.pi
    lo = torch.tensor([float(e[0]) for e in prep.geometry.r_edges], dtype=torch.float64)[g.layer]
    hi = torch.tensor([float(e[-1]) for e in prep.geometry.r_edges], dtype=torch.float64)[g.layer]
    assert bool(((g.r >= lo) & (g.r <= hi)).all())
    # a random rotation in α per shower: the same angle for all points of a shower, another for the next
    torch.manual_seed(5)
    base = m.sample_points(e_inc, prep)[2]
    torch.manual_seed(5)
    rot = torch.remainder(m.generate(e_inc, prep).alpha - base, 2 * math.pi)
    rot = torch.where(rot > 2 * math.pi - 1e-9, rot - 2 * math.pi, rot)
    for s in range(2):
        assert float(rot[shower_of == s].std()) < 1e-6
    assert abs(float(rot[shower_of == 0][0] - rot[shower_of == 1][0])) > 1e-3
    # a shower with more points than leaves keeps its layer proportions within the 20 leaves
    big = torch.tensor([[3, 1, 2], [10, 20, 10]])
    monkeypatch.setattr(m.shower_model, "sample_layers", lambda e, p: (shower, big, e_layer))
    g = m.generate(e_inc, prep)
    assert g.counts.tolist() == [6, 20]
    assert torch.bincount(g.layer[6:], minlength=3).tolist() == [5, 10, 5]
    free = _model(prep, alpha="free").eval()
    monkeypatch.setattr(free.shower_model, "sample_layers", lambda e, p: (shower, n_layer, e_layer))
    assert free.generate(e_inc, prep).alpha is None


def test_generated_files_have_one_point_per_cell(toy, tmp_path):
    from calopc.converters import read_points
    import h5py

    from calopc.models import checkpoint as ckpt
    from calopc.models.generate import generate

    ds, prep, _ = toy
    for alpha in ("model", "free"):
        run = tmp_path / alpha
        ckpt.save(run, "deeptree", _model(prep, alpha=alpha).eval(), prep)
        e = np.geomspace(1e3, 1e5, 12)
        res = generate(run, e, output=run / "gen.parquet", device="cpu", batch_size=5)
        assert res.n_showers == 12 and "collision_rate" in res.collisions
        ev = read_points(run / "gen.parquet")[0]
        for cells in ev["points"]["cell"].to_list():
            assert len(cells) == len(set(cells))
        assert res.n_points >= sum(len(c) for c in ev["points"]["cell"].to_list())
        # the same showers as voxels: one non-zero voxel per placed point
        generate(run, e, output=run / "gen.hdf5", device="cpu", batch_size=5, threshold=0.0)
        with h5py.File(run / "gen.hdf5") as f:
            vox = f["showers"][:]
        assert vox.shape == (12, prep.geometry.n_voxels)
        assert (vox > 0).sum(1).tolist() == [len(c) for c in ev["points"]["cell"].to_list()]


def test_layer_moments_are_the_energy_weighted_radial_centre_and_width(toy):
    _, prep, batch = toy
    m = _model(prep)
    cfg = m.config
    x, layer, shower_of = batch.points, batch.point_layer, batch.point_shower
    b, n_l = batch.mask.shape[0], prep.geometry.n_layers
    mom, occ = m.layer_moments(x, layer, shower_of, b)
    assert mom.shape == (b, n_l, 2) and occ.shape == (b, n_l)
    y = x.double().numpy() * np.asarray(cfg.point_std) + np.asarray(cfg.point_mean)
    u, w = 1 / (1 + np.exp(-y[:, 1])), np.exp(y[:, 2])
    for s in range(b):
        for lay in range(n_l):
            sel = (shower_of.numpy() == s) & (layer.numpy() == lay)
            assert bool(occ[s, lay]) == bool(sel.any())
            if not sel.any():
                continue
            c = np.average(u[sel], weights=w[sel])
            width = math.sqrt(max(np.average((u[sel] - c) ** 2, weights=w[sel]), 1e-8))
            assert mom[s, lay, 0].item() == pytest.approx(c, rel=1e-4, abs=1e-6)
            assert mom[s, lay, 1].item() == pytest.approx(width, rel=1e-3, abs=1e-4)
    # the shares need not sum to one: scaling every energy of a (shower, layer) changes nothing
    x2 = x.clone()
    x2[:, 2] += 0.7 / cfg.point_std[2]
    assert torch.allclose(m.layer_moments(x2, layer, shower_of, b)[0], mom, atol=1e-5)


def test_moment_loss_is_zero_on_the_real_showers_and_pulls_the_radii_towards_them(toy):
    _, prep, batch = toy
    m = _model(prep, moment_matching=1.0)
    packed = m._real(batch)
    assert m.moment_loss(batch, (None, None, None, packed)).item() == pytest.approx(0.0, abs=1e-5)
    # every generated point 0.5 standard units further out (or only the widths changed): the loss sees it
    x = packed[0].clone()
    x[:, 1] += 0.5
    out = x.clone().requires_grad_(True)
    loss = m.moment_loss(batch, (None, None, None, (out, *packed[1:])))
    assert loss.item() > 0.05
    loss.backward()
    # the gradient moves the points back inwards (a descent step lowers the loss)
    assert out.grad[:, 1].sum() > 0
    stepped = (out - 0.05 * out.grad / out.grad.abs().max()).detach()
    assert m.moment_loss(batch, (None, None, None, (stepped, *packed[1:]))).item() < loss.item()
    # the same from the padded layout (a batch without the packed points)
    padded = type(batch)(x=batch.x, mask=batch.mask, shower=batch.shower, cond=batch.cond, n=batch.n,
                         layer=batch.layer)
    assert m.moment_loss(padded, (None, None, None, packed)).item() == pytest.approx(0.0, abs=1e-5)
    assert m.moment_loss(padded, (None, None, None, (x, *packed[1:]))).item() == pytest.approx(loss.item(), rel=1e-5)


def test_training_step_with_moment_matching_adds_the_term_to_the_generator_loss(toy):
    _, prep, batch = toy
    losses = {}
    for weight in (0.0, 2.0):
        m = _model(prep, moment_matching=weight).train()
        opts = m.configure_optimizers(None)

        def backward(loss, name, opts=opts):
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()

        torch.manual_seed(3)
        losses[weight] = m.training_step(batch, 0, backward)
    assert "moment_matching" not in losses[0.0]
    mm = losses[2.0]["moment_matching"]
    assert mm.item() > 0
    # the same draw of showers (same seeds): the generator loss differs by exactly the weighted term
    assert losses[2.0]["generator"].item() == pytest.approx(losses[0.0]["generator"].item() + 2.0 * mm.item(),
                                                            rel=1e-4, abs=1e-5)


def test_bad_configs_give_one_line_errors(toy):
    _, prep, _ = toy
    with pytest.raises(ValueError, match=r"critic must be one of pool, meanfield; got 'transformer'") as e:
        DeepTreeConfig.from_dict({"critic": "transformer"})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"fewer than the \d+ points of the largest training shower.*ds2 = 6,000"):
        DeepTreeConfig.from_dict({**TINY, "branches": [2, 2], "features": [8, 6, 4]}).with_data(prep)
    with pytest.raises(ValueError, match="unknown DeepTree config keys"):
        DeepTreeConfig.from_dict({"branchs": [2]})
    with pytest.raises(ValueError, match=r"len\(branches\) \+ 1 = 4"):
        DeepTreeConfig.from_dict({"branches": [2, 2, 5], "features": [8, 4]})
    with pytest.raises(ValueError, match="preset must be one of auto, ds2, ds3"):
        DeepTreeConfig.from_dict({"preset": "ds1"})
    with pytest.raises(ValueError, match="alpha must be one of model, free"):
        DeepTreeConfig.from_dict({"alpha": "random"})
    with pytest.raises(ValueError, match=r"moment_matching must be >= 0; got 0.1, -1"):
        DeepTreeConfig.from_dict({"moment_matching": -1})


def test_presets_follow_the_geometry():
    from calopc.geometry import Geometry

    assert math.prod(PRESETS["ds2"]["branches"]) == 6000
    assert PRESETS["ds2"]["features"] == (64, 25, 15, 10, 8, 6, 4)
    for ds, preset, n_max in ((2, "ds2", 5187), (3, "ds3", 21570)):  # largest synthetic showers ('calopc synth')
        prep = Preprocessor(Geometry.calochallenge(ds), variant="II", point_mean=[0.0] * 3, point_std=[1.0] * 3,
                            n_max=n_max)
        cfg = DeepTreeConfig().with_data(prep)
        assert cfg.preset == preset and cfg.leaves >= n_max
    with pytest.raises(ValueError, match="28,800"):  # the ds2 tree cannot hold ds3 showers
        DeepTreeConfig.from_dict({"preset": "ds2"}).with_data(prep)


def test_training_and_resume_restore_both_networks_and_optimisers(toy_parquet, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from calopc.models import checkpoint as ckpt
    from calopc.models.train import TrainConfig, train

    run = tmp_path / "run"
    cfg = {"steps": 2, "batch_size": 8, "warmup": 1, "log_every": 1, "checkpoint_every": 2, "device": "cpu",
           "progress": False, "ema_decay": 0.9}
    res = train("deeptree", toy_parquet, run, model_config=TINY, config=TrainConfig(**cfg))
    assert res["steps"] == 2 and math.isfinite(res["final_loss"])
    state = torch.load(run / ckpt.STATE, weights_only=True)
    assert set(state["optimizers"]) == {"generator", "critic", "shower"}
    saved = load_file(str(run / ckpt.WEIGHTS))
    assert any(k.startswith("generator.") for k in saved) and any(k.startswith("critic.") for k in saved)
    assert (run / ckpt.EMA_WEIGHTS).exists()

    seen = {}
    original = DeepTree.training_step

    def spy(self, batch, step, backward):
        if not seen:
            seen["weights"] = {k: v.detach().clone() for k, v in self.state_dict().items()}
        return original(self, batch, step, backward)

    monkeypatch.setattr(DeepTree, "training_step", spy)
    train("deeptree", toy_parquet, run, config=TrainConfig(**{**cfg, "steps": 3}), resume=True)
    # both networks (and the shower model) start from the checkpoint ...
    assert seen["weights"].keys() == saved.keys()
    assert all(torch.equal(seen["weights"][k], v) for k, v in saved.items())
    # ... and both optimisers continue: Adam's step counters went on from 2 to 3
    state = torch.load(run / ckpt.STATE, weights_only=True)
    assert state["step"] == 3
    for name in ("generator", "critic", "shower"):
        steps = {float(s["step"]) for s in state["optimizers"][name]["state"].values()}
        assert steps == {3.0}, name
    assert state["optimizers"]["generator"]["param_groups"][0]["initial_lr"] == pytest.approx(1e-5)
    assert state["optimizers"]["critic"]["param_groups"][0]["initial_lr"] == pytest.approx(3e-5)


def test_non_finite_loss_stops_training_keeping_the_last_good_checkpoint(toy_parquet, tmp_path, monkeypatch):
    from calopc.models import checkpoint as ckpt
    from calopc.models.train import TrainConfig, TrainingDiverged, train

    original = DeepTree.training_step

    def diverging(self, batch, step, backward):
        out = original(self, batch, step, backward)
        if step >= 1:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(DeepTree, "training_step", diverging)
    run = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match="non-finite loss"):
        train("deeptree", toy_parquet, run, model_config=TINY,
              config=TrainConfig(steps=3, batch_size=8, warmup=1, log_every=1, checkpoint_every=1, device="cpu",
                                 progress=False))
    assert torch.load(run / ckpt.STATE, weights_only=True)["step"] == 1


def test_coupling_shower_model_option(toy):
    _, prep, _ = toy
    assert _model(prep, shower_passes=2).shower_model.flow.transform.transforms[0].passes == 2


def test_moment_condition_sees_a_reversed_energy_dependence(toy):
    """With ``moment_condition`` the term compares each layer moment's covariance with log E_inc: fakes whose
    radial centres move against the energy, with the pooled mean and spread of the real ones, are seen only then."""
    from calopc.models.moments import moment_loss

    _, prep, batch = toy
    m = _model(prep, moment_matching=1.0, moment_condition=True)
    packed = m._real(batch)
    b = batch.mask.shape[0]
    real = m.layer_moments(*packed[:3], b)
    cond = batch.cond[:, 0]
    assert m.moment_loss(batch, (None, None, None, packed)).item() == pytest.approx(0.0, abs=1e-5)
    # showers relabelled in reverse order of their condition: the same set of moments, the trend reversed
    order = torch.argsort(cond)
    flip = torch.empty_like(order)
    flip[order] = order.flip(0)
    moments, occ = real
    occ = occ & occ.all(0, keepdim=True)        # the layers every shower reaches: permuting keeps their statistics
    assert occ.any()
    real, fake = (moments, occ), (moments[flip], occ)
    with_cond, without = moment_loss(fake, real, cond).item(), moment_loss(fake, real).item()
    assert without == pytest.approx(0.0, abs=1e-4) and with_cond > 0.1
    # the real showers' own moments: 0 with and without the condition; the padded layout agrees
    assert moment_loss(real, real, cond).item() == pytest.approx(0.0, abs=1e-6)
    x = packed[0].clone()
    x[:, 1] += 0.3 * cond[packed[2]]            # radii pushed outwards with the energy: a trend, seen as such
    shifted = m.moment_loss(batch, (None, None, None, (x, *packed[1:])))
    assert shifted.item() > _model(prep, moment_matching=1.0).moment_loss(batch, (None, None, None, (x, *packed[1:])))
