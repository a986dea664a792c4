r"""Plots of the evaluation: feature histograms with uncertainties and ratio panels, first-look profiles,
average showers, and a parallel renderer that writes them all.

Every ``plot_*`` function takes numpy data and returns a :class:`matplotlib.figure.Figure`; nothing
touches global settings (the HEP style is applied inside a style context, :func:`style`) and no LaTeX
is needed. Conventions:

* densities ``1/N dN/dx`` per unit of ``x``; statistical uncertainties from the sum of weights squared
  (``sqrt(counts)`` for unweighted entries), drawn as error bars on the generated sample and as a band
  on the reference;
* the ratio panel shows generated/reference with the generated uncertainty as error bars and the
  reference uncertainty as a band around 1; points outside the panel's range are marked with arrows
  at its edge;
* log scales where the official CaloChallenge plots use them (energy per layer and cell energies
  log-log, centres and widths log-y);
* every figure carries the dataset label and both sample names with their sizes.

:func:`render` draws a list of :class:`PlotJob` in worker processes (spawn/forkserver, Agg canvas,
figures built in the workers from numpy arrays) and writes PNG (and optionally PDF) files.
"""

from __future__ import annotations

__all__ = [
    "DPI",
    "FeatureInfo",
    "PlotContext",
    "PlotJob",
    "dataset_label",
    "default_workers",
    "draw_hist_ratio",
    "draw_profile_ratio",
    "energy_text",
    "feature_info",
    "plot_average_maps",
    "plot_average_shower",
    "plot_feature",
    "plot_feature_grid",
    "plot_hits",
    "plot_longitudinal",
    "plot_radial",
    "plot_response",
    "render",
    "save",
    "style",
    "tex",
]

import math
import os
import re
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..geometry import Geometry
from .histograms import FeatureHist

REF_COLOR = "#6e6e6e"
GEN_COLOR = "#d62728"
DPI = 100  # PNG resolution: figures are drawn at the size they are shown in report.html
RATIO_RANGE = (0.5, 1.5)
_MAX_DECADES = 8  # log-y axes show at most this many decades below the maximum

#: font sizes in points; the PNGs are shown at their natural size, so 8 pt is the smallest text
_RC = {
    "font.size": 10, "axes.labelsize": 10, "axes.titlesize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
    "legend.fontsize": 8.5, "figure.titlesize": 12, "axes.linewidth": 1.0, "xtick.major.size": 5,
    "xtick.minor.size": 2.5, "ytick.major.size": 5, "ytick.minor.size": 2.5, "xtick.major.pad": 3,
    "ytick.major.pad": 3, "lines.linewidth": 1.4, "figure.dpi": DPI, "savefig.dpi": DPI,
    "xaxis.labellocation": "right", "yaxis.labellocation": "top", "axes.titlepad": 4,
}

_PARTICLES = {"electron": r"$e^{-}$", "photon": r"$\gamma$", "pion": r"$\pi^{+}$"}
_PARTICLES_TEXT = {"electron": "e⁻", "photon": "γ", "pion": "π⁺"}


@contextmanager
def style():
    """HEP style (mplhep ROOT, readable sizes) for the figures made inside the block; global settings untouched."""
    import matplotlib as mpl
    import matplotlib.style as mstyle

    from .._extras import mplhep

    with mpl.rc_context(), mstyle.context(mplhep().style.ROOT):
        mpl.rcParams.update(_RC)
        mpl.rcParams["text.usetex"] = False
        yield


def dataset_label(geometry: Geometry, *, tex: bool = True) -> str:
    """``"CaloChallenge ds2, e⁻"`` (mathtext for figures with ``tex=True``, Unicode for HTML otherwise)."""
    names = {"1-photons": ("1", "photon"), "1-pions": ("1", "pion"), "2": ("2", "electron"), "3": ("3", "electron")}
    table = _PARTICLES if tex else _PARTICLES_TEXT
    if geometry.name in names:
        ds, particle = names[geometry.name]
        return f"CaloChallenge ds{ds}, {table[particle]}"
    particle = table.get(geometry.particle, geometry.particle)
    return f"geometry {geometry.name}" + (f", {particle}" if particle else "")


@dataclass(frozen=True)
class PlotContext:
    """What every figure states: the dataset and the two samples with their sizes."""

    dataset: str  # e.g. "CaloChallenge ds2, $e^{-}$"
    ref_name: str  # file name of the reference sample
    gen_name: str  # file name of the generated sample
    n_ref: int  # showers in the reference
    n_gen: int  # showers in the generated sample

    @staticmethod
    def _short(name: str, n: int = 28) -> str:
        return name if len(name) <= n else name[: n - 10] + "…" + name[-9:]

    @property
    def ref_label(self) -> str:
        return f"reference: {self._short(self.ref_name)} (N = {self.n_ref:,})"

    @property
    def gen_label(self) -> str:
        return f"generated: {self._short(self.gen_name)} (N = {self.n_gen:,})"


