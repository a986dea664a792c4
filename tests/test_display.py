"""3-D shower displays (calopc show): cell placement, styles, the offline page, and the page in a browser."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("plotly")

from calopc.cli import main  # noqa: E402
from calopc.converters import convert_file  # noqa: E402
from calopc.display import STYLES, Shower, read_showers, shower_figure, write_display  # noqa: E402
from calopc.geometry import Geometry  # noqa: E402
from calopc.io import write_showers  # noqa: E402
from calopc.synth import generate  # noqa: E402

DS2 = Geometry.calochallenge("2")
DS1 = Geometry.calochallenge("1-photons")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Six dataset-2 showers as HDF5, the same as calopc Parquet, and six other showers."""
    d = tmp_path_factory.mktemp("display")
    inc, sh = generate("2", 6, seed=11)
    write_showers(d / "ref.hdf5", inc, sh)
    convert_file(d / "ref.hdf5", d / "ref.parquet", progress=False)
    inc2, sh2 = generate("2", 6, seed=12)
    write_showers(d / "gen.hdf5", inc2, sh2)
    return d, inc, sh, sh2


def _shower(g: Geometry, cells: list[int], energies: list[float], index: int = 0) -> Shower:
    return Shower(index=index, incident_energy=1e4, cell=np.array(cells), energy=np.array(energies, dtype=float))


def _cells_traces(fig: dict, scene: str = "scene") -> list[dict]:
    return [t for t in fig["data"] if t["scene"] == scene and t.get("mode") != "lines"]


def test_markers_sit_at_the_cell_centres_depth_in_mm():
    """A cell is drawn at x = r cos(alpha), y = r sin(alpha) and depth z_mm of its layer (horizontal axis)."""
    cells = [0, 100, 3000, 6479]
    fig = shower_figure([("a", [_shower(DS2, cells, [1.0, 10.0, 100.0, 0.5])])], DS2, style="markers")
    pts = {}
    for t in _cells_traces(fig):
        for x, y, z, cd in zip(t["x"], t["y"], t["z"], t["customdata"]):
            pts[(int(cd[0]), int(cd[1]), int(cd[2]))] = (x, y, z, cd[3])
    assert len(pts) == 4
    for c in cells:
        key = (DS2.layer_ids[DS2.cell_layer[c]], DS2.cell_alpha_bin[c], DS2.cell_r_bin[c])
        depth, x, y, e = pts[key]
        r, a = DS2.cell_r[c], DS2.cell_alpha[c]
        assert depth == pytest.approx(DS2.z_mm[DS2.cell_layer[c]], abs=1e-4)
        assert (x, y) == (pytest.approx(r * math.cos(a), abs=1e-4), pytest.approx(r * math.sin(a), abs=1e-4))
    assert fig["layout"]["scene"]["xaxis"]["title"]["text"] == "depth z (mm)"
    assert fig["layout"]["scene"]["xaxis"]["range"][1] > DS2.n_layers * DS2.layer_mm  # the whole calorimeter


def test_colour_is_log_energy_on_one_scale_and_the_core_is_opaque():
    """Colour = log10(E / MeV) on one scale for every view; higher-energy bands are drawn more opaque."""
    a = _shower(DS2, [10, 20, 30], [0.01, 1.0, 100.0])
    b = _shower(DS2, [40, 50], [0.5, 1000.0])
    fig = shower_figure([("a", [a]), ("b", [b])], DS2, style="markers")
    traces = _cells_traces(fig) + _cells_traces(fig, "scene2")
    scales = {(t["marker"]["cmin"], t["marker"]["cmax"]) for t in traces}
    assert len(scales) == 1 and scales.pop()[1] == pytest.approx(3.0)
    for t in traces:
        assert np.allclose(t["marker"]["color"], np.log10(t["customdata"][:, 3]), atol=1e-6)
    by_energy = sorted((float(t["customdata"][:, 3].max()), t["marker"]["opacity"]) for t in traces)
    assert [o for _, o in by_energy] == sorted(o for _, o in by_energy) and by_energy[-1][1] == 1.0
    assert sum(bool(t["marker"]["showscale"]) for t in traces) == 1  # one colour bar


