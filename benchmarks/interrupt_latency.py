"""How long `calopc generate` takes to stop after SIGTERM / Ctrl-C in the middle of one large batch.

With the interrupt checks in every model call (calopc.models.guards.add_interrupt_checks) against the same
command without them (the checks patched out in the child: the signal then waits for the end of the batch,
capped here at --cap seconds). A tiny CaloPointFlow is trained on synthetic
dataset-1-photons showers first. Prints one line per trial and the medians.

    python benchmarks/interrupt_latency.py [--trials 3] [--showers 100000] [--cap 60]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
          "if sys.argv[1] == 'old':\n"
          "    import calopc.models.generate as g; g.add_interrupt_checks = lambda model: []\n"
          "from calopc.cli import main; sys.exit(main(sys.argv[2:]))")
TINY = ["--set", "model.latent=4", "--set", "model.encoder_hidden=16", "--set", "model.point_transforms=2",
        "--set", "model.point_hidden=[16,16]", "--set", "model.latent_transforms=1", "--set", "model.latent_hidden=[16]",
        "--set", "model.shower_transforms=1", "--set", "model.shower_hidden=[16]"]


def _calopc(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "calopc", *args], check=True, stdout=subprocess.DEVNULL)


def trial(variant: str, run: Path, out: Path, n: int, sig: int, cap: float) -> float:
    argv = ["generate", str(run), "-n", str(n), "--batch-size", str(n), "--energies", "log-uniform:2e3:5e4",
            "-o", str(out), "--device", "cpu", "--no-progress"]
    p = subprocess.Popen([sys.executable, "-c", _CHILD, variant, *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    t = time.time()
    while not list(out.parent.glob(f".{out.name}.*.part")) and p.poll() is None and time.time() - t < 120:
        time.sleep(0.02)
    time.sleep(2.0)  # well inside the one sampling batch
    t_sig = time.monotonic()
    p.send_signal(sig)
    try:
        p.wait(timeout=cap)
        return time.monotonic() - t_sig
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--showers", type=int, default=100_000)
    ap.add_argument("--cap", type=float, default=60.0, help="seconds to wait for a stop before killing it")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        _calopc("synth", str(d / "s.hdf5"), "-n", "200", "--geometry", "1-photons", "--no-progress")
        _calopc("convert", str(d / "s.hdf5"), "-o", str(d / "s.parquet"), "--no-progress")
        _calopc("train", "calopointflow", "--data", str(d / "s.parquet"), "-o", str(d / "run"), "--steps", "2",
                "--batch-size", "8", "--device", "cpu", "--no-progress", *TINY)
        res: dict[str, list[float]] = {"new": [], "old": []}
        for i in range(a.trials):
            for variant in ("new", "old"):
                sig = signal.SIGTERM if i % 2 == 0 else signal.SIGINT
                lat = trial(variant, d / "run", d / f"g{i}{variant}.hdf5", a.showers, sig, a.cap)
                res[variant].append(lat)
                print(f"trial {i} {variant:3} {signal.Signals(sig).name:7} stopped after "
                      f"{'> %.0f' % a.cap if lat == float('inf') else '%.2f' % lat} s", flush=True)
        for v, xs in res.items():
            print(f"{v}: median {statistics.median(xs):.2f} s to stop ({len(xs)} trials, "
                  f"{a.showers} showers in one batch)")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
