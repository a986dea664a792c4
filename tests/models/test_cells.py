from __future__ import annotations

import awkward as ak
import numpy as np
import pytest
import torch

from calopc.converters import points_to_voxels
from calopc.geometry import Geometry
from calopc.models.cells import GeneratedShowers, place


def _random(geo: Geometry, b: int, seed: int, *, alpha: bool = True, mean: float = 12.0) -> GeneratedShowers:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(mean, b)
    p = int(counts.sum())
    layer = rng.integers(-1, geo.n_layers + 1, p)                  # some outside
    r_hi = max(e[-1] for e in geo.r_edges)
    r = rng.uniform(-0.5, r_hi * 1.05, p)
    a = rng.uniform(-np.pi, np.pi, p)
    e = rng.exponential(1.0, p)
    t = torch.as_tensor
    return GeneratedShowers(t(counts), t(layer), t(r), t(a) if alpha else None, t(e))


def _dense(pl, geo: Geometry, b: int) -> np.ndarray:
    out = np.zeros((b, geo.n_voxels))
    out[pl.shower.numpy(), pl.cell.numpy()] = pl.E.numpy()
    return out


def _events(g: GeneratedShowers) -> ak.Array:
    pts = ak.zip({"r": g.r.numpy(), "alpha": g.alpha.numpy(), "z": g.layer.numpy().astype(np.float64),
                  "E": g.E.numpy()})
    return ak.zip({"incident_energy": np.ones(len(g.counts)), "points": ak.unflatten(pts, g.counts.numpy())},
                  depth_limit=1)


@pytest.mark.parametrize("policy", ["sum", "max", "nearest-free"])
def test_agrees_with_points_to_voxels(toy_geometry, policy):
    g = _random(toy_geometry, 30, 1)
    pl = place(g, toy_geometry, policy=policy)
    ref, st = points_to_voxels(_events(g), toy_geometry, collisions=policy, return_stats=True)
    np.testing.assert_allclose(_dense(pl, toy_geometry, 30), ref, rtol=1e-12)
    for k in ("n_points", "n_outside", "n_collisions", "n_moved", "n_merged", "n_dropped"):
        assert pl.stats[k] == getattr(st, k), k
    assert st.n_collisions > 0 and st.n_outside > 0 and (policy != "nearest-free" or st.n_moved > 0)
    # at most one point per (shower, cell)
    key = pl.shower * toy_geometry.n_voxels + pl.cell
    assert torch.unique(key).numel() == key.numel()
    assert pl.counts.sum() == pl.cell.numel()


def test_ds2_nearest_free_agrees(toy_geometry):
    geo = Geometry.calochallenge(2)
    g = _random(geo, 4, 2, mean=3000)
    pl = place(g, geo, policy="nearest-free")
    ref, st = points_to_voxels(_events(g), geo, collisions="nearest-free", return_stats=True)
    np.testing.assert_allclose(_dense(pl, geo, 4), ref, rtol=1e-12)
    assert pl.stats["n_moved"] == st.n_moved > 0


@pytest.mark.parametrize("policy", ["alpha-free", "nearest-free", "sum", "max"])
def test_energy_per_layer_conserved(toy_geometry, policy):
    g = _random(toy_geometry, 20, 3, alpha=policy != "alpha-free")
    pl = place(g, toy_geometry, policy=policy)
    inside = (g.layer >= 0) & (g.layer < toy_geometry.n_layers)
    lay_in = torch.tensor(toy_geometry.cell_layer, dtype=torch.int64)[pl.cell]
    n_l = toy_geometry.n_layers
    shower = torch.repeat_interleave(torch.arange(20), g.counts)
    from calopc.models.cells import locate

    ok, _, _ = locate(toy_geometry, g.layer, g.r, g.alpha)
    assert bool((ok <= inside).all())
    key = (shower * n_l + g.layer.clamp(0, n_l - 1))[ok]
    e_in = torch.zeros(20 * n_l, dtype=torch.float64).index_add_(0, key, g.E[ok])
    e_out = torch.zeros(20 * n_l, dtype=torch.float64).index_add_(0, pl.shower * n_l + lay_in, pl.E)
    if policy == "max":
        assert bool((e_out <= e_in + 1e-12).all()) and pl.stats["n_dropped"] > 0
    else:
        torch.testing.assert_close(e_out, e_in)
    assert pl.stats["n_outside"] == int((~ok).sum())


