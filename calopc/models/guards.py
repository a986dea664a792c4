r"""Checks that keep training and generation honest.

* :func:`typed_options`: ``--set`` / ``--config`` values checked against the field types of a
  config dataclass before any work (``train.steps=2.5`` and ``train.amp=no`` are refused with one
  line naming the key, the value and the expected type);
* :func:`energy_range` / :func:`check_energy_range`: the incident-energy range of the training
  data is recorded in the run (``config.json``: ``train.incident_energy_range``); generating
  outside it warns, or with ``strict`` refuses;
* :func:`count_over_incident`: showers that deposit more energy than their incident energy;
* :func:`interruptible`: Ctrl-C and SIGTERM deferred by a writer (:func:`calopc.io.deferred_interrupts`)
  are honoured at the next module call of the model, i.e. within a sampler step, not after a batch.

Importing this module does not import torch.
"""

from __future__ import annotations

__all__ = ["add_interrupt_checks", "check_energy_range", "count_over_incident", "dataset_energy_range", "energy_range",
           "interruptible", "read_incident_energies", "shorten_quoted", "typed_options"]

import contextlib
import math
import types
import typing
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

_MAX_SHOWN = 60
#: generation within the training range widened by this share of its width (log scale) on each side is not flagged
RANGE_MARGIN = 0.1


def _short(v: Any) -> str:
    s = repr(v) if not isinstance(v, str) else v
    return s if len(s) <= _MAX_SHOWN else f"{s[:_MAX_SHOWN]}... ({len(s)} characters)"


def shorten_quoted(msg: str, limit: int = 80) -> str:
    """``msg`` with every quoted value longer than ``limit`` characters cut to its first
    :data:`_MAX_SHOWN` characters, an ellipsis and its length (an error that echoes a 100,000-character
    option value stays one readable line)."""
    import re

    def cut(m: re.Match) -> str:
        q, body = m.group(1), m.group(2)
        return f"{q}{body[:_MAX_SHOWN]}...{q} ({len(body):,} characters)"

    return re.sub(r"(['\"])((?:(?!\1).){%d,})\1" % (limit + 1), cut, msg)


# ----------------------------------------------------------------------------- typed options
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_int(v: Any) -> int | None:
    """``v`` as an int when it is one (or an integral finite float such as 1e4), else None."""
    if _is_int(v):
        return v
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return None


def _type_name(t: Any) -> str:
    if t is type(None):
        return "null"
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(t))
    if origin in (tuple, list):
        args = [a for a in typing.get_args(t) if a is not Ellipsis]
        return f"a list of {_PLURAL.get(args[0], 'values')}" if args else "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(t, getattr(t, "__name__", str(t)))


_PLURAL = {int: "integers", float: "numbers", bool: "true/false values", str: "strings"}


