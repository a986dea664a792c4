r"""Batched generation from a run directory: point clouds (Parquet) or voxels (official HDF5)."""

from __future__ import annotations

__all__ = ["GenerateResult", "generate", "likelihood_kwargs", "parse_energies", "refuse_overwriting_inputs", "sample_events",
           "sample_showers"]

import contextlib
import math
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import torch

from ..geometry import Geometry
from .cells import DEFAULT_OVERSAMPLE, PLACEMENT_POLICIES, GeneratedShowers, Placed, place
from .checkpoint import LoadedModel, load
from .guards import add_interrupt_checks, check_energy_range, count_over_incident
from .utils import resolve_device


@dataclass
class GenerateResult:
    """Summary of a :func:`generate` call."""

    n_showers: int
    n_points: int
    seconds_sampling: float
    seconds_total: float
    output: str | None
    collisions: dict = field(default_factory=dict)
    seconds_placing: float = 0.0      # points to cells (and voxels) on the device, host copies
    device: str = ""                  # the device that generated

    @property
    def showers_per_second(self) -> float:
        """Showers per second of the model's sampling alone."""
        return self.n_showers / self.seconds_sampling if self.seconds_sampling > 0 else float("inf")

    @property
    def showers_per_second_total(self) -> float:
        """Showers per second of the whole call (sampling, placing, writing)."""
        return self.n_showers / self.seconds_total if self.seconds_total > 0 else float("inf")

    def as_dict(self) -> dict:
        return {"n_showers": self.n_showers, "n_points": self.n_points, "seconds_sampling": self.seconds_sampling,
                "seconds_placing": self.seconds_placing, "seconds_total": self.seconds_total,
                "showers_per_second": self.showers_per_second,
                "showers_per_second_total": self.showers_per_second_total,
                "output": self.output, "collisions": self.collisions, "device": self.device}


def parse_energies(spec: str, n: int | None = None, *, seed: int = 0) -> np.ndarray:
    """Incident energies (MeV) from a command-line spec.

    * ``FILE.hdf5`` / ``FILE.parquet``: the incident energies of a shower or points file
      (the first ``n`` when given);
    * ``log-uniform:LO:HI`` or ``uniform:LO:HI``: ``n`` random energies (``n`` required);
    * ``E`` or ``E1,E2,...``: fixed values, repeated up to ``n`` when ``n`` is given.
    """
    spec = str(spec).strip()
    if n is not None and n < 1:
        msg = f"-n {n}: expected a number of showers >= 1"
        raise ValueError(msg)
    p = Path(spec)
    if p.suffix.lower() in (".h5", ".hdf5", ".parquet", ".pq") or p.exists():
        if not p.exists():
            msg = f"--energies: {spec}: no such file"
            raise ValueError(msg)
        if p.suffix.lower() in (".parquet", ".pq"):
            from .guards import read_incident_energies  # the energies only: no points, no geometry needed

            e = read_incident_energies(p)
        else:
            from ..io import open_showers

            with open_showers(p, validate=False) as f:
                e = np.asarray(f.read()[0], dtype=np.float64).reshape(-1)
        if n is not None and n > e.shape[0]:
            msg = f"-n {n}: --energies {spec} holds only {e.shape[0]} incident energies"
            raise ValueError(msg)
        e = e[:n] if n is not None else e
        if e.shape[0] == 0:
            msg = f"--energies {spec}: holds no showers (0 incident energies); expected at least one"
            raise ValueError(msg)
        bad = np.flatnonzero(~np.isfinite(e) | (e <= 0))
        if bad.size:
            msg = (f"--energies {spec}: incident energy {bad[0]} is {e[bad[0]]} ({bad.size} such); "
                   "expected finite energies > 0 MeV")
            raise ValueError(msg)
        return e
    kind, _, rest = spec.partition(":")
    if kind in ("log-uniform", "uniform"):
        try:
            lo, hi = (float(v) for v in rest.split(":"))
        except ValueError:
            msg = f"--energies {spec!r}: expected {kind}:LO:HI in MeV, e.g. log-uniform:1e3:1e6"
            raise ValueError(msg) from None
        if n is None:
            msg = f"--energies {spec!r} needs -n (number of showers)"
            raise ValueError(msg)
        if not 0 < lo <= hi < math.inf:
            msg = f"--energies {spec!r}: need 0 < LO <= HI < inf"
            raise ValueError(msg)
        rng = np.random.default_rng(seed)
        u = rng.random(n)
        return np.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if kind == "log-uniform" else lo + u * (hi - lo)
    try:
        vals = np.array([float(v) for v in spec.split(",")], dtype=np.float64)
    except ValueError:
        msg = (f"--energies {spec!r}: expected a file (.hdf5/.parquet), log-uniform:LO:HI, uniform:LO:HI "
               "or comma-separated energies in MeV")
        raise ValueError(msg) from None
    if (vals <= 0).any() or not np.isfinite(vals).all():
        msg = f"--energies {spec!r}: energies must be positive and finite (MeV)"
        raise ValueError(msg)
    if n is not None:
        vals = np.resize(vals, n)
    return vals


