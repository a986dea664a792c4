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
``calopc evaluate: FPD (elapsed 2m10s)``; work inside one unfinished update reports itself with
:meth:`Progress.substep` (``"sampler step 5/13"``, and the share of the next update done, which
the percentage, rate and ETA count). With a ``time_limit`` the ETA is the earlier of the count's
and the limit's end. ``enabled=False`` (``--no-progress``) turns off both.

The timer thread holds the :class:`Progress` only weakly: a ``Progress`` that is dropped without
:meth:`~Progress.close` stops its timer.
"""

from __future__ import annotations

__all__ = ["Progress", "format_seconds", "log_interval", "progress_bar"]

import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
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


class _ThreadTimer:
    """Calls ``tick()`` every ``interval`` seconds in a daemon thread until ``stop`` is set (the default timer)."""

    def __init__(self, tick: Callable[[], bool], interval: float, stop: threading.Event) -> None:
        self.thread = threading.Thread(target=self._run, args=(tick, interval, stop), name="calopc-progress",
                                       daemon=True)
        self.thread.start()

    @staticmethod
    def _run(tick: Callable[[], bool], interval: float, stop: threading.Event) -> None:
        while not stop.wait(interval):
            if not tick():
                return

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)


def _tick(ref: weakref.ReferenceType) -> bool:
    """One timer tick: a log line of the referenced :class:`Progress`; False once it is gone."""
    p = ref()
    if p is None:
        return False
    p._emit()
    return True


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
        time_limit: seconds after which the work stops whatever the count (``--time-limit``); the
            ETA is then at most the time left.
        clock: seconds of a monotonic clock (default :func:`time.monotonic`; tests inject their own).
        timer: ``timer(tick, interval, stop_event)`` starts the periodic log lines (default: a daemon
            thread); ``tick()`` writes one line and returns False once the ``Progress`` is gone. Tests
            inject a timer they fire by hand.

    The object has the small part of tqdm's interface the project uses: :meth:`update`,
    :meth:`set_postfix`, :meth:`close`, ``disable`` (True when no bar is drawn) and ``n``.
    """

    def __init__(self, total: int | None = None, desc: str = "", *, unit: str = "step", enabled: bool = True,
                 initial: int = 0, per_unit: tuple[float, str] | None = None, interval: float | None = None,
                 stream: TextIO | None = None, terminal: bool | None = None, leave: bool = False,
                 time_limit: float | None = None, clock: Callable[[], float] | None = None,
                 timer: Callable[..., Any] | None = None) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = int(initial)
        self._initial = int(initial)
        self.per_unit = per_unit
        self.interval = log_interval() if interval is None else float(interval)
        self.stream = sys.stderr if stream is None else stream
        self.time_limit = time_limit if time_limit is not None and time_limit > 0 else None
        self.postfix: dict[str, Any] = {}
        self._stage: str | None = None
        self._substep: tuple[str, float] | None = None  # (text, units of the next update already done)
        self._clock = time.monotonic if clock is None else clock
        self._t0 = self._clock()
        self._lines = 0
        self._last = ""
        self._closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer = None
        self._bar = None
        tty = _is_terminal(self.stream) if terminal is None else terminal
        if enabled and tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                             file=self.stream)
        elif enabled:
            # the timer holds a weak reference only: a Progress dropped without close() stops it
            weakref.finalize(self, self._stop.set)
            self._timer = (timer or _ThreadTimer)(lambda ref=weakref.ref(self): _tick(ref), self.interval, self._stop)
        self.disable = self._bar is None

    # ------------------------------------------------------------------ updates
    def update(self, n: int = 1, **postfix: Any) -> None:
        """``n`` more units done; ``postfix`` values (e.g. ``loss=0.43``) are shown beside the count."""
        self.n += n
        self._substep = None
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

    def substep(self, text: str, done: float = 0.0) -> None:
        """Progress inside the next, unfinished :meth:`update`: ``text`` (e.g. ``"batch 1/3, sampler step 5/13"``)
        and ``done`` units of that update already done (e.g. ``5/13`` of a batch of 1,000 showers: 385).

        Shown until the next :meth:`update`; the percentage, rate and ETA count ``done``, the count
        itself does not. Cheap: call it as often as the work allows.
        """
        self._substep = (text, max(0.0, float(done)))
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    # ------------------------------------------------------------------ log lines
    def line(self) -> str:
        """The plain log line for the current state."""
        elapsed = self._clock() - self._t0
        sub = self._substep
        parts: list[str] = []
        if self._stage:
            parts.append(self._stage)
        partial = sub[1] if sub is not None else 0.0
        if self.total is not None:
            partial = min(partial, max(0.0, self.total - self.n))
        if self.total is not None or self.n:
            count = f"{self.unit} {self.n}" if self.total is None else f"{self.unit} {self.n}/{self.total}"
            if self.total:
                count += f" ({100 * (self.n + partial) / self.total:.1f}%)"
            parts.append(count)
        if sub is not None and sub[0]:
            parts.append(sub[0])
        parts.extend(f"{k} {_fmt_value(v)}" for k, v in self.postfix.items())
        done = self.n - self._initial + partial
        rate = done / elapsed if elapsed > 0 else 0.0
        if done > 0:
            r = f"{rate:.3g} {self.unit}/s"
            if self.per_unit is not None:
                r += f" ({rate * self.per_unit[0]:.3g} {self.per_unit[1]}/s)"
            parts.append(r)
        parts.append(f"elapsed {format_seconds(elapsed)}")
        eta, limited = None, False
        if self.total is not None and done > 0 and self.n + partial < self.total and rate > 0:
            eta = (self.total - self.n - partial) / rate
        if self.time_limit is not None and (self.total is None or self.n < self.total):
            left = max(0.0, self.time_limit - elapsed)
            if eta is None or left < eta:
                eta, limited = left, True
        if eta is not None:
            parts.append(f"ETA {format_seconds(eta)}" + (" (time limit)" if limited else ""))
        head = f"calopc {self.desc}" if self.desc else "calopc"
        return f"{head}: " + ", ".join(parts)

    def _emit(self, final: bool = False) -> None:
        with self._lock:
            if self._stop.is_set() and not final:  # closed, dropped, or the stream failed
                return
            line = self.line()
            if final and line == self._last:  # the timer wrote this very line a moment ago
                return
            try:
                print(line, file=self.stream, flush=True)
                self._lines += 1
                self._last = line
            except (OSError, ValueError):  # stream closed: stop logging, never fail the work
                self._stop.set()

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        """Stop the bar or the timer; outside a terminal a last line is written if any was written before."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._timer is not None:
            self._stop.set()
            join = getattr(self._timer, "join", None)
            if join is not None:
                join(timeout=5)
            if self._lines:
                self._emit(final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(total: int | None = None, desc: str = "", *, enabled: bool = True, unit: str = "shower",
                 **kw: Any) -> Progress:
    """:class:`Progress` with the unit ``"shower"`` by default: a tqdm bar when stderr is a terminal,
    else a plain log line every ~30 s (never ``\\r`` lines in logs); nothing when not ``enabled``."""
    return Progress(total, desc, unit=unit, enabled=enabled, **kw)
