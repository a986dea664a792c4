"""calopc.progress: a bar on a terminal, a plain log line every ~30 s elsewhere.

The log-line tests drive the report with an injected clock and a timer fired by hand, so that
they do not depend on how fast the machine is.
"""

from __future__ import annotations

import gc
import io
import os
import subprocess
import sys
import threading
import time

from calopc.progress import Progress, format_seconds, log_interval


def _lines(buf: io.StringIO) -> list[str]:
    return [x for x in buf.getvalue().splitlines() if x]


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeTimer:
    """A timer factory for ``Progress(timer=...)`` that ticks only when the test calls :meth:`fire`."""

    def __call__(self, tick, interval, stop):
        self.tick, self.interval, self.stop = tick, interval, stop
        return self

    def fire(self) -> None:
        if not self.stop.is_set():
            self.tick()


def _progress(buf, **kw):
    clock, timer = Clock(), FakeTimer()
    p = Progress(stream=buf, terminal=False, clock=clock, timer=timer, **kw)
    return p, clock, timer


def test_log_lines_outside_a_terminal_carry_count_loss_rate_and_eta():
    buf = io.StringIO()
    p, clock, timer = _progress(buf, total=10, desc="train toy", unit="step", per_unit=(32, "showers"), interval=30)
    assert timer.interval == 30
    p.update(3, loss=0.4312345)
    clock.t += 6
    timer.fire()
    assert _lines(buf) == ["calopc train toy: step 3/10 (30.0%), loss 0.4312, 0.5 step/s (16 showers/s), "
                           "elapsed 6.0s, ETA 14s"]
    assert "\r" not in buf.getvalue()
    p.update(7)
    clock.t += 14
    timer.fire()
    p.close()  # the last line is not written twice when the timer has just written it
    assert _lines(buf)[1:] == ["calopc train toy: step 10/10 (100.0%), loss 0.4312, 0.5 step/s (16 showers/s), "
                               "elapsed 20s"]
    n = len(_lines(buf))
    timer.fire()
    assert len(_lines(buf)) == n  # the timer stopped


def test_a_long_single_step_still_gets_its_lines():
    """The line comes from a timer, not from update(): one unit of work lasting minutes is not silent."""
    buf = io.StringIO()
    p, clock, timer = _progress(buf, total=2, desc="generate", unit="shower")
    with p:
        for _ in range(2):
            clock.t += 30
            timer.fire()
        p.update(2)
    assert _lines(buf)[:2] == ["calopc generate: shower 0/2 (0.0%), elapsed 30s",
                               "calopc generate: shower 0/2 (0.0%), elapsed 1m00s"]


def test_substeps_report_progress_inside_one_update():
    """Work inside one unfinished update (a batch's sampler steps) shows its text, share, rate and ETA."""
    buf = io.StringIO()
    p, clock, timer = _progress(buf, total=40, desc="generate", unit="shower")
    clock.t += 8
    p.substep("sampler step 5/10", done=20)
    timer.fire()
    assert _lines(buf)[-1] == ("calopc generate: shower 0/40 (50.0%), sampler step 5/10, 2.5 shower/s, elapsed 8.0s, "
                               "ETA 8.0s")
    p.update(40)
    clock.t += 8
    timer.fire()
    assert "sampler step" not in _lines(buf)[-1] and "shower 40/40 (100.0%)" in _lines(buf)[-1]


def test_the_eta_honours_a_time_limit():
    """With a time limit the ETA is the earlier of the count's end and the limit's end."""
    buf = io.StringIO()
    p, clock, timer = _progress(buf, total=100_000, desc="train cc", unit="step", time_limit=65)
    p.update(217)
    clock.t += 60
    timer.fire()
    assert _lines(buf)[-1].endswith("elapsed 1m00s, ETA 5.0s (time limit)")
    q, clock, timer = _progress(buf, total=10, desc="train cc", unit="step", time_limit=3600)
    q.update(5)
    clock.t += 10
    timer.fire()
    assert _lines(buf)[-1].endswith("elapsed 10s, ETA 10s")  # the count ends first


def test_stage_text_and_unknown_total():
    buf = io.StringIO()
    p, clock, timer = _progress(buf, desc="evaluate")
    with p:
        p.stage("FPD")
        clock.t += 2
        timer.fire()
    assert _lines(buf)[0] == "calopc evaluate: FPD, elapsed 2.0s"


