"""benchmarks/gpu_check.py prints a row for every entry of its result: measured, failed, skipped by
``--quick`` or for time, as a whole entry or for one batch size."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


RESULT = {
    "device": "cpu", "torch": "2.x", "quick": True, "total_s": 12.0,
    "train": {
        "caloclouds ds2 b8": {"showers_per_s": 50.0, "ms_per_step": 160.0, "steps": 3, "ops": 1171, "syncs": 0},
        "deeptree ds2 b16 compile": {"skipped": "--quick"},
        "calopointflow ds3 b128": {"skipped": "out of time"},
        "caloclouds ds2 b2048": {"error": "OutOfMemoryError: CUDA out of memory.\nTried to allocate | 2 GiB"},
    },
    "generate": {
        "calopointflow ds2": {"4": {"ms_per_shower": 1.5, "ms_per_shower_sampling": 1.0, "showers_per_s": 666.7},
                              "16": {"skipped": "out of time"},
                              "10000": {"error": "RuntimeError: boom"}},
        "caloclouds:denoiser=transformer ds3": {"skipped": "--quick"},          # the whole entry skipped
        "deeptree ds3": {"skipped": "out of time"},
        "caloclouds ds3": {"error": "ValueError: " + "x" * 5000},              # the whole entry failed
    },
    "sparse": {"seconds": 3.0, "rc": 1, "error": "Traceback (most recent call last):\n ...\nValueError: last line"},
    "evaluate": {"seconds": 40.0, "rc": 0},
}


def test_the_table_has_a_row_for_every_entry(gpu_check, capsys):
    gpu_check.table(RESULT)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    cells = [len(re.split(r"(?<!\\)\|", line)) for line in rows]
    assert cells == [8] * 5 + [7] * 7 + [5] * 3      # one cell per column: training, generation, other (headers too)
    assert "| caloclouds ds2 b8 | 50 | 160.0 | 1,171 | 0 | - |" in out
    assert "| deeptree ds2 b16 compile | skipped: --quick |" in out
    assert "| calopointflow ds3 b128 | skipped: out of time |" in out
    assert "| caloclouds ds2 b2048 | error: OutOfMemoryError: CUDA out of memory. Tried to allocate \\| 2 GiB |" in out
    assert "| calopointflow ds2 | 4 | 1.500 | 1.000 | 666.7 |" in out
    assert "| calopointflow ds2 | 16 | skipped: out of time |" in out
    assert "| calopointflow ds2 | 10000 | error: RuntimeError: boom |" in out
    assert "| caloclouds:denoiser=transformer ds3 | | skipped: --quick |" in out
    assert "| deeptree ds3 | | skipped: out of time |" in out
    long = next(line for line in rows if line.startswith("| caloclouds ds3 |"))
    assert "error: ValueError: x" in long and len(long) < 300
    assert "ValueError: last line" in next(line for line in rows if line.startswith("| sparse |"))
    assert "| evaluate | 40.0 | ok |" in out
