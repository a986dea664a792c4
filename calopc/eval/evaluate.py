r"""``calopc evaluate``: compare a generated sample with a reference; metrics.json, plots, report.html."""

from __future__ import annotations

__all__ = ["METRICS", "evaluate"]

import math
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..geometry import Geometry
from .classifier import ClassifierConfig, classifier_inputs, classifier_metric, official_split, raw_voxels
from .distances import ESTIMATORS, TEST_LEVEL, TEST_MAX_SHOWERS, TEST_PERMUTATIONS, calibrated_tests, fpd, kpd
from .features import high_level_vector, match_official
from .histograms import (
    FeatureHist,
    feature_histograms,
    histogram_ranges,
    separation_power,
    separation_tests,
    shower_histogram_specs,
    voxel_spectrum,
)
from .permutation import reading, small_sample_note, z_score
from .samples import Sample, load_sample

#: metric groups that ``evaluate(metrics=...)`` accepts
METRICS = ("hist", "cls-low", "cls-low-normed", "cls-high", "cls-cnn", "cls-sparse", "fpd", "kpd", "prdc", "pointcloud",
           "plots", "displays")
DEFAULT_METRICS = ("hist", "cls-low", "cls-high", "fpd", "kpd", "pointcloud", "plots")
#: test entries in the units of the value (x1e3)
_SCALED = ("observed", "null_mean", "null_sd", "excess")
TEST_NOTE = (f"calibrated readout: a permutation test per distance ({TEST_PERMUTATIONS} shuffles of the labels "
             f"generated/reference over the pooled showers, at most {TEST_MAX_SHOWERS:,} per sample); 'differs' means "
             f"p <= {TEST_LEVEL:g}, which a perfect generator reads in {100 * TEST_LEVEL:g} % of its samples; 'no "
             "difference found' is the rest: a perfect generator, or a difference these sample sizes do not resolve; "
             "'same distribution' is the mean ± standard deviation of the statistic over the shuffles (what sample "
             "size alone gives) and the excess is the statistic's distance from that mean in units of that deviation")