@dataclass(frozen=True)
class FeatureInfo:
    """How a feature histogram is labelled and scaled."""

    kind: str  # feature family, e.g. "E_layer"
    layer: int | None  # layer id for per-layer features
    xlabel: str  # mathtext x label with unit
    ylabel: str  # mathtext y label with unit (density per unit x)
    text: str  # plain-text name for tables (Unicode), e.g. "⟨x⟩ in layer 3 [mm]"
    group: str  # plain-text name of the family, e.g. "⟨x⟩ per layer"
    log_x: bool
    log_y: bool


# kind: (mathtext symbol, text symbol, unit, log_x, log_y, family description)
_KINDS = {
    "E_layer": (r"E_{{k}}", "E", "MeV", True, True, "energy per layer"),
    "EC_x": (r"\langle x\rangle", "⟨x⟩", "mm", False, True, "⟨x⟩ per layer"),
    "EC_y": (r"\langle y\rangle", "⟨y⟩", "mm", False, True, "⟨y⟩ per layer"),
    "width_x": (r"\sigma_{x}", "σx", "mm", False, True, "width σx per layer"),
    "width_y": (r"\sigma_{y}", "σy", "mm", False, True, "width σy per layer"),
    "EC_r": (r"\langle r\rangle", "⟨r⟩", "mm", False, True, "⟨r⟩ per layer"),
    "width_r": (r"\sigma_{r}", "σr", "mm", False, True, "width σr per layer"),
    "sparsity": (r"s", "sparsity", "", False, False, "sparsity per layer"),
}


_TEX = {"⟨x⟩": r"$\langle x\rangle$", "⟨y⟩": r"$\langle y\rangle$", "⟨r⟩": r"$\langle r\rangle$",
        "σx": r"$\sigma_{x}$", "σy": r"$\sigma_{y}$", "σr": r"$\sigma_{r}$",
        "E_dep/E_inc": r"$E_\mathrm{dep}/E_\mathrm{inc}$"}


def tex(text: str) -> str:
    """Plain-text feature names (``⟨x⟩``, ``σr``) as mathtext for figure titles."""
    for k, v in _TEX.items():
        text = text.replace(k, v)
    return text


def _unit(unit: str) -> str:
    return f" [{unit}]" if unit else ""


def energy_text(mev: float) -> str:
    """``256 MeV``, ``1.02 GeV``, ``1.05 TeV``: an energy with a readable unit."""
    if mev < 1e3:
        return f"{mev:.3g} MeV"
    if mev < 1e6:
        return f"{mev / 1e3:.3g} GeV"
    return f"{mev / 1e6:.3g} TeV"


def feature_info(name: str, fallback_label: str = "", *, generic: bool = False) -> FeatureInfo:
    """Physics labels and scales of the histogram ``name`` (e.g. ``"E_ratio"``, ``"EC_x_3"``).

    ``generic=True`` writes the axis labels of per-layer features with ``k`` for the layer (the panel title
    names it), so that a page of layers shares its labels (and matplotlib parses each label once).
    """
    m = re.fullmatch(r"(.+)_(\d+)", name)
    if m and m.group(1) in _KINDS:
        kind, k = m.group(1), int(m.group(2))
        sym, text, unit, log_x, log_y, group = _KINDS[kind]
        kk = "$k$" if generic else str(k)
        sym = sym.replace("{k}", "k" if generic else str(k))
        dens = rf"$1/N\;dN/d{sym}$" + (f" [{unit}$^{{-1}}$]" if unit else "")
        if kind == "E_layer":
            return FeatureInfo(kind, k, f"energy in layer {kk}, ${sym}$ [MeV]", dens, f"E in layer {k} [MeV]", group,
                               log_x, log_y)
        if kind == "sparsity":
            return FeatureInfo(kind, k, f"sparsity in layer {kk} (share of empty cells)", dens,
                               f"sparsity in layer {k}", group, log_x, log_y)
        return FeatureInfo(kind, k, f"${sym}$ in layer {kk}{_unit(unit)}", dens, f"{text} in layer {k}{_unit(unit)}",
                           group, log_x, log_y)
    if name.startswith("E_ratio_einc_"):
        e = energy_text(float(name.rsplit("_", 1)[1]))
        s = r"E_\mathrm{dep}/E_\mathrm{inc}"
        return FeatureInfo("E_ratio_einc", None, f"${s}$ at $E_\\mathrm{{inc}}$ = {e}", rf"$1/N\;dN/d({s})$",
                           f"E_dep/E_inc at E_inc = {e}", "E_dep/E_inc per incident energy", False, False)
    if name == "E_ratio":
        s = r"E_\mathrm{dep}/E_\mathrm{inc}"
        return FeatureInfo(name, None, f"${s}$", rf"$1/N\;dN/d({s})$", "E_dep/E_inc", "E_dep/E_inc", False, False)
    if name == "voxel_spectrum":
        return FeatureInfo(name, None, r"cell energy $E_\mathrm{cell}$ [MeV]",
                           r"$1/N_\mathrm{cells}\;dN/dE_\mathrm{cell}$ [MeV$^{-1}$]", "cell energy [MeV]",
                           "cell-energy spectrum", True, True)
    if name == "n_hits":
        return FeatureInfo(name, None, r"cells above threshold per shower, $N_\mathrm{hits}$",
                           r"$1/N\;dN/dN_\mathrm{hits}$", "cells above threshold per shower", "points per shower",
                           False, False)
    label = fallback_label or name
    return FeatureInfo(name, None, label, "1/N dN/dx", name, name, False, False)