def likelihood_kwargs(loaded: LoadedModel, collisions: str, oversample: int | None,
                      model_kwargs: dict | None) -> dict | None:
    """The model keywords of a generation with placement ``collisions``: ``oversample=K`` added for
    ``"likelihood"`` (ValueError naming the model when it cannot draw candidate points)."""
    if collisions != "likelihood":
        if oversample not in (None, 1):
            msg = f"oversample={oversample} is for --collisions likelihood, not {collisions!r}"
            raise ValueError(msg)
        return model_kwargs
    import inspect

    k = DEFAULT_OVERSAMPLE if oversample is None else int(oversample)
    if k < 1:
        msg = f"oversample must be >= 1, got {oversample}"
        raise ValueError(msg)
    if "oversample" not in inspect.signature(loaded.model.generate).parameters:
        msg = (f"--collisions likelihood needs a model that samples points independently given their shower "
               f"(calopointflow variant II, caloclouds with the pointwise denoiser); the {loaded.name} model does "
               "not: choose another --collisions policy")
        raise ValueError(msg)
    return {**(model_kwargs or {}), "oversample": k}


@torch.no_grad()
def sample_showers(loaded: LoadedModel, e_inc: np.ndarray, device: torch.device,
                   model_kwargs: dict | None = None) -> GeneratedShowers:
    """One model call: the showers of ``e_inc`` as :class:`GeneratedShowers` on ``device``
    (models that still return the older ``(counts, zar, E)`` numpy tuple are converted).
    ``model_kwargs`` are passed to the model's ``generate`` (e.g. ``{"steps": 2}`` for CaloClouds)."""
    if model_kwargs:
        import inspect

        params = inspect.signature(loaded.model.generate).parameters
        bad = sorted(k for k in model_kwargs if k not in params)
        if bad:
            msg = f"generation options {bad} are not taken by the {loaded.name} model"
            raise ValueError(msg)
    out = loaded.model.generate(np.asarray(e_inc, dtype=np.float64), loaded.preprocessor, **(model_kwargs or {}))
    if isinstance(out, GeneratedShowers):
        return out.to(device)
    counts, zar, energy = out
    return GeneratedShowers.from_numpy(counts, zar, energy, device)