def _coerce(t: Any, v: Any, raw: str | None, *, sizes: bool) -> tuple[bool, Any]:
    """(ok, value) of ``v`` for the annotation ``t``; ``raw`` is the command-line text (strings stay as typed)."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(t)
        if v is None and type(None) in args:
            return True, None
        for a in args:
            if a is type(None):
                continue
            ok, out = _coerce(a, v, raw, sizes=sizes)
            if ok:
                return True, out
        return False, v
    if origin in (tuple, list):
        if not isinstance(v, (list, tuple)):
            return False, v
        args = [a for a in typing.get_args(t) if a is not Ellipsis]
        elem = args[0] if args else Any
        out = []
        for x in v:
            ok, y = _coerce(elem, x, None, sizes=sizes)
            if not ok or (sizes and _is_int(y) and y < 1):
                return False, v
            out.append(y)
        return True, tuple(out) if origin is tuple else out
    if t is bool:
        return isinstance(v, bool), v
    if t is int:
        i = _as_int(v)
        return (i is not None and (not sizes or i >= 0)), i
    if t is float:
        return (isinstance(v, (int, float)) and not isinstance(v, bool)), (float(v) if isinstance(v, (int, float)) else v)
    if t is str:
        if raw is not None:
            return True, raw
        return isinstance(v, str), v
    return True, v  # other annotations: left to the dataclass's own checks


def typed_options(cls: type, values: dict[str, Any], *, section: str, raw: dict[str, str] | None = None,
                  sizes: bool = False) -> dict[str, Any]:
    """``values`` checked against the field types of the dataclass ``cls`` (and converted: lists to tuples,
    integral numbers to ``int``, numbers to ``float``).

    Args:
        cls: a config dataclass (``TrainConfig``, ``CaloCloudsConfig``, ...).
        values: ``{field: value}`` as parsed (JSON/YAML).
        section: ``"train"`` or ``"model"``: names the key in messages (``train.steps``).
        raw: ``{field: text}`` as given on the command line (string fields keep it verbatim).
        sizes: integers must be >= 0 and list elements >= 1 (layer sizes, counts: model configs).

    Raises:
        ValueError: one line naming the key, the value and the expected type; unknown keys are
            left to the config class (its error lists the valid keys).
    """
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve at run time: leave it to the class
        hints = {}
    out = dict(values)
    for key, v in values.items():
        t = hints.get(key)
        if t is None:
            continue
        ok, conv = _coerce(t, v, (raw or {}).get(key), sizes=sizes)
        if not ok:
            want = _type_name(t)
            if sizes and t is not bool and "integer" in want:
                want += " >= 0" if typing.get_origin(t) not in (tuple, list) else " (each >= 1)"
            shown = (raw or {}).get(key, v if isinstance(v, str) else _short(v))
            msg = f"{section}.{key}={_short(shown)}: expected {want} ({section}.{key} is {_type_name(t)})"
            if t is bool and isinstance(v, str):
                msg += "; write true or false"
            raise ValueError(msg)
        out[key] = conv
    return out


# ----------------------------------------------------------------------------- energy range
def energy_range(e_inc: np.ndarray) -> list[float] | None:
    """``[min, max]`` of the incident energies (MeV) as recorded in a run; None when empty."""
    e = np.asarray(e_inc, dtype=np.float64).reshape(-1)
    e = e[np.isfinite(e) & (e > 0)]
    return [float(e.min()), float(e.max())] if e.size else None


def check_energy_range(meta: dict, energies: np.ndarray, *, strict: bool = False, where: str = "--energies") -> int:
    """Warn (``strict``: raise ValueError) when ``energies`` leave the run's training range; returns how many do.

    ``meta`` is the run's ``config.json``; runs written before the range was recorded are not checked.
    """
    rng = (meta.get("train") or {}).get("incident_energy_range")
    if not isinstance(rng, (list, tuple)) or len(rng) != 2:
        return 0
    lo, hi = float(rng[0]), float(rng[1])
    e = np.asarray(energies, dtype=np.float64).reshape(-1)
    # the training sample's extremes are not the edges of its distribution: allow 10% of the range's width
    # on a log scale each side (trained on 1e3-1e6 MeV: 500-2e6 MeV pass, 1e9 or 1e-3 MeV do not)
    margin = RANGE_MARGIN * math.log(hi / lo) if hi > lo else math.log(1 + RANGE_MARGIN)
    with np.errstate(divide="ignore", invalid="ignore"):
        le = np.log(e)
    out = ~((le >= math.log(lo) - margin) & (le <= math.log(hi) + margin))
    n = int(out.sum())
    if not n:
        return 0
    first = float(e[np.flatnonzero(out)[0]])
    msg = (f"{where}: {n} of {e.size} incident energies lie outside the training range {lo:.4g}-{hi:.4g} MeV "
           f"(first: {first:.4g} MeV); the model extrapolates there")
    if strict:
        raise ValueError(msg + " (refused with --strict)")
    warnings.warn(msg + " (--strict refuses this)", stacklevel=2)
    return n


# ----------------------------------------------------------------------------- generation statistics
def count_over_incident(counts: Any, energy: Any, e_inc: np.ndarray) -> Any:
    """Number of showers whose deposited energy exceeds their incident energy ``e_inc`` (MeV), as a 0-d
    tensor on the device (no host sync). ``counts``: points per shower ``(B,)``; ``energy``: point
    energies ``(P,)`` in shower order (:class:`calopc.models.cells.Placed`)."""
    import torch

    inc = torch.as_tensor(np.asarray(e_inc, dtype=np.float64), device=energy.device)
    cs = torch.zeros(energy.shape[0] + 1, dtype=torch.float64, device=energy.device)
    torch.cumsum(energy.to(torch.float64), 0, out=cs[1:])
    end = torch.cumsum(counts.to(torch.int64), 0)
    dep = cs[end] - cs[end - counts.to(torch.int64)]
    return (dep > inc * (1 + 1e-9)).sum()


# ----------------------------------------------------------------------------- interrupts
def add_interrupt_checks(model: Any) -> list:
    """Make every module call of ``model`` first check for a deferred Ctrl-C / SIGTERM
    (:func:`calopc.io.check_interrupt`): a long sampling batch then stops within one sampler step.
    Returns the hook handles (``h.remove()`` undoes it)."""
    from ..io import check_interrupt

    def hook(module: Any, args: Any) -> None:
        check_interrupt()

    return [m.register_forward_pre_hook(hook) for m in model.modules()]


@contextlib.contextmanager
def interruptible(model: Any) -> Iterator[None]:
    """:func:`add_interrupt_checks` for the block."""
    handles = add_interrupt_checks(model)
    try:
        yield
    finally:
        for h in handles:
            h.remove()

def dataset_energy_range(dataset: Any) -> list[float] | None:
    """:func:`energy_range` of a training dataset (in memory, or streamed: the files' incident-energy column)."""
    e = getattr(dataset, "e_inc", None)
    if e is not None:
        return energy_range(e)
    paths = getattr(getattr(dataset, "_src", None), "paths", None)
    if not paths:
        return None
    import pyarrow.parquet as pq

    ranges = [energy_range(pq.read_table(p, columns=["incident_energy"]).column(0).to_numpy()) for p in paths]
    ranges = [r for r in ranges if r is not None]
    return [min(r[0] for r in ranges), max(r[1] for r in ranges)] if ranges else None


def read_incident_energies(path: str | Any) -> np.ndarray:
    """The ``incident_energy`` column of a points Parquet file (MeV), without its points or geometry: what
    ``generate --energies FILE.parquet`` needs (no calopc metadata required); one-line errors naming the file."""
    import pyarrow.parquet as pq

    from ..io import ShowerFileError

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for files that are not Parquet
        msg = f"--energies {path}: cannot open as Parquet (truncated or not a Parquet file?): {err}"
        raise ShowerFileError(msg) from None
    with pf:
        if "incident_energy" not in pf.schema_arrow.names:
            msg = f"--energies {path}: no 'incident_energy' column; found {pf.schema_arrow.names}"
            raise ShowerFileError(msg)
        from ..converters.validate import check_points_schema

        check_points_schema(path, pf.schema_arrow)
        try:
            col = pf.read(columns=["incident_energy"]).column(0)
        except Exception as err:
            msg = f"--energies {path}: failed to read the incident energies (corrupt or truncated file?): {err}"
            raise ShowerFileError(msg) from None
    # a copy: arrow's zero-copy view is read-only, and torch warns when it wraps a read-only array
    return np.array(col.to_numpy(), dtype=np.float64).reshape(-1)