# --------------------------------------------------------------------------------------------- drawing helpers
def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=DPI)


def _centres(edges: np.ndarray, log_x: bool) -> np.ndarray:
    if log_x and edges[0] > 0:
        return np.sqrt(edges[1:] * edges[:-1])
    return 0.5 * (edges[1:] + edges[:-1])


def _stairs(ax, values: np.ndarray, edges: np.ndarray, *, color: str, fill: bool = False,
            baseline: float | np.ndarray | None = 0, **kw):
    """``ax.stairs`` without its data-limit update (Bézier walk over the path: a third of a page's time).

    Callers set the axis limits themselves.
    """
    from matplotlib.patches import StepPatch

    if fill:
        kw.setdefault("lw", 0)
        p = StepPatch(values, edges, baseline=baseline, fill=True, facecolor=color, edgecolor="none", **kw)
    else:
        p = StepPatch(values, edges, baseline=baseline, fill=False, edgecolor=color, **kw)
    ax.add_artist(p)
    return p


def _legend_handles(ctx: PlotContext) -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    return [Patch(facecolor=REF_COLOR, alpha=0.45, edgecolor="none", label=ctx.ref_label),
            Line2D([], [], color=GEN_COLOR, marker="o", ms=3, label=ctx.gen_label)]


def _ratio_panel(rax, x: np.ndarray, ref: np.ndarray, ref_err: np.ndarray, gen: np.ndarray, gen_err: np.ndarray,
                 edges: np.ndarray | None, lim: tuple[float, float] = RATIO_RANGE) -> None:
    """gen/ref points with gen error bars, a band of the relative reference uncertainty around 1, arrows off-scale."""
    from matplotlib.transforms import blended_transform_factory

    with np.errstate(divide="ignore", invalid="ignore"):
        has_ref = ref > 0
        ratio = np.where(has_ref, gen / ref, np.nan)
        rerr = np.where(has_ref, gen_err / ref, np.nan)
        band = np.where(has_ref, ref_err / ref, 0.0)
    if edges is not None:
        _stairs(rax, 1 + band, edges, baseline=1 - band, fill=True, color=REF_COLOR, alpha=0.4)
    else:
        rax.fill_between(x, 1 - band, 1 + band, color=REF_COLOR, alpha=0.4, lw=0)
    rax.axhline(1.0, color="k", lw=0.8, ls="--")
    lo, hi = lim
    inside = has_ref & (gen > 0) & (ratio >= lo) & (ratio <= hi)
    rax.errorbar(x[inside], ratio[inside], yerr=rerr[inside], fmt="o", ms=2.5, color=GEN_COLOR, elinewidth=1)
    up = (has_ref & (ratio > hi)) | (~has_ref & (gen > 0))
    down = has_ref & (ratio < lo)
    trans = blended_transform_factory(rax.transData, rax.transAxes)
    for mask, y, marker in ((up, 0.88, "^"), (down, 0.12, "v")):
        if mask.any():
            rax.plot(x[mask], np.full(int(mask.sum()), y), ls="none", marker=marker, ms=5, color=GEN_COLOR,
                     transform=trans, clip_on=True)
    rax.set_ylim(lo, hi)
    rax.set_ylabel("gen./ref.")