def _summary(hists: list[FeatureHist]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for h in hists:
        key = h.name.rsplit("_", 1)[0] if h.name[-1].isdigit() else h.name
        groups.setdefault(key, []).append(h.separation)
    # a group whose histograms are all empty (e.g. a dataset-1 energy absent from a small sample) has no value
    return {k: (float(np.mean(f)) if (f := [x for x in v if math.isfinite(x)]) else float("nan"))
            for k, v in groups.items()}


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _report_dropped(s: Sample, role: str, res: dict) -> None:
    """One warning (and ``res["unusable_showers"]``) when :func:`load_sample` left showers of ``s`` out."""
    dropped = s.extra.get("dropped")
    if dropped is None or not len(dropped):
        return
    first = int(dropped[0])
    res.setdefault("unusable_showers", {})[role] = {"count": len(dropped), "first": first}
    msg = (f"{s.path}: {len(dropped):,} of {s.extra['read']:,} {role} showers (first: shower {first}) hold cell "
           f"energies (up to {s.extra['dropped_max_cell_mev']:.3g} MeV) that overflow the features' float64 sums or "
           f"the classifiers' float32 inputs; every metric uses the other {len(s):,}")
    res["unusable_note"] = f"{res['unusable_note']}; {msg}" if "unusable_note" in res else msg
    warnings.warn(msg, UserWarning, stacklevel=3)


def _file_rows(s: Sample, n: int) -> tuple[int, np.ndarray | slice]:
    """Where the first ``n`` showers of ``s`` sit in its file: (rows to read, their index in what was read)."""
    rows = s.extra.get("rows")
    if rows is None:
        return n, slice(0, n)
    return int(rows[n - 1]) + 1, rows[:n]


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
    cls_dtype: str = "float64",
    cnn_options: dict | None = None,
    fpd_min_samples: int = 10_000,
    kpd_batch_size: int = 10_000,
    fpd_estimator: str = "official",
    test_permutations: int = TEST_PERMUTATIONS,
    low_normed: str = "official",
    prdc_k: int = 5,
    collisions: str = "sum",
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    formats: tuple[str, ...] | list[str] = ("png",),
    plot_workers: int | None = None,
    command: str | None = None,
    progress_desc: str = "evaluate",
) -> dict:
    """Evaluate ``gen`` against ``ref`` (voxel HDF5 or point-cloud Parquet files).

    Writes ``metrics.json``, ``report.html`` and the plots (PNG; PDF with ``formats``) into
    ``output_dir`` and returns the metrics dict. The report is built in a temporary sibling folder and
    moved in when complete (:func:`calopc.eval.staging.staged_folder`): it replaces an earlier report's
    files (figures that the new report lacks are removed), keeps every other file of the folder, and an
    interrupted or failed run leaves the folder as it was.

    Args:
        threshold: per-cell threshold in MeV; default: 1 MeV for dataset 1, 15.15 keV for 2 and 3.
        metrics: any of :data:`METRICS`.
        max_showers: use only the first ``max_showers`` showers of each file.
        cls_epochs, cls_seeds, cls_hidden, cls_batch_size: classifier settings (defaults are the
            official ones; ``cls_seeds`` trainings give mean ± standard deviation).
        cls_dtype: the DNN classifiers' precision: ``"float64"`` (official) or ``"float32"`` (about half
            the CPU time; a readout labelled with it in ``metrics.json``).
        cnn_options: further :class:`calopc.eval.cnn.CNNConfig` fields for ``cls-cnn`` / ``cls-sparse``
            (e.g. ``{"widths": (8, 16, 16, 32)}``); epochs and batch size come from ``cls_epochs``, ``cls_batch_size``.
        fpd_min_samples, kpd_batch_size: FPD/KPD batch sizes (official: 10,000).
        fpd_estimator: ``"official"`` (jetnet's: batches with replacement, bounded fit) or ``"calopc"``
            (without replacement); see :mod:`calopc.eval.distances`. Either way the readout comes from
            a calibrated permutation test of the two samples (``fpd_x1e3["test"]``).
        test_permutations: label permutations of the calibrated FPD/KPD and separation tests (the
            "differs / no difference found" readout; see :mod:`calopc.eval.permutation`).
        low_normed: ``cls-low-normed`` input, ``"official"`` (unthresholded voxels over the thresholded
            layer energy) or ``"calopc"`` (thresholded voxels); see :mod:`calopc.eval.classifier`.
        prdc_k: nearest neighbours of the PRDC metric (official: 5).
        collisions: re-voxelization policy for point-cloud inputs.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` for the classifiers.
        formats: plot file formats (``png``, ``pdf``, ``svg``); report.html shows the PNGs.
        plot_workers: processes drawing the plots (default: the CPUs available, at most 16; 1 = serial).
            Scripts using several must guard their entry point (``if __name__ == "__main__":``).
        command: the command line recorded in the provenance (default: ``sys.argv``).
        progress_desc: what the periodic log lines outside a terminal name (``calopc DESC: stage``).
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        msg = f"unknown metrics {sorted(unknown)}; choose from {', '.join(METRICS)}"
        raise ValueError(msg)
    if fpd_estimator not in ESTIMATORS:
        msg = f"fpd_estimator must be one of {', '.join(ESTIMATORS)}, got {fpd_estimator!r}"
        raise ValueError(msg)
    if test_permutations < round(1 / TEST_LEVEL) - 1:
        msg = (f"test_permutations must be at least {round(1 / TEST_LEVEL) - 1} for a {100 * TEST_LEVEL:g} % test "
               f"(p is at least 1/(permutations + 1)), got {test_permutations}")
        raise ValueError(msg)
    if low_normed not in ("official", "calopc"):
        msg = f"low_normed must be 'official' or 'calopc', got {low_normed!r}"
        raise ValueError(msg)
    if cls_dtype not in ("float64", "float32"):
        msg = f"cls_dtype must be float64 (official) or float32, got {cls_dtype!r}"
        raise ValueError(msg)
    if geometry is not None:
        official = match_official(geometry)
        if official is not None:  # e.g. the binning XML of an official dataset: behave exactly as that dataset
            geometry = official
        elif threshold is None and not geometry.threshold > 0:
            msg = (f"geometry {geometry.name!r} does not match any official dataset binning, so it has no official "
                   "cell threshold; pass --threshold (MeV), e.g. --threshold 0 for none")
            raise ValueError(msg)
    from ..progress import Progress

    prog = Progress(desc=progress_desc, enabled=progress, unit="stage")
    stage = prog.stage
    from .report import stale_plots
    from .staging import staged_folder

    # the report is written into a temporary sibling of output_dir and swapped in whole at the end: an interrupted
    # or failed run leaves the folder (and an earlier report in it) as it was
    with prog, staged_folder(output_dir, stale=stale_plots) as out:
        t0 = time.perf_counter()
        from .cnn import check_dense_memory
        from .samples import peek_sample

        # dense metrics that cannot fit (cls-low, cls-cnn on high-granularity geometries) refuse before any reading
        peek_geo, peek_n = peek_sample(ref, geometry=geometry)
        check_dense_memory(metrics, peek_geo, min(peek_n, max_showers or peek_n), batch_size=cls_batch_size,
                           hidden=cls_hidden, cnn_options=cnn_options)
        keep = any(m in metrics for m in ("cls-low", "cls-low-normed", "cls-cnn", "cls-sparse", "prdc"))
        if keep and not any(m in metrics for m in ("cls-low", "cls-low-normed", "cls-cnn", "prdc")):
            keep = "sparse"  # only cls-sparse needs the cells: keep the occupied ones (CellRows), not N x n_voxels
        stage(f"reading {Path(gen).name}")
        g_s = load_sample(gen, threshold=threshold, geometry=geometry, keep_voxels=keep, max_showers=max_showers,
                          collisions=collisions, progress=progress)
        stage(f"reading {Path(ref).name}")
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
            "histogram_ranges": histogram_ranges(geo),
        }
        timings: dict[str, float] = {"load": time.perf_counter() - t0}
        plots: dict[str, list[str]] = {}
        hists: list[FeatureHist] = []
        _report_dropped(g_s, "generated", res)
        _report_dropped(r_s, "reference", res)

        if "hist" in metrics or "plots" in metrics:
            stage("histograms")
            t = time.perf_counter()
            hists = feature_histograms(r_s.features, g_s.features, geo, threshold=thr)
            hists.append(voxel_spectrum(r_s.voxel_energies, g_s.voxel_energies, thr, n_ref=len(r_s), n_gen=len(g_s)))  # official: 49 log bins, float64
            res["separation"] = {h.name: _finite(h.separation) for h in hists}
            res["separation_summary"] = _summary(hists)
            timings["hist"] = time.perf_counter() - t
            if "hist" in metrics:  # calibrated readout of the separation powers (permutations of the showers)
                stage("histogram test")
                t = time.perf_counter()
                with one_blas_thread():
                    res["separation_test"] = separation_tests(
                        shower_histogram_specs(r_s.features, g_s.features, geo, threshold=thr),
                        permutations=test_permutations, seed=seed, level=TEST_LEVEL)
                for key in ("E_ratio", "mean"):
                    if key in res["separation_test"]:
                        res["separation_test"][key]["reading"] = reading(res["separation_test"][key])
                timings["hist test"] = time.perf_counter() - t

        hl_gen = hl_ref = None
        if any(m in metrics for m in ("cls-high", "fpd", "kpd")):
            hl_gen, hl_ref = high_level_vector(g_s.features), high_level_vector(r_s.features)
        # the classifiers compare samples of equal size (the official set-up): the first n showers of each
        n_cls = min(len(g_s), len(r_s))
        if any(m.startswith("cls-") for m in metrics) and g_s.extra["read"] != r_s.extra["read"]:
            note = (f"the classifiers compare samples of equal size (the official set-up): they use the first "
                    f"{n_cls:,} showers of each sample ({len(g_s):,} generated, {len(r_s):,} reference); the other "
                    "metrics use all; --max-showers N sets N for every metric")
            res["classifier_sizes_note"] = note
            warnings.warn(note, UserWarning, stacklevel=2)

        cls_cfg = ClassifierConfig(hidden=cls_hidden, epochs=cls_epochs, batch_size=cls_batch_size,
                                   dtype=cls_dtype)
        for kind in ("low", "low-normed", "high"):
            if f"cls-{kind}" not in metrics:
                continue
            stage(f"classifier {kind}")
            t = time.perf_counter()
            n = n_cls
            if kind == "high":
                xg, xr = hl_gen[:n], hl_ref[:n]
            elif kind == "low-normed" and low_normed == "official":  # the unthresholded voxels, re-read
                xg, xr = (classifier_inputs(kind, raw_voxels(s.path, max_showers=read, geometry=geometry,
                                                             collisions=collisions)[idx],
                                            s.features.e_inc[:n], geo, normed="official", threshold=thr)
                          for s in (g_s, r_s) for read, idx in [_file_rows(s, n)])
            else:
                xg = classifier_inputs(kind, g_s.low[:n], g_s.features.e_inc[:n], geo, normed=low_normed, threshold=thr)
                xr = classifier_inputs(kind, r_s.low[:n], r_s.features.e_inc[:n], geo, normed=low_normed, threshold=thr)
            counts = official_split(geo.name, n)
            r = classifier_metric(kind, xg, xr, config=replace(cls_cfg, counts=counts), seeds=cls_seeds, seed=seed,
                                  device=device, progress=progress)
            entry = {k: (_finite(v) if isinstance(v, float) else v) for k, v in r.as_dict().items()}
            entry["split"] = (f"official fixed counts per class {counts[0]}/{counts[1]}/rest" if counts
                              else "60/20/20 % per class")
            if kind == "low-normed":
                entry["definition"] = low_normed
            entry["test"] = auc_test(entry.get("auc"), _n_validation(geo.name, n))
            _note_negative_jsd(entry)
            res.setdefault("classifier", {})[kind] = entry
            timings[f"cls-{kind}"] = time.perf_counter() - t
        if any(f"cls-{k}" in metrics for k in ("low", "low-normed", "high")):
            from .classifier import OFFICIAL_SPLITS

            counts = official_split(geo.name, n_cls)
            need = OFFICIAL_SPLITS.get(geo.name)
            note = "classifier split per class: " + (
                f"the official fixed counts, {counts[0]:,} train / {counts[1]:,} test / the rest validation" if counts
                else "60/20/20 % train/test/validation"
                + (f" (the official fixed counts need {sum(need):,} showers per sample)" if need else ""))
            if "cls-low-normed" in metrics:
                note += ("; low-normed input: official definition (unthresholded voxels / (thresholded layer energy "
                         "+ 1e-16); a sub-threshold voxel in an empty layer gives up to ~1e16)" if low_normed == "official"
                         else "; low-normed input: calopc definition (thresholded voxels / (thresholded layer energy "
                         "+ 1e-16))")
            res["classifier_note"] = note

        for kind in ("cnn", "sparse"):  # the official ResNet classifier, dense and on occupied cells (calopc.eval.cnn)
            if f"cls-{kind}" not in metrics:
                continue
            from .cnn import CNNConfig, cnn_metric

            stage(f"classifier {kind}")
            t = time.perf_counter()
            n = n_cls
            cnn_cfg = CNNConfig(**{"epochs": cls_epochs, "batch_size": cls_batch_size,
                                   **(cnn_options or {})}).resolved(kind)
            xg, xr = ((s.low[:n] if s.low is not None else s.low_sparse.head(n)) for s in (g_s, r_s))
            r = cnn_metric(kind, xg, g_s.features.e_inc[:n], xr, r_s.features.e_inc[:n], geo,
                           config=cnn_cfg, seeds=cls_seeds, seed=seed, device=device, progress=progress)
            entry = {k: (_finite(v) if isinstance(v, float) else v) for k, v in r.as_dict().items()}
            counts = official_split(geo.name, n)
            entry["split"] = (f"official fixed counts per class {counts[0]}/{counts[1]}/rest" if counts
                              else "60/20/20 % per class")
            entry["network"] = {"widths": list(cnn_cfg.widths), "blocks": list(cnn_cfg.blocks),
                                "periodic_alpha": cnn_cfg.periodic_alpha}
            entry["test"] = auc_test(entry.get("auc"), _n_validation(geo.name, n))
            _note_negative_jsd(entry)
            res.setdefault("classifier", {})[kind] = entry
            timings[f"cls-{kind}"] = time.perf_counter() - t

        if "fpd" in metrics or "kpd" in metrics:
            # the official values (the published numbers), then one calibrated permutation test for both
            # (features scaled once, the kernel evaluated once for every labelling): see calibrated_tests
            for name, func, kw in (("fpd", fpd, {"min_samples": fpd_min_samples}),
                                   ("kpd", kpd, {"batch_size": kpd_batch_size})):
                if name not in metrics:
                    continue
                stage(name.upper())
                t = time.perf_counter()
                with warnings.catch_warnings(), one_blas_thread():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    v, e = func(hl_ref, hl_gen, estimator=fpd_estimator, seed=42 + seed, **kw)
                res[f"{name}_x1e3"] = {"value": v * 1e3, "error": e * 1e3, "estimator": fpd_estimator}
                timings[name] = time.perf_counter() - t
            t = time.perf_counter()
            with one_blas_thread():
                tests = calibrated_tests(hl_ref, hl_gen, metrics=tuple(m for m in ("fpd", "kpd") if m in metrics),
                                         permutations=test_permutations, seed=seed, progress=stage)
            for name, d in tests.items():
                d = {k: (v * 1e3 if k in _SCALED else v) for k, v in d.items()}
                res[f"{name}_x1e3"]["test"] = {**d, "reading": reading(d)}
            timings["fpd/kpd test"] = time.perf_counter() - t
            res["fpd_estimator"] = fpd_estimator
            if fpd_estimator == "official":
                note = ("FPD/KPD estimator: official (jetnet, as the CaloChallenge: batches drawn with "
                        "replacement, fit bounded at >= 0, KPD 16.275-83.725 % range); its error is the spread of the "
                        "resampling, not of the samples")
                if min(len(hl_ref), len(hl_gen)) < 50_000:
                    note += (f"; samples ({len(hl_gen)} generated, {len(hl_ref)} reference) smaller than the largest FPD "
                             "batch (50,000) are resampled with replacement, so their finite-sample noise is part of "
                             "the value (a perfect generator does not reach 0)")
            else:
                note = "FPD/KPD estimator: calopc (batches drawn without replacement, unbounded fit)"
                if len(hl_ref) < 2 * fpd_min_samples:
                    note += (f"; small samples ({len(hl_gen)} generated, {len(hl_ref)} reference): batch sizes were capped, "
                             "so values are not comparable with published ones")
            res["fpd_kpd_note"] = note + "; " + TEST_NOTE

        if "separation_test" in res or "fpd" in metrics or "kpd" in metrics:
            note = small_sample_note(min(len(r_s), TEST_MAX_SHOWERS), min(len(g_s), TEST_MAX_SHOWERS),
                                     hl_ref.shape[1] if "fpd" in metrics else None)
            if note:
                res["small_sample_note"] = note
                warnings.warn(note, UserWarning, stacklevel=2)

        if "prdc" in metrics:
            from .prdc import prdc, prdc_features

            stage("PRDC")
            t = time.perf_counter()
            p = prdc(prdc_features(r_s.low), prdc_features(g_s.low), k=prdc_k, device=device, progress=progress)
            res["prdc"] = p.as_dict()
            timings["prdc"] = time.perf_counter() - t

        if "pointcloud" in metrics:
            stage("point-cloud view")
            res["pointcloud"] = _pointcloud(g_s, r_s)

        if "plots" in metrics:
            stage("plots")
            t = time.perf_counter()
            pstats: dict = {}
            plots, res["plot_pages"], res["plot_index"] = _make_plots(out, hists, g_s, r_s, geo, formats=tuple(formats),
                                                                      workers=plot_workers, progress=progress,
                                                                      stats=pstats)
            timings["plots"] = time.perf_counter() - t
            timings["plots_cpu"] = pstats.get("cpu_s", 0.0)  # CPU seconds summed over the drawing processes
            res["plot_workers"] = pstats.get("workers", 1)
        if "displays" in metrics:  # displays.html: 3-D views of the first showers, reference beside generated
            stage("shower displays")
            t = time.perf_counter()
            res["displays"] = _displays(out, g_s, r_s, geo, threshold=thr, collisions=collisions)
            timings["displays"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        res["timings_s"] = timings
        res["plots"] = plots

        from .report import provenance, write_metrics, write_report

        res["provenance"] = provenance(
            {"generated": g_s.path, "reference": r_s.path}, command=command,
            seeds={"seed": seed,
                   "classifier": [seed + s for s in range(cls_seeds)] if any(m.startswith("cls-") for m in metrics) else [],
                   "fpd_kpd": 42 + seed if {"fpd", "kpd"} & set(metrics) else None},
            options={"metrics": list(metrics), "threshold_mev": thr, "max_showers": max_showers, "cls_epochs": cls_epochs,
                     "cls_seeds": cls_seeds, "cls_hidden": cls_hidden, "cls_batch_size": cls_batch_size,
                     "cls_dtype": cls_dtype,
                     "fpd_min_samples": fpd_min_samples, "kpd_batch_size": kpd_batch_size, "fpd_estimator": fpd_estimator,
                     "low_normed": low_normed, "prdc_k": prdc_k, "cnn_options": cnn_options or {}, "collisions": collisions,
                     "device": device, "formats": list(formats)},
            dataset_label=_dataset_text(geo))
        stage("report")
        write_metrics(out / "metrics.json", res)
        write_report(out / "report.html", res)
        return res


#: how many showers of each sample the page of shower displays (metric "displays") shows
DISPLAY_SHOWERS = 3


def _displays(out: Path, g_s: Sample, r_s: Sample, geo: Geometry, *, threshold: float, collisions: str) -> dict:
    """Write :data:`calopc.eval.report.DISPLAY_PAGE`: the first :data:`DISPLAY_SHOWERS` showers of the reference
    and of the generated sample, side by side; returns what :func:`calopc.display.write_display` reports, the page
    relative to ``out``."""
    from ..display import write_display
    from .report import DISPLAY_PAGE

    n = min(DISPLAY_SHOWERS, len(g_s), len(r_s))
    info = write_display(out / DISPLAY_PAGE, [r_s.path, g_s.path], indices=list(range(max(1, n))),
                         labels=["reference", "generated"], geometry=geo, threshold=threshold, collisions=collisions,
                         title=f"calopc evaluation: showers of {_dataset_text(geo)}")
    return {**info, "path": DISPLAY_PAGE}


def one_blas_thread():
    """Context in which numpy's BLAS uses one thread (``threadpoolctl``; no-op without it).

    The distances work on small matrices (362 features): a second BLAS thread gains little, while on a
    shared machine with more busy processes than cores the spinning threads of OpenBLAS wait for each
    other: one FPD of 1k showers took 188 s instead of 14 s with 2 threads at load 17 on 2 cores (the
    audit's 829 s of FPD).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _n_validation(dataset: str, n: int) -> int:
    """Showers per class in the classifiers' validation split (the AUC is measured there)."""
    from .classifier import _split_sizes

    a, b = _split_sizes(n, ClassifierConfig(counts=official_split(dataset, n)))
    return n - a - b


def auc_test(auc: float | None, n_val: int) -> dict:
    """Calibrated readout of a classifier AUC: a one-sided test of "no better than chance".

    The AUC is measured on a validation split that took no part in training or calibration, so for a
    perfect generator the labels are independent of the scores and the AUC is a Mann–Whitney statistic
    with mean 0.5 and standard deviation ``sqrt((2 n + 1) / (12 n²))`` for ``n`` showers per class (ties
    from the isotonic calibration only narrow it, so the test is conservative). The mean over several
    seeds has at most that spread. "Differs" means ``p <= 0.05`` (one-sided, normal approximation);
    the keys are those of :func:`calopc.eval.permutation.summarize` (``z``: (AUC − 0.5) / sd), with
    ``reading`` the verdict in words.
    """
    sd = math.sqrt((2 * n_val + 1) / (12 * n_val * n_val)) if n_val > 0 else float("nan")
    out = {"statistic": "AUC on the validation split", "null_mean": 0.5, "null_sd": sd, "n_validation_per_class": n_val,
           "n_ref": n_val, "n_gen": n_val, "level": TEST_LEVEL}
    if auc is None or not math.isfinite(auc) or not math.isfinite(sd):
        return {**out, "p_value": None, "compatible": None, "differs": None, "reading": "(not tested)"}
    z = z_score(auc, 0.5, sd)
    p = 0.5 * math.erfc(z / math.sqrt(2))
    out = {**out, "observed": auc, "excess": auc - 0.5, "z": z, "p_value": p, "compatible": p > TEST_LEVEL,
           "differs": p <= TEST_LEVEL}
    return {**out, "reading": reading(out)}


def _note_negative_jsd(entry: dict) -> None:
    """A negative JSD = (ln 2 − BCE)/ln 2 means a cross-entropy above ln 2 on the validation split: the calibrated
    classifier does worse than a constant 1/2 (undertrained, or nothing to find). The value is kept as the
    official definition gives it (published tables are not clipped) and gets a note."""
    jsd = entry.get("jsd")
    if jsd is not None and math.isfinite(jsd) and jsd < 0:
        entry["jsd_note"] = ("JSD < 0: the classifier's cross-entropy on the validation split is above ln 2 (worse "
                             "than chance: undertrained, or no difference to find); it carries no information, read "
                             "it as 0")


def _dataset_text(geo: Geometry) -> str:
    from .plots import dataset_label

    return dataset_label(geo, tex=False)


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


def _binned_mean(x: np.ndarray, values: np.ndarray, edges: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, its standard error, relative width σ/mean and its error of ``values`` in bins of ``x``."""
    idx = np.searchsorted(edges, x, side="right") - 1
    ok = (idx >= 0) & (idx < len(edges) - 1) & np.isfinite(values)
    idx, v = idx[ok], values[ok]
    nb = len(edges) - 1
    n = np.bincount(idx, minlength=nb).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.bincount(idx, weights=v, minlength=nb) / n
        var = np.maximum(np.bincount(idx, weights=v**2, minlength=nb) / n - mean**2, 0.0) * n / np.maximum(n - 1, 1)
        sd = np.sqrt(var)
        sem = sd / np.sqrt(n)
        rel = sd / mean
        rel_err = rel / np.sqrt(2 * np.maximum(n - 1, 1))
    empty = n < 2
    for a in (mean, sem, rel, rel_err):
        a[empty] = np.nan
    return {"mean": mean, "mean_err": sem, "rel_width": rel, "rel_width_err": rel_err}


def _layer_maps(mean_shower: np.ndarray, geo: Geometry, r_edges: np.ndarray) -> np.ndarray:
    """Average shower summed over α: ``(n_layers, n_r)`` on the common radial edges (MeV)."""
    from .profiles import radial_matrix

    per_r = mean_shower[:, None] * radial_matrix(geo, r_edges)  # (n_voxels, n_r)
    out = np.zeros((geo.n_layers, len(r_edges) - 1))
    np.add.at(out, geo.cell_layer, per_r)
    return out


def _make_plots(out: Path, hists: list[FeatureHist], g_s: Sample, r_s: Sample, geo: Geometry, *,
                formats: tuple[str, ...] = ("png",), workers: int | None = None, progress: bool = False,
                layers_per_page: int = 9, stats: dict | None = None,
                ) -> tuple[dict[str, list[str]], dict[str, list[dict]], dict[str, str]]:
    """Draw every figure (in parallel processes unless ``workers == 1``).

    Returns ``({stem: [files]}, {feature kind: [{"stem", "layers", "title"}]}, {histogram: stem})``: the
    files, the per-layer pages in layer order, and the figure that shows each histogram. ``stats`` receives
    the number of drawing processes and their CPU seconds (see :func:`calopc.eval.plots.render`).
    """
    from .plots import (
        PlotContext,
        PlotJob,
        dataset_label,
        energy_text,
        feature_info,
        plot_average_maps,
        plot_average_shower,
        plot_feature,
        plot_feature_grid,
        plot_hits,
        plot_longitudinal,
        plot_radial,
        plot_response,
        render,
    )

    ctx = PlotContext(dataset_label(geo), r_s.path.name, g_s.path.name, len(r_s), len(g_s))
    gf, rf = g_s.features, r_s.features
    jobs: list[PlotJob] = []
    pages: dict[str, list[dict]] = {}
    kinds: dict[str, list[FeatureHist]] = {}
    index: dict[str, str] = {}
    per_energy = [h for h in hists if h.name.startswith("E_ratio_einc_")]  # dataset 1: one page, as the official
    for h in hists:
        info = feature_info(h.name)
        if info.layer is not None:
            kinds.setdefault(info.kind, []).append(h)
        elif not h.name.startswith("E_ratio_einc_"):
            jobs.append(PlotJob(h.name, plot_feature, (h, ctx), cost=1.0))
            index[h.name] = h.name
    if per_energy:
        jobs.append(PlotJob("E_ratio_per_energy", plot_feature_grid,
                            (per_energy, ctx, "E_dep/E_inc per incident energy"), {"ncols": 4}, cost=len(per_energy)))
        index.update((h.name, "E_ratio_per_energy") for h in per_energy)
    for kind, hs in kinds.items():
        group = feature_info(hs[0].name).group
        for i in range(0, len(hs), layers_per_page):
            part = hs[i:i + layers_per_page]
            ids = [feature_info(h.name).layer for h in part]
            stem = f"{kind}_layers_{ids[0]}-{ids[-1]}"
            title = f"{group}, layers {ids[0]}–{ids[-1]}"
            jobs.append(PlotJob(stem, plot_feature_grid, (part, ctx, title), cost=len(part)))
            index.update((h.name, stem) for h in part)
            pages.setdefault(kind, []).append({"stem": stem, "layers": ids, "title": title})

    def mean_sem(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return a.mean(0), a.std(0, ddof=1) / np.sqrt(len(a)) if len(a) > 1 else np.zeros(a.shape[1])

    ids = list(geo.layer_ids)
    jobs.append(PlotJob("longitudinal_profile", plot_longitudinal, (ids, mean_sem(rf.e_layer), mean_sem(gf.e_layer),
                                                                     ctx), cost=1.0))
    rp, gp = r_s.extra.get("profiles"), g_s.extra.get("profiles")
    if rp is not None and gp is not None:
        jobs.append(PlotJob("radial_profile", plot_radial, (rp.r_edges, (rp.radial_mean, rp.radial_sem),
                                                              (gp.radial_mean, gp.radial_sem), ctx), cost=1.0))
    if geo.name.startswith("1"):
        from .profiles import energy_bins

        ebins = energy_bins(geo)
    else:
        lo = min(gf.e_inc.min(), rf.e_inc.min())
        hi = max(gf.e_inc.max(), rf.e_inc.max()) * (1 + 1e-9)
        ebins = np.logspace(np.log10(lo), np.log10(hi), max(int(np.ceil(4 * np.log10(hi / lo))), 1) + 1)
    jobs.append(PlotJob("response", plot_response, (ebins, _binned_mean(rf.e_inc, rf.e_ratio, ebins),
                                                    _binned_mean(gf.e_inc, gf.e_ratio, ebins), ctx), cost=2.0))
    per_e = {}
    for name, f in (("reference", rf), ("generated", gf)):
        b = _binned_mean(f.e_inc, f.n_hits.astype(np.float64), ebins)
        per_e[name] = (b["mean"], b["mean_err"])
    jobs.append(PlotJob("hits", plot_hits, (ids, {"reference": mean_sem(rf.n_hits_layer.astype(np.float64)),
                                                  "generated": mean_sem(gf.n_hits_layer.astype(np.float64))},
                                            ebins, per_e, ctx), cost=2.0))
    if rp is not None and gp is not None:
        rows = [("all energies", _layer_maps(r_s.mean_shower, geo, rp.r_edges),
                 _layer_maps(g_s.mean_shower, geo, rp.r_edges), len(r_s), len(g_s))]
        for b in range(len(rp.e_edges) - 1):
            if rp.e_counts[b] == 0 and gp.e_counts[b] == 0:
                continue
            lo_e, hi_e = rp.e_edges[b], rp.e_edges[b + 1]
            title = f"$E_{{inc}} \\in$ [{energy_text(lo_e)}, {energy_text(hi_e)})"
            rows.append((title, _layer_maps(rp.e_mean_shower[b], geo, rp.r_edges),
                         _layer_maps(gp.e_mean_shower[b], geo, rp.r_edges), int(rp.e_counts[b]), int(gp.e_counts[b])))
        jobs.append(PlotJob("average_shower_energy_bins", plot_average_maps, (rows, rp.r_edges, ids, ctx),
                            cost=len(rows)))
    for show in ("reference", "generated", "ratio"):
        jobs.append(PlotJob(f"average_shower_{show}", plot_average_shower, (r_s.mean_shower, g_s.mean_shower, geo, ctx),
                            {"show": show}, cost=geo.n_layers / 4))
    return render(jobs, out, formats=formats, workers=workers, progress=progress, stats=stats), pages, index
