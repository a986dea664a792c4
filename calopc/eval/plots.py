r"""Plots of the evaluation: feature histograms with ratio panels, average showers, hit counts.

Every function takes data and returns a :class:`matplotlib.figure.Figure`; nothing touches
global settings (the HEP style is applied inside a style context) and no LaTeX is needed.
"""

from __future__ import annotations

__all__ = ["draw_hist_ratio", "plot_average_showers", "plot_feature", "plot_feature_grid", "plot_hits", "save"]

import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..geometry import Geometry
from .histograms import FeatureHist

REF_COLOR = "#7f7f7f"
GEN_COLOR = "#d62728"


@contextmanager
def style():
    """HEP style for the figures made inside the block; global settings are restored afterwards."""
    import matplotlib as mpl
    import matplotlib.style as mstyle

    from .._extras import mplhep

    with mpl.rc_context(), mstyle.context(mplhep().style.ROOT):
        mpl.rcParams["text.usetex"] = False
        yield


def _figure(w: float, h: float, layout: str | None = "constrained"):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout=layout)


def draw_hist_ratio(ax, rax, fh: FeatureHist, *, legend: bool = True, small: bool = False) -> None:
    """Reference (filled) and generated (step) densities on ``ax``, gen/ref on ``rax``."""
    e = fh.edges
    w = np.diff(e)
    ref = fh.ref / max(fh.ref.sum(), 1) / w
    gen = fh.gen / max(fh.gen.sum(), 1) / w
    ax.stairs(ref, e, fill=True, color=REF_COLOR, alpha=0.5, label="reference")
    ax.stairs(gen, e, color=GEN_COLOR, lw=1.5, label="generated")
    fs = 7 if small else None
    ax.set_title(f"{fh.name}: sep. {fh.separation:.4f}", fontsize=fs or 11)
    if fh.log_x:
        ax.set_xscale("log")
        rax.set_xscale("log")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(ref > 0, gen / ref, np.nan)
    rax.stairs(ratio, e, color=GEN_COLOR)
    rax.axhline(1.0, color="k", lw=0.8, ls="--")
    rax.set_ylim(0.5, 1.5)
    rax.set_xlabel(fh.label, fontsize=fs)
    rax.set_ylabel("gen/ref", fontsize=fs)
    ax.tick_params(labelbottom=False, labelsize=fs or 10)
    rax.tick_params(labelsize=fs or 10)
    if legend:
        ax.legend(fontsize=fs or 10, frameon=False)


def plot_feature(fh: FeatureHist):
    """One feature histogram with a ratio panel."""
    with style():
        fig = _figure(6, 5)
        ax, rax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        draw_hist_ratio(ax, rax, fh)
    return fig


def plot_feature_grid(hists: list[FeatureHist], title: str, ncols: int = 5):
    """Many histograms (e.g. one feature in every layer), each with its ratio panel, on one page."""
    n = len(hists)
    nrows = math.ceil(n / ncols)
    with style():
        fig = _figure(3.2 * ncols, 3.0 * nrows, layout=None)  # a layout engine is slow with this many axes
        outer = fig.add_gridspec(nrows, ncols, left=0.05, right=0.98, bottom=0.03, top=1 - 1.0 / (3.0 * nrows),
                                 wspace=0.35, hspace=0.45)
        for i, fh in enumerate(hists):
            r, c = divmod(i, ncols)
            inner = outer[r, c].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.08)
            ax = fig.add_subplot(inner[0])
            rax = fig.add_subplot(inner[1], sharex=ax)
            draw_hist_ratio(ax, rax, fh, legend=(i == 0), small=True)
        fig.suptitle(title)
    return fig


