r"""Compare several generators with one reference: the multi-class log-posterior and a leaderboard.

**Multi-class log-posterior** (CaloChallenge results paper): one DNN is trained to tell apart the
reference and the ``k`` generated samples at once (``k + 1`` classes, cross-entropy); its inputs are
``[log10 E_inc, voxels / E_inc]`` (thresholded voxels, as the ``cls-low`` classifier), its hidden
layers ``2 × 2048`` with LeakyReLU. Each class is split 60/20/20 % (train / test / validation, equal
class sizes: every sample is cut to the smallest); the epoch with the lowest test cross-entropy is
kept. On the validation showers of class ``j`` the mean of ``log p(class i | shower)`` gives the entry
``(j, i)`` of the matrix; mean ± standard deviation over ``runs`` trainings with different seeds.
A generator indistinguishable from the reference has ``⟨log p(ref | gen)⟩ ≈ ⟨log p(gen | gen)⟩``;
``k + 1`` identical samples give ``log 1/(k + 1)`` everywhere, clearly different ones a dominant diagonal.

**Leaderboard**: :func:`calopc.eval.evaluate` of each generator against the reference (AUC low/high,
FPD/KPD, separation powers, point-cloud collisions), plus the generation time and collision share
when the file carries them (HDF5 attributes or the ``calopc.info`` Parquet metadata, keys
:data:`TIME_KEYS` and :data:`COLLISION_KEYS`) or the caller passes them (``extra``).

``calopc compare REF GEN1 GEN2 ... -o DIR`` (:mod:`calopc.cli.eval`) writes ``compare.json``, ``log_posterior.png`` (heat map),
``report.html`` (sortable leaderboard, matrix table, links to each generator's own report) and one
``calopc evaluate`` folder per generator.
"""

from __future__ import annotations

__all__ = [
    "COLLISION_KEYS",
    "TIME_KEYS",
    "LogPosterior",
    "MultiClassConfig",
    "compare",
    "file_metadata",
    "log_posterior_matrix",
    "multiclass_inputs",
    "parse_generated",
]

import html
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

#: metadata keys read as the generation time: total seconds, or milliseconds per shower
TIME_KEYS = ("generation_time_s", "time_per_shower_ms")
#: metadata keys read as the share of points that collided when they were put into cells
COLLISION_KEYS = ("collision_rate", "collision_share")
#: the evaluate metrics behind the leaderboard
LEADERBOARD_METRICS = ("hist", "cls-low", "cls-high", "fpd", "kpd", "pointcloud")


@dataclass(frozen=True)
class MultiClassConfig:
    hidden: tuple[int, ...] = (2048, 2048)  # hidden layer widths (LeakyReLU)
    lr: float = 2e-4  # Adam learning rate
    batch_size: int = 1000  # showers per step
    epochs: int = 50  # at most; the epoch with the lowest test cross-entropy is kept
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train, test (epoch selection), validation per class
    dtype: str = "float32"  # network and input precision


@dataclass
class LogPosterior:
    """⟨log p(class i | shower of class j)⟩: ``mean[j, i]`` and ``std[j, i]`` over the runs."""

    names: list[str]  # class names; the reference first
    mean: np.ndarray  # (K, K)
    std: np.ndarray  # (K, K), nan for one run
    runs: list[np.ndarray]  # one (K, K) matrix per training
    n_per_class: int  # showers per class used (train + test + validation)
    n_validation: int  # validation showers per class

    def as_dict(self) -> dict:
        return {"names": self.names, "mean": self.mean.tolist(), "std": [[_nan_none(v) for v in r] for r in self.std],
                "runs": [r.tolist() for r in self.runs], "n_per_class": self.n_per_class,
                "n_validation": self.n_validation}


