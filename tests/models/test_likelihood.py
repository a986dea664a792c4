"""The cell-likelihood placement (``collisions="likelihood"``): candidate points → distinct cells."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from calopc.geometry import Geometry
from calopc.models.cells import GeneratedShowers, cell_tables, place, place_likelihood


@pytest.fixture(scope="module")
def ds2() -> Geometry:
    return Geometry.calochallenge("2")


def _candidates(geo: Geometry, b: int, k: int, seed: int, *, alpha: bool) -> GeneratedShowers:
    """Random candidates: ``k n_l`` per (shower, layer), radii concentrated at small r."""
    g = torch.Generator().manual_seed(seed)
    n_l = geo.n_layers
    n = torch.randint(0, 80, (b, n_l), generator=g)
    n[0, 0] = int(geo.n_alpha[0] * geo.n_r[0])              # a full layer: every cell chosen
    e_l = torch.rand(b, n_l, generator=g, dtype=torch.float64) * 100 * (n > 0)
    grp = torch.repeat_interleave(torch.arange(b * n_l), (n * k).reshape(-1))
    lay = grp % n_l
    r_max = torch.tensor([e[-1] for e in geo.r_edges], dtype=torch.float64)[lay]
    r = torch.rand(grp.shape[0], generator=g, dtype=torch.float64).pow(2) * r_max * 0.6
    a = (torch.rand(grp.shape[0], generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    e = torch.rand(grp.shape[0], generator=g, dtype=torch.float64) + 0.1
    return GeneratedShowers((n * k).sum(1), lay, r, a if alpha else None, e, layer_counts=n, layer_energy=e_l,
                            oversample=k)


def _per_layer(pl, geo: Geometry, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    lay = torch.as_tensor(np.array(geo.cell_layer))[pl.cell]
    grp = pl.shower * geo.n_layers + lay
    cnt = torch.zeros(b * geo.n_layers, dtype=torch.int64).index_add_(0, grp, torch.ones_like(grp))
    e = torch.zeros(b * geo.n_layers, dtype=torch.float64).index_add_(0, grp, pl.E.to(torch.float64))
    return cnt.reshape(b, -1), e.reshape(b, -1)


@pytest.mark.parametrize("alpha", [True, False], ids=["alpha", "ring"])
def test_no_collisions_exact_counts_and_layer_energies(ds2, alpha):
    b, k = 6, 4
    g = _candidates(ds2, b, k, seed=1, alpha=alpha)
    pl = place(g, ds2, policy="likelihood", generator=torch.Generator().manual_seed(0))
    key = pl.shower * ds2.n_voxels + pl.cell
    assert bool((key[1:] > key[:-1]).all())                     # distinct cells, sorted by (shower, cell)
    cnt, e = _per_layer(pl, ds2, b)
    assert torch.equal(cnt, g.layer_counts)                      # exactly n_l points per layer
    assert torch.equal(pl.counts, g.layer_counts.sum(1))
    torch.testing.assert_close(e, g.layer_energy, rtol=1e-9, atol=1e-9)
    assert bool((pl.E > 0).all())
    s = pl.stats
    assert s["n_collisions"] == s["n_moved"] == s["n_merged"] == s["n_dropped"] == 0
    assert s["collision_rate"] == 0.0
    assert s["n_points"] == int(g.layer_counts.sum()) and s["n_candidates"] == g.n_points
    # the same generator state gives the same placement; another one another
    again = place(g, ds2, policy="likelihood", generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.cell, pl.cell) and torch.equal(again.E, pl.E)
    other = place(g, ds2, policy="likelihood", generator=torch.Generator().manual_seed(1))
    assert not torch.equal(other.cell, pl.cell)


def _one_layer(geo: Geometry, cells: list[int], shares: list[int], n: int, b: int, energies=None) -> GeneratedShowers:
    """``b`` identical showers: layer 0 holds ``n`` points; ``shares[i]`` candidates at the centre of ``cells[i]``."""
    k = sum(shares) // n
    assert k * n == sum(shares)
    cr = torch.as_tensor(np.array(geo.cell_r), dtype=torch.float64)
    ca = torch.as_tensor(np.array(geo.cell_alpha), dtype=torch.float64)
    idx = torch.tensor([c for c, m in zip(cells, shares) for _ in range(m)])
    e = torch.ones(idx.shape[0], dtype=torch.float64) if energies is None else torch.tensor(
        [x for x, m in zip(energies, shares) for _ in range(m)], dtype=torch.float64)
    n_l = torch.zeros(b, geo.n_layers, dtype=torch.int64)
    n_l[:, 0] = n
    e_l = torch.zeros(b, geo.n_layers, dtype=torch.float64)
    e_l[:, 0] = 10.0
    rep = lambda t: t.repeat(b)  # noqa: E731
    return GeneratedShowers(torch.full((b,), idx.shape[0]), torch.zeros(b * idx.shape[0], dtype=torch.int64),
                            rep(cr[idx]), rep(ca[idx]), rep(e), layer_counts=n_l, layer_energy=e_l, oversample=k)


def test_hit_probabilities_follow_the_candidate_density(toy_geometry):
    ds2 = toy_geometry                                              # layer 0: 4 α × 2 r cells
    cells, shares, b = [0, 3, 5], [6, 3, 1], 4000
    gen = torch.Generator().manual_seed(5)
    # one point per layer: each cell is hit with its share of the candidates
    pl = place(_one_layer(ds2, cells, shares, 1, b), ds2, policy="likelihood", generator=gen)
    freq = np.array([(pl.cell == c).float().mean().item() for c in cells])
    p = np.array(shares) / sum(shares)
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / b)), freq
    # two points: without replacement, P(c) = p_c + sum_{j != c} p_j p_c / (1 - p_j) (successive draws)
    pl = place(_one_layer(ds2, cells, [12, 6, 2], 2, b), ds2, policy="likelihood", generator=gen)
    got = np.array([(pl.cell == c).float().sum().item() / b for c in cells])
    want = np.array([p[c] + sum(p[j] * p[c] / (1 - p[j]) for j in range(3) if j != c) for c in range(3)])
    assert np.all(np.abs(got - want) < 4 * np.sqrt(want * (1 - want) / b)), (got, want)
    assert np.isclose(got.sum(), 2.0)                               # two distinct cells every time


def test_empty_cells_complete_a_layer_next_to_the_candidates(ds2):
    # 3 points, candidates in one cell only: the cell, then two empty cells among its nearest neighbours
    from calopc.converters.core import neighbour_table

    b = 200
    pl = place(_one_layer(ds2, [40], [3], 3, b), ds2, policy="likelihood", generator=torch.Generator().manual_seed(2))
    assert pl.stats["n_fallback"] == 2 * b
    assert int((pl.cell == 40).sum()) == b
    nbr = neighbour_table(ds2)[:, :8]
    near = set(np.flatnonzero((nbr == 40).any(1)).tolist())       # cells that have cell 40 among their 8 nearest
    assert set(pl.cell[pl.cell != 40].tolist()) <= near


def test_cell_energies_come_from_their_candidates(ds2):
    # two cells, one point each: energies 5 : 1 from the candidates, rescaled to the layer energy 10
    pl = place(_one_layer(ds2, [3, 40], [4, 4], 2, 3, energies=[5.0, 1.0]), ds2, policy="likelihood",
               generator=torch.Generator().manual_seed(0))
    e = pl.E.reshape(3, 2)
    torch.testing.assert_close(e, torch.tensor([[50 / 6, 10 / 6]] * 3, dtype=torch.float64))


def test_ring_mode_spreads_a_ring_over_its_alpha_bins(toy_geometry):
    # α not modelled: candidates of one ring are spread evenly over its α bins
    ds2 = toy_geometry
    b, n = 3000, 1
    g = _one_layer(ds2, [1], [4], n, b)
    g = GeneratedShowers(g.counts, g.layer, g.r, None, g.E, g.layer_counts, g.layer_energy, g.oversample)
    pl = place(g, ds2, policy="likelihood", generator=torch.Generator().manual_seed(3))
    t = cell_tables(ds2, "cpu")
    assert bool((t["cell_r"][pl.cell] == t["cell_r"][1]).all())           # all in the candidates' ring
    hist = torch.bincount(pl.cell, minlength=ds2.n_voxels)[pl.cell.unique()].double()
    assert hist.numel() == ds2.n_alpha[0]
    p = 1 / ds2.n_alpha[0]
    assert bool(((hist / b - p).abs() < 4 * math.sqrt(p * (1 - p) / b)).all()), hist


class _Syncs(TorchDispatchMode):
    """Operators that make the host wait for the device on CUDA (data-dependent shapes or values)."""

    NAMES = ("nonzero", "_local_scalar_dense", "masked_select", "_unique", "unique_consecutive", "bincount", "equal")

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in self.NAMES or (name == "repeat_interleave" and kwargs.get("output_size") is None) or (
                name == "index" and any(isinstance(a, torch.Tensor) and a.dtype == torch.bool
                                        for a in (args[1] if len(args) > 1 else []) if a is not None)):
            self.found.append(name)
        return func(*args, **kwargs)


def test_no_host_sync_before_the_statistics(ds2):
    g = _candidates(ds2, 3, 3, seed=4, alpha=False)
    place_likelihood(g, ds2)                                     # tables cached
    with _Syncs() as mode:
        place_likelihood(g, ds2, generator=torch.Generator().manual_seed(0))
    assert mode.found == []


def test_errors(ds2):
    g = _candidates(ds2, 2, 2, seed=0, alpha=True)
    with pytest.raises(ValueError, match="candidate points for the 'likelihood' placement"):
        place(g, ds2, policy="nearest-free")
    plain = GeneratedShowers(g.counts, g.layer, g.r, g.alpha, g.E)
    with pytest.raises(ValueError, match="needs candidate points with per-layer counts"):
        place(plain, ds2, policy="likelihood")


# ------------------------------------------------------------------------------------------------ with models
@pytest.fixture(scope="module")
def cc_run(tmp_path_factory, toy_parquet):
    from calopc.models.train import TrainConfig, train

    out = tmp_path_factory.mktemp("cc_lk") / "run"
    cfg = {"widths": [16, 16], "fourier": 8, "layer_embedding": 2, "shower_transforms": 1, "shower_hidden": [16],
           "steps": 2}
    train("caloclouds", toy_parquet, out, model_config=cfg,
          config=TrainConfig(steps=2, batch_size=8, warmup=1, device="cpu", progress=False))
    return out


@pytest.mark.parametrize("which", ["calopointflow", "caloclouds"])
def test_generate_with_likelihood_placement(which, toy_run, cc_run, tmp_path):
    from calopc.converters import read_points
    from calopc.models.checkpoint import load
    from calopc.models.generate import generate, sample_showers

    run = toy_run if which == "calopointflow" else cc_run
    e = np.geomspace(1e3, 1e5, 12)
    res = generate(run, e, output=tmp_path / "g.parquet", collisions="likelihood", oversample=3, batch_size=5,
                   device="cpu", seed=1)
    c = res.collisions
    assert c["n_collisions"] == 0 and c["n_moved"] == 0 and c["collision_rate"] == 0.0
    assert c["n_candidates"] == 3 * c["n_points"] and res.n_points == c["n_points"]
    ev = read_points(tmp_path / "g.parquet")[0]
    for cells in ev["points"]["cell"]:
        cells = np.asarray(cells)
        assert np.unique(cells).size == cells.size                       # one point per cell
    # the model drew 3 n_l candidates in every layer, n_l from its shower model
    loaded = load(run, device="cpu")
    torch.manual_seed(0)
    g = sample_showers(loaded, e[:4], torch.device("cpu"), {"oversample": 3})
    lay = torch.zeros(4 * loaded.geometry.n_layers, dtype=torch.int64).index_add_(
        0, torch.repeat_interleave(torch.arange(4), g.counts) * loaded.geometry.n_layers + g.layer,
        torch.ones_like(g.layer))
    assert torch.equal(lay.reshape(4, -1), 3 * g.layer_counts)
    again = generate(run, e, output=None, collisions="likelihood", oversample=3, batch_size=5, device="cpu", seed=1)
    assert again.collisions["n_fallback"] == c["n_fallback"]               # same seed, same placement


def test_models_that_cannot_draw_candidates_are_refused(toy_run):
    from calopc.models.checkpoint import load
    from calopc.models.generate import generate, likelihood_kwargs

    class _NoCandidates:
        name = "deeptree"

        class model:  # noqa: N801
            @staticmethod
            def generate(e_inc, prep):
                raise AssertionError

    with pytest.raises(ValueError, match="the deeptree model does not: choose another --collisions"):
        likelihood_kwargs(_NoCandidates(), "likelihood", None, None)
    with pytest.raises(ValueError, match="oversample=3 is for --collisions likelihood"):
        generate(toy_run, np.array([1e4]), collisions="nearest-free", oversample=3, device="cpu")
    # CaloClouds with the transformer denoiser: points attend to each other
    from calopc.models.caloclouds import CaloClouds, CaloCloudsConfig

    loaded = load(toy_run, device="cpu")
    cc = CaloClouds(CaloCloudsConfig.from_dict({"widths": [8], "fourier": 4, "layer_embedding": 2,
                                                 "shower_transforms": 1, "shower_hidden": [8], "denoiser": "transformer",
                                                 "dim": 8, "heads": 2, "blocks": 1, "mlp": 8}).with_data(loaded.preprocessor))
    with pytest.raises(ValueError, match="denoiser='pointwise'"):
        cc.generate(np.array([1e4]), loaded.preprocessor, oversample=2)
    # CaloPointFlow variant I has no per-layer counts
    from types import SimpleNamespace

    from calopc.models.calopointflow import CaloPointFlow

    variant_i = SimpleNamespace(layered=False, parameters=lambda: iter([torch.zeros(1)]))
    with pytest.raises(ValueError, match="variant II"):
        CaloPointFlow.generate(variant_i, np.array([1e4]), loaded.preprocessor, oversample=2)
