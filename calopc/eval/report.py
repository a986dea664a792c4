r"""A single self-contained ``report.html`` from the metrics dict (images are linked files beside it)."""

from __future__ import annotations

__all__ = ["write_report"]

import html
from pathlib import Path

from ..io import atomic_output


def _fmt(v: object, nd: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return html.escape(str(v))


def _pm(d: dict, key: str, nd: int = 4) -> str:
    return f"{_fmt(d.get(key), nd)} ± {_fmt(d.get(key + '_err'), nd)}"


def write_report(path: Path, res: dict) -> None:
    """Write the HTML report for the metrics ``res`` (as returned by :func:`calopc.eval.evaluate`)."""
    rows = []
    add = rows.append
    add(f"<h1>calopc evaluation: dataset {_fmt(res['dataset'])}</h1>")
    add("<table><tr><th>generated</th><td>{}</td><td>{} showers</td></tr><tr><th>reference</th><td>{}</td><td>{} showers</td></tr>"
        "<tr><th>threshold</th><td colspan=2>{:.5g} MeV</td></tr></table>".format(
            _fmt(res["generated"]), res["n_generated"], _fmt(res["reference"]), res["n_reference"], res["threshold_mev"]))
    if "classifier" in res or "fpd_x1e3" in res or "kpd_x1e3" in res:
        add("<h2>Summary</h2><table><tr><th>metric</th><th>value</th><th>reference-vs-reference floor</th></tr>")
        for kind, c in res.get("classifier", {}).items():
            add(f"<tr><td>classifier AUC ({kind})</td><td>{_pm(c, 'auc')}</td><td>0.5</td></tr>")
            add(f"<tr><td>classifier JSD ({kind})</td><td>{_pm(c, 'jsd')}</td><td>0</td></tr>")
        for key, label in (("fpd_x1e3", "FPD ×10³"), ("kpd_x1e3", "KPD ×10³")):
            if key in res:
                d = res[key]
                add(f"<tr><td>{label}</td><td>{_fmt(d['value'], 3)} ± {_fmt(d['error'], 3)}</td>"
                    f"<td>{_fmt(d['ref_floor'], 3)} ± {_fmt(d['ref_floor_error'], 3)}</td></tr>")
        add("</table>")
        if "fpd_kpd_note" in res:
            add(f"<p><em>{_fmt(res['fpd_kpd_note'])}</em></p>")
    if "separation_summary" in res:
        add("<h2>Separation power (mean over layers)</h2><table><tr><th>feature</th><th>separation</th></tr>")
        for k, v in res["separation_summary"].items():
            add(f"<tr><td>{_fmt(k)}</td><td>{_fmt(v, 5)}</td></tr>")
        add("</table>")
    if "pointcloud" in res:
        pc = res["pointcloud"]
        add("<h2>Point-cloud view</h2><table><tr><th></th><th>generated</th><th>reference</th></tr>")
        add(f"<tr><td>points per shower (mean ± std)</td><td>{pc['hits_mean']['generated']:.1f} ± {pc['hits_std']['generated']:.1f}</td>"
            f"<td>{pc['hits_mean']['reference']:.1f} ± {pc['hits_std']['reference']:.1f}</td></tr>")
        add(f"<tr><td>separation of points per shower</td><td colspan=2>{_fmt(pc['hits_separation'], 5)}</td></tr>")
        for name, st in pc.get("revoxelization", {}).items():
            add(f"<tr><td>re-voxelization of the {name} points</td><td colspan=2>{st['n_collisions']} collisions "
                f"({100 * st['collision_rate']:.2f} %), {st['n_outside']} outside</td></tr>")
        add("</table>")
    for name, files in res.get("plots", {}).items():
        png = next((f for f in files if f.endswith(".png")), None)
        pdf = next((f for f in files if f.endswith(".pdf")), None)
        if png:
            add(f"<h3>{_fmt(name)}</h3><a href='{html.escape(pdf or png)}'><img src='{html.escape(png)}' style='max-width:100%'></a>")
    if "separation" in res:
        add("<h2>All separation powers</h2><table><tr><th>histogram</th><th>separation</th></tr>")
        for k, v in res["separation"].items():
            add(f"<tr><td>{_fmt(k)}</td><td>{_fmt(v, 5)}</td></tr>")
        add("</table>")
    t = res.get("timings_s", {})
    add("<p>timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()) + "</p>")
    doc = ("<!doctype html><html><head><meta charset='utf-8'><title>calopc evaluation</title><style>"
           "body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}</style></head><body>"
           + "\n".join(rows) + "</body></html>")
    with atomic_output(path) as tmp:
        tmp.write_text(doc, encoding="utf-8")