def _ratio_range(x: np.ndarray, ref: np.ndarray, gen: np.ndarray, gen_err: np.ndarray) -> tuple[float, float]:
    """A symmetric ratio range around 1 that holds the points and their error bars (steps 0.05 … 0.5)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.abs(gen / ref - 1) + np.abs(gen_err / ref)
    r = r[np.isfinite(r)]
    need = float(r.max()) * 1.15 if r.size else 0.5
    for step in (0.05, 0.1, 0.2, 0.5):
        if need <= step:
            return 1 - step, 1 + step
    return RATIO_RANGE


def _set_y(ax, log_y: bool, values: Sequence[np.ndarray], headroom: float, *, zero: bool = True) -> None:
    v = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in values])
    v = v[np.isfinite(v)]
    if log_y:
        pos = v[v > 0]
        if pos.size:
            from matplotlib.ticker import LogLocator, NullLocator

            ax.set_yscale("log")
            hi = pos.max() * headroom**2 * 10
            lo = max(pos.min() / 3, hi * 10.0**-_MAX_DECADES)
            ax.set_ylim(lo, hi)
            # few ticks: tick objects are most of the drawing time of a page
            ax.yaxis.set_major_locator(LogLocator(base=10, numticks=6))
            ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2, 5), numticks=6) if hi / lo < 1e4 else NullLocator())
        return
    top = v.max() if v.size else 1.0
    if not zero and v.size:
        bottom = v.min()
        span = max(top - bottom, 1e-12)
        ax.set_ylim(bottom - 0.1 * span, top + (headroom - 1) * 3 * span)
        return
    ax.set_ylim(0, top * headroom if top > 0 else 1.0)


def draw_hist_ratio(ax, rax, fh: FeatureHist, ctx: PlotContext, *, legend: bool = True, title: str | None = None,
                    zoom: bool = True, generic: bool = False) -> FeatureInfo:
    """Reference (filled, with its uncertainty band) and generated (with error bars) densities, ratio below.

    Densities are per unit of ``x``; the uncertainties are ``sqrt(Σ w²)`` per bin (``sqrt(counts)``).
    ``zoom`` limits the x range to the occupied bins (the binning, and the separation power, are unchanged).
    ``generic`` labels per-layer axes with ``k`` (see :func:`feature_info`).
    Returns the :class:`FeatureInfo` used for the labels.
    """
    info = feature_info(fh.name, getattr(fh, "label", ""), generic=generic)
    log_x = info.log_x or bool(getattr(fh, "log_x", False))
    e = np.asarray(fh.edges, dtype=np.float64)
    w = np.diff(e)
    ref = np.asarray(fh.ref, dtype=np.float64)
    gen = np.asarray(fh.gen, dtype=np.float64)
    nr, ng = max(ref.sum(), 1.0), max(gen.sum(), 1.0)
    dr, er = ref / (nr * w), np.sqrt(ref) / (nr * w)
    dg, eg = gen / (ng * w), np.sqrt(gen) / (ng * w)
    x = _centres(e, log_x)
    _stairs(ax, dr, e, fill=True, color=REF_COLOR, alpha=0.3)
    _stairs(ax, dr + er, e, baseline=np.maximum(dr - er, 0), fill=True, color=REF_COLOR, alpha=0.45)
    _stairs(ax, dg, e, color=GEN_COLOR, lw=1.2)
    m = gen > 0
    ax.errorbar(x[m], dg[m], yerr=eg[m], fmt="none", ecolor=GEN_COLOR, elinewidth=1)
    if log_x:
        ax.set_xscale("log")
    _set_y(ax, info.log_y, [dr + er, dg + eg, np.where(dr > 0, dr, np.nan), np.where(dg > 0, dg, np.nan)],
           headroom=1.45 if legend else 1.15)
    ax.set_xlim(e[0], e[-1])
    if zoom:
        occ = np.flatnonzero((ref > 0) | (gen > 0))
        if occ.size:
            lo, hi = max(occ[0] - 1, 0), min(occ[-1] + 2, len(e) - 1)
            ax.set_xlim(e[lo], e[hi])
    _ratio_panel(rax, x, dr, er, dg, eg, e)
    ax.set_ylabel(info.ylabel)
    rax.set_xlabel(info.xlabel)
    ax.tick_params(labelbottom=False)
    sep = fh.separation
    ax.set_title(title if title is not None else ctx.dataset, loc="left", y=1.0)
    ax.set_title("S = –" if not np.isfinite(sep) else f"S = {sep:.4f}", loc="right", y=1.0)
    if legend:
        ax.legend(handles=_legend_handles(ctx), loc="upper right", frameon=False)
    return info


def _pair(fig, spec):
    """Main axes and ratio axes (shared x) in one grid cell."""
    inner = spec.subgridspec(2, 1, height_ratios=[3, 1], hspace=0.06)
    ax = fig.add_subplot(inner[0])
    rax = fig.add_subplot(inner[1], sharex=ax)
    return ax, rax


def _single(w: float = 6.4, h: float = 5.6, *, top: float = 0.4, bottom: float = 0.55, left: float = 0.95,
            right: float = 0.2):
    fig = _figure(w, h)
    gs = fig.add_gridspec(1, 1, left=left / w, right=1 - right / w, top=1 - top / h, bottom=bottom / h)
    return fig, gs


def plot_feature(fh: FeatureHist, ctx: PlotContext):
    """One feature histogram with its ratio panel (6.4 × 5.6 in)."""
    with style():
        fig, gs = _single()
        ax, rax = _pair(fig, gs[0])
        draw_hist_ratio(ax, rax, fh, ctx)
    return fig


def plot_feature_grid(hists: Sequence[FeatureHist], ctx: PlotContext, title: str, *, ncols: int = 3):
    """A page of histograms (one feature in a group of layers), 4 in per panel, one legend for the page."""
    n = len(hists)
    nrows = max(math.ceil(n / ncols), 1)
    w, panel_h, top, bottom = 4.0 * ncols, 3.6, 0.85, 0.6
    h = top + bottom + panel_h * nrows
    with style():
        fig = _figure(w, h)
        outer = fig.add_gridspec(nrows, ncols, left=0.85 / w, right=1 - 0.15 / w, top=1 - top / h,
                                 bottom=bottom / h, wspace=0.42, hspace=0.38)
        for i, fh in enumerate(hists):
            ax, rax = _pair(fig, outer[divmod(i, ncols)])
            info = feature_info(fh.name)
            draw_hist_ratio(ax, rax, fh, ctx, legend=False,
                            title=f"layer {info.layer}" if info.layer is not None else tex(info.text))
            for a in (ax, rax):  # minor ticks cost half the drawing time of a 9-panel page
                a.minorticks_off()
        fig.suptitle(f"{tex(title)} — {ctx.dataset}", x=0.85 / w, y=1 - 0.12 / h, ha="left", va="top")
        fig.legend(handles=_legend_handles(ctx), loc="upper left", bbox_to_anchor=(0.85 / w, 1 - 0.42 / h),
                   ncol=2, frameon=False)
    return fig


def draw_profile_ratio(ax, rax, x: np.ndarray, ref: tuple[np.ndarray, np.ndarray], gen: tuple[np.ndarray, np.ndarray],
                       ctx: PlotContext, *, edges: np.ndarray | None = None, log_y: bool = True,
                       legend: bool = True, zero: bool = True) -> None:
    """A mean profile: reference as a band (mean ± standard error), generated as points with error bars.

    The ratio panel's range adapts to the points (±5 %, ±10 %, ±20 % or ±50 %); arrows mark points beyond it.
    ``zero=False`` lets a linear y axis start near the data instead of at 0.
    """
    rm, re_ = (np.asarray(a, dtype=np.float64) for a in ref)
    gm, ge = (np.asarray(a, dtype=np.float64) for a in gen)
    x = np.asarray(x, dtype=np.float64)
    if edges is not None:
        _stairs(ax, rm, edges, color=REF_COLOR, lw=1.0, baseline=None)
        _stairs(ax, rm + re_, edges, baseline=np.maximum(rm - re_, 0), fill=True, color=REF_COLOR, alpha=0.45)
        ax.set_xlim(edges[0], edges[-1])
    else:
        ax.plot(x, rm, color=REF_COLOR, lw=1.0)
        ax.fill_between(x, np.maximum(rm - re_, 0), rm + re_, color=REF_COLOR, alpha=0.45, lw=0)
    ok = np.isfinite(gm)
    ax.errorbar(x[ok], gm[ok], yerr=ge[ok], fmt="o", ms=3, color=GEN_COLOR, elinewidth=1)
    _set_y(ax, log_y, [rm + re_, gm + ge, np.where(rm > 0, rm, np.nan), np.where(gm > 0, gm, np.nan)],
           headroom=1.45 if legend else 1.15, zero=zero)
    _ratio_panel(rax, x, rm, re_, gm, ge, edges, lim=_ratio_range(x, rm, gm, ge))
    ax.tick_params(labelbottom=False)
    if legend:
        ax.legend(handles=_legend_handles(ctx), loc="upper right", frameon=False)


def plot_longitudinal(layer_ids: Sequence[int], ref: tuple[np.ndarray, np.ndarray], gen: tuple[np.ndarray, np.ndarray],
                      ctx: PlotContext):
    """Mean longitudinal profile: mean energy per layer (± standard error), with the ratio."""
    n = len(layer_ids)
    edges = np.arange(n + 1) - 0.5
    with style():
        fig, gs = _single(7.2, 5.6)
        ax, rax = _pair(fig, gs[0])
        draw_profile_ratio(ax, rax, np.arange(n), ref, gen, ctx, edges=edges)
        ax.set_ylabel(r"mean energy per layer $\langle E_{k}\rangle$ [MeV]")
        rax.set_xlabel("layer $k$")
        if n <= 20:
            rax.set_xticks(np.arange(n), [str(i) for i in layer_ids])
        ax.set_title(ctx.dataset, loc="left", y=1.0)
        ax.set_title("longitudinal profile", loc="right", y=1.0)
    return fig


def plot_radial(r_edges: np.ndarray, ref: tuple[np.ndarray, np.ndarray], gen: tuple[np.ndarray, np.ndarray],
                ctx: PlotContext):
    """Mean radial profile: energy per mm of radius summed over layers (± standard error), with the ratio."""
    e = np.asarray(r_edges, dtype=np.float64)
    w = np.diff(e)
    ref = (np.asarray(ref[0]) / w, np.asarray(ref[1]) / w)
    gen = (np.asarray(gen[0]) / w, np.asarray(gen[1]) / w)
    with style():
        fig, gs = _single(7.2, 5.6)
        ax, rax = _pair(fig, gs[0])
        draw_profile_ratio(ax, rax, 0.5 * (e[1:] + e[:-1]), ref, gen, ctx, edges=e)
        ax.set_ylabel(r"mean energy per radius $\langle dE/dr\rangle$ [MeV/mm]")
        rax.set_xlabel("radius $r$ [mm]")
        ax.set_title(ctx.dataset, loc="left", y=1.0)
        ax.set_title("radial profile (all layers)", loc="right", y=1.0)
    return fig


def plot_response(e_edges: np.ndarray, ref: dict[str, np.ndarray], gen: dict[str, np.ndarray], ctx: PlotContext):
    """Response ``⟨E_dep/E_inc⟩`` and resolution ``σ/⟨E_dep/E_inc⟩`` in bins of incident energy, with ratios.

    ``ref``/``gen`` hold ``mean, mean_err, rel_width, rel_width_err`` arrays, one value per energy bin (NaN if empty).
    """
    e = np.asarray(e_edges, dtype=np.float64)
    x = np.sqrt(e[1:] * e[:-1])
    with style():
        fig = _figure(12.8, 5.6)
        gs = fig.add_gridspec(1, 2, left=0.95 / 12.8, right=1 - 0.2 / 12.8, top=1 - 0.4 / 5.6, bottom=0.55 / 5.6,
                              wspace=0.28)
        for i, (key, ylabel) in enumerate((("mean", r"response $\langle E_\mathrm{dep}/E_\mathrm{inc}\rangle$"),
                                           ("rel_width", r"resolution $\sigma/\langle E_\mathrm{dep}/E_\mathrm{inc}"
                                                         r"\rangle$"))):
            ax, rax = _pair(fig, gs[i])
            draw_profile_ratio(ax, rax, x, (ref[key], ref[f"{key}_err"]), (gen[key], gen[f"{key}_err"]), ctx,
                               edges=e, log_y=False, legend=(i == 0), zero=(key != "mean"))
            ax.set_xscale("log")
            ax.set_ylabel(ylabel)
            rax.set_xlabel(r"incident energy $E_\mathrm{inc}$ [MeV]")
            ax.set_title(ctx.dataset if i == 0 else "", loc="left", y=1.0)
    return fig


def plot_hits(layer_ids: Sequence[int], per_layer: dict[str, tuple[np.ndarray, np.ndarray]], e_edges: np.ndarray,
              per_energy: dict[str, tuple[np.ndarray, np.ndarray]], ctx: PlotContext):
    """Point-cloud view: mean points per layer and mean points per shower vs incident energy, with ratios.

    ``per_layer``/``per_energy`` map ``"reference"``/``"generated"`` to ``(mean, standard error)``.
    """
    n = len(layer_ids)
    e = np.asarray(e_edges, dtype=np.float64)
    with style():
        fig = _figure(12.8, 5.6)
        gs = fig.add_gridspec(1, 2, left=0.95 / 12.8, right=1 - 0.2 / 12.8, top=1 - 0.4 / 5.6, bottom=0.55 / 5.6,
                              wspace=0.28)
        ax, rax = _pair(fig, gs[0])
        draw_profile_ratio(ax, rax, np.arange(n), per_layer["reference"], per_layer["generated"], ctx,
                           edges=np.arange(n + 1) - 0.5)
        ax.set_ylabel(r"mean points per layer $\langle N_{k}\rangle$")
        rax.set_xlabel("layer $k$")
        ax.set_title(ctx.dataset, loc="left", y=1.0)
        ax, rax = _pair(fig, gs[1])
        draw_profile_ratio(ax, rax, np.sqrt(e[1:] * e[:-1]), per_energy["reference"], per_energy["generated"], ctx,
                           edges=e, legend=False)
        ax.set_xscale("log")
        ax.set_ylabel(r"mean points per shower $\langle N_\mathrm{hits}\rangle$")
        rax.set_xlabel(r"incident energy $E_\mathrm{inc}$ [MeV]")
    return fig


def _cmaps():
    import matplotlib as mpl

    seq = mpl.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    div = mpl.colormaps["RdBu_r"].with_extremes(bad="#d9d9d9")
    return seq, div


def plot_average_maps(rows: Sequence[tuple[str, np.ndarray, np.ndarray, int, int]], r_edges: np.ndarray,
                      layer_ids: Sequence[int], ctx: PlotContext, *, rel_range: float = 0.5):
    """Average showers as (layer, r) maps summed over α: reference, generated and (gen − ref)/ref per energy bin.

    ``rows``: ``(title, ref_map, gen_map, n_ref, n_gen)`` with maps of shape ``(n_layers, n_r)`` in MeV.
    Grey cells: no energy in the reference (or in both samples for the first two columns).
    """
    from matplotlib.colors import LogNorm, Normalize

    seq, div = _cmaps()
    r = np.asarray(r_edges, dtype=np.float64)
    n = len(layer_ids)
    lx = np.arange(n + 1) - 0.5
    nrows = max(len(rows), 1)
    w, row_h, top, bottom = 15.0, 3.0, 0.75, 0.6
    h = top + bottom + row_h * nrows
    with style():
        fig = _figure(w, h)
        gs = fig.add_gridspec(nrows, 3, left=0.8 / w, right=1 - 0.9 / w, top=1 - top / h, bottom=bottom / h,
                              wspace=0.32, hspace=0.55)
        for i, (title, rm, gm, nr, ng) in enumerate(rows):
            pos = np.concatenate([rm[rm > 0], gm[gm > 0]])
            norm = LogNorm(vmin=max(pos.min(), pos.max() * 1e-6), vmax=pos.max()) if pos.size else Normalize(0, 1)
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.where(rm > 0, (gm - rm) / rm, np.nan)
            for j, (img, cmap, nm, lab) in enumerate((
                    (np.where(rm > 0, rm, np.nan), seq, norm, f"reference (N = {nr:,})"),
                    (np.where(gm > 0, gm, np.nan), seq, norm, f"generated (N = {ng:,})"),
                    (rel, div, Normalize(-rel_range, rel_range), "(gen. − ref.)/ref."))):
                ax = fig.add_subplot(gs[i, j])
                mesh = ax.pcolormesh(lx, r, np.ma.masked_invalid(img.T), cmap=cmap, norm=nm)
                ax.set_title(f"{title}: {lab}", loc="left", fontsize=9, y=1.0)
                ax.set_xlabel("layer $k$")
                ax.set_ylabel("$r$ [mm]")
                ax.tick_params(which="minor", length=0)
                cb = fig.colorbar(mesh, ax=ax, pad=0.02, fraction=0.05,
                                  extend="both" if j == 2 else "neither")
                cb.set_label("(gen. − ref.)/ref." if j == 2 else "mean energy [MeV]", fontsize=9)
                cb.ax.tick_params(labelsize=8)
        fig.suptitle(f"average shower per incident-energy bin (summed over α) — {ctx.dataset}", x=0.8 / w,
                     y=1 - 0.1 / h, ha="left", va="top")
        fig.text(0.8 / w, 1 - 0.45 / h, f"{ctx.ref_label};  {ctx.gen_label};  grey: no energy in the reference",
                 fontsize=9, va="top")
    return fig


def plot_average_shower(ref_mean: np.ndarray, gen_mean: np.ndarray, geometry: Geometry, ctx: PlotContext, *,
                        show: str = "reference", ncols: int = 5, rel_range: float = 0.5):
    """Average energy per cell, layer by layer, in the r–α plane: ``show`` = reference, generated or ratio.

    ``"reference"`` and ``"generated"`` share one log colour scale; ``"ratio"`` draws (gen − ref)/ref.
    Radius on a square-root scale (ticks in mm); grey cells hold no energy (in the reference for the ratio).
    """
    from matplotlib.colors import LogNorm, Normalize

    if show not in ("reference", "generated", "ratio"):
        msg = f"show must be one of reference, generated, ratio, got {show!r}"
        raise ValueError(msg)
    seq, div = _cmaps()
    pos = np.concatenate([ref_mean[ref_mean > 0], gen_mean[gen_mean > 0]])
    if show == "ratio":
        with np.errstate(divide="ignore", invalid="ignore"):
            data = np.where(ref_mean > 0, (gen_mean - ref_mean) / ref_mean, np.nan)
        norm, cmap, cbl = Normalize(-rel_range, rel_range), div, "(gen. − ref.)/ref."
    else:
        m = ref_mean if show == "reference" else gen_mean
        data = np.where(m > 0, m, np.nan)
        vmax = pos.max() if pos.size else 1.0
        norm = LogNorm(vmin=max(pos.min(), vmax * 1e-6) if pos.size else 1e-3, vmax=vmax)
        cmap, cbl = seq, "mean energy per cell [MeV]"
    n = geometry.n_layers
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    cell, top, right = 2.3, 0.8, 1.2
    w, h = ncols * cell + right, nrows * cell + top
    with style():
        fig = _figure(w, h)
        gs = fig.add_gridspec(nrows, ncols, left=0.15 / w, right=1 - right / w, top=1 - top / h, bottom=0.1 / h,
                              wspace=0.25, hspace=0.3)
        mesh = None
        for l in range(n):
            ax = fig.add_subplot(gs[divmod(l, ncols)], projection="polar")
            na, edges = geometry.n_alpha[l], np.asarray(geometry.r_edges[l])
            img = data[geometry.offsets[l]:geometry.offsets[l + 1]].reshape(na, len(edges) - 1)
            theta = np.linspace(-np.pi, np.pi, na + 1)
            rr = np.sqrt(edges / edges[-1])
            mesh = ax.pcolormesh(theta, rr, np.ma.masked_invalid(img.T), norm=norm, cmap=cmap)
            ax.set_xticks([])
            ticks = [t for t in (edges[-1] / 16, edges[-1] / 4) if t > edges[0]]
            ax.set_yticks(np.sqrt(np.asarray(ticks) / edges[-1]), [f"{t:.0f}" for t in ticks], fontsize=8)
            ax.set_ylim(0, 1)
            ax.set_title(f"layer {geometry.layer_ids[l]}", fontsize=9, pad=2, y=1.0)
        if mesh is not None:
            cax = fig.add_axes((1 - (right - 0.3) / w, 0.15, 0.18 / w, 0.6))
            cb = fig.colorbar(mesh, cax=cax, extend="both" if show == "ratio" else "neither")
            cb.set_label(cbl)
        what = {"reference": ctx.ref_label, "generated": ctx.gen_label,
                "ratio": "(generated − reference)/reference"}[show]
        fig.suptitle(f"average shower, {what} — {ctx.dataset}", x=0.15 / w, y=1 - 0.1 / h, ha="left", va="top")
        fig.text(0.15 / w, 1 - 0.45 / h, "radius on a square-root scale, ticks in mm; grey: no energy"
                 + (" in the reference" if show == "ratio" else ""), fontsize=9, va="top")
    return fig


# --------------------------------------------------------------------------------------------- rendering
def save(fig, out_dir: str | os.PathLike, name: str, formats: Sequence[str] = ("png",), *, dpi: int = DPI) -> list[str]:
    """Write ``fig`` as ``name.<fmt>`` for each format (atomically); return the file names."""
    from ..io import atomic_output

    names = []
    for fmt in formats:
        target = Path(out_dir) / f"{name}.{fmt}"
        with atomic_output(target) as tmp, style():
            fig.savefig(tmp, format=fmt, dpi=dpi)
        names.append(target.name)
    return names


@dataclass
class PlotJob:
    """One figure to draw: ``func(*args, **kwargs)`` saved as ``stem.<fmt>``; ``cost`` orders the work."""

    stem: str  # output file name without extension
    func: Callable  # a module-level plot_* function (pickled by reference)
    args: tuple = ()  # numpy arrays and small objects
    kwargs: dict = field(default_factory=dict)
    cost: float = 1.0  # rough relative drawing time (bigger first)


def _draw(job: PlotJob, out_dir: str, formats: tuple[str, ...]) -> tuple[str, list[str], float]:
    import time

    cpu = time.process_time()
    fig = job.func(*job.args, **job.kwargs)
    files = save(fig, out_dir, job.stem, formats)
    fig.clear()
    return job.stem, files, time.process_time() - cpu


def _context():
    """forkserver where available (the server imports matplotlib once and forks every worker from it), else spawn."""
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", __name__])  # no effect once a forkserver runs; then workers import it
    return ctx


def default_workers() -> int:
    """Processes for :func:`render`: the CPUs this process may use, at most 16."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 16))


