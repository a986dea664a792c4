r"""3-D shower displays: the cells of showers drawn in x, y, z on one interactive HTML page.

:func:`write_display` reads a few showers of one or more files (CaloChallenge voxel HDF5, calopc
point-cloud Parquet, or showerdata HDF5), places every hit cell in space with the geometry and
writes one self-contained HTML page (plotly, its JavaScript embedded once: it opens offline).
Each file is one 3-D view, side by side (e.g. reference and generated); a slider picks the
shower, and turning one view turns the others.

Placement: the cell's transverse centre ``x = r·cos α``, ``y = r·sin α`` (mm; r the radial bin
mid-point, α the angular bin centre) and its depth along the horizontal axis: ``z`` in mm for
geometries with a known layer thickness (datasets 2 and 3 and ``hg``: layer *l* spans
``[l, l+1) × 3.4 mm``, :attr:`calopc.geometry.Geometry.z_mm` its centre); dataset 1 records no
depths (its layers are ATLAS samplings of very different thickness), so its layers are drawn one
unit apart, in their order, and the depth axis reads "layer".

Two styles:

* ``markers``: one marker per cell at its centre, its size following the cell's transverse
  extent (``max(Δr, r·Δα)``), drawn with WebGL points: fast and small (about 50 bytes of HTML a cell).
* ``cells``: every cell as its true annular sector (a mesh; wide α bins and full rings are
  curved), about ten times the bytes: what dataset 1's rings and 36° sectors need.
  ``auto`` (default) takes ``cells`` for geometries with full-ring layers (dataset 1), else ``markers``.

Colour is ``log10(E / MeV)`` on one scale for the whole page; the cells are split in three bands
of that scale drawn ever more opaque, so that the core of a shower shows through its halo.

plotly is imported only here (the ``display`` extra): ``import calopc`` stays light.
"""

from __future__ import annotations

__all__ = ["STYLES", "Shower", "read_showers", "shower_figure", "write_display"]

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .geometry import Geometry, resolve_threshold

#: ``style`` choices of :func:`write_display`
STYLES = ("auto", "markers", "cells")
#: opacity of the three log-energy bands (lowest to highest); low energies light yellow, high dark red
_BAND_OPACITY = (0.1, 0.3, 1.0)
_COLORSCALE = "YlOrRd"
#: the colour scale every trace uses: YlOrRd reversed, light yellow (low) to dark red (high)
_SCALE = {"colorscale": _COLORSCALE, "reversescale": True}
_HEIGHT = 640


@dataclass
class Shower:
    """One shower to draw: its hit cells.

    Attributes:
        index: row in its file.
        incident_energy: MeV.
        cell: flat cell indices ``(k,)`` of the cells with energy (at or above the threshold).
        energy: their energies ``(k,)``, MeV, float64.
    """

    index: int
    incident_energy: float
    cell: np.ndarray
    energy: np.ndarray


# ----------------------------------------------------------------------------- reading
def _positions(indices: list[int], n: int, path: Path) -> list[int]:
    out = []
    for i in indices:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            msg = (f"{path}: shower index {i} is out of range; the file holds {n} showers (0..{n - 1}, or -1 for "
                   "the last)")
            raise ValueError(msg)
        out.append(j)
    return out


