from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("mplhep")

from calopc import __version__
from calopc.eval import evaluate
from calopc.eval.report import file_fingerprint, worst_histograms, write_metrics, write_report
from calopc.io import write_showers


def _no_nan(name: str):
    msg = f"metrics.json holds a bare {name}"
    raise ValueError(msg)


def _showers(geometry, n: int, seed: int, scale: float = 5.0):
    rng = np.random.default_rng(seed)
    v = np.where(rng.random((n, geometry.n_voxels)) < 0.6, rng.exponential(scale, (n, geometry.n_voxels)), 0.0)
    return 10 ** rng.uniform(3, 6, n), v


@pytest.fixture(scope="module")
def report(tmp_path_factory, toy_geometry):
    """A full report (hist, point cloud, FPD/KPD, plots drawn by two processes) on the toy geometry."""
    d = tmp_path_factory.mktemp("report")
    write_showers(d / "ref.hdf5", *_showers(toy_geometry, 300, 1))
    write_showers(d / "gen.hdf5", *_showers(toy_geometry, 300, 2, scale=6.0))
    out = d / "out"
    res = evaluate(d / "gen.hdf5", d / "ref.hdf5", out, geometry=toy_geometry, threshold=0.01,
                   metrics=("hist", "pointcloud", "fpd", "kpd", "plots"), fpd_min_samples=60, kpd_batch_size=60,
                   progress=False, plot_workers=2, command="calopc evaluate gen.hdf5 ref.hdf5 -o out", seed=3)
    return out, res


def test_metrics_json_is_valid_and_has_provenance(report):
    out, res = report
    m = json.loads((out / "metrics.json").read_text(), parse_constant=_no_nan)
    p = m["provenance"]
    assert p["versions"]["calopc"] == __version__
    assert p["command"] == "calopc evaluate gen.hdf5 ref.hdf5 -o out"
    assert p["seeds"]["seed"] == 3 and re.match(r"\d{4}-\d\d-\d\dT", p["date_utc"])
    for role in ("generated", "reference"):
        fp = p["inputs"][role]
        assert fp["hash_method"] == "sha256" and len(fp["sha256"]) == 64 and fp["size_bytes"] > 0
    assert p["inputs"]["generated"]["sha256"] == file_fingerprint(res["generated"])["sha256"]
    assert p["options"]["threshold_mev"] == 0.01
    assert m["plot_pages"]["E_layer"][0]["layers"] == [0, 2, 3]


def test_report_has_worst_ten_and_every_image_exists(report):
    out, res = report
    html = (out / "report.html").read_text()
    table = html.split("<table id=worst>")[1].split("</table>")[0]
    rows = re.findall(r"<tr><td class=n>(\d+)</td><td>(.*?)</td><td class=n>([0-9.]+)</td><td class=n>[^<]*</td>"
                      r"<td class=n>([^<]*)</td><td class=n>[^<]*</td></tr>", table)
    assert "<th>same distribution</th><th>excess (null sd)</th>" in table  # the calibrated floor beside each S
    assert [int(r[0]) for r in rows] == list(range(1, 11))
    # ranked by the standardised excess (S − null mean)/null sd, not by S
    per = res["separation_test"]["per_histogram"]
    zs = [float(r[3].replace("−", "-")) for r in rows]
    assert zs == sorted(zs, reverse=True)
    best = max(per, key=lambda k: per[k]["z"] if per[k]["z"] is not None and np.isfinite(per[k]["z"]) else -np.inf)
    assert zs[0] == pytest.approx(per[best]["z"], abs=0.051)
    by_s = [k for k, _ in sorted(((k, v) for k, v in res["separation"].items() if v is not None),
                                 key=lambda kv: -kv[1])[:10]]
    assert [k for k, _ in worst_histograms(res["separation"], tests=per)] != by_s  # the ranking differs here
    assert all("href='#fig-" in r[1] for r in rows)  # every row links to its figure
    for a in re.findall(r"href='#(fig-[^']+)'", table):
        assert f"id='{a}'" in html
    refs = set(re.findall(r"(?:src|href)='([^'#][^']*)'", html))
    assert refs and any(r.endswith(".png") for r in refs)
    for r in refs:
        assert (out / r).is_file() and (out / r).stat().st_size > 1000, r
    for stem in ("longitudinal_profile", "radial_profile", "response", "hits", "average_shower_energy_bins",
                 "average_shower_ratio", "E_layer_layers_0-3"):
        assert f"src='{stem}.png'" in html
    assert "sel-kind" in html and "data-kind='EC_x'" in html  # the layer selector
    assert "Provenance" in html and res["provenance"]["inputs"]["reference"]["sha256"] in html
    head = re.sub(r"(src|href|id)='[^']*'", "", html.split("<h2>First")[0])
    assert "⟨x⟩ per layer" in html and "E_ratio" not in head  # physics names, not code names
    assert not list(out.glob("*.part")) and not list(out.glob("*.pdf"))