def test_alpha_free_never_collides_when_rings_fit():
    geo = Geometry.calochallenge(2)                    # 16 α bins per ring
    rng = np.random.default_rng(0)
    b = 50
    # every shower: 9 rings of layer 3, up to 16 points each
    n_ring = rng.integers(0, 17, (b, 9))
    counts = n_ring.sum(1)
    rb = np.concatenate([np.repeat(np.arange(9), n) for n in n_ring])
    edges = np.asarray(geo.r_edges[3])
    r = edges[rb] + rng.random(rb.shape[0]) * (edges[rb + 1] - edges[rb])
    g = GeneratedShowers(torch.as_tensor(counts), torch.full((rb.shape[0],), 3), torch.as_tensor(r), None,
                         torch.as_tensor(rng.exponential(1.0, rb.shape[0])))
    gen = torch.Generator().manual_seed(1)
    pl = place(g, geo, generator=gen)                  # auto: alpha-free
    assert pl.stats["n_collisions"] == pl.stats["n_merged"] == 0 and pl.stats["n_outside"] == 0
    assert pl.cell.numel() == rb.shape[0]
    np.testing.assert_array_equal(pl.counts.numpy(), counts)
    assert bool((torch.tensor(geo.cell_r_bin)[pl.cell].sort().values == torch.as_tensor(np.sort(rb))).all())
    # deterministic with the generator; another seed moves α
    pl2 = place(g, geo, generator=torch.Generator().manual_seed(1))
    pl3 = place(g, geo, generator=torch.Generator().manual_seed(2))
    assert torch.equal(pl.cell, pl2.cell) and not torch.equal(pl.cell, pl3.cell)
    # α bins are used uniformly
    ab = torch.tensor(geo.cell_alpha_bin)[pl.cell]
    hist = torch.bincount(ab, minlength=16).double()
    assert float(hist.min()) > 0.7 * float(hist.mean())


def test_alpha_free_merges_only_overflow():
    geo = Geometry.calochallenge(2)
    n = 40                                             # one ring, 16 α bins: 24 points beyond
    edges = geo.r_edges[0]
    r = torch.full((n,), 0.5 * (edges[2] + edges[3]), dtype=torch.float64)
    g = GeneratedShowers(torch.tensor([n]), torch.zeros(n, dtype=torch.int64), r, None,
                         torch.ones(n, dtype=torch.float64))
    pl = place(g, geo, policy="alpha-free", generator=torch.Generator().manual_seed(0))
    assert pl.stats["n_merged"] == pl.stats["n_collisions"] == n - 16
    assert pl.cell.numel() == 16 and float(pl.E.sum()) == n
    assert sorted(pl.E.tolist()) == [2.0] * 8 + [3.0] * 8   # chunks of n_α: 40 = 16 + 16 + 8


def test_legacy_tuple_and_errors(toy_geometry):
    counts = np.array([2, 1])
    zar = np.array([[0.2, 0.1, 0.5], [2.4, -3.0, 1.5], [7.0, 0.0, 0.5]])
    g = GeneratedShowers.from_numpy(counts, zar, np.array([1.0, 2.0, 3.0]))
    pl = place(g, toy_geometry, policy="sum")
    assert pl.stats["n_outside"] == 1 and pl.counts.tolist() == [2, 0]
    # no alpha but "sum" asked for: uniform angles, energies conserved, same rings
    pl2 = place(GeneratedShowers(g.counts, g.layer, g.r, None, g.E), toy_geometry, policy="sum")
    assert float(pl2.E.sum()) == 3.0 and pl2.counts.tolist()[1] == 0
    assert torch.equal(torch.tensor(toy_geometry.cell_r_bin)[pl2.cell].sort().values,
                       torch.tensor(toy_geometry.cell_r_bin)[pl.cell].sort().values)
    with pytest.raises(ValueError, match="collision policy must be one of"):
        place(g, toy_geometry, policy="nearest")


def test_cli_collision_choices_mirror_the_policies():
    from calopc.cli.options import COLLISIONS, GENERATE_COLLISIONS
    from calopc.models.cells import PLACEMENT_POLICIES

    assert GENERATE_COLLISIONS == PLACEMENT_POLICIES
    assert COLLISIONS == tuple(p for p in PLACEMENT_POLICIES if p != "likelihood")  # likelihood: generate only


def test_cli_oversample_help_names_the_default():
    import argparse

    from calopc.models.cells import DEFAULT_OVERSAMPLE
    from calopc.cli.models import register

    ap = argparse.ArgumentParser()
    register(ap.add_subparsers())
    gen = next(a for a in ap._subparsers._group_actions[0].choices["generate"]._actions if a.dest == "oversample")
    assert f"others {DEFAULT_OVERSAMPLE})" in gen.help