def test_short_work_and_disabled_progress_write_nothing():
    buf = io.StringIO()
    p, clock, timer = _progress(buf, total=5, desc="x")
    with p:
        p.update(5)
    assert buf.getvalue() == ""
    p = Progress(total=5, desc="x", interval=0.001, stream=buf, terminal=False, enabled=False)
    with p:
        p.update(5)
    assert buf.getvalue() == "" and p.disable and p._timer is None


def test_a_forgotten_close_stops_the_timer_thread():
    """The timer thread holds the Progress weakly: dropping it without close() ends the thread."""
    buf = io.StringIO()
    p = Progress(total=5, desc="x", interval=0.01, stream=buf, terminal=False)
    thread = p._timer.thread
    assert thread.is_alive()
    del p
    gc.collect()
    deadline = time.monotonic() + 30
    while thread.is_alive() and time.monotonic() < deadline:
        thread.join(0.05)
    assert not thread.is_alive()
    assert not [t for t in threading.enumerate() if t is thread]


def test_the_default_timer_writes_lines():
    buf = io.StringIO()
    with Progress(total=5, desc="x", interval=0.01, stream=buf, terminal=False) as p:
        deadline = time.monotonic() + 30
        while not _lines(buf) and time.monotonic() < deadline:
            time.sleep(0.01)
        p.update(5)
    assert _lines(buf)[0].startswith("calopc x: step 0/5 (0.0%), elapsed ")


def test_a_bar_on_a_terminal():
    buf = io.StringIO()
    with Progress(total=4, desc="convert", unit="shower", stream=buf, terminal=True) as p:
        assert not p.disable
        p.substep("batch 1/1", done=2)
        p.update(4, loss=1.0)
    assert "convert" in buf.getvalue()


def test_format_seconds_and_interval(monkeypatch):
    assert [format_seconds(s) for s in (4.21, 42, 450, 6960)] == ["4.2s", "42s", "7m30s", "1h56m"]
    monkeypatch.setenv("CALOPC_LOG_INTERVAL", "0.5")
    assert log_interval() == 0.5
    monkeypatch.setenv("CALOPC_LOG_INTERVAL", "-1")
    assert log_interval() == 30.0


def test_a_command_logs_progress_lines_into_a_log_file(tmp_path):
    """`calopc synth` with stderr to a file (as under nohup/Slurm) writes plain progress lines there."""
    env = dict(os.environ, CALOPC_LOG_INTERVAL="0.02")
    with open(tmp_path / "log", "w") as log:
        r = subprocess.run([sys.executable, "-m", "calopc", "synth", str(tmp_path / "s.hdf5"), "-n", "3000"],
                           stdout=log, stderr=subprocess.STDOUT, env=env, timeout=300)
    text = (tmp_path / "log").read_text()
    assert r.returncode == 0, text
    assert "calopc synth s.hdf5: shower " in text and "/3000 (" in text and "\r" not in text


def test_generation_reports_progress_inside_its_first_batch():
    """Each network call of a batch is a substep; from the second batch on also a share of the batch done."""
    import pytest

    torch = pytest.importorskip("torch")
    from calopc.models.generate import _CallCounter

    class Sampler(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(2, 2)

        def generate(self, x, steps):
            for _ in range(steps):
                x = self.net(x)
            return x

    class Bar:
        def __init__(self) -> None:
            self.seen = []

        def substep(self, text, done=0.0):
            self.seen.append((text, done))

    model, bar = Sampler(), Bar()
    calls = _CallCounter(model, bar, batch_size=10, n=25)
    calls.start(0, 10)
    model.generate(torch.zeros(1, 2), 4)
    assert bar.seen == [(f"batch 1/3: network call {k}", 0.0) for k in (1, 2, 3, 4)]
    calls.start(1, 10)
    model.generate(torch.zeros(1, 2), 2)
    assert bar.seen[-2:] == [("batch 2/3: network call 1/4", 2.5), ("batch 2/3: network call 2/4", 5.0)]
    calls.remove()
    model.generate(torch.zeros(1, 2), 1)
    assert len(bar.seen) == 6
