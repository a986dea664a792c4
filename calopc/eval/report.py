r"""``report.html`` and ``metrics.json`` from the metrics dict, with provenance.

The report is one HTML file with the images linked beside it (no network, plain HTML/JS), built from
the sections of :data:`SECTIONS` in order: the samples, a summary table with every number and its
calibrated reading ("differs" / "no difference found", :func:`calopc.eval.permutation.reading`), PRDC,
the 10 histograms that separate the samples most (ranked by the standardised excess of their
permutation tests), the separation per feature, the point-cloud view, the plots (per-layer pages with
a layer selector, the average showers), a link to the 3-D shower displays, all separation powers, and
the provenance (calopc version, command line, seeds, input file fingerprints, date).
"""

from __future__ import annotations

__all__ = [
    "SECTIONS",
    "file_fingerprint",
    "provenance",
    "remove_stale_plots",
    "stale_plots",
    "worst_histograms",
    "write_metrics",
    "write_report",
]

import datetime as _dt
import hashlib
import html
import json
import math
import os
import platform
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_output

#: files up to this size get a full sha256; bigger ones a sha256 of their first and last MiB plus the size
FULL_HASH_MAX = 256 * 2**20
_MIB = 2**20


def _json_safe(obj: Any) -> Any:
    """NaN/±inf → None, numpy and paths → JSON types (used when :func:`calopc.io.json_safe` is absent)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return _json_safe(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def _safe(obj: Any) -> Any:
    from .. import io

    return getattr(io, "json_safe", _json_safe)(obj)


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Size, modification time and sha256 of ``path``.

    Files up to :data:`FULL_HASH_MAX` (256 MiB) are hashed whole (``method: "sha256"``); bigger ones
    by their first and last MiB (``method: "sha256-first-last-MiB"``), which with the size and
    the modification time identifies a file in practice without reading gigabytes.
    """
    p = Path(path)
    st = p.stat()
    h = hashlib.sha256()
    with p.open("rb") as fh:
        if st.st_size <= FULL_HASH_MAX:
            for block in iter(lambda: fh.read(8 * _MIB), b""):
                h.update(block)
            method = "sha256"
        else:
            h.update(fh.read(_MIB))
            fh.seek(st.st_size - _MIB)
            h.update(fh.read(_MIB))
            method = "sha256-first-last-MiB"
    mtime = _dt.datetime.fromtimestamp(st.st_mtime, tz=_dt.timezone.utc).isoformat(timespec="seconds")
    return {"path": str(p.resolve()), "size_bytes": st.st_size, "mtime_utc": mtime, "sha256": h.hexdigest(),
            "hash_method": method}


def provenance(inputs: dict[str, str | os.PathLike], *, command: str | None = None, seeds: dict | None = None,
               options: dict | None = None, dataset_label: str | None = None) -> dict[str, Any]:
    """Where the numbers come from: versions, command line, seeds, options, input fingerprints, date (UTC)."""
    from .. import __version__

    versions = {"calopc": __version__, "python": platform.python_version()}
    for mod in ("numpy", "matplotlib", "torch", "sklearn"):
        m = sys.modules.get(mod)
        if m is not None:
            versions[mod] = getattr(m, "__version__", "?")
    if command is None:
        argv = list(sys.argv)
        if argv and argv[0].endswith(("__main__.py", "calopc")):
            argv[0] = "calopc"
        command = shlex.join(argv)
    return {
        "versions": versions,
        "command": command,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seeds": seeds or {},
        "options": options or {},
        "inputs": {k: file_fingerprint(v) for k, v in inputs.items()},
        "dataset_label": dataset_label or "",
    }


#: file names of the figures ``calopc evaluate`` draws (``<stem>.<png|pdf|svg>``)
_PLOT_FILE = re.compile(r"^(?:E_ratio|E_ratio_per_energy|voxel_spectrum|n_hits|longitudinal_profile|radial_profile|"
                        r"response|hits|average_shower_(?:energy_bins|reference|generated|ratio)|"
                        r"[A-Za-z_]+_layers_-?\d+--?\d+)\.(?:png|pdf|svg)$")
#: the page of 3-D shower displays ``calopc evaluate --metrics ...,displays`` writes beside ``report.html``
DISPLAY_PAGE = "displays.html"