def test_cells_style_draws_annular_sectors_on_the_cell_bounds():
    """Each mesh vertex lies on its cell's r bounds, inside its α bin and in its layer's depth slab."""
    cells = [1, 9, 200, 367]  # dataset 1: full rings (layer 0) and 36° sectors (layers 1, 2)
    fig = shower_figure([("a", [_shower(DS1, cells, [5.0, 50.0, 500.0, 5000.0])])], DS1, style="cells")
    b = DS1.cell_bounds()
    seen = set()
    for t in _cells_traces(fig):
        assert t["type"] == "mesh3d"
        x, y, z = (np.asarray(t[k], dtype=np.float64) for k in ("x", "y", "z"))
        layer_id = t["customdata"][:, 0].astype(int)
        for c in cells:
            lid = DS1.layer_ids[DS1.cell_layer[c]]
            m = (layer_id == lid) & (t["customdata"][:, 1] == DS1.cell_alpha_bin[c]) & \
                (t["customdata"][:, 2] == DS1.cell_r_bin[c])
            if not m.any():
                continue
            seen.add(c)
            r = np.hypot(y[m], z[m])
            assert np.all(np.isclose(r, b["r_lo"][c], atol=1e-3) | np.isclose(r, b["r_hi"][c], atol=1e-3))
            a = np.arctan2(z[m], y[m])
            if b["alpha_hi"][c] - b["alpha_lo"][c] < 2 * math.pi - 1e-9:
                inside = (a >= b["alpha_lo"][c] - 1e-4) & (a <= b["alpha_hi"][c] + 1e-4)
                assert inside[r > 1e-3].all()
            layer = DS1.cell_layer[c]
            assert x[m].min() > layer and x[m].max() < layer + 1
        n_vert, n_tri = len(x), len(t["i"])
        assert max(max(t["i"]), max(t["j"]), max(t["k"])) < n_vert and n_tri > 0
    assert seen == set(cells)
    ticks = fig["layout"]["scene"]["xaxis"]
    assert ticks["ticktext"] == [str(i) for i in DS1.layer_ids]  # no depths in dataset 1: layers by their id
    assert "no depths" in ticks["title"]["text"]


def test_auto_style_follows_the_geometry():
    """auto: cells for geometries with full-ring layers (dataset 1), markers otherwise."""
    s1 = shower_figure([("a", [_shower(DS1, [1], [5.0])])], DS1)
    s2 = shower_figure([("a", [_shower(DS2, [1], [5.0])])], DS2)
    assert {t["type"] for t in _cells_traces(s1)} == {"mesh3d"}
    assert {t["type"] for t in _cells_traces(s2)} == {"scatter3d"}
    from calopc.cli.display import STYLES as CLI_STYLES

    assert CLI_STYLES == STYLES


def test_slider_shows_one_row_of_showers_at_a_time():
    """Step k of the slider makes visible the outlines and exactly the traces of row k, in every view."""
    rows = [[_shower(DS2, [k * 10 + 1, k * 10 + 2], [1.0, 50.0], index=k) for k in range(3)] for _ in range(2)]
    fig = shower_figure([("ref", rows[0]), ("gen", rows[1])], DS2)
    steps = fig["layout"]["sliders"][0]["steps"]
    assert [s["label"] for s in steps] == ["0", "1", "2"]
    for k, step in enumerate(steps):
        vis = step["args"][0]["visible"]
        shown = [t for t, v in zip(fig["data"], vis) if v and t.get("mode") != "lines"]
        assert {t["scene"] for t in shown} == {"scene", "scene2"}
        cells = {int(c[1]) for t in shown for c in t["customdata"][:, :3].astype(int)}  # alpha bins of the cells
        assert cells == {DS2.cell_alpha_bin[k * 10 + 1], DS2.cell_alpha_bin[k * 10 + 2]}
        assert all(v for t, v in zip(fig["data"], vis) if t.get("mode") == "lines")
        notes = step["args"][1]["annotations"]
        assert [n["text"].split("<br>")[0] for n in notes] == ["<b>ref</b>", "<b>gen</b>"]
        assert f"shower {k}:" in notes[0]["text"]