def _nan_none(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def multiclass_inputs(showers: np.ndarray, incident: np.ndarray) -> np.ndarray:
    """``[log10 E_inc, voxels / E_inc]`` (float32).

    Shapes:
        showers: ``(N, n_voxels)`` thresholded voxels; incident: ``(N,)``; returns ``(N, 1 + n_voxels)``.
    """
    inc = np.asarray(incident, dtype=np.float64).reshape(-1, 1)
    out = np.empty((inc.shape[0], 1 + np.shape(showers)[1]), dtype=np.float32)
    out[:, :1] = np.log10(inc)
    np.divide(np.asarray(showers, dtype=np.float32), inc.astype(np.float32), out=out[:, 1:])
    return out


def _one_run(xs: list[np.ndarray], cfg: MultiClassConfig, seed: int, dev, progress: bool) -> np.ndarray:
    import torch
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    dtype = getattr(torch, cfg.dtype)
    n = len(xs[0])
    a, b = int(n * cfg.split[0]), int(n * cfg.split[1])
    parts: list[list[np.ndarray]] = [[], [], []]
    labels: list[list[np.ndarray]] = [[], [], []]
    for c, x in enumerate(xs):
        idx = rng.permutation(n)
        for p, sel in enumerate((idx[:a], idx[a:a + b], idx[a + b:])):
            parts[p].append(x[sel])
            labels[p].append(np.full(len(sel), c))
    tx = [torch.as_tensor(np.concatenate(p), device=dev).to(dtype) for p in parts]
    ty = [torch.as_tensor(np.concatenate(y), device=dev, dtype=torch.int64) for y in labels]
    k = len(xs)
    layers: list[torch.nn.Module] = []
    width = tx[0].shape[1]
    for h in cfg.hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.LeakyReLU()]
        width = h
    layers.append(torch.nn.Linear(width, k))
    net = torch.nn.Sequential(*layers).to(device=dev, dtype=dtype)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    loss_fn = torch.nn.CrossEntropyLoss()

    def log_probs(x: torch.Tensor) -> torch.Tensor:
        net.eval()
        with torch.no_grad():
            out = torch.cat([torch.log_softmax(net(x[i:i + 10_000]).double(), 1) for i in range(0, len(x), 10_000)])
        net.train()
        return out

    best, best_state = math.inf, None
    ntr = len(tx[0])
    bar = tqdm(range(cfg.epochs), desc=f"multi-class (seed {seed})", disable=None if progress else True, leave=False)
    for _ in bar:
        perm = torch.randperm(ntr, device=dev)
        for i in range(0, ntr, cfg.batch_size):
            sel = perm[i:i + cfg.batch_size]
            opt.zero_grad()
            loss_fn(net(tx[0][sel]), ty[0][sel]).backward()
            opt.step()
        test_ce = float(-log_probs(tx[1]).gather(1, ty[1][:, None]).mean())
        if test_ce < best:
            best = test_ce
            best_state = {kk: v.detach().clone() for kk, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    lp = log_probs(tx[2]).cpu().numpy()
    yv = ty[2].cpu().numpy()
    return np.stack([lp[yv == j].mean(0) for j in range(k)])


def log_posterior_matrix(inputs: list[np.ndarray], names: list[str], *, config: MultiClassConfig | None = None,
                         runs: int = 10, seed: int = 0, device: str = "auto", progress: bool = False) -> LogPosterior:
    """Train the multi-class DNN ``runs`` times on ``inputs`` (one matrix per class, reference first).

    Every class is cut to the smallest one. Returns ⟨log p(i | j)⟩ as mean ± std over the runs.
    """
    from .classifier import _resolve_device

    cfg = config or MultiClassConfig()
    if len(inputs) < 2 or len(inputs) != len(names):
        msg = (f"the multi-class comparison needs at least 2 samples with one name each, got {len(inputs)} samples "
               f"and {len(names)} names")
        raise ValueError(msg)
    if runs < 1:
        msg = f"runs must be >= 1, got {runs}"
        raise ValueError(msg)
    dims = {x.shape[1] for x in inputs}
    if len(dims) != 1:
        msg = f"all samples need the same number of input features, got {sorted(dims)}"
        raise ValueError(msg)
    n = min(len(x) for x in inputs)
    n_val = n - int(n * cfg.split[0]) - int(n * cfg.split[1])
    if int(n * cfg.split[0]) < 1 or int(n * cfg.split[1]) < 1 or n_val < 1:
        msg = f"the multi-class comparison needs at least 10 showers per sample, the smallest has {n}"
        raise ValueError(msg)
    xs = [np.asarray(x[:n]) for x in inputs]
    dev = _resolve_device(device)
    mats = [_one_run(xs, cfg, seed + r, dev, progress) for r in range(runs)]
    stack = np.stack(mats)
    std = stack.std(0, ddof=1) if runs > 1 else np.full(stack.shape[1:], np.nan)
    return LogPosterior(list(names), stack.mean(0), std, mats, n, n_val)


# ------------------------------------------------------------------------------------------ files
def parse_generated(specs: list[str]) -> dict[str, Path]:
    """``["a.h5", "flow=b.parquet"]`` → ``{"a": a.h5, "flow": b.parquet}`` (names from ``name=`` or the file stem)."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        name = name.strip()
        if not name or not path:
            msg = f"generated sample {spec!r}: expected PATH or NAME=PATH"
            raise ValueError(msg)
        if name in out or name == "reference":
            msg = (f"generated sample name {name!r} is used twice (or is 'reference'); name them explicitly, "
                   f"e.g. {name}_2={path}")
            raise ValueError(msg)
        out[name] = Path(path)
    return out


def _scalar(v: object) -> object:
    if isinstance(v, bytes):
        v = v.decode(errors="replace")
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, np.ndarray) and v.size == 1:
        v = v.reshape(-1)[0].item()
    return v if isinstance(v, (int, float, str, bool)) else None


def file_metadata(path: str | os.PathLike) -> dict:
    """Scalar metadata of a sample file: HDF5 root attributes, or the ``calopc.info`` dict of a Parquet file."""
    path = Path(path)
    with path.open("rb") as fh:
        parquet = fh.read(4) == b"PAR1"
    meta: dict = {}
    if parquet:
        import pyarrow.parquet as pq

        raw = pq.read_schema(path).metadata or {}
        try:
            info = json.loads(raw.get(b"calopc.info", b"{}"))
        except ValueError:
            info = {}
        items = info.items() if isinstance(info, dict) else ()
    else:
        import h5py

        with h5py.File(path, "r") as f:
            items = [(k, f.attrs[k]) for k in f.attrs]
    for k, v in items:
        s = _scalar(v)
        if s is not None:
            meta[str(k)] = s
    return meta


def _clean(v: object) -> object:
    """JSON-ready copy: non-finite floats become None, numpy scalars plain numbers."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _count(path: Path) -> int:
    """Number of showers in a sample file."""
    with path.open("rb") as fh:
        parquet = fh.read(4) == b"PAR1"
    if parquet:
        import pyarrow.parquet as pq

        return int(pq.read_metadata(path).num_rows)
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["incident_energies"].shape[0]) if "incident_energies" in f else 0


