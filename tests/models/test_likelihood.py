"""The cell-likelihood placement (``collisions="likelihood"``): candidate points → distinct cells."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from calopc.geometry import Geometry
from calopc.models.cells import (GeneratedShowers, cell_tables, inclusion_probabilities, place, place_likelihood,
                                 systematic_sample)


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
    # two points: π = min(1, λ q) with Σ π = 2: 2 × (0.6, 0.3, 0.1) caps the first cell at 1 and gives its
    # excess to the others in proportion, (1, 0.75, 0.25); successive draws would give (0.92, 0.78, 0.29)
    pl = place(_one_layer(ds2, cells, [12, 6, 2], 2, b), ds2, policy="likelihood", generator=gen)
    got = np.array([(pl.cell == c).float().sum().item() / b for c in cells])
    want = np.array([1.0, 0.75, 0.25])
    assert got[0] == 1.0 and pl.stats["n_certain"] == b
    assert np.all(np.abs(got[1:] - want[1:]) < 4 * np.sqrt(want[1:] * (1 - want[1:]) / b)), got
    assert np.isclose(got.sum(), 2.0) and pl.stats["n_fallback"] == 0   # two distinct cells, both with candidates


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


# ------------------------------------------------------------------------------------------------ the sampling design
def _iterative_cap(w: np.ndarray, n: int) -> np.ndarray:
    """π ∝ w summing to n, capped at 1, the excess redistributed until no π exceeds 1 (the textbook loop)."""
    pi, fixed = np.zeros_like(w), np.zeros(w.shape, dtype=bool)
    while True:
        free = ~fixed
        pi[free] = (n - fixed.sum()) * w[free] / w[free].sum()
        pi[fixed] = 1.0
        over = free & (pi > 1)
        if not over.any():
            return pi
        fixed |= over


def test_inclusion_probabilities_cap_and_redistribute():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(300, 30, generator=g, dtype=torch.float64) ** 8          # very uneven: many capped cells
    w[:, 25:] = 0.0                                                           # padding: never chosen
    n = torch.randint(0, 26, (300,), generator=g)
    pi = inclusion_probabilities(w, n)
    want = np.stack([_iterative_cap(w[i, :25].numpy(), int(n[i])) for i in range(300)])
    np.testing.assert_allclose(pi[:, :25].numpy(), want, rtol=0, atol=1e-12)
    assert bool((pi[:, 25:] == 0).all())
    torch.testing.assert_close(pi.sum(1), n.double(), rtol=0, atol=1e-9)
    assert int((pi == 1).sum()) > 300                                          # the cap was exercised


def _radial_layer(geo: Geometry, layer: int, scale: float) -> torch.Tensor:
    """A layer's cells weighted by a radial profile decaying as exp(−r / scale), ``(cells,)``."""
    cr = torch.as_tensor(np.array(geo.cell_r), dtype=torch.float64)
    lay = torch.as_tensor(np.array(geo.cell_layer))
    return torch.exp(-cr[lay == layer] / scale)


def _z_scores(freq: torch.Tensor, pi: torch.Tensor, draws: int) -> torch.Tensor:
    """(observed − π) / binomial sd per cell; a cell with π ∈ {0, 1} must match exactly (sd 0: ±inf otherwise)."""
    sd = (pi * (1 - pi) / draws).sqrt()
    dev = freq - pi
    return torch.where(sd > 0, dev / sd.clamp(min=1e-300), torch.where(dev == 0, 0.0, math.inf))


@pytest.mark.parametrize(("n", "scale"), [(12, 2.0), (40, 6.0)], ids=["uncapped", "capped"])
def test_systematic_sample_includes_every_cell_with_its_probability(ds2, n, scale):
    # a ds2 layer (16 α × 9 r = 144 cells) with a steep radial profile; with n = 40 the core ring is capped at
    # π = 1 and the next one gets π = 0.81
    w = _radial_layer(ds2, 5, scale)
    pi = inclusion_probabilities(w, torch.tensor(n))
    assert int((pi == 1).sum()) == (16 if n == 40 else 0) and float(pi[pi < 1].max()) > 0.6
    draws = 4000
    chosen = systematic_sample(pi.expand(draws, -1), torch.full((draws,), n),
                               generator=torch.Generator().manual_seed(n))
    assert bool((chosen.sum(1) == n).all())                                    # exactly n distinct cells
    z = _z_scores(chosen.double().mean(0), pi, draws)
    assert float(z.abs().max()) < 4, z