def test_the_same_showers_read_from_hdf5_parquet_and_showerdata(tmp_path, files):
    """read_showers gives the same cells and energies from voxels, point clouds and a showerdata file."""
    from calopc.converters.showerdata import export_showerdata

    d, inc, sh, _ = files
    export_showerdata(d / "ref.hdf5", tmp_path / "ref.h5", progress=False)
    got = [read_showers(p, [4, 0, -1], threshold=0) for p in (d / "ref.hdf5", d / "ref.parquet", tmp_path / "ref.h5")]
    for g, showers in got:
        assert g == DS2
        assert [s.index for s in showers] == [4, 0, 5]
        for s, row in zip(showers, (4, 0, 5)):
            assert np.array_equal(s.cell, np.flatnonzero(sh[row])) and np.array_equal(s.energy, sh[row][s.cell])
            assert s.incident_energy == inc[row]
    g, official = read_showers(d / "ref.hdf5", [0])  # default: the official threshold
    assert official[0].energy.min() >= DS2.threshold
    assert official[0].cell.size == int((sh[0] >= DS2.threshold).sum())


def test_page_is_self_contained_with_one_copy_of_plotly(tmp_path, files):
    """The HTML embeds plotly.js once and loads nothing from the network; data are binary arrays."""
    d, _, sh, _ = files
    info = write_display(tmp_path / "p.html", [d / "ref.hdf5", d / "gen.hdf5"], indices=[0, 1, 2])
    html = (tmp_path / "p.html").read_text()
    assert info["bytes"] == len(html.encode()) and info["style"] == "markers" and info["indices"] == [0, 1, 2]
    assert not re.search(r"<script[^>]+src=", html)  # nothing to fetch
    assert html.count("plotly.js v") == 1  # the library's banner: one copy
    assert '"bdata"' in html
    assert info["cells"][0] == int((sh[:3] >= DS2.threshold).sum())