def test_fpd_kpd_reading_and_nan_metrics(tmp_path):
    res = {"dataset": "2", "generated": "g.h5", "reference": "r.h5", "n_generated": 10, "n_reference": 10,
           "threshold_mev": 0.015, "fpd_x1e3": {"value": 0.4, "error": 0.5, "ref_floor": 0.3, "ref_floor_error": 0.4},
           "kpd_x1e3": {"value": 9.0, "error": 1.0, "ref_floor": 0.0, "ref_floor_error": 0.1,
                        "value_at_floor_size": 0.1, "value_at_floor_size_error": 0.1, "floor_size": 5000},
           "classifier": {"high": {"auc": 0.51, "auc_err": 0.01, "jsd": -0.01, "jsd_err": 0.02}},
           "separation": {"E_ratio": float("nan"), "E_layer_3": 0.2, "EC_x_3": np.float64(0.1)},
           "timings_s": {"total": float("inf")}}
    write_metrics(tmp_path / "m.json", res)
    m = json.loads((tmp_path / "m.json").read_text(), parse_constant=_no_nan)
    assert m["separation"]["E_ratio"] is None and m["timings_s"]["total"] is None
    write_report(tmp_path / "r.html", res)
    html = (tmp_path / "r.html").read_text()
    fpd = html.split("FPD ×10³")[1].split("</tr>")[0]
    assert "compatible with zero" in fpd and "compatible with the reference floor" in fpd
    kpd = html.split("KPD ×10³")[1].split("</tr>")[0]
    # compared with the floor at the floor's sample size, not with the full-size value
    assert "differs from zero by +9.0σ" in kpd and "sample size (5,000): 0.100 ± 0.100" in kpd
    assert "compatible with the reference floor</b> (+0.7σ)" in kpd
    jsd = html.split("classifier JSD (high)")[1].split("</tr>")[0]
    assert "compatible with zero" in jsd
    assert worst_histograms(res["separation"]) == [("E_layer_3", 0.2), ("EC_x_3", 0.1)]
    tests = {"E_layer_3": {"z": 1.0}, "EC_x_3": {"z": 4.0}}
    assert worst_histograms(res["separation"], tests=tests) == [("EC_x_3", 0.1), ("E_layer_3", 0.2)]


def _readout_res() -> dict:
    """A metrics dict with every calibrated readout: FPD no difference, KPD differs, AUC, separations."""
    test = {"observed": 840.0, "null_mean": 845.0, "null_sd": 30.0, "excess": -5.0, "z": -5.0 / 30.0, "p_value": 0.57,
            "permutations": 99, "n_real": 1000, "n_ref": 1000, "n_gen": 1000, "level": 0.05, "compatible": True,
            "differs": False, "statistic": "Fréchet distance of the samples' moments"}
    return {"dataset": "2", "generated": "g.h5", "reference": "r.h5", "n_generated": 1000, "n_reference": 1000,
            "fpd_x1e3": {"value": 841.7, "error": 1.3, "estimator": "official", "test": test},
            "kpd_x1e3": {"value": 0.31, "error": 0.1, "estimator": "official",
                         "test": {**test, "observed": 9.0, "null_mean": 0.0, "null_sd": 0.4, "excess": 9.0, "z": 22.5,
                                  "p_value": 0.01, "compatible": False, "differs": True}},
            "classifier": {"high": {"auc": 0.52, "auc_err": 0.0, "jsd": -0.4565, "jsd_err": 0.0, "aucs": [0.52],
                                    "jsds": [-0.4565], "jsd_note": "JSD < 0: read it as 0",
                                    "test": {"null_mean": 0.5, "null_sd": 0.0323, "n_validation_per_class": 200,
                                             "n_ref": 200, "n_gen": 200, "z": 0.02 / 0.0323, "p_value": 0.27,
                                             "level": 0.05, "compatible": True, "differs": False}}},
            "separation_test": {"E_ratio": {"observed": 0.098, "null_mean": 0.037, "null_sd": 0.005, "z": 12.2,
                                            "p_value": 0.01, "permutations": 99, "level": 0.05, "n_ref": 1000,
                                            "n_gen": 1000, "compatible": False, "differs": True},
                                "mean": {"observed": 0.027, "null_mean": 0.027, "null_sd": 0.001, "z": 0.0,
                                         "p_value": 0.4, "permutations": 99, "level": 0.05, "compatible": True,
                                         "differs": False, "histograms": 362}}}