def stale_plots(folder: str | os.PathLike, keep: Iterable[str]) -> list[str]:
    """Names of figures of an earlier report in ``folder`` that are not in ``keep``.

    A file counts if the folder's ``metrics.json`` lists it (its plots, or its page of 3-D displays)
    or its name is one calopc gives a figure or the display page (a run killed before writing
    ``metrics.json`` leaves such files). Other files are not figures.
    """
    folder = Path(folder)
    keep = {Path(f).name for f in keep}
    listed: set[str] = set()
    try:
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        old = metrics.get("plots") or {}
        listed = {Path(f).name for files in old.values() for f in files if isinstance(f, str)}
        page = (metrics.get("displays") or {}).get("path")
        if isinstance(page, str):
            listed.add(Path(page).name)
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    out = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if p.name in keep or not (p.name in listed or p.name == DISPLAY_PAGE or _PLOT_FILE.match(p.name)):
            continue
        if p.is_file() or p.is_symlink():
            out.append(p.name)
    return out


def remove_stale_plots(folder: str | os.PathLike, plots: dict[str, list[str]]) -> list[Path]:
    """Remove figures of an earlier report from a reused report folder; returns the removed files.

    A file goes if it is not one of this run's ``plots`` and :func:`stale_plots` names it. Other files
    are left alone. (``evaluate`` itself swaps a whole report in, see :mod:`calopc.eval.staging`.)
    """
    folder = Path(folder)
    removed = []
    for name in stale_plots(folder, (f for files in plots.values() for f in files)):
        (folder / name).unlink(missing_ok=True)
        removed.append(folder / name)
    return removed