def render(jobs: Sequence[PlotJob], out_dir: str | os.PathLike, *, formats: Sequence[str] = ("png",),
           workers: int | None = None, progress: bool = False, stats: dict | None = None) -> dict[str, list[str]]:
    """Draw and save every job; return ``{stem: [file names]}`` in the order of ``jobs``.

    ``workers > 1`` draws in that many processes (forkserver or spawn start, so no state of the
    caller is inherited; each figure is built in the worker from the job's arrays). ``workers=1``
    draws in this process. A progress bar is shown only on a terminal and when ``progress`` is true.
    As with any spawn/forkserver multiprocessing, a script that calls this (or ``evaluate``) must guard its
    entry point with ``if __name__ == "__main__":``, since the workers import the main module.
    ``stats``, if given, receives ``workers`` and ``cpu_s`` (CPU seconds spent drawing, summed over jobs).
    """
    from tqdm.auto import tqdm

    formats = tuple(formats)
    bad = [f for f in formats if f not in ("png", "pdf", "svg")]
    if bad or not formats:
        msg = f"plot formats must be a non-empty subset of png, pdf, svg, got {','.join(formats) or 'nothing'}"
        raise ValueError(msg)
    if workers is not None and workers < 1:
        msg = f"plot workers must be >= 1, got {workers}"
        raise ValueError(msg)
    out = str(out_dir)
    n = min(workers or default_workers(), len(jobs))
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i].cost)
    done: dict[str, list[str]] = {}
    cpu = 0.0
    with tqdm(total=len(jobs), desc="plots", unit="fig", disable=None if progress else True, leave=False) as bar:
        if n <= 1:
            for i in order:
                stem, files, c = _draw(jobs[i], out, formats)
                done[stem] = files
                cpu += c
                bar.update(1)
        else:
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(max_workers=n, mp_context=_context()) as pool:
                futs = [pool.submit(_draw, jobs[i], out, formats) for i in order]
                try:
                    for fut in as_completed(futs):
                        stem, files, c = fut.result()
                        done[stem] = files
                        cpu += c
                        bar.update(1)
                except BaseException:
                    for fut in futs:
                        fut.cancel()
                    raise
    if stats is not None:
        stats.update(workers=max(n, 1), cpu_s=cpu)
    return {j.stem: done[j.stem] for j in jobs}