def test_successive_sampling_does_not_include_cells_with_their_probability(ds2):
    """The Gumbel top-k of log w (successive draws ∝ w, the placement's former design) on the same layer: its
    inclusion probabilities are not π."""
    n, draws = 40, 4000
    w = _radial_layer(ds2, 5, 6.0)
    pi = inclusion_probabilities(w, torch.tensor(n))
    u = torch.rand(draws, w.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    keys = w.log() - (-u.log()).log()
    top = torch.zeros(draws, w.shape[0], dtype=torch.bool).scatter_(1, keys.topk(n, dim=1).indices, True)
    z = _z_scores(top.double().mean(0), pi, draws)
    assert float(z.abs().max()) > 10, z


def test_systematic_sample_is_a_pure_function_of_its_noise():
    pi = inclusion_probabilities(torch.tensor([[4.0, 2.0, 1.0, 1.0, 0.0]]), torch.tensor([2]))
    order, u = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]]), torch.tensor([0.3])
    # intervals in this order: [0, 1) certain → taken; then 0.5, 0.25, 0.25 rescaled to [0, 1): u = 0.3 hits cell 1
    got = systematic_sample(pi, torch.tensor([2]), u=u, order=order)
    assert got.tolist() == [[True, True, False, False, False]]
    got = systematic_sample(pi, torch.tensor([2]), u=torch.tensor([0.6]), order=order)
    assert got.tolist() == [[True, False, True, False, False]]


def test_systematic_sample_chooses_every_pair_of_cells_together():
    """In a fixed order, 6 cells with π = ½ and n = 3 come as (0, 2, 4) or (1, 3, 5) only; the random order makes
    every pair possible."""
    draws = 2000
    pi = torch.full((draws, 6), 0.5, dtype=torch.float64)
    chosen = systematic_sample(pi, torch.full((draws,), 3), generator=torch.Generator().manual_seed(0))
    together = (chosen[:, :, None] & chosen[:, None, :]).double().mean(0)
    assert float(together.min()) > 0.05, together