def plot_average_showers(ref_mean: np.ndarray, gen_mean: np.ndarray, geometry: Geometry, *, ncols: int = 9):
    """Average energy per cell, layer by layer, in the r–α plane (polar), reference beside generated."""
    from matplotlib.colors import LogNorm

    pos = np.concatenate([ref_mean[ref_mean > 0], gen_mean[gen_mean > 0]])
    vmin = max(pos.min(), pos.max() * 1e-6) if pos.size else 1e-3
    vmax = pos.max() if pos.size else 1.0
    norm = LogNorm(vmin=vmin, vmax=vmax)
    n = geometry.n_layers
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    figs = []
    with style():
        for name, mean in (("reference", ref_mean), ("generated", gen_mean)):
            fig = _figure(2.2 * ncols + 1.5, 2.3 * nrows + 0.8)
            mesh = None
            for l in range(n):
                ax = fig.add_subplot(nrows, ncols, l + 1, projection="polar")
                na, edges = geometry.n_alpha[l], np.asarray(geometry.r_edges[l])
                img = mean[geometry.offsets[l]:geometry.offsets[l + 1]].reshape(na, len(edges) - 1)
                theta = np.linspace(-np.pi, np.pi, na + 1)
                rr = np.sqrt(edges / edges[-1])  # sqrt scale so the small inner cells stay visible
                mesh = ax.pcolormesh(theta, rr, np.ma.masked_less_equal(img.T, 0), norm=norm, cmap="viridis")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"layer {geometry.layer_ids[l]}", fontsize=8)
            if mesh is not None:
                fig.colorbar(mesh, ax=fig.axes, shrink=0.6, label="mean energy per cell [MeV]")
            fig.suptitle(f"average shower, {name} (radius on a square-root scale)")
            figs.append(fig)
    return figs


def plot_hits(ref, gen, geometry: Geometry):
    """Point-cloud view: points per shower, mean points per layer, points vs incident energy."""
    with style():
        fig = _figure(16, 4.5)
        a1, a2, a3 = fig.subplots(1, 3)
        nmax = max(ref.n_hits.max(), gen.n_hits.max(), 1)
        bins = np.linspace(0, nmax * 1.05 + 1, 51)
        a1.hist(ref.n_hits, bins=bins, density=True, color=REF_COLOR, alpha=0.5, label="reference")
        a1.hist(gen.n_hits, bins=bins, density=True, histtype="step", color=GEN_COLOR, lw=1.5, label="generated")
        a1.set_xlabel("points per shower")
        a1.legend(frameon=False)
        x = np.arange(geometry.n_layers)
        a2.step(x, ref.n_hits_layer.mean(0), where="mid", color=REF_COLOR, label="reference")
        a2.step(x, gen.n_hits_layer.mean(0), where="mid", color=GEN_COLOR, label="generated")
        a2.set_xlabel("layer")
        a2.set_ylabel("mean points per layer")
        ebins = np.logspace(np.log10(min(ref.e_inc.min(), gen.e_inc.min())),
                            np.log10(max(ref.e_inc.max(), gen.e_inc.max())) + 1e-9, 16)
        for f, c, lab in ((ref, REF_COLOR, "reference"), (gen, GEN_COLOR, "generated")):
            idx = np.clip(np.digitize(f.e_inc, ebins) - 1, 0, len(ebins) - 2)
            cnt = np.bincount(idx, minlength=len(ebins) - 1)
            mean = np.bincount(idx, weights=f.n_hits, minlength=len(ebins) - 1) / np.maximum(cnt, 1)
            mid = np.sqrt(ebins[1:] * ebins[:-1])
            a3.plot(mid[cnt > 0], mean[cnt > 0], "o-", color=c, label=lab, ms=4)
        a3.set_xscale("log")
        a3.set_xlabel(r"$E_{inc}$ [MeV]")
        a3.set_ylabel("mean points per shower")
    return fig


def save(fig, out_dir: Path, name: str, formats: tuple[str, ...] = ("png", "pdf")) -> list[str]:
    """Write ``fig`` as ``name.png`` and ``name.pdf`` (atomically); return the file names."""
    from ..io import atomic_output

    names = []
    for fmt in formats:
        target = Path(out_dir) / f"{name}.{fmt}"
        with atomic_output(target) as tmp, style():
            fig.savefig(tmp, format=fmt, dpi=90)
        names.append(target.name)
    return names