def _pick(meta: dict, keys: tuple[str, ...]) -> tuple[str, float] | None:
    for k in keys:
        v = meta.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return k, float(v)
    return None


# ------------------------------------------------------------------------------------------ leaderboard
def _row(name: str, path: Path, res: dict, meta: dict, n: int) -> dict:
    cls = res.get("classifier", {})
    sep = res.get("separation_summary", {})
    vals = [v for v in sep.values() if v is not None and math.isfinite(v)]
    row: dict = {"name": name, "path": str(path), "n_showers": res.get("n_generated", n)}
    for kind in ("low", "high"):
        c = cls.get(kind, {})
        row[f"auc_{kind}"], row[f"auc_{kind}_err"] = c.get("auc"), c.get("auc_err")
    for key in ("fpd", "kpd"):
        d = res.get(f"{key}_x1e3", {})
        row[f"{key}_x1e3"], row[f"{key}_x1e3_err"] = d.get("value"), d.get("error")
    row["fpd_estimator"] = res.get("fpd_estimator")
    row["separation_mean"] = float(np.mean(vals)) if vals else None
    row["separation_e_ratio"] = sep.get("E_ratio")
    coll = _pick(meta, COLLISION_KEYS)
    if coll is None:
        st = res.get("pointcloud", {}).get("revoxelization", {}).get("generated")
        if st and st.get("collision_rate") is not None:
            coll = ("revoxelization", float(st["collision_rate"]))
    row["collision_share"] = None if coll is None else coll[1]
    t = _pick(meta, TIME_KEYS)
    if t is None:
        row["time_per_shower_ms"] = None
    elif t[0] == "time_per_shower_ms":
        row["time_per_shower_ms"] = t[1]
    else:
        row["time_per_shower_ms"] = 1e3 * t[1] / max(int(row["n_showers"] or 0), 1)
    return row


