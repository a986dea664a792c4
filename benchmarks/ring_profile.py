r"""The inner rings of a layer, generated against reference: hits, energy shares and their energy order.

The radial centre of energy (EC_r) of the core layers is the worst feature of every family in the
fidelity table. This script looks at where it comes from, per quartile of the incident energy (of the
reference) and for the chosen layers:

* ``hits k``: mean number of hit cells of ring ``k`` (``r`` bin ``k``; a full ring has ``n_alpha`` hits);
* ``full 0``: share of the showers whose innermost ring is full;
* ``E share k``: mean share of the layer's energy in ring ``k``;
* ``order``: share of the showers (with hits in both rings) in which some cell of ring 1 holds more energy
  than some cell of ring 0 (0: the rings are strictly ordered in energy).

Files are CaloChallenge HDF5 files of the same geometry (read whole: use a few thousand showers).

Usage::

    python benchmarks/ring_profile.py --reference ref.hdf5 --generated cpf=gen_cpf.hdf5 dt=gen_dt.hdf5 \
        --dataset 2 --layers 5 10 --out benchmarks/results/ring-profile-ds2.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def ring_profile(e_inc: np.ndarray, showers: np.ndarray, geometry, layers: list[int], edges: np.ndarray,
                 rings: int = 2) -> dict[int, list[dict]]:
    """Per layer, one dict per incident-energy bin (``edges``): ``hits``, ``full0``, ``share``, ``order``,
    ``n`` (see the module docstring)."""
    cell_layer = np.asarray(geometry.cell_layer)
    r_bin = np.asarray(geometry.cell_r_bin)
    out: dict[int, list[dict]] = {}
    for lay in layers:
        if not 0 <= lay < geometry.n_layers:
            msg = f"layer {lay}: the geometry {geometry.name!r} has layers 0-{geometry.n_layers - 1}"
            raise ValueError(msg)
        n_a = geometry.n_alpha[lay]
        if geometry.n_r[lay] < 2:
            msg = f"layer {lay} has {geometry.n_r[lay]} radial bin(s); the ring profile needs at least 2"
            raise ValueError(msg)
        cols = [np.flatnonzero((cell_layer == lay) & (r_bin == k)) for k in range(min(rings, geometry.n_r[lay]))]
        layer_e = showers[:, cell_layer == lay].sum(1)
        rows = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = (e_inc >= lo) & (e_inc <= hi) & (layer_e > 0)
            ring = [showers[sel][:, c] for c in cols]                        # (n, n_alpha) each
            tot = layer_e[sel]
            hits = [float((r > 0).sum(1).mean()) if len(tot) else float("nan") for r in ring]
            share = [float((r.sum(1) / tot).mean()) if len(tot) else float("nan") for r in ring]
            both = ((ring[0] > 0).any(1) & (ring[1] > 0).any(1))
            min0 = np.where(ring[0] > 0, ring[0], np.inf).min(1)
            order = float((ring[1].max(1) > min0)[both].mean()) if both.any() else float("nan")
            full0 = float(((ring[0] > 0).sum(1) == n_a).mean()) if len(tot) else float("nan")
            rows.append({"e_lo": float(lo), "e_hi": float(hi), "n": int(sel.sum()), "hits": hits, "full0": full0,
                         "share": share, "order": order})
        out[lay] = rows
    return out


def _read(path: str, geometry):
    from calopc.hdf5 import open_showers

    with open_showers(path, geometry=geometry) as f:
        e, s = f.read()
    return np.asarray(e, dtype=np.float64).reshape(-1), np.asarray(s, dtype=np.float64)


def markdown(profiles: dict[str, dict[int, list[dict]]]) -> str:
    names = list(profiles)
    layers = list(profiles[names[0]])
    lines = []
    for lay in layers:
        lines += [f"**Layer {lay}** (per quartile of the reference's incident energy, low to high)", "",
                  "| sample | E_inc quartile | hits 0 / 1 | full 0 | E share 0 / 1 | order |", "|---|---|---|---|---|---|"]
        for q in range(len(profiles[names[0]][lay])):
            for name in names:
                r = profiles[name][lay][q]
                lines.append(f"| {name} | {q + 1} ({r['e_lo']:.3g}–{r['e_hi']:.3g} MeV) | {r['hits'][0]:.1f} / "
                             f"{r['hits'][1]:.1f} | {r['full0']:.2f} | {r['share'][0]:.3f} / {r['share'][1]:.3f} | "
                             f"{r['order']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from calopc.geometry import Geometry

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="reference (held-out) showers, HDF5")
    ap.add_argument("--generated", nargs="+", required=True, metavar="NAME=PATH", help="generated showers, HDF5")
    ap.add_argument("--dataset", default="2", help="CaloChallenge dataset of the files (default: %(default)s)")
    ap.add_argument("--layers", type=int, nargs="+", default=[5, 10], help="layers (default: %(default)s)")
    ap.add_argument("--bins", type=int, default=4, help="incident-energy quantile bins (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown table here (and .json beside it)")
    a = ap.parse_args(argv)
    geometry = Geometry.calochallenge(a.dataset)
    e_ref, s_ref = _read(a.reference, geometry)
    edges = np.quantile(e_ref, np.linspace(0, 1, a.bins + 1))
    profiles = {"reference": ring_profile(e_ref, s_ref, geometry, a.layers, edges)}
    for spec in a.generated:
        name, sep, path = spec.partition("=")
        if not sep:
            ap.error(f"--generated {spec!r}: expected NAME=PATH")
        profiles[name] = ring_profile(*_read(path, geometry), geometry, a.layers, edges)
    md = markdown(profiles)
    print(md)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".json").write_text(json.dumps({"reference": a.reference, "generated": a.generated,
                                                           "dataset": a.dataset, "profiles": profiles}, indent=1))
        a.out.write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
