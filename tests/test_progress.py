"""calopc.progress: a bar on a terminal, a plain log line every ~30 s elsewhere."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

from calopc.progress import Progress, format_seconds, log_interval


def _lines(buf: io.StringIO) -> list[str]:
    return [x for x in buf.getvalue().splitlines() if x]


def test_log_lines_outside_a_terminal_carry_count_loss_rate_and_eta():
    buf = io.StringIO()
    p = Progress(total=10, desc="train toy", unit="step", per_unit=(32, "showers"), interval=0.05, stream=buf,
                 terminal=False)
    p.update(3, loss=0.4312345)
    time.sleep(0.2)
    lines = _lines(buf)
    assert lines, "no line after several intervals"
    first = lines[0]
    assert first.startswith("calopc train toy: step 3/10 (30.0%), loss 0.4312, ")
    assert " step/s (" in first and " showers/s)" in first and "elapsed " in first and "ETA " in first
    assert "\r" not in buf.getvalue()
    p.update(7)
    p.close()
    n = len(_lines(buf))
    assert _lines(buf)[-1].startswith("calopc train toy: step 10/10 (100.0%)")  # a last line at the end
    assert "ETA" not in _lines(buf)[-1]
    time.sleep(0.15)
    assert len(_lines(buf)) == n  # the timer stopped


def test_a_long_single_step_still_gets_its_lines():
    """The line comes from a timer, not from update(): one step of minutes is not silent."""
    buf = io.StringIO()
    with Progress(total=2, desc="generate", unit="shower", interval=0.05, stream=buf, terminal=False) as p:
        time.sleep(0.25)  # the first unit of work takes long
        p.update(2)
    assert len(_lines(buf)) >= 2 and _lines(buf)[0].startswith("calopc generate: shower 0/2 (0.0%), elapsed ")


def test_stage_text_and_unknown_total():
    buf = io.StringIO()
    with Progress(desc="evaluate", interval=0.05, stream=buf, terminal=False) as p:
        p.stage("FPD")
        time.sleep(0.15)
    assert _lines(buf)[0].startswith("calopc evaluate: FPD, elapsed ")


def test_short_work_and_disabled_progress_write_nothing():
    buf = io.StringIO()
    with Progress(total=5, desc="x", interval=30, stream=buf, terminal=False) as p:
        p.update(5)
    assert buf.getvalue() == ""
    with Progress(total=5, desc="x", interval=0.01, stream=buf, terminal=False, enabled=False) as p:
        time.sleep(0.05)
        p.update(5)
    assert buf.getvalue() == "" and p.disable


def test_a_bar_on_a_terminal():
    buf = io.StringIO()
    with Progress(total=4, desc="convert", unit="shower", stream=buf, terminal=True) as p:
        assert not p.disable
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
        r = subprocess.run([sys.executable, "-m", "calopc", "synth", str(tmp_path / "s.hdf5"), "-n", "1000"],
                           stdout=log, stderr=subprocess.STDOUT, env=env, timeout=120)
    text = (tmp_path / "log").read_text()
    assert r.returncode == 0, text
    assert "calopc synth s.hdf5: shower " in text and "/1000 (" in text and "\r" not in text
