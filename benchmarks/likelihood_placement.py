r"""The cell-likelihood placement's inputs: candidates (inclusion error and cost against ``K``) and density masses.

``--collisions likelihood`` draws every cell of a (shower, layer) with ``π_c = min(1, λ q_c)``
(:func:`calopc.models.cells.place_likelihood`). A model without a density (CaloClouds' diffusion)
estimates ``q`` from ``K n_l`` candidate points; the noise of that estimate moves the inclusion
frequencies away from ``π`` (most visibly: a cell with ``π = 1`` is left out whenever fewer than ``K``
of its candidates fall in it). This measures, for ``K`` in ``--ks``:

* **toy**: a 40-cell layer with a decaying radial profile ``q_c ∝ exp(−c / 4)`` and ``n = 12``
  (the first cells capped at ``π = 1``): the inclusion frequency of every cell over ``--reps``
  draws against ``π``, with the former design (Gumbel top-k of the candidate counts) at the same
  ``K`` and the design with the exact ``q`` (``K = ∞``) for comparison;
* **model** (``--run``, a CaloClouds run with the pointwise denoiser, e.g. a distilled student):
  for ``--showers`` showers whose shower features are drawn once, the reference ``π`` from
  ``--k-ref`` candidates per point, then ``--reps`` placements at every ``K`` (the first
  ``K n_l`` of ``max K`` candidates per layer, which are i.i.d.), and ``K`` with the candidates of
  a ring pooled over its α bins (``alpha`` dropped), against the same reference;
* **cost**: seconds per shower of sampling ``K n_l`` candidates and placing them, as a ratio to
  ``K = 1`` (same invocation, same showers);
* **density** (``--run``, a CaloPointFlow II run with α free and no set summary): the cell masses
  of :meth:`~calopc.models.calopointflow.CaloPointFlow.cell_masses` with the default nodes and
  cheaper or dearer ones against a fine reference (8 Gauss–Legendre nodes per r-bin, 1024
  energy nodes over the layer's sampled energies ± 4), as the largest and mean total variation
  ``½ Σ_rings |m − m_ref|`` per layer (and weighted by the layer's points), and their cost as a
  ratio to sampling the points (same invocation, same showers).

Figures: ``core`` the mean inclusion frequency of the cells with ``π = 1`` (1 is exact);
``misplaced`` ``Σ_c |f_c − π_c| / (2 n)``, the share of a layer's points that go elsewhere than
the design sends them (0 is exact; the sampling noise of ``--reps`` draws adds a floor, shown
by ``K = ∞``); ``max |f − π|`` over cells.

Usage::

    python benchmarks/likelihood_placement.py --parts toy
    python benchmarks/likelihood_placement.py --parts model cost --run RUN_CM --showers 4 --reps 100
    python benchmarks/likelihood_placement.py --parts density --run RUN_CPF --showers 20
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from calopc.models.cells import GeneratedShowers, inclusion_probabilities, place_likelihood, systematic_sample


def _figures(freq: torch.Tensor, pi: torch.Tensor, n: torch.Tensor) -> dict[str, float]:
    """``freq``, ``pi``: ``(G, C)``; ``n``: ``(G,)`` (groups with n = 0 are left out)."""
    keep = n > 0
    freq, pi, n = freq[keep], pi[keep], n[keep]
    core = pi >= 1 - 1e-12
    dev = (freq - pi).abs()
    return {"core": float(freq[core].mean()) if bool(core.any()) else math.nan,
            "misplaced": float(dev.sum() / (2 * n.sum())), "max_dev": float(dev.max()),
            "n_core_cells": int(core.sum())}


def toy(ks: list[int], reps: int, seed: int) -> dict:
    """The 40-cell toy: new design from K candidates, the former design (Gumbel top-k), the exact density."""
    gen = torch.Generator().manual_seed(seed)
    c, n = 40, 12
    q = torch.exp(-torch.arange(c, dtype=torch.float64) / 4)
    q /= q.sum()
    pi = inclusion_probabilities(q, torch.tensor(n))
    nn = torch.full((reps,), n)
    out = {"cells": c, "n": n, "pi": pi.tolist(), "rows": []}

    def new_design(w: torch.Tensor) -> torch.Tensor:
        return systematic_sample(inclusion_probabilities(w, nn), nn, generator=gen)

    def gumbel(w: torch.Tensor) -> torch.Tensor:
        u = torch.rand(w.shape, generator=gen, dtype=torch.float64).clamp(1e-300, 1 - 1e-16)
        keys = torch.where(w > 0, w.clamp(min=1e-300).log(), -1e4) - (-u.log()).log()  # empty cells last
        return torch.zeros_like(w, dtype=torch.bool).scatter_(1, keys.topk(n, dim=1).indices, True)

    exact = new_design(q.expand(reps, c)).double().mean(0)
    out["rows"].append({"K": "inf", "design": "systematic", **_figures(exact[None], pi[None], torch.tensor([n]))})
    for k in ks:
        idx = torch.multinomial(q.expand(reps, c), k * n, replacement=True, generator=gen)
        cnt = torch.zeros(reps, c, dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
        # a cell without candidates: the placement's fallback weight (drawn only when the others are certain)
        w = torch.where(cnt > 0, cnt, 1e-30)
        for name, fn in (("systematic", new_design), ("gumbel top-k", gumbel)):
            f = fn(w).double().mean(0)
            out["rows"].append({"K": k, "design": name, **_figures(f[None], pi[None], torch.tensor([n]))})
    return out


def _candidates(loaded, s: torch.Tensor, cond: torch.Tensor, n_layer: torch.Tensor, e_layer: torch.Tensor, k: int,
                reps: int) -> GeneratedShowers:
    """``reps`` copies of the given showers, ``k n_l`` candidates per layer sampled from the point model."""
    model, prep = loaded.model, loaded.preprocessor
    b, n_l = n_layer.shape
    nl = n_layer.repeat(reps, 1) * k
    group = torch.repeat_interleave(torch.arange(reps * b * n_l), nl.reshape(-1))
    shower_of, layer = group // n_l, group % n_l
    y = model.sample_points(cond.repeat(reps, 1), s.repeat(reps, 1), shower_of, layer)
    if model.alpha_free:
        y = torch.cat([y.new_zeros(y.shape[0], 1), y], dim=1)
    zar, w = prep.to_torch("cpu").inverse_points_layer(y, layer)
    alpha, r = zar[:, 1], zar[:, 2]
    el = e_layer.repeat(reps, 1).reshape(-1).to(w.dtype)
    tot = torch.zeros(reps * b * n_l, dtype=w.dtype).index_add_(0, group, w)
    energy = w / tot.clamp(min=1e-300)[group] * el[group]
    return GeneratedShowers(nl.sum(1), layer, r, None if model.alpha_free else alpha, energy,
                            layer_counts=n_layer.repeat(reps, 1), layer_energy=e_layer.repeat(reps, 1), oversample=k)


def _subset(g: GeneratedShowers, k: int, k_max: int) -> GeneratedShowers:
    """The first ``k n_l`` of the ``k_max n_l`` candidates of every (shower, layer)."""
    grp = torch.repeat_interleave(torch.arange(g.layer_counts.numel()), (g.layer_counts * k_max).reshape(-1))
    start = torch.cumsum((g.layer_counts * k_max).reshape(-1), 0) - (g.layer_counts * k_max).reshape(-1)
    keep = torch.arange(grp.shape[0]) - start[grp] < (g.layer_counts.reshape(-1) * k)[grp]
    counts = (g.layer_counts * k).sum(1)
    return GeneratedShowers(counts, g.layer[keep], g.r[keep], None if g.alpha is None else g.alpha[keep], g.E[keep],
                            layer_counts=g.layer_counts, layer_energy=g.layer_energy, oversample=k)


def _freq(pl, geo, b: int, reps: int) -> torch.Tensor:
    """Inclusion frequency of every cell of each of the ``b`` showers over ``reps`` copies, ``(b, n_voxels)``."""
    sh = pl.shower % b
    return torch.zeros(b * geo.n_voxels, dtype=torch.float64).index_add_(
        0, sh * geo.n_voxels + pl.cell, torch.ones_like(pl.E, dtype=torch.float64)).reshape(b, -1) / reps


def _layer_view(x: torch.Tensor, geo) -> torch.Tensor:
    """``(b, n_voxels)`` → ``(b L, most cells of a layer)``, padded with 0."""
    from calopc.models.cells import _likelihood_tables

    table = _likelihood_tables(geo, x.device)["layer_cells"]
    return torch.cat([x, x.new_zeros(x.shape[0], 1)], 1)[:, table].reshape(-1, table.shape[1])


def model_part(run: str, ks: list[int], k_ref: int, showers: int, reps: int, seed: int) -> dict:
    from calopc.models.checkpoint import load

    loaded = load(run, device="cpu")
    geo, model, prep = loaded.geometry, loaded.model, loaded.preprocessor
    torch.manual_seed(seed)
    e = torch.as_tensor(np.geomspace(2e3, 5e5, showers), dtype=torch.float64)
    s, n_layer, e_layer = model.shower.sample_layers(e, prep)
    dtype = next(model.denoiser.parameters()).dtype
    cond = torch.as_tensor(prep.forward_cond(e.numpy()), dtype=dtype)
    s = s.to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    # the reference q: the share of the k_ref n_l candidates in each cell; π = min(1, λ q)
    g_ref = _candidates(loaded, s, cond, n_layer, e_layer, k_ref, 1)
    from calopc.models.cells import locate

    ok, _, cell = locate(geo, g_ref.layer, g_ref.r, g_ref.alpha)
    sh = torch.repeat_interleave(torch.arange(showers), g_ref.counts)
    cnt = torch.zeros(showers * geo.n_voxels, dtype=torch.float64).index_add_(
        0, (sh * geo.n_voxels + cell)[ok], torch.ones(int(ok.sum()), dtype=torch.float64)).reshape(showers, -1)
    n_flat = n_layer.reshape(-1)
    pi_ref = inclusion_probabilities(_layer_view(cnt, geo), n_flat)
    out = {"run": str(run), "showers": showers, "reps": reps, "k_ref": k_ref,
           "points_per_shower": n_layer.sum(1).tolist(), "rows": []}
    k_max = max(ks)
    g_all = _candidates(loaded, s, cond, n_layer, e_layer, k_max, reps)
    for k in ks:
        g = _subset(g_all, k, k_max)
        for pooled in (False, True):
            gg = GeneratedShowers(g.counts, g.layer, g.r, None, g.E, g.layer_counts, g.layer_energy, k) if pooled else g
            pl = place_likelihood(gg, geo, generator=gen)
            f = _layer_view(_freq(pl, geo, showers, reps), geo)
            out["rows"].append({"K": k, "alpha": "pooled per ring" if pooled else "cells",
                                **_figures(f, pi_ref, n_flat)})
            print(out["rows"][-1], flush=True)
    return out


def cost(run: str, ks: list[int], showers: int, seed: int) -> dict:
    """Seconds per shower of sampling K n_l candidates and placing them, and the ratio to K = 1."""
    from calopc.models.checkpoint import load
    from calopc.models.generate import sample_showers
    from calopc.models.cells import place

    loaded = load(run, device="cpu")
    e = np.geomspace(2e3, 5e5, showers)
    rows = []
    for k in ks:
        torch.manual_seed(seed)
        t = time.perf_counter()
        g = sample_showers(loaded, e, torch.device("cpu"), {"oversample": k})
        t1 = time.perf_counter()
        place(g, loaded.geometry, policy="likelihood", generator=torch.Generator().manual_seed(seed))
        t2 = time.perf_counter()
        rows.append({"K": k, "sample_s_per_shower": (t1 - t) / showers, "place_s_per_shower": (t2 - t1) / showers})
    base = rows[0]["sample_s_per_shower"] + rows[0]["place_s_per_shower"]
    for r in rows:
        r["ratio_to_first"] = (r["sample_s_per_shower"] + r["place_s_per_shower"]) / base
        print(r, flush=True)
    return {"showers": showers, "rows": rows}


def density(run: str, showers: int, seed: int) -> dict:
    """Cell masses of a CaloPointFlow II with the default quadrature and others against a fine reference; cost."""
    from calopc.models.checkpoint import load
    from calopc.models.shower import torch_preprocessor

    loaded = load(run, device="cpu")
    model, prep, geo = loaded.model, loaded.preprocessor, loaded.geometry
    torch.manual_seed(seed)
    e = torch.as_tensor(np.geomspace(2e3, 5e5, showers), dtype=torch.float64)
    s, n_layer, _ = model.shower_flow.sample_layers(e, prep)
    b, n_l = n_layer.shape
    p = torch_preprocessor(prep, torch.device("cpu")) or prep
    cond = torch.as_tensor(p.forward_cond(e), dtype=torch.float32).reshape(b, -1)
    group = torch.repeat_interleave(torch.arange(b * n_l), n_layer.reshape(-1))
    t0 = time.perf_counter()
    z = model.latent_flow(torch.cat([cond, s], dim=-1)).sample()
    with torch.no_grad():
        x = model._point_sample(model._flat_context(z, cond, s, group // n_l, group % n_l), None)
    t_sample = time.perf_counter() - t0
    occ = n_layer.reshape(-1) > 0

    def rings(**kw) -> tuple[torch.Tensor, float]:
        t = time.perf_counter()
        m = model.cell_masses(z, cond, s, n_layer, x, group, prep, **kw)
        dt = time.perf_counter() - t
        rb = torch.as_tensor(np.array(geo.cell_r_bin))
        lay = torch.as_tensor(np.array(geo.cell_layer))
        r = torch.zeros(b, n_l * max(geo.n_r), dtype=torch.float64).index_add_(1, lay * max(geo.n_r) + rb, m)
        return r.reshape(b * n_l, -1)[occ], dt

    ref, _ = rings(r_nodes=8, e_nodes=1024, e_pad=4.0)
    rows = []
    for kw in ({"r_nodes": 1, "e_nodes": 48}, {"r_nodes": 2, "e_nodes": 24}, {"r_nodes": 2, "e_nodes": 32},
               {"r_nodes": 2, "e_nodes": 48}, {"r_nodes": 2, "e_nodes": 96}, {"r_nodes": 4, "e_nodes": 96}):
        m, dt = rings(**kw)
        tv = 0.5 * (m - ref).abs().sum(1)
        w = n_layer.reshape(-1)[occ].double()
        rows.append({**kw, "tv_max": float(tv.max()), "tv_mean": float(tv.mean()),
                     "tv_points_weighted": float((tv * w).sum() / w.sum()),
                     "seconds_per_shower": dt / b, "ratio_to_sampling": dt / t_sample})
        print(rows[-1], flush=True)
    return {"run": str(run), "showers": b, "points": int(n_layer.sum()), "occupied_layers": int(occ.sum()),
            "sampling_seconds_per_shower": t_sample / b, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", choices=("toy", "model", "cost", "density"), default=["toy"])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--reps", type=int, default=4000, help="draws per figure (default: %(default)s)")
    ap.add_argument("--run", default=None, help="a CaloClouds run (pointwise denoiser) for the model and cost parts, "
                    "a CaloPointFlow II run (α free, no set summary) for the density part")
    ap.add_argument("--k-ref", type=int, default=256, help="candidates per point of the model's reference π")
    ap.add_argument("--showers", type=int, default=4, help="showers of the model part (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args(argv)
    res: dict = {}
    if "toy" in args.parts:
        res["toy"] = toy(args.ks, args.reps, args.seed)
        print(f"toy: {res['toy']['cells']} cells, n = {res['toy']['n']}, {args.reps} draws")
        print(f"{'K':>5} {'design':>14} {'core':>7} {'misplaced':>10} {'max|f-π|':>9}")
        for r in res["toy"]["rows"]:
            print(f"{r['K']:>5} {r['design']:>14} {r['core']:7.3f} {r['misplaced']:10.4f} {r['max_dev']:9.3f}")
    if {"model", "cost", "density"} & set(args.parts) and not args.run:
        ap.error("--run is needed for the model, cost and density parts")
    if "model" in args.parts:
        res["model"] = model_part(args.run, args.ks, args.k_ref, args.showers, args.reps, args.seed)
    if "cost" in args.parts:
        res["cost"] = cost(args.run, args.ks, max(args.showers, 8), args.seed)
    if "density" in args.parts:
        res["density"] = density(args.run, args.showers, args.seed)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".part")
        tmp.write_text(json.dumps(res, indent=1) + "\n")
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