def write_metrics(path: str | os.PathLike, res: dict) -> None:
    """``metrics.json``: valid JSON (NaN and infinities written as ``null``), written atomically."""
    text = json.dumps(_safe(res), indent=2, allow_nan=False)
    with atomic_output(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------- HTML helpers
def _e(v: object) -> str:
    return html.escape(str(v), quote=True)


def _num(v: object, nd: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, (int, float)):
        return f"{v:.{nd}f}"
    return _e(v)


def _pm(v: object, err: object, nd: int = 4) -> str:
    if err is None or (isinstance(err, float) and not math.isfinite(err)):
        return _num(v, nd)
    return f"{_num(v, nd)} ± {_num(err, nd)}"


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _zero_verdict(v: object, err: object, *, ideal: float = 0.0, what: str = "zero") -> str:
    """Reading of ``v ± err`` against its ideal value (two standard errors)."""
    if not _finite(v):
        return "not computed"
    if not _finite(err) or err <= 0:
        return f"{'at' if v == ideal else 'differs from'} {what} (no uncertainty)"
    pull = (v - ideal) / err
    if abs(pull) <= 2:
        return f"<b>compatible with {what}</b> ({pull:+.1f}σ)"
    return f"differs from {what} by {pull:+.1f}σ"


def _p_text(t: dict) -> str:
    p = t.get("p_value")
    n = t.get("permutations")
    if isinstance(n, int) and n > 0 and _finite(p) and p <= 1 / (n + 1) * (1 + 1e-12):
        return f"p ≤ {1 / (n + 1):.2g}"
    return f"p = {p:.2g}" if _finite(p) else "p –"


def _z_text(t: dict) -> str:
    z = t.get("z")
    return f"{'+' if z >= 0 else '−'}{abs(z):.1f}" if _finite(z) else "–"


def _test_verdict(t: dict) -> str:
    """Reading of a calibrated test (:func:`calopc.eval.permutation.summarize`, ``evaluate.auc_test``):
    ``<b>differs</b> (p ≤ 0.01; 1,000 vs 1,000 showers; excess +12.3 null sd)`` or ``<b>no difference found</b>
    (…)``."""
    from .permutation import reading

    if t.get("p_value") is None:
        return "not tested"
    word, _, rest = reading(t, html=True).partition(" (")
    return f"<b>{_e(word)}</b> ({_e(rest)}"


def _distance_reading(d: dict) -> str:
    """FPD/KPD reading: the calibrated test when present (else the older floor comparison)."""
    t = d.get("test")
    if not isinstance(t, dict):
        return _floor_verdict(d)
    return (f"{_test_verdict(t)}; test statistic ({_e(t.get('statistic', ''))}) {_num(t.get('observed'), 3)}, "
            f"same distribution {_pm(t.get('null_mean'), t.get('null_sd'), 3)}")


def _floor_verdict(d: dict) -> str:
    """Reading of an FPD/KPD entry: the value against zero, and against the reference floor at equal sample sizes.

    When the entry has ``value_at_floor_size`` (the distance measured with the floor's sample sizes), that is
    what is compared with the floor; otherwise the value itself.
    """
    v, e, f, fe = d.get("value"), d.get("error"), d.get("ref_floor"), d.get("ref_floor_error")
    parts = [_zero_verdict(v, e)]
    cv, ce, where = v, e, ""
    if _finite(d.get("value_at_floor_size")):
        cv, ce = d["value_at_floor_size"], d.get("value_at_floor_size_error")
        size = d.get("floor_size")
        where = f" at the floor's sample size{f' ({size:,})' if isinstance(size, int) else ''}: {_pm(cv, ce, 3)}"
    if _finite(cv) and _finite(f):
        err = math.hypot(ce if _finite(ce) else 0.0, fe if _finite(fe) else 0.0)
        if err > 0:
            pull = (cv - f) / err
            parts.append(f"{where.lstrip(' ')}{',' if where else ''} <b>compatible with the reference floor</b> "
                         f"({pull:+.1f}σ)" if abs(pull) <= 2 else
                         f"{where.lstrip(' ')}{',' if where else ''} {pull:+.1f}σ from the reference floor")
    return "; ".join(parts)


def _short(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else _e(v)


def _feature_text(name: str) -> str:
    from .plots import feature_info

    return feature_info(name).text


def worst_histograms(separation: dict[str, float | None], n: int = 10,
                     tests: dict[str, dict] | None = None) -> list[tuple[str, float]]:
    """The ``n`` histograms that separate the samples most: ``[(name, S)]``, worst first (NaN/None left out).

    With ``tests`` (``separation_test["per_histogram"]``), ranked by the standardised excess ``z =
    (S − null mean)/null sd`` of each histogram's permutation test: the null S grows with coarse bins and
    few entries, so raw S would rank sparse histograms first whatever the generator. Histograms without a
    test (or without a spread) follow, by S. Without ``tests``: by S.
    """
    vals = [(k, float(v)) for k, v in separation.items() if _finite(v)]
    tests = tests or {}

    def key(kv: tuple[str, float]) -> tuple:
        z = (tests.get(kv[0]) or {}).get("z")
        return (0, -z, -kv[1]) if _finite(z) else (1, -kv[1], 0.0)

    return sorted(vals, key=key)[:n]


def _page_of(res: dict) -> dict[str, str]:
    """Histogram name → anchor of the figure that shows it."""
    plots = res.get("plots", {})
    return {name: f"fig-{stem}" for name, stem in res.get("plot_index", {}).items() if stem in plots}


def _section_displays(res: dict) -> list[str]:
    """A link to the page of 3-D shower displays (metric ``displays``)."""
    d = res.get("displays")
    if not d:
        return []
    shown = ", ".join(str(i) for i in d.get("indices", []))
    return [f"<h2>Shower displays</h2><p><a href='{_e(d.get('path', DISPLAY_PAGE))}'>3-D displays</a> of showers "
            f"{_e(shown)} of the reference and the generated sample, side by side (an interactive page, "
            f"{d.get('bytes', 0) / 1e6:.1f} MB, that opens offline: drag to turn both views, the slider picks the "
            "shower; colour: log<sub>10</sub>(E / MeV)).</p>"]


def _img(stem: str, files: list[str], alt: str, *, anchor: bool = True) -> str:
    png = next((f for f in files if f.endswith(".png")), None)
    other = [f for f in files if not f.endswith(".png")]
    if png is None:
        return "".join(f"<a href='{_e(f)}'>{_e(f)}</a> " for f in files)
    links = " ".join(f"<a href='{_e(f)}'>{_e(f.rsplit('.', 1)[1].upper())}</a>" for f in other)
    fid = f" id='fig-{_e(stem)}'" if anchor else ""
    return (f"<figure{fid}><img src='{_e(png)}' alt='{_e(alt)}' loading='eager'>"
            f"<figcaption>{_e(alt)}{' · ' + links if links else ''}</figcaption></figure>")


_CAPTIONS = {
    "longitudinal_profile": "Mean longitudinal profile: mean energy per layer (band/bars: standard error of the mean)",
    "radial_profile": "Mean radial profile over all layers (energy per mm of radius; standard errors)",
    "response": "Response ⟨E_dep/E_inc⟩ and resolution σ/⟨E_dep/E_inc⟩ in bins of incident energy",
    "hits": "Points (cells above threshold) per layer and per shower vs incident energy",
    "average_shower_energy_bins": "Average shower per incident-energy bin (official avg-E), summed over α: "
                                  "reference, generated and (gen. − ref.)/ref.",
    "E_ratio": "E_dep/E_inc (official binning)",
    "E_ratio_per_energy": "E_dep/E_inc per incident energy (official binnings of dataset 1)",
    "voxel_spectrum": "Cell-energy spectrum (all cells above threshold)",
    "n_hits": "Cells above threshold per shower",
    "average_shower_reference": "Average shower of the reference, per layer (r–α plane)",
    "average_shower_generated": "Average shower of the generated sample, per layer (r–α plane)",
    "average_shower_ratio": "(generated − reference)/reference of the average shower, per layer",
}

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1300px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
figure{margin:1em 0}figure img{max-width:100%;height:auto;display:block}figcaption{font-size:.9em;color:#555}
.note{color:#555;font-size:.92em}
.sel{position:sticky;top:0;background:#fff;padding:.4em 0;border-bottom:1px solid #ddd;z-index:2}
.sel select{font-size:1em;margin-right:1em}code{background:#f3f3f3;padding:0 3px}
"""

_JS = """
(function(){
  var kind=document.getElementById('sel-kind'), grp=document.getElementById('sel-group');
  var all=document.getElementById('sel-all');
  if(!kind){return;}
  var pages=[].slice.call(document.querySelectorAll('.page'));
  function show(){
    pages.forEach(function(p){
      var on=all.checked||(p.getAttribute('data-kind')===kind.value&&
                           (grp.value==='*'||p.getAttribute('data-group')===grp.value));
      p.style.display=on?'':'none';
    });
  }
  function fromHash(){
    var el=document.getElementById(location.hash.slice(1));
    if(el&&el.classList.contains('page')){
      kind.value=el.getAttribute('data-kind');grp.value=el.getAttribute('data-group');all.checked=false;show();
      el.scrollIntoView();
    }
  }
  kind.addEventListener('change',show);grp.addEventListener('change',show);all.addEventListener('change',show);
  window.addEventListener('hashchange',fromHash);
  show();fromHash();
})();
"""


def _title(res: dict) -> str:
    prov = res.get("provenance", {})
    return prov.get("dataset_label") or f"dataset {res.get('dataset', '?')}"


def _section_samples(res: dict) -> list[str]:
    """Title, the two samples, threshold and histogram ranges."""
    rows = [f"<h1>calopc evaluation — {_e(_title(res))}</h1>", "<table><tr><th></th><th>file</th><th>showers</th></tr>"]
    for role in ("generated", "reference"):
        rows.append(f"<tr><th>{role}</th><td><code>{_e(res.get(role, ''))}</code></td>"
                    f"<td class=n>{res.get('n_' + role, 0):,}</td></tr>")
    thr = res.get("threshold_mev")
    rows.append(f"<tr><th>cell threshold</th><td colspan=2>{_num(thr, 5)} MeV</td></tr>"
                + (f"<tr><th>histogram ranges</th><td colspan=2>{_e(res['histogram_ranges'])}</td></tr>"
                   if res.get("histogram_ranges") else "") + "</table>")
    return rows


def _section_summary(res: dict) -> list[str]:
    """The summary table: every metric with its calibrated reading, and how to read it."""
    rows: list[str] = []
    add = rows.append
    # ---- summary
    if "classifier" in res or "fpd_x1e3" in res or "kpd_x1e3" in res or "separation_test" in res:
        add("<h2>Summary</h2><table><tr><th>metric</th><th>value</th><th>same distribution at these sample "
            "sizes</th><th>reading</th></tr>")
        for kind, c in res.get("classifier", {}).items():
            t = c.get("test")
            if isinstance(t, dict):
                auc_null = _pm(0.5, t.get("null_sd"))
                auc_read = (f"0.5 = indistinguishable; {_test_verdict(t)} (the AUC against its "
                            "chance spread)")
                jsd_read = "0 = indistinguishable, lower is better; tested through the AUC"
                if c.get("jsd_note"):
                    jsd_read += f"; <b>{_e(c['jsd_note'])}</b>"
            else:
                auc_null = "0.5"
                auc_read = ("0.5 = indistinguishable; "
                            + _zero_verdict(c.get("auc"), c.get("auc_err"), ideal=0.5, what="0.5"))
                jsd_read = "0 = indistinguishable, lower is better; " + _zero_verdict(c.get("jsd"), c.get("jsd_err"))
            one = isinstance(c.get("aucs"), list) and len(c["aucs"]) < 2  # one training: no spread to quote
            add(f"<tr><td>classifier AUC ({_e(kind)})</td>"
                f"<td class=n>{_num(c.get('auc')) if one else _pm(c.get('auc'), c.get('auc_err'))}</td>"
                f"<td class=n>{auc_null}</td><td>{auc_read}</td></tr>")
            add(f"<tr><td>classifier JSD ({_e(kind)})</td>"
                f"<td class=n>{_num(c.get('jsd')) if one else _pm(c.get('jsd'), c.get('jsd_err'))}</td>"
                f"<td class=n>≈ 0</td><td>{jsd_read}</td></tr>")
        known = {"value", "error", "ref_floor", "ref_floor_error", "value_at_floor_size", "value_at_floor_size_error",
                 "test"}
        for key, name in (("fpd_x1e3", "FPD ×10³"), ("kpd_x1e3", "KPD ×10³")):
            d = res.get(key)
            if not isinstance(d, dict):
                continue
            extra = "; ".join(f"{_e(k)}: {_short(v)}" for k, v in d.items()
                              if k not in known and not isinstance(v, dict))
            extra = f"<br><span class=note>{extra}</span>" if extra else ""
            t = d.get("test")
            null = (_pm(t.get("null_mean"), t.get("null_sd"), 3) if isinstance(t, dict)
                    else _pm(d.get("ref_floor"), d.get("ref_floor_error"), 3))
            add(f"<tr><td>{name}</td><td class=n>{_pm(d.get('value'), d.get('error'), 3)}</td>"
                f"<td class=n>{null}</td>"
                f"<td>lower is better; {_distance_reading(d)}{extra}"
                "</td></tr>")
        st = res.get("separation_test") or {}
        for key, name in (("E_ratio", "separation power of E_dep/E_inc"),
                          ("mean", f"mean separation power ({st.get('mean', {}).get('histograms', 0)} histograms)")):
            t = st.get(key)
            if not isinstance(t, dict):
                continue
            add(f"<tr><td>{_e(name)}</td><td class=n>{_num(t.get('observed'), 4)}</td>"
                f"<td class=n>{_pm(t.get('null_mean'), t.get('null_sd'), 4)}</td>"
                f"<td>0 = identical, lower is better; {_test_verdict(t)}</td></tr>")
        add("</table>")
        add("<p class=note><b>How to read “differs” and “no difference found”.</b> Each reading is a calibrated "
            "test of “the generated showers come from the reference's distribution”. “Differs” means that a "
            "difference was found (p ≤ 0.05): a perfect generator reads it in only 5 % of its samples, at any "
            "sample size. “No difference found” is not a certificate: a perfect generator reads it, and so does "
            "any generator whose difference these sample sizes (at most 5,000 showers per sample in the "
            "permutation tests) cannot resolve. The excess is the observed statistic minus its mean over the "
            "shuffles, in units of their standard deviation (“null sd”): how far beyond what sample size alone "
            "gives. FPD, KPD: permutation tests. The two samples are pooled and the labels generated/reference "
            "shuffled (both sizes kept); the distance is recomputed for every shuffle. The shuffles give what two "
            "samples of one distribution show at these sample sizes (the column “same distribution”: mean ± "
            "standard deviation of the test statistic); p is the share of shuffles at least as large as the "
            "observed value. The official values carry a finite-sample bias (with replacement, a small sample "
            "keeps its own noise), so do not compare them with 0: the FPD test statistic is the Fréchet distance "
            "of the two samples' moments with each feature scaled as the official estimator scales it for a "
            "reference of this size, which the official FPD of samples smaller than its batches equals closely, so "
            "its column applies to the FPD value; the KPD test uses the unbiased MMD² of the samples, which "
            "repeated showers do not bias as they bias the official KPD of a small sample. The official ± is the "
            "spread of the official resampling, not of the samples. Classifiers: the AUC is measured on a "
            "validation split that played no part in training or calibration, so for a perfect generator it "
            "follows the Mann–Whitney chance distribution (0.5 ± the value shown, one-sided test; ties make it "
            "conservative). Separation powers: the same shuffles of the showers, each histogram refilled (a "
            "histogram of N showers is never 0 for a perfect generator); E_layer is binned for the test up to the "
            "largest energy of both samples, which no shuffle changes.</p>")
        for k in ("unusable_note", "small_sample_note", "classifier_sizes_note", "fpd_kpd_note", "classifier_note"):
            if k in res:
                add(f"<p class=note>{_e(res[k])}</p>")

    return rows


def _section_prdc(res: dict) -> list[str]:
    """Precision, recall, density, coverage."""
    rows: list[str] = []
    add = rows.append
    # ---- PRDC
    if isinstance(res.get("prdc"), dict):
        p = res["prdc"]
        add(f"<h2>Precision, recall, density, coverage</h2><p class=note>k = {_e(p.get('k'))} nearest neighbours on "
            f"log10 cell energies (empty cells at 0.1 MeV), {p.get('n_real', 0):,} reference and "
            f"{p.get('n_fake', 0):,} generated showers; a perfect generator gives density ≈ 1 and the "
            "reference-vs-reference values of precision, recall and coverage.</p><table><tr>"
            + "".join(f"<th>{k}</th>" for k in ("precision", "recall", "density", "coverage")) + "</tr><tr>"
            + "".join(f"<td class=n>{_num(p.get(k), 4)}</td>" for k in ("precision", "recall", "density", "coverage"))
            + "</tr></table>")

    return rows


def _section_worst(res: dict) -> list[str]:
    """The histograms that separate the samples most."""
    rows: list[str] = []
    add = rows.append
    # ---- worst 10 and summary per feature
    sep = res.get("separation", {})
    if sep:
        anchors = _page_of(res)
        per = (res.get("separation_test") or {}).get("per_histogram", {})
        ranked = worst_histograms(sep, tests=per)
        by_z = bool(per) and any(_finite((per.get(k) or {}).get("z")) for k, _ in ranked)
        add("<h2>The 10 histograms that separate the samples most</h2>"
            "<p class=note>Separation power S = ½ Σ (p − q)²/(p + q) of the unit-sum histograms: 0 = identical, "
            "1 = disjoint; lower is better. Click a name for its plot."
            + (" Ranked by the excess of S over its value for samples of one distribution, in units of that "
               "value's spread (raw S favours coarse, sparsely filled histograms, whose S is large for any two "
               "samples). “Same distribution”: mean ± standard deviation of S over the label shuffles of the "
               "showers; p: the share of shuffles with an S at least as large, for this histogram alone (of "
               "hundreds of histograms, about 1 in 20 has p ≤ 0.05 for a perfect generator: the summary's test of "
               "the mean separation is the overall reading). E_layer is tested with its range up to the largest "
               "energy of both samples; the S column is the official one." if by_z else "") + "</p>")
        add("<table id=worst><tr><th>#</th><th>histogram</th><th>S</th>"
            + ("<th>same distribution</th><th>excess (null sd)</th><th>p</th>" if per else "") + "</tr>")
        for i, (name, v) in enumerate(ranked, 1):
            a = anchors.get(name, "")
            cell = f"<a href='#{_e(a)}'>{_e(_feature_text(name))}</a>" if a else _e(_feature_text(name))
            t = per.get(name)
            if isinstance(t, dict):
                tested = (f" (tested S {_num(t.get('observed'), 5)})" if t.get("binning") == "pooled" else "")
                more = (f"<td class=n>{_pm(t.get('null_mean'), t.get('null_sd'), 5)}{tested}</td>"
                        f"<td class=n>{_z_text(t)}</td><td class=n>{_p_text(t)}</td>")
            else:
                more = "<td></td><td></td><td></td>" if per else ""
            add(f"<tr><td class=n>{i}</td><td>{cell}</td><td class=n>{v:.5f}</td>{more}</tr>")
        add("</table>")
    return rows


def _section_per_feature(res: dict) -> list[str]:
    """Separation power per feature (mean over layers and the worst layer)."""
    from .plots import feature_info

    sep = res.get("separation", {})
    rows: list[str] = []
    add = rows.append
    if "separation_summary" in res:
        add("<h2>Separation power per feature</h2><table><tr><th>feature</th><th>mean S over layers</th>"
            "<th>largest S (layer)</th></tr>")
        for k, v in res["separation_summary"].items():
            members = [(n, s) for n, s in sep.items() if feature_info(n).kind == k and _finite(s)]
            worst = max(members, key=lambda t: t[1], default=None)
            where = (f"layer {feature_info(worst[0]).layer}" if worst and feature_info(worst[0]).layer is not None
                     else _feature_text(worst[0]) if worst else "")
            wtxt = f"{worst[1]:.5f} ({_e(where)})" if worst and len(members) > 1 else ""
            fi0 = feature_info(f"{k}_0")
            group = fi0.group if fi0.layer is not None or k == "E_ratio_einc" else feature_info(k).group
            add(f"<tr><td>{_e(group)}</td><td class=n>{_num(v, 5)}</td><td class=n>{wtxt}</td></tr>")
        add("</table><p class=note>Lower is better.</p>")

    return rows


def _section_pointcloud(res: dict) -> list[str]:
    """The point-cloud view: points per shower and re-voxelization."""
    rows: list[str] = []
    add = rows.append
    # ---- point cloud table
    if "pointcloud" in res:
        pc = res["pointcloud"]
        add("<h2>Point-cloud view</h2><table><tr><th></th><th>generated</th><th>reference</th></tr>")
        hm, hs = pc.get("hits_mean", {}), pc.get("hits_std", {})
        add("<tr><td>points per shower (mean ± std)</td>"
            f"<td class=n>{_pm(hm.get('generated'), hs.get('generated'), 1)}"
            f"</td><td class=n>{_pm(hm.get('reference'), hs.get('reference'), 1)}</td></tr>")
        add(f"<tr><td>separation power of points per shower</td><td colspan=2 class=n>"
            f"{_num(pc.get('hits_separation'), 5)}</td></tr>")
        for name, st in pc.get("revoxelization", {}).items():
            add(f"<tr><td>re-voxelization of the {_e(name)} points</td><td colspan=2>"
                f"{st.get('n_collisions')} collisions "
                f"({100 * (st.get('collision_rate') or 0):.2f} %), {st.get('n_outside')} outside</td></tr>")
        add("</table>")

    return rows


def _section_plots(res: dict) -> list[str]:
    """The figures: first look, other distributions, per-layer pages, average showers."""
    from .plots import feature_info

    sep = res.get("separation", {})
    rows: list[str] = []
    add = rows.append
    # ---- plots
    plots: dict[str, list[str]] = res.get("plots", {})
    pages: dict[str, list[dict]] = res.get("plot_pages", {})
    paged = {p["stem"] for ps in pages.values() for p in ps}
    first = ["longitudinal_profile", "radial_profile", "response", "E_ratio", "voxel_spectrum", "n_hits", "hits",
             "average_shower_energy_bins"]
    shown = [s for s in first if s in plots]
    if shown:
        add("<h2>First look</h2>")
        for s in shown:
            add(_img(s, plots[s], _CAPTIONS.get(s, s)))
    others = [s for s in plots if s not in paged and s not in first and not s.startswith("average_shower_")]
    if others:
        add("<h2>Other distributions</h2>")
        for s in others:
            add(_img(s, plots[s], _CAPTIONS.get(s) or (_feature_text(s) if s in sep else s)))
    if pages:
        kinds = list(pages)
        groups = pages[kinds[0]]
        add("<h2 id=per-layer>Per-layer distributions</h2>")
        add("<div class=sel><label>feature <select id=sel-kind>"
            + "".join(f"<option value='{_e(k)}'>{_e(feature_info(k + '_0').group)}</option>" for k in kinds)
            + "</select></label><label>layers <select id=sel-group><option value='*'>all</option>"
            + "".join(f"<option value='{i}'>{g['layers'][0]}–{g['layers'][-1]}</option>"
                      for i, g in enumerate(groups))
            + "</select></label><label><input type=checkbox id=sel-all> show every page</label></div>")
        for kind, ps in pages.items():
            for i, p in enumerate(ps):
                if p["stem"] not in plots:
                    continue
                add(f"<div class=page id='fig-{_e(p['stem'])}' data-kind='{_e(kind)}' data-group='{i}'>"
                    + _img(p["stem"], plots[p["stem"]], p["title"], anchor=False) + "</div>")
    polar = [s for s in ("average_shower_reference", "average_shower_generated", "average_shower_ratio") if s in plots]
    if polar:
        add("<h2>Average showers per layer</h2>")
        for s in polar:
            add(_img(s, plots[s], _CAPTIONS[s]))

    return rows


def _section_all_separations(res: dict) -> list[str]:
    """Every separation power, largest first."""
    sep = res.get("separation", {})
    rows: list[str] = []
    add = rows.append
    # ---- all separation powers
    if sep:
        add(f"<h2>All separation powers</h2><details><summary>{len(sep)} histograms, largest first</summary>"
            "<table><tr><th>histogram</th><th>S</th></tr>")
        for name, v in sorted(sep.items(), key=lambda kv: -(kv[1] if _finite(kv[1]) else -1)):
            add(f"<tr><td>{_e(_feature_text(name))}</td><td class=n>{_num(v, 5)}</td></tr>")
        add("</table></details>")

    return rows


def _section_provenance(res: dict) -> list[str]:
    """Versions, command line, date, seeds, input fingerprints, options; timings."""
    prov = res.get("provenance", {})
    rows: list[str] = []
    add = rows.append
    # ---- provenance
    if prov:
        add("<h2>Provenance</h2><table>")
        add("<tr><th>calopc</th><td>" + _e(", ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items()))
            + "</td></tr>")
        add(f"<tr><th>command</th><td><code>{_e(prov.get('command', ''))}</code></td></tr>")
        add(f"<tr><th>date (UTC)</th><td>{_e(prov.get('date_utc', ''))}</td></tr>")
        add(f"<tr><th>seeds</th><td>{_e(json.dumps(_safe(prov.get('seeds', {}))))}</td></tr>")
        for role, fp in prov.get("inputs", {}).items():
            add(f"<tr><th>{_e(role)} file</th><td><code>{_e(fp.get('path'))}</code><br>"
                f"{fp.get('size_bytes', 0):,} bytes, "
                f"modified {_e(fp.get('mtime_utc'))}<br>{_e(fp.get('hash_method'))} <code>{_e(fp.get('sha256'))}</code>"
                "</td></tr>")
        add(f"<tr><th>options</th><td><code>{_e(json.dumps(_safe(prov.get('options', {}))))}</code></td></tr>")
        add("</table>")
    t = res.get("timings_s", {})
    if t:
        add("<p class=note>timings (s): " + ", ".join(f"{_e(k)} {v:.1f}" for k, v in t.items() if _finite(v)) + "</p>")
    return rows


#: the sections of ``report.html`` in page order; each maps the metrics dict to HTML fragments (nothing when
#: its metrics are absent). Add a page by inserting a function here (or pass ``sections`` to write_report).
SECTIONS: list[Callable[[dict], list[str]]] = [
    _section_samples, _section_summary, _section_prdc, _section_worst, _section_per_feature, _section_pointcloud,
    _section_plots, _section_displays, _section_all_separations, _section_provenance,
]


def write_report(path: str | os.PathLike, res: dict,
                 sections: Sequence[Callable[[dict], list[str]]] | None = None) -> None:
    """Write the HTML report for the metrics ``res`` (as returned by :func:`calopc.eval.evaluate`).

    Args:
        sections: the page's sections in order (default: :data:`SECTIONS`).
    """
    rows = [frag for section in (SECTIONS if sections is None else sections) for frag in section(res)]
    label = _title(res)
    doc = ("<!doctype html><html lang=en><head><meta charset='utf-8'><meta name=viewport "
           "content='width=device-width,initial-scale=1'><title>calopc evaluation — " + _e(label) + "</title><style>"
           + _CSS + "</style></head><body>\n" + "\n".join(rows) + "\n<script>" + _JS + "</script></body></html>\n")
    with atomic_output(path) as tmp:
        tmp.write_text(doc, encoding="utf-8")