def test_sampling_design_runs_in_an_onnx_graph(tmp_path):
    """The design is a pure tensor function of (weights, n, u, order): traced once, it gives the same cells as torch
    in onnxruntime, for other shapes too."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import warnings

    class Design(torch.nn.Module):
        def forward(self, w, n, u, order):
            pi = inclusion_probabilities(w, n)
            return systematic_sample(pi, n, u=u, order=order), pi

    gen = torch.Generator().manual_seed(0)

    def inputs(b: int, c: int):
        w = torch.rand(b, 3, c, generator=gen, dtype=torch.float64) ** 6
        w[..., c - 3:] = 0.0
        return (w, torch.randint(0, c - 2, (b, 3), generator=gen), torch.rand(b, 3, generator=gen, dtype=torch.float64),
                torch.rand(b, 3, c, generator=gen, dtype=torch.float64))

    names = ["w", "n", "u", "order"]
    dyn = {"w": {0: "b", 2: "c"}, "n": {0: "b"}, "u": {0: "b"}, "order": {0: "b", 2: "c"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Design(), inputs(2, 20), str(tmp_path / "design.onnx"), dynamo=False, opset_version=17,
                          input_names=names, output_names=["chosen", "pi"], dynamic_axes=dyn)
    sess = ort.InferenceSession(str(tmp_path / "design.onnx"))
    for b, c in ((2, 20), (7, 45)):
        args = inputs(b, c)
        chosen, pi = sess.run(None, {k: v.numpy() for k, v in zip(names, args)})
        want = Design()(*args)
        np.testing.assert_array_equal(chosen, want[0].numpy())
        np.testing.assert_allclose(pi, want[1].numpy(), rtol=0, atol=1e-12)
        assert np.array_equal(chosen.sum(-1), args[1].numpy())


def test_density_placement_includes_every_cell_with_its_probability(ds2):
    """Cell masses given (as a density model gives them): the placement draws each cell with π = min(1, λ mass)."""
    b, n = 3000, 30
    lay = torch.as_tensor(np.array(ds2.cell_layer))
    w = _radial_layer(ds2, 5, 6.0)
    mass = torch.zeros(b, ds2.n_voxels, dtype=torch.float64)
    mass[:, lay == 5] = w / w.sum()
    n_l = torch.zeros(b, ds2.n_layers, dtype=torch.int64)
    n_l[:, 5] = n
    r = torch.rand(b * n, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 50
    g = GeneratedShowers(torch.full((b,), n), torch.full((b * n,), 5), r, None, 1 + 1 / (1 + r),
                         layer_counts=n_l, layer_energy=torch.full((b, ds2.n_layers), 7.0), cell_mass=mass)
    pl = place(g, ds2, policy="likelihood", generator=torch.Generator().manual_seed(3))
    assert torch.equal(pl.counts, torch.full((b,), n)) and pl.stats["n_fallback"] == 0
    freq = torch.bincount(pl.cell, minlength=ds2.n_voxels)[lay == 5].double() / b
    z = _z_scores(freq, inclusion_probabilities(w, torch.tensor(n)), b)
    assert float(z.abs().max()) < 4, z
    # energies by rank: the less energetic points (larger r) go to the outer chosen rings, layer sums kept
    cr = torch.as_tensor(np.array(ds2.cell_r), dtype=torch.float64)[pl.cell].reshape(b, n)
    e = pl.E.reshape(b, n)
    e_by_r = e.gather(1, torch.argsort(cr * 1e3 - e, dim=1))                  # by radius, within a ring by energy down
    assert bool((e_by_r[:, 1:] <= e_by_r[:, :-1] + 1e-12).all())
    torch.testing.assert_close(e.sum(1), torch.full((b,), 7.0, dtype=torch.float64))
    per_shower = (1 + 1 / (1 + r)).reshape(b, n)
    torch.testing.assert_close(e.sort(1).values, (per_shower * 7 / per_shower.sum(1, keepdim=True)).sort(1).values)


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


@pytest.mark.parametrize("mode", ["candidates", "density"])
def test_no_host_sync_before_the_statistics(ds2, mode):
    g = _candidates(ds2, 3, 3 if mode == "candidates" else 1, seed=4, alpha=False)
    if mode == "density":
        g.cell_mass = torch.rand(3, ds2.n_voxels, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    place_likelihood(g, ds2)                                     # tables cached
    with _Syncs() as mode_:
        place_likelihood(g, ds2, generator=torch.Generator().manual_seed(0))
    assert mode_.found == []


def test_errors(ds2):
    g = _candidates(ds2, 2, 2, seed=0, alpha=True)
    with pytest.raises(ValueError, match="candidate points for the 'likelihood' placement"):
        place(g, ds2, policy="nearest-free")
    plain = GeneratedShowers(g.counts, g.layer, g.r, g.alpha, g.E)
    with pytest.raises(ValueError, match="needs points with per-layer counts"):
        place(plain, ds2, policy="likelihood")
    masses = GeneratedShowers(g.counts, g.layer, g.r, g.alpha, g.E, g.layer_counts, g.layer_energy, oversample=2,
                              cell_mass=torch.ones(2, ds2.n_voxels, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"cell_mass of shape \(2, 6480\) with oversample=2"):
        place(masses, ds2, policy="likelihood")


@pytest.mark.parametrize("n0", [1, 12])
def test_counts_that_do_not_match_the_candidates_are_refused(n0):
    """One shower, 4 candidates in layer 0 of ds1-photons (8 cells), K = 2: n_0 = 1 would place 2 points for a
    shower that has 1; n_0 = 12 asks for more points than the layer has cells."""
    geo = Geometry.calochallenge("1-photons")
    n_l = torch.zeros(1, geo.n_layers, dtype=torch.int64)
    n_l[0, 0] = n0
    r = torch.tensor([1.0, 2.0, 5.0, 20.0], dtype=torch.float64)
    g = GeneratedShowers(torch.tensor([4]), torch.zeros(4, dtype=torch.int64), r, None,
                         torch.ones(4, dtype=torch.float64), layer_counts=n_l, oversample=2)
    match = "do not match layer_counts" if n0 == 1 else "more points than the layer has cells"
    with pytest.raises(ValueError, match=match):
        place_likelihood(g, geo, generator=torch.Generator().manual_seed(0))
    # consistent counts pass: 2 × 2 candidates
    n_l[0, 0] = 2
    assert place_likelihood(g, geo).counts.tolist() == [2]


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


# ------------------------------------------------------------------------------------------------ density masses
@pytest.fixture(scope="module")
def free_flow(toy_geometry):
    """A CaloPointFlow II (α free, no set summary) with random point-flow weights and a CDF preprocessing fitted
    on uneven toy data."""
    from calopc.models.calopointflow import CaloPointFlow, CaloPointFlowConfig
    from calopc.models.preprocess import Preprocessor

    from .conftest import TINY

    geo = toy_geometry
    rng = np.random.default_rng(0)
    w = rng.exponential(1.0, geo.n_voxels) ** 2
    cell = rng.choice(geo.n_voxels, 1000, p=w / w.sum())
    e_inc = np.exp(rng.uniform(np.log(1e3), np.log(1e5), 50))
    prep = Preprocessor.fit(geo, cell, rng.exponential(1.0, 1000), np.full(50, 20), e_inc, variant="II",
                            dequantisation="cdf")
    torch.manual_seed(0)
    model = CaloPointFlow(CaloPointFlowConfig(**{**TINY, "set_summary": False, "alpha": "free"}).with_data(prep))
    with torch.no_grad():
        for p in model.point_flow.parameters():
            p.add_(torch.randn_like(p) * 0.15)
    return model.eval(), prep


def _inputs(model, prep, b: int, n: int):
    """Latent, condition and shower features of ``b`` showers with ``n`` points in every layer, and the points."""
    n_l = prep.geometry.n_layers
    torch.manual_seed(1)
    z = torch.randn(b, model.config.latent)
    cond = torch.randn(b, 1)
    shower = torch.randn(b, 2 * n_l)
    n_layer = torch.full((b, n_l), n)
    group = torch.repeat_interleave(torch.arange(b * n_l), n)
    x = model._point_sample(model._flat_context(z, cond, shower, group // n_l, group % n_l), None)
    return z, cond, shower, n_layer, x, group


def _ring_masses(mass: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """``(B, n_voxels)`` cell masses → ``(B, L, R)`` ring masses."""
    rb = torch.as_tensor(np.array(geo.cell_r_bin))
    lay = torch.as_tensor(np.array(geo.cell_layer))
    out = torch.zeros(mass.shape[0], geo.n_layers * max(geo.n_r), dtype=torch.float64)
    return out.index_add_(1, lay * max(geo.n_r) + rb, mass).reshape(mass.shape[0], geo.n_layers, -1)


class _Gauss(torch.nn.Module):
    """A point 'flow' whose density is known: independent normals in the standardised (y_r, y_E)."""

    def __init__(self, loc: tuple[float, float], scale: tuple[float, float]) -> None:
        super().__init__()
        self.loc, self.scale = torch.tensor(loc), torch.tensor(scale)

    def forward(self, ctx: torch.Tensor) -> torch.distributions.Distribution:
        n = ctx.shape[0]
        return torch.distributions.Independent(
            torch.distributions.Normal(self.loc.expand(n, 2), self.scale.expand(n, 2)), 1)


def test_cell_masses_integrate_a_known_density(free_flow):
    import copy

    model, prep = free_flow
    geo = prep.geometry
    model = copy.deepcopy(model)
    model.point_flow = _Gauss((0.3, -0.4), (0.7, 1.3))
    z, cond, shower, n_layer, x, group = _inputs(model, prep, 2, 6)
    mass = model.cell_masses(z, cond, shower, n_layer, x, group, prep)
    # the exact mass of r-bin k: Φ((y_{k+1} − 0.3) / 0.7) − Φ((y_k − 0.3) / 0.7), y_k the bin edges in the flow's
    # coordinate (the probit of the training CDF, standardised), the energy integrating to 1
    nd = torch.distributions.Normal(0.0, 1.0)
    for i in range(geo.n_layers):
        c = np.concatenate([[0.0], np.cumsum(prep.pdf_r[i])])
        y = (nd.icdf(torch.as_tensor(c / c[-1], dtype=torch.float64)) - prep.point_mean[1]) / prep.point_std[1]
        want = torch.diff(nd.cdf((y - 0.3) / 0.7))
        got = _ring_masses(mass, geo)[:, i, :geo.n_r[i]]
        torch.testing.assert_close(got, want.expand_as(got), rtol=0, atol=2e-3)
        # the cells of a ring share its mass
        cells = torch.as_tensor(np.flatnonzero(np.asarray(geo.cell_layer) == i))
        torch.testing.assert_close(mass[:, cells].sum(1), torch.ones(2, dtype=torch.float64))


def test_cell_masses_agree_with_the_flow_samples(free_flow):
    """Masses integrated from a (random) flow's density = the share of the flow's own samples in each ring."""
    model, prep = free_flow
    geo = prep.geometry
    z, cond, shower, n_layer, x, group = _inputs(model, prep, 1, 4)
    mass = _ring_masses(model.cell_masses(z, cond, shower, n_layer, x, group, prep, r_nodes=16, e_nodes=128), geo)[0]
    m = 40_000
    for i in range(geo.n_layers):
        ctx = model._flat_context(z, cond, shower, torch.zeros(m, dtype=torch.int64), torch.full((m,), i))
        y = model._point_sample(ctx, None)
        zar, _ = prep.inverse_points_layer(torch.cat([torch.zeros(m, 1), y], 1).numpy(), np.full(m, i))
        rb = np.clip(np.searchsorted(geo.r_edges[i], zar[:, 2], side="right") - 1, 0, geo.n_r[i] - 1)
        freq = np.bincount(rb, minlength=geo.n_r[i]) / m
        p = mass[i, :geo.n_r[i]].numpy()
        assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / m) + 2e-3), (i, freq, p)


def test_density_generation_places_the_model_points(free_flow):
    model, prep = free_flow
    geo = prep.geometry
    torch.manual_seed(2)
    g = model.generate(np.geomspace(1e3, 1e5, 6), prep, oversample=None)
    assert g.oversample == 1 and g.cell_mass is not None and g.layer_counts is not None
    occupied = g.layer_counts > 0
    lay = torch.as_tensor(np.array(geo.cell_layer))
    per_layer = torch.zeros(6, geo.n_layers, dtype=torch.float64).index_add_(1, lay, g.cell_mass)
    torch.testing.assert_close(per_layer[occupied], torch.ones(int(occupied.sum()), dtype=torch.float64))
    assert bool((per_layer[~occupied] == 0).all())
    pl = place(g, geo, policy="likelihood", generator=torch.Generator().manual_seed(0))
    cnt, e = _per_layer(pl, geo, 6)
    assert torch.equal(cnt, g.layer_counts)
    torch.testing.assert_close(e, g.layer_energy.to(torch.float64), rtol=1e-9, atol=1e-9)
    # the same points placed by another policy: the masses are ignored
    assert place(g, geo, policy="alpha-free").stats["n_points"] == g.n_points
    # α modelled or a set summary: no density masses, candidates instead
    with pytest.raises(ValueError, match="draw candidate points instead"):
        from dataclasses import replace

        type(model)(replace(model.config, set_summary=True)).cell_masses(*_inputs(model, prep, 1, 2), prep)