def test_calibrated_readouts_in_the_summary(tmp_path):
    """The readouts of calibrated tests: 'differs' / 'no difference found' with p, the sample sizes and the excess
    in units of the null's spread, the same-distribution value beside the official one, no ± for one training."""
    write_report(tmp_path / "r.html", _readout_res())
    html = (tmp_path / "r.html").read_text()
    assert "perfect generator</b>" not in html and "compatible with a perfect" not in html
    fpd = html.split("FPD ×10³")[1].split("</tr>")[0]
    assert "845.000 ± 30.000" in fpd
    assert "<b>no difference found</b> (p = 0.57; 1,000 vs 1,000 showers; excess −0.2 null sd)" in fpd
    kpd = html.split("KPD ×10³")[1].split("</tr>")[0]
    assert "<b>differs</b> (p ≤ 0.01; 1,000 vs 1,000 showers; excess +22.5 null sd)" in kpd
    auc = html.split("classifier AUC (high)")[1].split("</tr>")[0]
    assert "0.5200</td>" in auc and "± 0.0000" not in auc and "0.5000 ± 0.0323" in auc
    assert "<b>no difference found</b> (p = 0.27; 200 vs 200 validation showers; excess +0.6 null sd)" in auc
    jsd = html.split("classifier JSD (high)")[1].split("</tr>")[0]
    assert "<b>JSD &lt; 0: read it as 0</b>" in jsd
    e = html.split("separation power of E_dep/E_inc")[1].split("</tr>")[0]
    assert "<b>differs</b> (p ≤ 0.01; 1,000 vs 1,000 showers; excess +12.2 null sd)" in e and "0.0370 ± 0.0050" in e
    assert "mean separation power (362 histograms)" in html and "How to read “differs”" in html
    assert "σ" not in html.split("<h2>Summary</h2>")[1].split("</table>")[0]  # no pulls from resampling errors


def test_command_line_summary_reads_each_test():
    from calopc.cli.eval import summary_lines

    text = summary_lines(_readout_res())
    assert "compatible" not in text and "perfect generator" not in text
    lines = text.splitlines()
    auc = next(x for x in lines if x.lstrip().startswith("classifier high"))
    assert auc.endswith("no difference found (p = 0.27; 200 vs 200 validation showers; excess +0.6 null sd)")
    assert lines[lines.index(auc) + 1].strip() == "JSD < 0: read it as 0"
    fpd = next(x for x in lines if "FPD x1e3" in x)
    assert ("no difference found (p = 0.57; 1,000 vs 1,000 showers; excess -0.2 null sd); test statistic 840.000, "
            "same distribution at these sizes 845.000 ± 30.000") in fpd
    kpd = next(x for x in lines if "KPD x1e3" in x)
    assert "differs (p <= 0.01; 1,000 vs 1,000 showers; excess +22.5 null sd)" in kpd
    sep = next(x for x in lines if "separation E_dep/E_inc" in x)
    assert sep.endswith("differs (p <= 0.01; 1,000 vs 1,000 showers; excess +12.2 null sd)")


def test_negative_jsd_gets_a_note_and_keeps_its_official_value():
    from calopc.eval.evaluate import _note_negative_jsd

    entry = {"auc": 0.5347, "jsd": -0.4565}
    _note_negative_jsd(entry)
    assert entry["jsd"] == -0.4565 and "worse than chance" in entry["jsd_note"] and "read it as 0" in entry["jsd_note"]
    for jsd in (0.0, 0.02, None, float("nan")):
        entry = {"jsd": jsd}
        _note_negative_jsd(entry)
        assert "jsd_note" not in entry


_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = [].slice.call(document.images);
  var bad = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; })
                .map(function (i) { return i.src; });
  var out = document.createElement('pre');
  out.id = 'image-check';
  out.textContent = JSON.stringify({n: imgs.length, broken: bad});
  document.body.appendChild(out);
});
</script></body>"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install chromium)")
def test_report_images_load_in_a_browser(report):
    out, _ = report
    page = out / "browser-check.html"
    page.write_text((out / "report.html").read_text().replace("</body>", _CHECK))
    try:
        dom = subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120, check=False).stdout
    finally:
        page.unlink()
    found = re.search(r"<pre id=\"image-check\">(.*?)</pre>", dom)
    assert found, dom[-2000:]
    check = json.loads(found.group(1))
    assert check["n"] >= 15 and check["broken"] == []


def test_cli_plot_options(tmp_path, capsys):
    from calopc.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "a.hdf5", "b.hdf5", "-o", str(tmp_path / "r"), "--formats", "png,jpg"])
    assert exc.value.code == 2
    assert "plot formats must be a comma-separated subset of png,pdf,svg, got 'png,jpg'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "a.hdf5", "b.hdf5", "-o", str(tmp_path / "r"), "--plot-workers", "0"])
    assert exc.value.code == 2 and "--plot-workers" in capsys.readouterr().err


def test_report_sections_are_a_list_that_can_be_extended(tmp_path):
    from calopc.eval import report

    res = {"dataset": "2", "generated": "g.h5", "reference": "r.h5", "n_generated": 3, "n_reference": 3,
           "separation": {"E_ratio": 0.2}}

    def extra(r: dict) -> list[str]:
        return [f"<h2 id=extra>{r['n_generated']} showers in 3-D</h2>"]

    write_report(tmp_path / "a.html", res, sections=[*report.SECTIONS[:2], extra, *report.SECTIONS[2:]])
    html = (tmp_path / "a.html").read_text()
    assert html.index("<h1>") < html.index("<h2 id=extra>3 showers in 3-D</h2>") < html.index("histograms that separate")
    write_report(tmp_path / "b.html", res, sections=[extra])
    body = (tmp_path / "b.html").read_text().split("<body>")[1]
    assert "<h1>" not in body and "id=extra" in body