def read_showers(path: str | os.PathLike, indices: list[int] | tuple[int, ...], *, geometry: Geometry | None = None,
                 threshold: float | str | None = "official", collisions: str = "auto"
                 ) -> tuple[Geometry, list[Shower]]:
    """The showers ``indices`` (negative: from the end) of one file, as hit cells.

    Args:
        path: CaloChallenge voxel HDF5, calopc point-cloud Parquet, or a showerdata HDF5 file.
        indices: rows to read, in the order to draw them.
        geometry: instead of the detected one (HDF5), the file's metadata (Parquet) or the
            ``calopc`` group (showerdata); required for showerdata files from other writers.
        threshold: cells with less energy (MeV) are not drawn; ``"official"`` (default): the
            dataset's readout threshold.
        collisions: policy for points without a cell index (model output), as in ``calopc voxelize``.

    Returns:
        ``(geometry, showers)``.

    Raises:
        ValueError: an index outside the file (the message names the file and its size); invalid input
            (:class:`~calopc.hdf5.ShowerFileError`).
    """
    from .converters import open_points, points_to_voxels
    from .converters.showerdata import is_showerdata, open_showerdata
    from .converters.sources import has_glob, is_parquet
    from .hdf5 import open_showers

    path = Path(path)
    idx = list(indices)
    if path.is_dir() or (not path.exists() and has_glob(path)) or is_parquet(path):
        with open_points(path, geometry=geometry) as f:
            g = f.geometry
            want = _positions(idx, len(f), path)
            rows: dict[int, Any] = {}
            start = 0
            for chunk in f.iterate(max(1, min(2000, (64 << 20) // (8 * g.n_voxels)))):
                stop = start + len(chunk)
                for j in {j for j in want if start <= j < stop}:
                    rows[j] = chunk[j - start:j - start + 1]
                start = stop
                if len(rows) == len(set(want)):
                    break
        import awkward as ak

        events = ak.concatenate([rows[j] for j in want])
        inc = np.asarray(events["incident_energy"], dtype=np.float64)
        thr = resolve_threshold(threshold, g)
        dense = points_to_voxels(events, g, collisions=collisions, threshold=thr, dtype=np.float64)
    elif is_showerdata(path):
        with open_showerdata(path) as f:
            g = f.target_geometry(geometry)
            want = _positions(idx, len(f), path)
            thr = resolve_threshold(threshold, g)
            got: dict[int, tuple[float, np.ndarray, np.ndarray]] = {}
            step = max(1, min(2000, (64 << 20) // (8 * g.n_voxels)))
            for a, inc_c, counts, cell, e, _ in f.cells(g, collisions=collisions, threshold=thr, dtype=np.float64,
                                                         step=step):
                offs = np.concatenate([[0], np.cumsum(counts)])
                for j in {j for j in want if a <= j < a + counts.shape[0]}:
                    k = j - a
                    got[j] = (float(inc_c[k]), cell[offs[k]:offs[k + 1]], e[offs[k]:offs[k + 1]])
                if len(got) == len(set(want)):
                    break
        showers = [Shower(index=j, incident_energy=got[j][0], cell=got[j][1].astype(np.int64),
                          energy=got[j][2].astype(np.float64)) for j in want]
        return g, showers
    else:
        with open_showers(path, geometry=geometry) as f:
            g = f.geometry
            want = _positions(idx, len(f), path)
            thr = resolve_threshold(threshold, g)
            lo, hi = min(want), max(want) + 1
            if hi - lo <= max(len(want), 256):  # one read of the span (its gzip chunks inflated once)
                inc, dense = f.read(lo, hi)
                inc, dense = inc[[j - lo for j in want]], dense[[j - lo for j in want]]
            else:
                parts = [f.read(j, j + 1) for j in want]
                inc = np.concatenate([p[0] for p in parts])
                dense = np.concatenate([p[1] for p in parts])
        inc = np.asarray(inc, dtype=np.float64)
        dense = np.asarray(dense, dtype=np.float64)
        if thr > 0:
            dense = np.where(dense >= thr, dense, 0.0)
    showers = []
    for k, j in enumerate(want):
        cell = np.flatnonzero(dense[k] > 0)
        showers.append(Shower(index=j, incident_energy=float(inc[k]), cell=cell, energy=dense[k, cell]))
    return g, showers


# ----------------------------------------------------------------------------- geometry of the drawing
@dataclass
class _Frame:
    """How a geometry is placed in the plot: depth of every layer, transverse size, aspect."""

    depth_lo: np.ndarray  # (n_layers,) front of each layer, plot units
    depth_hi: np.ndarray
    depth_title: str
    r_max: np.ndarray  # (n_layers,) outer radius, mm
    px_per_mm: float
    aspect_depth: float


def _frame(g: Geometry, columns: int) -> _Frame:
    r_max = np.array([e[-1] for e in g.r_edges], dtype=np.float64)
    rr = float(r_max.max())
    if g.layer_mm is not None:
        pitch = float(g.layer_mm)
        lo = np.arange(g.n_layers) * pitch
        title = "depth z (mm)"
        depth = g.n_layers * pitch
        aspect = min(3.0, max(0.5, depth / (2 * rr)))
        extent = max(depth, 2 * rr)
    else:  # dataset 1: no depths in the dataset; one unit per layer
        pitch = 1.0
        lo = np.arange(g.n_layers, dtype=np.float64)
        title = "layer (no depths in the dataset)"
        aspect = 1.5
        extent = 2 * rr
    gap = 0.08 * pitch  # a thin gap between layers keeps them apart in the cell style
    plot_px = 0.8 * min(_HEIGHT, 1300 / max(1, columns))
    return _Frame(lo + gap / 2, lo + pitch - gap / 2, title, r_max, plot_px / extent, aspect)


def _cell_tables(g: Geometry) -> dict[str, np.ndarray]:
    b = g.cell_bounds()
    return {"r": g.cell_r, "alpha": g.cell_alpha, "layer": g.cell_layer, "r_lo": b["r_lo"], "r_hi": b["r_hi"],
            "a_lo": b["alpha_lo"], "a_hi": b["alpha_hi"], "a_bin": g.cell_alpha_bin, "r_bin": g.cell_r_bin}


def _style(style: str, g: Geometry) -> str:
    if style not in STYLES:
        msg = f"style must be one of {', '.join(STYLES)}, got {style!r}"
        raise ValueError(msg)
    if style == "auto":
        return "cells" if min(g.n_alpha) == 1 else "markers"
    return style


# ----------------------------------------------------------------------------- traces
def _customdata(g: Geometry, t: dict, cell: np.ndarray, e: np.ndarray) -> np.ndarray:
    """``(k, 4)`` float32: XML layer id, α bin, r bin, E (MeV) for the hover text."""
    ids = np.asarray(g.layer_ids)
    return np.stack([ids[t["layer"][cell]], t["a_bin"][cell], t["r_bin"][cell], e], axis=1).astype(np.float32)


_HOVER = ("layer %{customdata[0]:.0f}, α bin %{customdata[1]:.0f}, r bin %{customdata[2]:.0f}<br>"
          "E = %{customdata[3]:.4g} MeV<extra></extra>")


def _marker_trace(g: Geometry, t: dict, fr: _Frame, cell: np.ndarray, e: np.ndarray, logc: tuple[float, float],
                  scene: str, opacity: float, show_scale: bool) -> dict:
    r, a, layer = t["r"][cell], t["alpha"][cell], t["layer"][cell]
    na = np.asarray(g.n_alpha)[layer]
    dr = t["r_hi"][cell] - t["r_lo"][cell]
    arc = np.where(na > 1, r * (t["a_hi"][cell] - t["a_lo"][cell]), 0.0)
    size = np.clip(0.6 * np.maximum(dr, arc) * fr.px_per_mm, 2, 14).astype(np.uint8)
    depth = 0.5 * (fr.depth_lo + fr.depth_hi)[layer]
    return {
        "type": "scatter3d", "mode": "markers", "scene": scene,
        "x": depth.astype(np.float32), "y": (r * np.cos(a)).astype(np.float32), "z": (r * np.sin(a)).astype(np.float32),
        "marker": {"size": size, "color": np.log10(e).astype(np.float32), **_SCALE,
                   "cmin": logc[0], "cmax": logc[1], "opacity": opacity, "line": {"width": 0},
                   "showscale": show_scale, "colorbar": _COLORBAR},
        "customdata": _customdata(g, t, cell, e), "hovertemplate": _HOVER, "showlegend": False,
    }


_COLORBAR = {"title": {"text": "log<sub>10</sub>(E / MeV)", "side": "right"}, "thickness": 14, "len": 0.6}


def _mesh_trace(g: Geometry, t: dict, fr: _Frame, cell: np.ndarray, e: np.ndarray, logc: tuple[float, float],
                scene: str, opacity: float, show_scale: bool) -> dict:
    """Every cell as its annular sector: ``n_seg`` flat pieces per cell (one per ≤ 7.5° of α)."""
    xs, ys, zs, vals, cds, faces = [], [], [], [], [], []
    base = 0
    width = t["a_hi"][cell] - t["a_lo"][cell]
    nseg = np.maximum(1, np.ceil(width / (2 * math.pi / 48) - 1e-9)).astype(np.int64)
    cd_all = _customdata(g, t, cell, e)
    loge = np.log10(e)
    for s in np.unique(nseg):
        m = nseg == s
        c = cell[m]
        k = c.shape[0]
        full = width[m] >= 2 * math.pi - 1e-9
        ang = t["a_lo"][c][:, None] + (t["a_hi"][c] - t["a_lo"][c])[:, None] * np.linspace(0, 1, s + 1)[None, :]
        layer = t["layer"][c]
        # vertices per cell: angle j (0..s), radius (lo, hi), depth (lo, hi): index ((j * 2 + ri) * 2 + zi)
        rad = np.stack([t["r_lo"][c], t["r_hi"][c]], axis=1)  # (k, 2)
        dep = np.stack([fr.depth_lo[layer], fr.depth_hi[layer]], axis=1)  # (k, 2)
        shape = (k, s + 1, 2, 2)
        rr = np.broadcast_to(rad[:, None, :, None], shape)
        aa = np.broadcast_to(ang[:, :, None, None], shape)
        dd = np.broadcast_to(dep[:, None, None, :], shape)
        xs.append(dd.reshape(-1))
        ys.append((rr * np.cos(aa)).reshape(-1))
        zs.append((rr * np.sin(aa)).reshape(-1))
        nv = (s + 1) * 4
        vals.append(np.repeat(loge[m], nv))
        cds.append(np.repeat(cd_all[m], nv, axis=0))

        def v(j: np.ndarray | int, ri: int, zi: int) -> np.ndarray:
            return (np.asarray(j) * 2 + ri) * 2 + zi

        j = np.arange(s)
        quads = [  # (4 corner indices per segment): front/back faces, outer and inner walls
            (v(j, 0, 0), v(j, 1, 0), v(j + 1, 1, 0), v(j + 1, 0, 0)),
            (v(j, 0, 1), v(j, 1, 1), v(j + 1, 1, 1), v(j + 1, 0, 1)),
            (v(j, 1, 0), v(j + 1, 1, 0), v(j + 1, 1, 1), v(j, 1, 1)),
            (v(j, 0, 0), v(j + 1, 0, 0), v(j + 1, 0, 1), v(j, 0, 1)),
        ]
        caps = [(v(0, 0, 0), v(0, 1, 0), v(0, 1, 1), v(0, 0, 1)), (v(s, 0, 0), v(s, 1, 0), v(s, 1, 1), v(s, 0, 1))]
        per_cell = np.concatenate([np.stack([q[0], q[1], q[2], q[0], q[2], q[3]], axis=-1).reshape(-1, 3)
                                   for q in quads])  # (4 s * 2, 3) triangles
        cap_tris = np.concatenate([np.array([[q[0], q[1], q[2]], [q[0], q[2], q[3]]]) for q in caps])
        offs = base + np.arange(k, dtype=np.int64)[:, None, None] * nv
        faces.append((per_cell[None] + offs).reshape(-1, 3))
        if (~full).any():
            faces.append((cap_tris[None] + offs[~full]).reshape(-1, 3))
        base += k * nv
    f = np.concatenate(faces) if faces else np.zeros((0, 3), dtype=np.int64)
    itype = np.uint16 if base < 1 << 16 else np.uint32
    return {
        "type": "mesh3d", "scene": scene,
        "x": np.concatenate(xs).astype(np.float32), "y": np.concatenate(ys).astype(np.float32),
        "z": np.concatenate(zs).astype(np.float32),
        "i": f[:, 0].astype(itype), "j": f[:, 1].astype(itype), "k": f[:, 2].astype(itype),
        "intensity": np.concatenate(vals).astype(np.float32), "intensitymode": "vertex", **_SCALE,
        "cmin": logc[0], "cmax": logc[1], "opacity": opacity, "flatshading": True, "showscale": show_scale,
        "colorbar": _COLORBAR, "customdata": np.concatenate(cds), "hovertemplate": _HOVER, "showlegend": False,
        "lighting": {"ambient": 0.75, "diffuse": 0.4, "specular": 0.05},
    }


def _outline(g: Geometry, fr: _Frame, scene: str) -> dict:
    """Thin lines marking the calorimeter: the outer circle of the first and last layer, four lines along the
    depth through every layer's outer radius, and the beam axis."""
    phi = np.linspace(0, 2 * math.pi, 73)
    xs, ys, zs = [], [], []

    def add(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> None:
        xs.extend([*x, None])
        ys.extend([*y, None])
        zs.extend([*z, None])

    for layer, d in ((0, fr.depth_lo[0]), (g.n_layers - 1, fr.depth_hi[-1])):
        rr = fr.r_max[layer]
        add(np.full(phi.shape, d), rr * np.cos(phi), rr * np.sin(phi))
    steps_d = np.stack([fr.depth_lo, fr.depth_hi], axis=1).reshape(-1)
    steps_r = np.repeat(fr.r_max, 2)
    for a in (0, math.pi / 2, math.pi, 3 * math.pi / 2):
        add(steps_d, steps_r * math.cos(a), steps_r * math.sin(a))
    length = fr.depth_hi[-1] - fr.depth_lo[0]
    add(np.array([fr.depth_lo[0] - 0.1 * length, fr.depth_hi[-1] + 0.05 * length]), np.zeros(2), np.zeros(2))
    return {"type": "scatter3d", "mode": "lines", "scene": scene, "x": xs, "y": ys, "z": zs,
            "line": {"color": "rgba(90,90,90,0.45)", "width": 2}, "hoverinfo": "skip", "showlegend": False}


def _energy_text(mev: float) -> str:
    return f"{mev / 1000:.4g} GeV" if mev >= 1000 else f"{mev:.4g} MeV"


def shower_figure(columns: list[tuple[str, list[Shower]]], geometry: Geometry, *, style: str = "auto",
                  title: str = "") -> dict:
    """The plotly figure (a dict: ``data``, ``layout``) of showers, one 3-D view per column, a slider over rows.

    Args:
        columns: ``(label, showers)`` per view; every column holds the same number of showers
            (row *k* of every column is shown together).
        geometry: the showers' geometry.
        style: ``"markers"``, ``"cells"`` or ``"auto"`` (see the module docstring).
        title: the figure's title.

    Returns:
        The figure as a dict (what :func:`plotly.io.to_html` takes); numpy arrays are written as
        binary (base64) arrays.
    """
    if not columns:
        msg = "no showers to draw"
        raise ValueError(msg)
    rows = len(columns[0][1])
    if any(len(s) != rows for _, s in columns):
        msg = f"every column needs the same number of showers, got {[len(s) for _, s in columns]}"
        raise ValueError(msg)
    style = _style(style, geometry)
    ncol = len(columns)
    fr = _frame(geometry, ncol)
    t = _cell_tables(geometry)
    pooled = np.concatenate([s.energy for _, ss in columns for s in ss] + [np.zeros(0)])
    pooled = pooled[pooled > 0]
    if pooled.size:
        logc = (float(np.log10(np.percentile(pooled, 1))), float(np.log10(pooled.max())))
    else:
        logc = (-3.0, 3.0)
    if logc[1] - logc[0] < 1e-6:
        logc = (logc[0] - 0.5, logc[1] + 0.5)
    cuts = np.linspace(logc[0], logc[1], len(_BAND_OPACITY) + 1)
    make = _mesh_trace if style == "cells" else _marker_trace

    data: list[dict] = []
    owner: list[int] = []  # row of each trace; -1: always visible
    for c in range(ncol):
        data.append(_outline(geometry, fr, _scene(c)))
        owner.append(-1)
    first_scale = True
    for k in range(rows):
        for c, (_, showers) in enumerate(columns):
            s = showers[k]
            band = np.clip(np.searchsorted(cuts, np.log10(np.maximum(s.energy, 1e-300)), side="right") - 1,
                           0, len(_BAND_OPACITY) - 1)
            for b, opacity in enumerate(_BAND_OPACITY):
                m = band == b
                if not m.any():
                    continue
                tr = make(geometry, t, fr, s.cell[m], s.energy[m], logc, _scene(c), opacity, first_scale)
                first_scale = False
                tr["visible"] = k == 0
                data.append(tr)
                owner.append(k)
    if first_scale:  # nothing drawn at all: keep a colour bar so the page explains itself
        data.append({"type": "scatter3d", "mode": "markers", "scene": _scene(0), "x": [None], "y": [None],
                     "z": [None], "marker": {"color": [logc[0]], **_SCALE, "cmin": logc[0],
                                             "cmax": logc[1], "showscale": True, "colorbar": _COLORBAR},
                     "showlegend": False, "hoverinfo": "skip"})
        owner.append(-1)

    def notes(k: int) -> list[dict]:
        out = []
        for c, (label, showers) in enumerate(columns):
            s = showers[k]
            text = (f"<b>{label}</b><br>shower {s.index}: E<sub>inc</sub> {_energy_text(s.incident_energy)}, "
                    f"{s.cell.size} cells, E<sub>dep</sub> {_energy_text(float(s.energy.sum()))}")
            out.append({"text": text, "x": (c + 0.5) / ncol, "y": 1.0, "xref": "paper", "yref": "paper",
                        "xanchor": "center", "yanchor": "bottom", "showarrow": False, "font": {"size": 13}})
        return out

    steps = []
    for k in range(rows):
        visible = [o == -1 or o == k for o in owner]
        label = str(columns[0][1][k].index)
        steps.append({"method": "update", "label": label, "args": [{"visible": visible}, {"annotations": notes(k)}]})
    r_out = float(fr.r_max.max()) * 1.05
    depth_range = [float(fr.depth_lo[0] - 0.1 * (fr.depth_hi[-1] - fr.depth_lo[0])),
                   float(fr.depth_hi[-1] + 0.05 * (fr.depth_hi[-1] - fr.depth_lo[0]))]
    layout: dict[str, Any] = {
        "height": _HEIGHT, "margin": {"l": 10, "r": 10, "t": 80 if title else 60, "b": 10},
        "annotations": notes(0), "paper_bgcolor": "white",
        "sliders": [{"active": 0, "steps": steps, "currentvalue": {"prefix": "shower "}, "pad": {"t": 10},
                     "len": 0.9, "x": 0.05}] if rows > 1 else [],
    }
    if title:
        layout["title"] = {"text": title, "x": 0.5, "y": 0.98, "yanchor": "top"}
    ticks: dict[str, Any] = {}
    if geometry.layer_mm is None:  # no depths: each layer labelled by its id at its centre
        ticks = {"tickvals": (0.5 * (fr.depth_lo + fr.depth_hi)).tolist(),
                 "ticktext": [str(i) for i in geometry.layer_ids]}
    for c in range(ncol):
        layout[_scene(c)] = {
            "domain": {"x": [c / ncol, (c + 1) / ncol], "y": [0.04 if rows > 1 else 0, 0.93]},
            "xaxis": {"title": {"text": fr.depth_title}, "range": depth_range, "backgroundcolor": "#f4f4f4",
                      **ticks},
            "yaxis": {"title": {"text": "x (mm)"}, "range": [-r_out, r_out], "backgroundcolor": "#f4f4f4"},
            "zaxis": {"title": {"text": "y (mm)"}, "range": [-r_out, r_out], "backgroundcolor": "#f4f4f4"},
            "aspectmode": "manual", "aspectratio": {"x": fr.aspect_depth, "y": 1, "z": 1},
            "camera": {"eye": {"x": 0.45, "y": -2.3, "z": 1.0}, "up": {"x": 0, "y": 0, "z": 1}},
        }
    return {"data": data, "layout": layout}


_TYPED = {"float32": "f4", "float64": "f8", "int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2",
          "int32": "i4", "uint32": "u4"}


def _binary(obj: Any) -> Any:
    """``obj`` with every numpy array as a plotly.js typed array (``{"dtype", "bdata"[, "shape"]}``, base64).

    plotly.js decodes these into typed arrays: a float32 coordinate costs 5.3 bytes of HTML, not ~10
    as decimal text, and the page parses faster.
    """
    import base64

    if isinstance(obj, dict):
        return {k: _binary(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_binary(v) for v in obj]
    if isinstance(obj, np.ndarray):
        a = obj
        if a.dtype.name not in _TYPED:
            a = a.astype(np.float64 if a.dtype.kind == "f" else np.int32)
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        out = {"dtype": _TYPED[a.dtype.name], "bdata": base64.b64encode(a.tobytes()).decode("ascii")}
        if a.ndim > 1:
            out["shape"] = ",".join(str(d) for d in a.shape)
        return out
    return obj


def _scene(c: int) -> str:
    return "scene" if c == 0 else f"scene{c + 1}"


#: turning (or zooming) one view turns the others the same way
_SYNC_JS = """
(function () {
  var gd = document.getElementById('{plot_id}');
  if (!gd || !gd.on) { return; }
  var busy = false;
  gd.on('plotly_relayout', function (ev) {
    if (busy) { return; }
    var cam = null, src = null;
    Object.keys(ev).forEach(function (k) {
      var m = k.match(/^(scene[0-9]*)\\.camera$/);
      if (m) { cam = ev[k]; src = m[1]; }
    });
    if (!cam) { return; }
    var upd = {};
    Object.keys(gd._fullLayout).forEach(function (s) {
      if (/^scene[0-9]*$/.test(s) && s !== src) { upd[s + '.camera'] = cam; }
    });
    busy = true;
    Plotly.relayout(gd, upd).then(function () { busy = false; }, function () { busy = false; });
  });
})();
"""


def write_display(output: str | os.PathLike, files: list[str | os.PathLike], *, indices: list[int] | None = None,
                  labels: list[str] | None = None, geometry: Geometry | None = None,
                  threshold: float | str | None = "official", style: str = "auto", collisions: str = "auto",
                  title: str | None = None) -> dict:
    """Write an HTML page of 3-D shower displays, one view per file side by side, a slider over the showers.

    Args:
        output: the HTML file (written under a temporary name, renamed when complete).
        files: one to four shower files (voxel HDF5, calopc Parquet, showerdata HDF5) of one geometry.
        indices: the showers (rows) to draw from every file; default: the first five (or fewer).
        labels: one title per view (default: the file names).
        geometry: instead of the detected one (or the files' metadata).
        threshold: cells with less energy (MeV) are not drawn; ``"official"``: the readout threshold.
        style: ``"auto"``, ``"markers"`` or ``"cells"`` (see the module docstring).
        collisions: policy for points without a cell (model output), as ``calopc voxelize``.
        title: the page's title (default: a line naming the geometry).

    Returns:
        ``{"path", "bytes", "geometry", "style", "indices", "cells"}``: what was written (``cells``:
        drawn cells per view, summed over the showers).

    Raises:
        ModuleNotFoundError: plotly is missing (``pip install 'calopc[display]'``).
        ValueError: files of different geometries, more than four files, a bad style, an index outside a file.
    """
    from ._extras import plotly_io
    from ._safety import atomic_output, check_not_input

    pio = plotly_io()
    files = [Path(p) for p in files]
    if not 1 <= len(files) <= 4:
        msg = f"give one to four shower files (one view each), got {len(files)}"
        raise ValueError(msg)
    if labels is not None and len(labels) != len(files):
        msg = f"give one label per file: {len(files)} files, {len(labels)} labels"
        raise ValueError(msg)
    output = Path(output)
    check_not_input(output, files)
    if indices is None:
        indices = list(range(max(1, min(5, _rows(files[0], geometry)))))
    if not indices:
        msg = "no shower indices given"
        raise ValueError(msg)
    columns = []
    g0: Geometry | None = None
    for k, p in enumerate(files):
        g, showers = read_showers(p, indices, geometry=geometry, threshold=threshold, collisions=collisions)
        if g0 is not None and g != g0:
            msg = (f"{p}: geometry {g.name!r} ({g.n_voxels} cells) differs from {files[0]}'s {g0.name!r} "
                   f"({g0.n_voxels} cells); every view must show one geometry")
            raise ValueError(msg)
        g0 = g
        columns.append((labels[k] if labels is not None else p.name, showers))
    assert g0 is not None
    chosen = _style(style, g0)
    label = g0.name if not g0.name[0].isdigit() else f"dataset {g0.name}"
    fig = shower_figure(columns, g0, style=chosen,
                        title=title if title is not None else f"calopc showers, {label} ({g0.n_voxels} cells)")
    html = pio.to_html(_binary(fig), include_plotlyjs=True, full_html=True, post_script=_SYNC_JS, validate=False,
                       config={"responsive": True, "displaylogo": False}, default_width="100%",
                       default_height=f"{_HEIGHT}px")
    with atomic_output(output, expected_bytes=len(html)) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return {"path": str(output), "bytes": len(html.encode()), "geometry": g0.name, "style": chosen,
            "indices": [s.index for s in columns[0][1]], "cells": [int(sum(s.cell.size for s in ss))
                                                                   for _, ss in columns]}


def _rows(path: Path, geometry: Geometry | None) -> int:
    """Number of showers in a file (cheap: metadata only)."""
    from .converters import open_points
    from .converters.showerdata import is_showerdata, open_showerdata
    from .converters.sources import has_glob, is_parquet
    from .hdf5 import open_showers

    if path.is_dir() or (not path.exists() and has_glob(path)) or is_parquet(path):
        with open_points(path, geometry=geometry) as f:
            return len(f)
    if is_showerdata(path):
        with open_showerdata(path) as f:
            return len(f)
    with open_showers(path, geometry=geometry) as f:
        return len(f)
