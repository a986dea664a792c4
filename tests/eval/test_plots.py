from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("mplhep")

from matplotlib.container import ErrorbarContainer
from matplotlib.patches import StepPatch
from matplotlib.text import Text

from calopc.eval.histograms import FeatureHist
from calopc.eval.plots import (
    PlotContext,
    PlotJob,
    dataset_label,
    feature_info,
    plot_average_maps,
    plot_average_shower,
    plot_feature,
    plot_feature_grid,
    plot_longitudinal,
    plot_response,
    render,
)
from calopc.geometry import Geometry

CTX = PlotContext("CaloChallenge ds2, $e^{-}$", "ref.hdf5", "gen.hdf5", 1000, 900)


def _hist(name: str, edges: np.ndarray, seed: int = 0, *, boost: int | None = None) -> FeatureHist:
    rng = np.random.default_rng(seed)
    n = len(edges) - 1
    ref = rng.poisson(200 * np.exp(-np.linspace(0, 3, n)))
    gen = rng.poisson(180 * np.exp(-np.linspace(0, 3, n)))
    if boost is not None:
        gen[boost] = ref[boost] * 3 + 10  # far above the ratio panel's range
        gen[boost + 1] = 0  # far below
        ref[boost + 1] = max(ref[boost + 1], 5)
    return FeatureHist(name, name, edges, ref, gen, log_x=edges[0] > 0 and edges[-1] / edges[0] > 100)


def _axes(fig):
    ax, rax = fig.axes[0], fig.axes[1]
    return ax, rax


def test_feature_labels_and_scales():
    info = feature_info("E_layer_12")
    assert info.layer == 12 and info.log_x and info.log_y and "[MeV]" in info.xlabel and "MeV$^{-1}$" in info.ylabel
    assert feature_info("EC_x_3").text == "⟨x⟩ in layer 3 [mm]" and feature_info("EC_x_3").log_y
    assert not feature_info("E_ratio").log_y and feature_info("E_ratio").text == "E_dep/E_inc"
    assert feature_info("width_r_7").text == "σr in layer 7 [mm]"
    assert feature_info("voxel_spectrum").log_x and feature_info("voxel_spectrum").log_y
    assert dataset_label(Geometry.calochallenge("2"), tex=False) == "CaloChallenge ds2, e⁻"
    assert dataset_label(Geometry.calochallenge("1-pions"), tex=False) == "CaloChallenge ds1, π⁺"


def test_energy_per_layer_plot_is_log_log_with_units_errors_band_and_arrows():
    fh = _hist("E_layer_5", np.logspace(-2, 4, 40), boost=10)
    fig = plot_feature(fh, CTX)
    ax, rax = _axes(fig)
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "MeV$^{-1}$" in ax.get_ylabel() and "[MeV]" in rax.get_xlabel() and "layer 5" in rax.get_xlabel()
    assert any(isinstance(c, ErrorbarContainer) for c in ax.containers)  # generated error bars
    assert any(isinstance(c, ErrorbarContainer) for c in rax.containers)  # ratio error bars
    # reference uncertainty: a filled band with a per-bin baseline, in the main panel and around 1 in the ratio
    bands = [p for p in rax.patches if isinstance(p, StepPatch) and np.ndim(p.get_data().baseline) == 1]
    assert bands and np.all(np.asarray(bands[0].get_data().baseline) <= 1.0)
    assert any(isinstance(p, StepPatch) and np.ndim(p.get_data().baseline) == 1 for p in ax.patches)
    markers = {ln.get_marker() for ln in rax.lines}
    assert "^" in markers and "v" in markers  # off-scale points marked at the panel edges
    assert rax.get_ylim() == (0.5, 1.5) and rax.get_ylabel() == "gen./ref."
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["reference: ref.hdf5 (N = 1,000)", "generated: gen.hdf5 (N = 900)"]
    titles = {ax.get_title(loc="left"), ax.get_title(loc="right")}
    assert "CaloChallenge ds2, $e^{-}$" in titles and any(t.startswith("S = 0.") for t in titles)


def test_centre_plot_is_log_y_linear_x_and_energy_ratio_linear():
    fig = plot_feature(_hist("EC_x_3", np.linspace(-30, 30, 101)), CTX)
    ax, rax = _axes(fig)
    assert ax.get_xscale() == "linear" and ax.get_yscale() == "log"
    assert "[mm]" in rax.get_xlabel() and "mm$^{-1}$" in ax.get_ylabel()
    lo, hi = ax.get_xlim()
    assert -30 <= lo and hi <= 30
    fig = plot_feature(_hist("E_ratio", np.linspace(0.5, 1.5, 101)), CTX)
    ax, rax = _axes(fig)
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0 and "E_\\mathrm{dep}" in rax.get_xlabel()