class _CallCounter:
    """Progress inside a batch: counts the calls of the model's parts (the sampler's network evaluations) and
    reports them with :meth:`calopc.progress.Progress.substep`; from the second batch on, as a share of the
    first batch's calls."""

    def __init__(self, model: torch.nn.Module, bar: Any, batch_size: int, n: int) -> None:
        self.bar, self.n_batches = bar, -(-n // batch_size)
        self.calls, self.per_batch, self.batch, self.size = 0, None, 0, 0
        self.handles = [m.register_forward_pre_hook(self._hook) for m in model.children()]

    def start(self, batch: int, size: int) -> None:
        if batch == 1:
            self.per_batch = max(1, self.calls)
        self.calls, self.batch, self.size = 0, batch, size

    def _hook(self, module: Any, args: Any) -> None:
        self.calls += 1
        of = f"/{self.per_batch}" if self.per_batch else ""
        done = self.size * min(1.0, self.calls / self.per_batch) if self.per_batch else 0.0
        self.bar.substep(f"batch {self.batch + 1}/{self.n_batches}: network call {self.calls}{of}", done)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def sample_events(loaded: LoadedModel, energies: np.ndarray, *, seed: int = 0, batch_size: int = 1000,
                  device: str | torch.device = "cpu", collisions: str = "auto",
                  oversample: int | None = None) -> Iterator[ak.Array]:
    """Yield generated showers, ``batch_size`` at a time, as awkward events
    ``{incident_energy, points: {r, alpha, z (float32 cell centres), E (float64), cell (int32)}}``,
    points placed in cells with the ``collisions`` policy (:func:`calopc.models.cells.place`).

    The same ``seed``, energies, batch size and device give the same showers.
    """
    device = resolve_device(device)
    kw = likelihood_kwargs(loaded, collisions, oversample, None)
    loaded.model.to(device).eval()
    energies = np.asarray(energies, dtype=np.float64).reshape(-1)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        gen = torch.Generator(device).manual_seed(seed + 1)
        for i in range(0, energies.shape[0], batch_size):
            e = energies[i:i + batch_size]
            pl = place(sample_showers(loaded, e, device, kw), loaded.geometry, policy=collisions, generator=gen)
            yield _points_events(e, pl.cell.cpu().numpy(), pl.E.cpu().numpy(), pl.counts.cpu().numpy(),
                                 loaded.geometry)


def _points_events(e_inc: np.ndarray, cell: np.ndarray, energy: np.ndarray, counts: np.ndarray,
                   geo: Geometry) -> ak.Array:
    """Placed points as awkward events in the format of :func:`calopc.converters.voxels_to_points`."""
    from ..converters.core import _build_events, _coordinate_tables

    tab = _coordinate_tables(geo)
    offsets = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    fields = {"r": tab["r"][cell], "alpha": tab["alpha"][cell], "z": tab["z"][cell],
              "E": energy.astype(np.float64), "cell": cell.astype(np.int32)}
    return _build_events(e_inc, offsets, fields)


class _WriterThread:
    """Runs ``fn(*args)`` jobs in order in a background thread, at most ``depth`` waiting
    (writing overlaps sampling)."""

    def __init__(self, depth: int = 2) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="calopc-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            if self._error is None:
                try:
                    job[0](*job[1])
                except BaseException as err:  # noqa: BLE001 - handed to the caller
                    self._error = err

    def submit(self, fn: Any, *args: Any) -> None:
        self._raise()
        while True:
            try:
                self._q.put((fn, args), timeout=0.1)
                return
            except queue.Full:
                self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        """Wait for the jobs to finish; re-raise a writer error."""
        self._q.put(None)
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Drop the waiting jobs and stop."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._q.get_nowait()
        self._error = self._error or RuntimeError("aborted")
        self._q.put(None)
        self._thread.join()


def refuse_overwriting_inputs(output: str | os.PathLike | None, inputs: Iterable[str | os.PathLike],
                              flag: str = "-o") -> None:
    """ValueError when ``output`` resolves to one of ``inputs`` (the input would be destroyed)."""
    if output is None:
        return
    out = Path(output).resolve()
    for p in inputs:
        if p is not None and Path(p).exists() and Path(p).resolve() == out:
            msg = f"{flag} {output}: is also an input ({p}); choose another output file"
            raise ValueError(msg)


def generate(run_dir: str | os.PathLike, energies: np.ndarray, *, output: str | os.PathLike | None = None,
             seed: int = 0, batch_size: int = 1000, device: str = "auto", ema: bool = True,
             collisions: str = "auto", threshold: float | None = None, progress: bool = False,
             model_kwargs: dict | None = None, oversample: int | None = None, amp: bool = False) -> GenerateResult:
    """Generate one shower per incident energy and write them.

    Everything up to the finished batch stays on the device: the model samples, the points
    are placed in cells (:func:`calopc.models.cells.place`) and, for HDF5, scattered into
    dense voxels there; then one copy per batch goes to the host, and a writer thread writes
    it while the next batch is sampled.

    Args:
        run_dir: a run directory from ``calopc train``.
        energies: incident energies in MeV, ``(N,)``.
        output: ``*.parquet`` (point clouds in cells: cell-centre ``r, alpha, z``, ``E``, ``cell``)
            or ``*.hdf5``/``*.h5`` (voxels in the official format). None: sample and time only.
        seed: random seed.
        batch_size: showers per model call.
        device: ``auto``, ``cpu`` or ``cuda``.
        ema: use the EMA weights. Defaults to True.
        collisions: ``auto`` (``alpha-free`` for models that generate no angle, else ``nearest-free``),
            ``alpha-free``, ``nearest-free``, ``sum``, ``max`` or ``likelihood`` (see :mod:`calopc.models.cells`;
            ``likelihood`` for models that sample points independently given their shower).
        threshold: voxel threshold (MeV) for HDF5 output; default: the geometry's.
        progress: show a progress bar (on a terminal only).
        model_kwargs: keywords of the model's ``generate`` (e.g. ``{"steps": 2}``: sampler steps of CaloClouds).
        oversample: candidate points per point of ``collisions="likelihood"`` (default
            :data:`calopc.models.cells.DEFAULT_OVERSAMPLE`).
        amp: bfloat16 autocast of the model's sampling on CUDA (ignored elsewhere). On CUDA float32
            matmuls use TF32 inside this call either way (:mod:`calopc.models.precision`).

    Returns:
        A :class:`GenerateResult` with counts, timings and collision statistics.
    """
    from ..converters import points_writer
    from ..io import shower_writer
    from .precision import autocast, fast_matmul

    if collisions not in PLACEMENT_POLICIES:
        msg = f"collisions must be one of {', '.join(PLACEMENT_POLICIES)}, got {collisions!r}"
        raise ValueError(msg)
    kind = None
    if output is not None:
        suf = Path(output).suffix.lower()
        kind = {".parquet": "points", ".pq": "points", ".hdf5": "voxels", ".h5": "voxels"}.get(suf)
        if kind is None:
            msg = f"output {output}: expected a .parquet (points) or .hdf5/.h5 (voxels) file name"
            raise ValueError(msg)
    if batch_size < 1:
        msg = f"batch_size must be >= 1, got {batch_size}"
        raise ValueError(msg)
    if np.size(energies) == 0:  # before anything is loaded or written
        msg = "no incident energies: nothing to generate (expected at least one)"
        raise ValueError(msg)
    dev = resolve_device(device)
    loaded = load(run_dir, ema=ema, device=dev)
    model_kwargs = likelihood_kwargs(loaded, collisions, oversample, model_kwargs)
    check_energy_range(loaded.meta, energies)  # warns outside the training range (the CLI's --strict refuses)
    add_interrupt_checks(loaded.model)  # a deferred Ctrl-C/SIGTERM stops within a sampler step, not after a batch
    from .train import _fast_splines

    _fast_splines(loaded.model, "auto", dev)  # zuko splines with the faster knot cumsum on CUDA (calopc.models.flows)
    geo = loaded.geometry
    thr = geo.threshold if threshold is None else threshold
    if not math.isfinite(thr) or thr < 0:
        msg = f"threshold must be a finite number >= 0 MeV, got {thr}"
        raise ValueError(msg)
    energies = np.asarray(energies, dtype=np.float64).reshape(-1)
    t_start = time.perf_counter()
    timing = {"sampling": 0.0, "placing": 0.0}
    n_points = 0
    stats: dict[str, float] = {}
    bar = None
    if progress:
        from ..progress import Progress  # a bar on a terminal, a log line every ~30 s elsewhere

        bar = Progress(total=energies.shape[0], unit="shower", desc="generate")
    calls = _CallCounter(loaded.model, bar, batch_size, energies.shape[0]) if bar is not None else None

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    over = torch.zeros((), dtype=torch.int64, device=dev)

    def batches() -> Iterator[tuple[np.ndarray, Placed]]:
        nonlocal n_points
        devices = [dev] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            gen = torch.Generator(dev).manual_seed(seed + 1)
            for i in range(0, energies.shape[0], batch_size):
                e = energies[i:i + batch_size]
                sync()
                t = time.perf_counter()
                if calls is not None:
                    calls.start(i // batch_size, e.shape[0])
                with fast_matmul(dev), autocast(dev, amp):
                    g = sample_showers(loaded, e, dev, model_kwargs)
                sync()
                t1 = time.perf_counter()
                pl = place(g, geo, policy=collisions, generator=gen)
                over.add_(count_over_incident(pl.counts, pl.E, e))  # showers depositing more than E_inc
                timing["sampling"] += t1 - t
                timing["placing"] += time.perf_counter() - t1
                n_points += g.n_points // g.oversample   # likelihood: K candidates per placed point
                for k, v in pl.stats.items():
                    if k != "collision_rate":
                        stats[k] = stats.get(k, 0) + v
                yield e, pl

    # recorded in the output: voxelize re-applies the threshold and dtype of a points file, and
    # calopc compare reads the generation time and collision share
    info = {"model": loaded.name, "run_dir": str(run_dir), "seed": seed, "threshold": float(thr), "dtype": "float32",
            "incident_dtype": "float64", "device": str(dev)}
    n_vox = geo.n_voxels
    try:
        with contextlib.ExitStack() as stack:
            if kind == "points":
                w = stack.enter_context(points_writer(output, geo, info=info))
            elif kind == "voxels":
                w = stack.enter_context(shower_writer(output, n_vox, dtype=np.float32))
            writer = _WriterThread() if kind is not None else None
            # the writer thread stops before the file is closed (and, on an error, discarded)
            stack.callback(lambda: writer is not None and writer.abort())
            for e, pl in batches():
                t = time.perf_counter()
                if kind == "voxels":
                    dense = torch.zeros(e.shape[0] * n_vox, dtype=torch.float32, device=dev)
                    dense[pl.shower * n_vox + pl.cell] = pl.E.to(torch.float32)
                    if thr > 0:
                        low = (dense > 0) & (dense < thr)
                        dense = dense.masked_fill(low, 0.0)
                        stats["n_below_threshold"] = stats.get("n_below_threshold", 0) + int(low.sum())
                    writer.submit(w.append, e, dense.cpu().numpy().reshape(e.shape[0], n_vox))
                elif kind == "points":
                    host = (pl.cell.cpu().numpy(), pl.E.cpu().numpy(), pl.counts.cpu().numpy())
                    writer.submit(lambda e, h: w.append(_points_events(e, *h, geo)), e, host)
                timing["placing"] += time.perf_counter() - t
                if bar is not None:
                    bar.update(e.shape[0])
            if writer is not None:
                writer.close()
                writer = None
            if kind == "voxels":
                inside = stats.get("n_points", 0) - stats.get("n_outside", 0)
                w.set_attrs({**{k: v for k, v in info.items() if k != "dtype"},
                             "generation_time_s": timing["sampling"] + timing["placing"],
                             "collision_rate": stats.get("n_collisions", 0) / inside if inside else 0.0,
                             "moved_ring_rate": stats.get("n_moved_ring", 0) / inside if inside else 0.0})
    finally:
        if calls is not None:
            calls.remove()
        if bar is not None:
            bar.close()
    inside = stats.get("n_points", 0) - stats.get("n_outside", 0)
    stats["collision_rate"] = stats.get("n_collisions", 0) / inside if inside else 0.0
    stats.setdefault("n_moved_ring", 0)
    stats["moved_ring_rate"] = stats["n_moved_ring"] / inside if inside else 0.0
    stats.setdefault("n_below_threshold", 0)
    stats["n_over_incident"] = int(over)  # showers with deposited > incident energy (unphysical)
    return GenerateResult(int(energies.shape[0]), n_points, timing["sampling"], time.perf_counter() - t_start,
                          None if output is None else str(output), stats, seconds_placing=timing["placing"],
                          device=str(dev))
