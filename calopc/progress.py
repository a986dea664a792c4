r"""Progress of long work: a tqdm bar on a terminal, a plain log line every ~30 s elsewhere.

Every long-running command (train, generate, distill, evaluate, convert, ...) reports through
:class:`Progress`, so a job log under ``nohup`` or Slurm is never silent for long::

    with Progress(total=2000, desc="train caloclouds", unit="step", per_unit=(32, "showers")) as p:
        for step in range(2000):
            ...
            p.update(1, loss=0.4312)

On a terminal (stderr is a TTY) this draws a tqdm bar. Elsewhere a background thread writes one
line to stderr every ``interval`` seconds (default 30; ``CALOPC_LOG_INTERVAL`` overrides it)::

    calopc train caloclouds: step 120/2000 (6.0%), loss 0.4312, 0.27 step/s (8.6 showers/s), elapsed 7m30s, ETA 1h56m

and, when the work took longer than one interval, a last line when it ends. The line is written
on the timer, not on :meth:`Progress.update`, so a single step that takes minutes still gets its
lines. Work without a count reports its current stage: ``p.stage("FPD")`` →
``calopc evaluate: FPD (elapsed 2m10s)``. ``enabled=False`` (``--no-progress``) turns off both.
"""

from __future__ import annotations

__all__ = ["Progress", "format_seconds", "log_interval", "progress_bar"]

import math
import os
import sys
import threading
import time
from typing import Any, TextIO

_DEFAULT_INTERVAL = 30.0


def log_interval() -> float:
    """Seconds between log lines outside a terminal: ``CALOPC_LOG_INTERVAL`` or 30."""
    try:
        v = float(os.environ.get("CALOPC_LOG_INTERVAL", _DEFAULT_INTERVAL))
    except ValueError:
        return _DEFAULT_INTERVAL
    return v if math.isfinite(v) and v > 0 else _DEFAULT_INTERVAL


def format_seconds(s: float) -> str:
    """``4.2s``, ``7m30s``, ``1h56m``."""
    if not math.isfinite(s):
        return "?"
    s = max(0.0, s)
    if s < 60:
        return f"{s:.1f}s" if s < 10 else f"{s:.0f}s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """A progress report: tqdm bar on a terminal, a log line every ``interval`` s elsewhere.

    Args:
        total: units of work (``None``: unknown; the line then shows only the count or the stage).
        desc: what is running, e.g. ``"train caloclouds"``; the log line starts with ``calopc DESC:``.
        unit: the unit of ``total`` (``"step"``, ``"shower"``).
        enabled: False turns off bar and log lines (``--no-progress``).
        initial: units already done (a resumed training).
        per_unit: ``(factor, name)``: also report the rate in another unit, e.g. ``(32, "showers")``
            for training steps of 32 showers.
        interval: seconds between log lines (default :func:`log_interval`).
        stream: where to write (default ``sys.stderr``).
        terminal: force bar (True) or log lines (False); default: whether ``stream`` is a terminal.

    The object has the small part of tqdm's interface the project uses: :meth:`update`,
    :meth:`set_postfix`, :meth:`close`, ``disable`` (True when no bar is drawn) and ``n``.
    """

    def __init__(self, total: int | None = None, desc: str = "", *, unit: str = "step", enabled: bool = True,
                 initial: int = 0, per_unit: tuple[float, str] | None = None, interval: float | None = None,
                 stream: TextIO | None = None, terminal: bool | None = None, leave: bool = False) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = int(initial)
        self._initial = int(initial)
        self.per_unit = per_unit
        self.interval = log_interval() if interval is None else float(interval)
        self.stream = sys.stderr if stream is None else stream
        self.postfix: dict[str, Any] = {}
        self._stage: str | None = None
        self._t0 = time.monotonic()
        self._lines = 0
        self._closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None
        tty = _is_terminal(self.stream) if terminal is None else terminal
        if enabled and tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                             file=self.stream)
        elif enabled:
            self._thread = threading.Thread(target=self._run, name="calopc-progress", daemon=True)
            self._thread.start()
        self.disable = self._bar is None

    # ------------------------------------------------------------------ updates
    def update(self, n: int = 1, **postfix: Any) -> None:
        """``n`` more units done; ``postfix`` values (e.g. ``loss=0.43``) are shown beside the count."""
        self.n += n
        if postfix:
            self.postfix.update(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _fmt_value(v) for k, v in self.postfix.items()}, refresh=False)
            self._bar.update(n)

    def set_postfix(self, **postfix: Any) -> None:
        """Values shown beside the count (e.g. ``loss``), kept until replaced."""
        self.postfix.update(postfix)
        if self._bar is not None:
            self._bar.set_postfix({k: _fmt_value(v) for k, v in self.postfix.items()})

    def stage(self, text: str) -> None:
        """The current stage of work without a count (e.g. ``"FPD"``); shown in the bar and the log lines."""
        self._stage = text
        if self._bar is not None:
            self._bar.set_description_str(f"{self.desc}: {text}" if self.desc else text)

    # ------------------------------------------------------------------ log lines
    def line(self) -> str:
        """The plain log line for the current state."""
        elapsed = time.monotonic() - self._t0
        parts: list[str] = []
        if self._stage:
            parts.append(self._stage)
        if self.total is not None or self.n:
            count = f"{self.unit} {self.n}" if self.total is None else f"{self.unit} {self.n}/{self.total}"
            if self.total:
                count += f" ({100 * self.n / self.total:.1f}%)"
            parts.append(count)
        parts.extend(f"{k} {_fmt_value(v)}" for k, v in self.postfix.items())
        done = self.n - self._initial
        rate = done / elapsed if elapsed > 0 else 0.0
        if done > 0:
            r = f"{rate:.3g} {self.unit}/s"
            if self.per_unit is not None:
                r += f" ({rate * self.per_unit[0]:.3g} {self.per_unit[1]}/s)"
            parts.append(r)
        parts.append(f"elapsed {format_seconds(elapsed)}")
        if self.total is not None and done > 0 and self.n < self.total:
            parts.append(f"ETA {format_seconds((self.total - self.n) / rate)}")
        head = f"calopc {self.desc}" if self.desc else "calopc"
        return f"{head}: " + ", ".join(parts)

    def _emit(self) -> None:
        with self._lock:
            try:
                print(self.line(), file=self.stream, flush=True)
                self._lines += 1
            except (OSError, ValueError):  # stream closed: stop logging, never fail the work
                self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._emit()

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        """Stop the bar or the timer; outside a terminal a last line is written if any was written before."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            if self._lines:
                self._emit()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten close() must not leave the timer running
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()


def progress_bar(total: int | None = None, desc: str = "", *, enabled: bool = True, unit: str = "shower",
                 **kw: Any) -> Progress:
    """:class:`Progress` with the unit ``"shower"`` by default: a tqdm bar when stderr is a terminal,
    else a plain log line every ~30 s (never ``\\r`` lines in logs); nothing when not ``enabled``."""
    return Progress(total, desc, unit=unit, enabled=enabled, **kw)