def test_layer_page_is_readable():
    hists = [_hist(f"width_r_{k}", np.linspace(0, 20, 101), seed=k) for k in range(9)]
    fig = plot_feature_grid(hists, CTX, "width σr per layer, layers 0–8")
    assert len(fig.axes) == 18
    w, h = fig.get_size_inches()
    assert w == pytest.approx(12.0) and fig.dpi == 100  # 1200 px: shown 1:1 in report.html
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_text() and t.get_visible()]
    assert sizes and min(sizes) >= 8
    assert fig.legends and "N = 1,000" in fig.legends[0].get_texts()[0].get_text()
    assert fig.axes[0].get_title(loc="left") == "layer 0"
    assert all(fig.axes[i].get_ylabel().endswith("[mm$^{-1}$]") for i in range(0, 18, 2))


def test_profiles_have_errors_ratio_and_units():
    ref = np.exp(-np.linspace(0, 4, 10)) * 1e3
    gen = ref * (1 + 0.08 * np.resize([1, -1], 10))
    fig = plot_longitudinal(list(range(10)), (ref, ref * 0.001), (gen, gen * 0.001), CTX)
    ax, rax = _axes(fig)
    assert ax.get_yscale() == "log" and "[MeV]" in ax.get_ylabel() and "layer" in rax.get_xlabel()
    assert any(isinstance(c, ErrorbarContainer) for c in ax.containers)
    assert rax.get_ylim() == pytest.approx((0.9, 1.1))  # adapts to the ±8 % deviations
    stats = {k: np.full(5, v) for k, v in (("mean", 0.8), ("mean_err", 0.01), ("rel_width", 0.1),
                                           ("rel_width_err", 0.005))}
    fig = plot_response(np.logspace(3, 6, 6), stats, stats, CTX)
    assert len(fig.axes) == 4 and fig.axes[0].get_xscale() == "log"
    assert "[MeV]" in fig.axes[1].get_xlabel()


def test_average_shower_maps_and_relative_difference(toy_geometry):
    g = toy_geometry
    rng = np.random.default_rng(2)
    ref = rng.exponential(1.0, g.n_voxels)
    ref[0] = 0.0
    gen = ref * 1.1
    fig = plot_average_shower(ref, gen, g, CTX, show="ratio")
    assert any("(gen. − ref.)/ref." in ax.get_ylabel() for ax in fig.axes)  # the colour bar
    mesh = fig.axes[0].collections[0]
    vals = np.ma.masked_invalid(mesh.get_array())
    assert np.allclose(vals.compressed(), 0.1) and vals.mask.any()  # +10 % everywhere, empty reference cell grey
    with pytest.raises(ValueError, match="show must be one of"):
        plot_average_shower(ref, gen, g, CTX, show="both")
    m = np.abs(rng.standard_normal((3, 4))) + 0.1
    fig = plot_average_maps([("all energies", m, m * 1.2, 10, 10)], np.array([0, 1, 3, 5, 9.0]), [0, 2, 3], CTX)
    assert len(fig.axes) == 6  # three maps with their colour bars
    assert np.allclose(np.ma.masked_invalid(fig.axes[4].collections[0].get_array()).compressed(), 0.2)


def test_parallel_and_serial_rendering_write_the_same_files(tmp_path):
    jobs = [PlotJob(f"E_layer_{k}", plot_feature, (_hist(f"E_layer_{k}", np.logspace(-2, 4, 40), seed=k), CTX))
            for k in range(2)]
    serial = render(jobs, tmp_path / "serial", workers=1, formats=("png", "pdf"))
    parallel = render(jobs, tmp_path / "parallel", workers=2, formats=("png", "pdf"))
    assert serial == parallel == {f"E_layer_{k}": [f"E_layer_{k}.png", f"E_layer_{k}.pdf"] for k in range(2)}
    from PIL import Image

    for k in range(2):
        a = np.asarray(Image.open(tmp_path / "serial" / f"E_layer_{k}.png"))
        b = np.asarray(Image.open(tmp_path / "parallel" / f"E_layer_{k}.png"))
        assert a.shape == b.shape == (560, 640, 4) and np.array_equal(a, b)
    assert not list(tmp_path.rglob("*.part"))
    with pytest.raises(ValueError, match="plot formats"):
        render(jobs, tmp_path, formats=("jpg",))
    with pytest.raises(ValueError, match="plot workers"):
        render(jobs, tmp_path, workers=0)