def test_show_command(tmp_path, files, capsys):
    d, _, _, _ = files
    out = tmp_path / "s.html"
    assert main(["show", str(d / "ref.hdf5"), str(d / "ref.parquet"), "--index", "1", "-1", "-o", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {out}: showers 1, 5 of 2 files side by side (dataset 2, markers, ")
    assert out.stat().st_size > 4_000_000


@pytest.mark.parametrize(("argv", "message"), [
    (["--index", "6"], "ref.hdf5: shower index 6 is out of range; the file holds 6 showers (0..5, or -1 for the last)"),
    (["-o", "x.png"], "x.png: show writes an HTML page; give a name ending in .html, e.g. {tmp}/x.html"),
    (["--labels", "a", "b"], "--labels needs one label per file: 1 files, 2 labels"),
])
def test_show_errors_are_one_line(tmp_path, files, capsys, argv, message):
    d, _, _, _ = files
    argv = [a if a != "x.png" else str(tmp_path / "x.png") for a in argv]
    assert main(["show", str(d / "ref.hdf5"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("calopc show: error: ")
    assert err.endswith(message.format(tmp=tmp_path))


def test_files_of_different_geometries_are_refused(tmp_path, files):
    d, _, _, _ = files
    inc, sh = generate("1-photons", 2, seed=1)
    write_showers(tmp_path / "ds1.hdf5", inc, sh)
    with pytest.raises(ValueError, match=r"ds1.hdf5: geometry '1-photons' \(368 cells\) differs from .*ref.hdf5's '2'"):
        write_display(tmp_path / "p.html", [d / "ref.hdf5", tmp_path / "ds1.hdf5"], indices=[0])


def test_plotly_is_imported_only_by_the_display():
    """import calopc (and building the CLI) leaves plotly unloaded; the display loads it."""
    code = ("import sys, calopc, calopc.display, calopc.cli; calopc.cli.build_parser(); a = 'plotly' in sys.modules; "
            "from calopc._extras import plotly_io; plotly_io(); print(a, 'plotly' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_evaluate_links_a_page_of_displays(tmp_path, toy_geometry, toy_showers):
    """evaluate --metrics ...,displays writes displays.html beside report.html and links it; without it, no page."""
    from calopc.eval import evaluate

    _, sh = toy_showers
    inc = 1.5 * np.maximum(sh.sum(axis=1), 1.0)
    write_showers(tmp_path / "ref.hdf5", inc, sh)
    write_showers(tmp_path / "gen.hdf5", inc, sh[::-1].copy())
    out = tmp_path / "report"
    res = evaluate(tmp_path / "gen.hdf5", tmp_path / "ref.hdf5", out, geometry=toy_geometry, threshold=0.01,
                   metrics=("pointcloud", "displays"), progress=False)
    assert res["displays"]["path"] == "displays.html" and res["displays"]["indices"] == [0, 1, 2]
    page = (out / "displays.html").read_text()
    assert "\\u003cb\\u003ereference" in page and "\\u003cb\\u003egenerated" in page  # the views' titles
    report = (out / "report.html").read_text()
    assert "<a href='displays.html'>3-D displays</a> of showers 0, 1, 2" in report
    assert json.loads((out / "metrics.json").read_text())["displays"]["bytes"] == len(page.encode())
    evaluate(tmp_path / "gen.hdf5", tmp_path / "ref.hdf5", out, geometry=toy_geometry, threshold=0.01,
             metrics=("pointcloud",), progress=False)
    assert not (out / "displays.html").exists() and "displays.html" not in (out / "report.html").read_text()


_CHECK = """<script>
window.addEventListener('load', function () {
  var out = {};
  function done() {
    var pre = document.createElement('pre'); pre.id = 'display-check';
    pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
  }
  var gd = document.querySelector('.js-plotly-plot');
  if (!gd || !window.Plotly) { out.error = 'no plot'; done(); return; }
  out.traces = gd.data.length;
  out.shown = gd.data.filter(function (t) { return t.visible !== false && t.mode === 'markers'; }).length;
  out.canvases = gd.querySelectorAll('.gl-container canvas').length;
  Plotly.toImage(gd, {format: 'png', width: 1000, height: 500}).then(function (url) {
    var img = new Image();
    img.onload = function () {
      var c = document.createElement('canvas'); c.width = img.width; c.height = img.height;
      var ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
      var d = ctx.getImageData(0, 0, c.width, c.height).data, left = 0, right = 0;
      for (var i = 0; i < d.length; i += 4) {  // red cells (the colour bar sits right of 85 % of the width)
        var x = (i / 4) % c.width;
        if (d[i] > 150 && d[i + 1] < 140 && d[i + 2] < 110) {
          if (x < c.width / 2) { left++; } else if (x < 0.85 * c.width) { right++; }
        }
      }
      out.red = [left, right];
      Plotly.relayout(gd, {'scene.camera': {eye: {x: 2.5, y: 0.1, z: 0.2}, up: {x: 0, y: 0, z: 1}}}).then(function () {
        setTimeout(function () { out.eye2 = gd.layout.scene2.camera.eye; done(); }, 300);
      });
    };
    img.src = url;
  }, function (e) { out.error = String(e); done(); });
});
</script></body>"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install chromium)")
def test_page_draws_both_views_in_a_browser(tmp_path, files):
    """Headless Chromium renders the WebGL views: red (energetic) cells in both, and turning one turns the other."""
    d, _, _, _ = files
    write_display(tmp_path / "p.html", [d / "ref.hdf5", d / "gen.hdf5"], indices=[0, 1])
    page = tmp_path / "check.html"
    page.write_text((tmp_path / "p.html").read_text().replace("</body>", _CHECK))
    (tmp_path / "profile").mkdir()
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=300, check=False).stdout
    found = re.search(r"<pre id=\"display-check\">(.*?)</pre>", dom)
    assert found, dom[-2000:]
    check = json.loads(found.group(1))
    assert "error" not in check, check
    assert check["canvases"] >= 1 and check["shown"] >= 2
    assert min(check["red"]) > 50, check  # neither view is blank
    assert check["eye2"] == {"x": 2.5, "y": 0.1, "z": 0.2}  # the second view followed the first