def compare(
    reference: str | os.PathLike,
    generated: dict[str, str | os.PathLike],
    out: str | os.PathLike,
    *,
    runs: int = 10,
    multiclass: MultiClassConfig | None = None,
    metrics: tuple[str, ...] | list[str] = LEADERBOARD_METRICS,
    extra: dict[str, dict] | None = None,
    geometry=None,
    threshold: float | None = None,
    max_showers: int | None = None,
    collisions: str = "sum",
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    **evaluate_kwargs,
) -> dict:
    """Compare the ``generated`` samples (name → file) with ``reference``; write the comparison into ``out``.

    Args:
        reference: reference sample (voxel HDF5 or point-cloud Parquet).
        generated: name → generated sample file; names become table rows and folder names.
        out: output folder: ``compare.json``, ``report.html``, ``log_posterior.png`` and one
            :func:`calopc.eval.evaluate` folder per generator.
        runs: multi-class trainings (mean ± std); 0 skips the multi-class comparison.
        multiclass: network settings of the multi-class DNN (:class:`MultiClassConfig`).
        metrics: :func:`calopc.eval.evaluate` metrics per generator (empty: no leaderboard metrics).
        extra: name → ``{"generation_time_s" | "time_per_shower_ms": ..., "collision_rate": ...}`` for
            generators whose files do not carry them.
        geometry, threshold, max_showers, collisions, device, seed, progress: as :func:`calopc.eval.evaluate`.
        **evaluate_kwargs: passed on to :func:`calopc.eval.evaluate` (e.g. ``cls_epochs``, ``fpd_estimator``).

    Returns:
        The contents of ``compare.json``: ``leaderboard`` (one dict per generator), ``log_posterior``
        (:meth:`LogPosterior.as_dict`), ``timings_s``.
    """
    from ..io import atomic_output
    from .evaluate import evaluate
    from .samples import load_sample

    t0 = time.perf_counter()
    if not generated:
        msg = "compare needs at least one generated sample"
        raise ValueError(msg)
    if runs < 0:
        msg = f"runs must be >= 0 (0 skips the multi-class comparison), got {runs}"
        raise ValueError(msg)
    bad = [n for n in generated if not n or "/" in n or n in (".", "..", "reference")]
    if bad:
        msg = f"generated sample names must be plain folder names other than 'reference', got {bad}"
        raise ValueError(msg)
    paths = {name: Path(p) for name, p in generated.items()}
    for name, p in [("reference", Path(reference)), *paths.items()]:
        if not p.exists():
            msg = f"{p}: no such file (sample {name!r})"
            raise FileNotFoundError(msg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    extra = extra or {}
    timings: dict[str, float] = {}

    rows, per = [], {}
    for name, p in paths.items():
        t = time.perf_counter()
        res = {}
        if metrics:
            res = evaluate(p, reference, out / name, metrics=tuple(metrics), geometry=geometry, threshold=threshold,
                           max_showers=max_showers, collisions=collisions, device=device, seed=seed,
                           progress=progress, **evaluate_kwargs)
        meta = {**file_metadata(p), **extra.get(name, {})}
        row = _row(name, p, res, meta, res["n_generated"] if "n_generated" in res else _count(p))
        row["report"] = f"{name}/report.html" if metrics else None
        rows.append(row)
        per[name] = meta
        timings[f"evaluate {name}"] = time.perf_counter() - t

    lp = None
    if runs > 0:
        t = time.perf_counter()
        inputs, names = [], ["reference", *paths]
        geo = None
        for p in [Path(reference), *paths.values()]:
            s = load_sample(p, threshold=threshold, geometry=geometry, keep_voxels=True, max_showers=max_showers,
                            collisions=collisions, progress=progress)
            if geo is not None and s.geometry.n_voxels != geo.n_voxels:
                msg = f"{p}: {s.geometry.n_voxels} voxels per shower, the reference has {geo.n_voxels}"
                raise ValueError(msg)
            geo = geo or s.geometry
            inputs.append(multiclass_inputs(s.low, s.features.e_inc))
            del s
        lp = log_posterior_matrix(inputs, names, config=multiclass, runs=runs, seed=seed, device=device,
                                  progress=progress)
        del inputs
        for row in rows:
            j = lp.names.index(row["name"])
            row["log_p_self"] = float(lp.mean[j, j])
            row["log_p_reference"] = float(lp.mean[j, 0])
        timings["multi-class"] = time.perf_counter() - t

    res = {"reference": str(reference), "generated": {k: str(v) for k, v in paths.items()}, "leaderboard": rows,
           "log_posterior": None if lp is None else lp.as_dict(), "metadata": per,
           "multiclass_config": asdict(multiclass or MultiClassConfig()), "runs": runs}
    plots = {}
    if lp is not None:
        plots["log_posterior"] = _plot_log_posterior(lp, out)
    timings["total"] = time.perf_counter() - t0
    res["timings_s"] = timings
    res["plots"] = plots
    with atomic_output(out / "compare.json") as tmp:
        tmp.write_text(json.dumps(_clean(res), indent=2, allow_nan=False))
    _write_report(out / "report.html", res)
    return res


# ------------------------------------------------------------------------------------------ output
def _plot_log_posterior(lp: LogPosterior, out: Path) -> list[str]:
    from matplotlib.figure import Figure

    from .plots import save, style

    k = len(lp.names)
    with style():
        fig = Figure(figsize=(2.2 + 1.1 * k, 1.6 + 1.0 * k))
        ax = fig.add_subplot()
        im = ax.imshow(lp.mean, cmap="viridis", vmax=0.0)
        for j in range(k):
            for i in range(k):
                v, e = lp.mean[j, i], lp.std[j, i]
                txt = f"{v:.2f}" + (f"\n±{e:.2f}" if math.isfinite(e) else "")
                ax.text(i, j, txt, ha="center", va="center", fontsize=9,
                        color="black" if v > lp.mean.min() + 0.6 * (0 - lp.mean.min()) else "white")
        ax.set_xticks(range(k), lp.names, rotation=30, ha="right")
        ax.set_yticks(range(k), lp.names)
        ax.set_xlabel("class $i$")
        ax.set_ylabel("showers from $j$")
        ax.set_title(r"$\langle \log p(i \,|\, x \in j) \rangle$" + f"  (log 1/{k} = {math.log(1 / k):.2f})",
                     fontsize=11)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
    return save(fig, out, "log_posterior")


_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.style.cursor = 'pointer';
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var asc = th.getAttribute('data-dir') !== 'asc';
    table.querySelectorAll('th').forEach(function (h) { h.removeAttribute('data-dir'); });
    th.setAttribute('data-dir', asc ? 'asc' : 'desc');
    function key(r) { var c = r.cells[col], v = c.getAttribute('data-v');
      return v === null ? c.textContent : (v === '' ? NaN : parseFloat(v)); }
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (typeof x === 'number' && typeof y === 'number') {
        if (isNaN(x)) return 1; if (isNaN(y)) return -1; return asc ? x - y : y - x; }
      return asc ? String(x).localeCompare(String(y)) : String(y).localeCompare(String(x));
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""

_COLUMNS = (  # key, header, digits, error key
    ("auc_low", "AUC low", 4, "auc_low_err"),
    ("auc_high", "AUC high", 4, "auc_high_err"),
    ("fpd_x1e3", "FPD ×10³", 2, "fpd_x1e3_err"),
    ("kpd_x1e3", "KPD ×10³", 3, "kpd_x1e3_err"),
    ("separation_mean", "separation (mean)", 5, None),
    ("separation_e_ratio", "separation E_tot/E_inc", 5, None),
    ("log_p_self", "⟨log p(self)⟩", 3, None),
    ("log_p_reference", "⟨log p(ref)⟩", 3, None),
    ("collision_share", "collision share", 4, None),
    ("time_per_shower_ms", "ms / shower", 3, None),
)


def _cell(row: dict, key: str, nd: int, err: str | None) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "<td data-v=''>–</td>"
    e = row.get(err) if err else None
    txt = f"{v:.{nd}f}" + (f" ± {e:.{nd}f}" if isinstance(e, float) and math.isfinite(e) else "")
    return f"<td data-v='{v!r}'>{txt}</td>"


def _write_report(path: Path, res: dict) -> None:
    from ..io import atomic_output

    esc = html.escape
    h = [f"<h1>calopc comparison</h1><p>reference: {esc(res['reference'])}</p>"]
    rows = res["leaderboard"]
    est = {r.get("fpd_estimator") for r in rows} - {None}
    h.append("<h2>Leaderboard</h2><p>Click a column header to sort. AUC 0.5, FPD/KPD 0, separation 0 and "
             "⟨log p(ref)⟩ = ⟨log p(self)⟩ mean indistinguishable from the reference"
             + (f"; FPD/KPD estimator: {esc(', '.join(sorted(est)))}" if est else "") + ".</p>")
    h.append("<table class='sortable'><thead><tr><th>generator</th><th>showers</th>"
             + "".join(f"<th>{esc(c[1])}</th>" for c in _COLUMNS) + "</tr></thead><tbody>")
    for r in rows:
        name = esc(r["name"])
        link = f"<a href='{esc(r['report'])}'>{name}</a>" if r.get("report") else name
        h.append(f"<tr><td>{link}</td><td data-v='{r.get('n_showers') or ''}'>{r.get('n_showers') or '–'}</td>"
                 + "".join(_cell(r, *c[:1], c[2], c[3]) for c in _COLUMNS) + "</tr>")
    h.append("</tbody></table>")
    lp = res.get("log_posterior")
    if lp:
        names = lp["names"]
        h.append(f"<h2>Multi-class log-posterior</h2><p>⟨log p(class | showers from the row's sample)⟩ over "
                 f"{lp['n_validation']} validation showers per class, mean ± std over {len(lp['runs'])} trainings "
                 f"(log 1/{len(names)} = {math.log(1 / len(names)):.3f}).</p>")
        h.append("<table><tr><th>showers from \\ class</th>" + "".join(f"<th>{esc(n)}</th>" for n in names) + "</tr>")
        for j, nj in enumerate(names):
            cells = []
            for i in range(len(names)):
                m, s = lp["mean"][j][i], lp["std"][j][i]
                cells.append(f"<td>{m:.3f}" + (f" ± {s:.3f}" if s is not None else "") + "</td>")
            h.append(f"<tr><th>{esc(nj)}</th>{''.join(cells)}</tr>")
        h.append("</table>")
        for f in res.get("plots", {}).get("log_posterior", []):
            if f.endswith(".png"):
                h.append(f"<p><img src='{esc(f)}' style='max-width:100%'></p>")
    t = res.get("timings_s", {})
    h.append("<p>timings (s): " + ", ".join(f"{esc(k)} {v:.1f}" for k, v in t.items()) + "</p>")
    doc = ("<!doctype html><html><head><meta charset='utf-8'><title>calopc comparison</title><style>"
           "body{font-family:sans-serif;max-width:1400px;margin:auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}th[data-dir=asc]:after{content:' ▲'}"
           "th[data-dir=desc]:after{content:' ▼'}</style></head><body>" + "\n".join(h)
           + f"<script>{_SORT_JS}</script></body></html>")
    with atomic_output(path) as tmp:
        tmp.write_text(doc, encoding="utf-8")


def __getattr__(name: str):
    if name == "register":  # the command line moved to calopc.cli.eval
        import warnings

        warnings.warn("calopc.eval.compare.register moved to calopc.cli.eval.register_compare", DeprecationWarning,
                      stacklevel=2)
        from ..cli.eval import register_compare

        return register_compare
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
