r"""``calopc evaluate``: compare a generated sample with a reference; metrics.json, plots, report.html."""

from __future__ import annotations

__all__ = ["METRICS", "evaluate"]

import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np

from ..geometry import Geometry
from .classifier import ClassifierConfig, classifier_inputs, classifier_metric
from .distances import fpd, kpd
from .features import high_level_vector
from .histograms import FeatureHist, feature_histograms, separation_power
from .samples import Sample, load_sample

#: metric groups that ``evaluate(metrics=...)`` accepts
METRICS = ("hist", "cls-low", "cls-low-normed", "cls-high", "fpd", "kpd", "pointcloud", "plots")
DEFAULT_METRICS = ("hist", "cls-low", "cls-high", "fpd", "kpd", "pointcloud", "plots")


def _summary(hists: list[FeatureHist]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for h in hists:
        key = h.name.rsplit("_", 1)[0] if h.name[-1].isdigit() else h.name
        groups.setdefault(key, []).append(h.separation)
    return {k: float(np.nanmean(v)) for k, v in groups.items()}


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def evaluate(
    gen: str | os.PathLike,
    ref: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    geometry: Geometry | None = None,
    threshold: float | None = None,
    metrics: tuple[str, ...] | list[str] = DEFAULT_METRICS,
    max_showers: int | None = None,
    cls_epochs: int = 50,
    cls_seeds: int = 3,
    cls_hidden: int = 2048,
    cls_batch_size: int = 1000,
    fpd_min_samples: int = 10_000,
    kpd_batch_size: int = 10_000,
    collisions: str = "sum",
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Evaluate ``gen`` against ``ref`` (voxel HDF5 or point-cloud Parquet files).

    Writes ``metrics.json``, ``report.html`` and the plots (PNG and PDF) into
    ``output_dir`` and returns the metrics dict.

    Args:
        threshold: per-cell threshold in MeV; default: 1 MeV for dataset 1, 15.15 keV for 2 and 3.
        metrics: any of :data:`METRICS`.
        max_showers: use only the first ``max_showers`` showers of each file.
        cls_epochs, cls_seeds, cls_hidden, cls_batch_size: classifier settings (defaults are the
            official ones; ``cls_seeds`` trainings give mean ± standard deviation).
        fpd_min_samples, kpd_batch_size: FPD/KPD batch sizes (official: 10,000).
        collisions: re-voxelization policy for point-cloud inputs.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` for the classifiers.
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        msg = f"unknown metrics {sorted(unknown)}; choose from {', '.join(METRICS)}"
        raise ValueError(msg)
    t0 = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    keep = any(m in metrics for m in ("cls-low", "cls-low-normed"))
    g_s = load_sample(gen, threshold=threshold, geometry=geometry, keep_voxels=keep, max_showers=max_showers,
                      collisions=collisions, progress=progress)
    r_s = load_sample(ref, threshold=threshold, geometry=geometry, keep_voxels=keep, max_showers=max_showers,
                      collisions=collisions, progress=progress)
    if g_s.geometry != r_s.geometry:
        msg = (f"geometries differ: {g_s.path} is {g_s.geometry.name!r} ({g_s.geometry.n_voxels} voxels), "
               f"{r_s.path} is {r_s.geometry.name!r} ({r_s.geometry.n_voxels} voxels)")
        raise ValueError(msg)
    geo = r_s.geometry
    thr = r_s.extra["threshold"]
    res: dict = {
        "generated": str(g_s.path), "reference": str(r_s.path), "dataset": geo.name, "n_voxels": geo.n_voxels,
        "n_generated": len(g_s), "n_reference": len(r_s), "threshold_mev": thr,
    }
    timings: dict[str, float] = {"load": time.perf_counter() - t0}
    plots: dict[str, list[str]] = {}
    hists: list[FeatureHist] = []

    if "hist" in metrics or "plots" in metrics:
        t = time.perf_counter()
        hists = feature_histograms(r_s.features, g_s.features, geo, threshold=thr)
        vmax = max(float(r_s.voxel_energies.max()) if r_s.voxel_energies.size else thr * 10, thr * 10)
        vedges = np.logspace(np.log10(thr), np.log10(vmax), 51)
        hv = FeatureHist("voxel_spectrum", "cell energy [MeV]", vedges,
                         np.histogram(r_s.voxel_energies, vedges)[0], np.histogram(g_s.voxel_energies, vedges)[0],
                         log_x=True)
        hists.append(hv)
        res["separation"] = {h.name: _finite(h.separation) for h in hists}
        res["separation_summary"] = _summary(hists)
        timings["hist"] = time.perf_counter() - t

    hl_gen = hl_ref = None
    if any(m in metrics for m in ("cls-high", "fpd", "kpd")):
        hl_gen, hl_ref = high_level_vector(g_s.features), high_level_vector(r_s.features)

    cls_cfg = ClassifierConfig(hidden=cls_hidden, epochs=cls_epochs, batch_size=cls_batch_size)
    for kind in ("low", "low-normed", "high"):
        if f"cls-{kind}" not in metrics:
            continue
        t = time.perf_counter()
        if len(g_s) != len(r_s):
            msg = (f"classifier metrics need samples of equal size (official set-up), got {len(g_s)} generated and "
                   f"{len(r_s)} reference showers; pass max_showers (--max-showers) to use the first N of each")
            raise ValueError(msg)
        n = len(g_s)
        if kind == "high":
            xg, xr = hl_gen[:n], hl_ref[:n]
        else:
            xg = classifier_inputs(kind, g_s.low[:n], g_s.features.e_inc[:n], geo)
            xr = classifier_inputs(kind, r_s.low[:n], r_s.features.e_inc[:n], geo)
        r = classifier_metric(kind, xg, xr, config=cls_cfg, seeds=cls_seeds, seed=seed, device=device,
                              progress=progress)
        res.setdefault("classifier", {})[kind] = {k: (_finite(v) if isinstance(v, float) else v)
                                                  for k, v in r.as_dict().items()}
        timings[f"cls-{kind}"] = time.perf_counter() - t

    if "fpd" in metrics or "kpd" in metrics:
        # the reference-vs-reference floor: two disjoint halves of the reference
        half = len(hl_ref) // 2
        ra, rb = hl_ref[:half], hl_ref[half:2 * half]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if "fpd" in metrics:
                t = time.perf_counter()
                v, e = fpd(hl_ref, hl_gen, min_samples=fpd_min_samples, seed=42 + seed)
                fv, fe = fpd(ra, rb, min_samples=fpd_min_samples, seed=42 + seed)
                res["fpd_x1e3"] = {"value": v * 1e3, "error": e * 1e3, "ref_floor": fv * 1e3, "ref_floor_error": fe * 1e3}
                timings["fpd"] = time.perf_counter() - t
            if "kpd" in metrics:
                t = time.perf_counter()
                v, e = kpd(hl_ref, hl_gen, batch_size=kpd_batch_size, seed=42 + seed)
                fv, fe = kpd(ra, rb, batch_size=kpd_batch_size, seed=42 + seed)
                res["kpd_x1e3"] = {"value": v * 1e3, "error": e * 1e3, "ref_floor": fv * 1e3, "ref_floor_error": fe * 1e3}
                timings["kpd"] = time.perf_counter() - t
        if len(hl_ref) < 2 * fpd_min_samples:
            res["fpd_kpd_note"] = (f"small samples ({len(hl_gen)} generated, {len(hl_ref)} reference): batch sizes were "
                                   "capped, so values are not directly comparable with published ones")

    if "pointcloud" in metrics:
        res["pointcloud"] = _pointcloud(g_s, r_s)

    if "plots" in metrics:
        t = time.perf_counter()
        plots = _make_plots(out, hists, g_s, r_s, geo)
        timings["plots"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    res["timings_s"] = timings
    res["plots"] = plots

    from ..io import atomic_output
    from .report import write_report

    with atomic_output(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(res, indent=2))
    write_report(out / "report.html", res)
    return res


def _pointcloud(g_s: Sample, r_s: Sample) -> dict:
    gf, rf = g_s.features, r_s.features
    ebins = np.logspace(np.log10(min(gf.e_inc.min(), rf.e_inc.min())), np.log10(max(gf.e_inc.max(), rf.e_inc.max())) + 1e-9, 7)

    def prof(f):
        idx = np.clip(np.digitize(f.e_inc, ebins) - 1, 0, len(ebins) - 2)
        cnt = np.bincount(idx, minlength=len(ebins) - 1)
        return (np.bincount(idx, weights=f.n_hits, minlength=len(ebins) - 1) / np.maximum(cnt, 1)).tolist()

    nmax = max(int(gf.n_hits.max()), int(rf.n_hits.max()), 1)
    hb = np.linspace(0, nmax + 1, 51)
    out = {
        "hits_mean": {"generated": float(gf.n_hits.mean()), "reference": float(rf.n_hits.mean())},
        "hits_std": {"generated": float(gf.n_hits.std()), "reference": float(rf.n_hits.std())},
        "hits_separation": separation_power(np.histogram(rf.n_hits, hb)[0], np.histogram(gf.n_hits, hb)[0]),
        "hits_per_layer_mean": {"generated": gf.n_hits_layer.mean(0).tolist(), "reference": rf.n_hits_layer.mean(0).tolist()},
        "hits_vs_e_inc": {"e_inc_edges_mev": ebins.tolist(), "generated": prof(gf), "reference": prof(rf)},
    }
    for name, s in (("generated", g_s), ("reference", r_s)):
        pe = s.point_energies if s.point_energies is not None else s.voxel_energies
        out.setdefault("hit_energy_quantiles_mev", {})[name] = np.quantile(pe, [0.01, 0.1, 0.5, 0.9, 0.99]).tolist() if pe.size else []
        if s.collisions is not None:
            out.setdefault("revoxelization", {})[name] = s.collisions.as_dict()
    return out


def _make_plots(out: Path, hists: list[FeatureHist], g_s: Sample, r_s: Sample, geo: Geometry) -> dict[str, list[str]]:
    from .plots import plot_average_showers, plot_feature, plot_feature_grid, plot_hits, save

    plots: dict[str, list[str]] = {}
    by = {h.name: h for h in hists}
    for name in ("E_ratio", "voxel_spectrum", "n_hits"):
        if name in by:
            plots[name] = save(plot_feature(by[name]), out, name)
    kinds: dict[str, list[FeatureHist]] = {}
    for h in hists:
        if h.name[-1].isdigit():
            kinds.setdefault(h.name.rsplit("_", 1)[0], []).append(h)
    for kind, hs in kinds.items():
        plots[f"{kind}_per_layer"] = save(plot_feature_grid(hs, f"{kind} per layer"), out, f"{kind}_per_layer")
    fr, fg = plot_average_showers(r_s.mean_shower, g_s.mean_shower, geo)
    plots["average_shower_reference"] = save(fr, out, "average_shower_reference")
    plots["average_shower_generated"] = save(fg, out, "average_shower_generated")
    plots["hits"] = save(plot_hits(r_s.features, g_s.features, geo), out, "hits")
    return plots
