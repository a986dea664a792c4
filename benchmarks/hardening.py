r"""What the safety checks cost, and whether Ctrl-C is honoured: this tree against a baseline tree.

Measures, for each of two source trees of calopc (``--baseline``, by default the last commit,
exported with ``git archive``, and this working tree), in fresh processes:

* wall time of ``calopc synth``, ``convert`` and ``voxelize`` on a synthetic dataset-2 file
  (the checks added for faults: free-space and writability checks, validation of every chunk,
  the geometry check of the first chunk, deferred interrupts), best of ``--repeat`` runs;
* in one process, ``voxelize`` with and without the per-chunk input validation (the run-to-run
  noise of a shared machine cancels there);
* Ctrl-C during ``calopc synth`` (an HDF5 writer): ``--trials`` runs, each interrupted with
  SIGINT at a different moment; counted as honoured when the exit code is 130 and neither
  the output nor a temporary file is left; and the time from the signal to the exit.

Prints a table and writes JSON (``--json``). Usage::

    python benchmarks/hardening.py [--n 2000] [--trials 8] [--repeat 3] [--baseline DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
          "from calopc.cli import main; sys.exit(main())")


def _run(tree: Path, argv: list[str], cwd: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _CHILD, *argv], cwd=cwd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode:
        msg = f"{' '.join(argv)} failed with {tree}: {r.stderr.strip()[-500:]}"
        raise RuntimeError(msg)
    return dt


def _interrupt_trial(tree: Path, cwd: Path, n: int, delay: float) -> tuple[bool, float, int]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    out = cwd / "int.hdf5"
    p = subprocess.Popen([sys.executable, "-c", _CHILD, "synth", str(out), "-n", str(n)], cwd=cwd, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not list(cwd.glob(".int.hdf5.*.part")) and p.poll() is None and time.time() - t0 < 120:
        time.sleep(0.005)
    time.sleep(delay)
    t = time.perf_counter()
    p.send_signal(signal.SIGINT)
    rc = p.wait()
    latency = time.perf_counter() - t
    left = [q for q in cwd.iterdir() if q.name.startswith((".int.hdf5", "int.hdf5"))]
    ok = rc == 130 and not left
    for q in left:
        q.unlink()
    return ok, latency, rc


_OVERHEAD = r"""
import json, sys, time
from unittest import mock
import calopc.converters.files as files
import calopc.io as cio
from calopc.converters import voxelize_file

src, reps = sys.argv[1], int(sys.argv[2])
best = {"checked": float("inf"), "unchecked": float("inf")}
voxelize_file(src, "o.hdf5", progress=False)  # warm-up: imports, geometry tables
for _ in range(reps):
    for label in best:
        with mock.patch.object(files.PointsFile, "check", lambda self, chunk, start=0: None) if label == "unchecked" \
                else mock.patch.object(files, "MAX_OUTSIDE", files.MAX_OUTSIDE):
            t = time.perf_counter()
            voxelize_file(src, "o.hdf5", progress=False)
            best[label] = min(best[label], time.perf_counter() - t)
print(json.dumps(best))
"""


def _check_overhead(tree: Path, cwd: Path, repeat: int) -> dict:
    """Same process, same file: voxelize with and without the per-chunk validation, taking turns."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _OVERHEAD, "s.parquet", str(repeat)], cwd=cwd, env=env,
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _export_head(dest: Path) -> Path:
    repo = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(repo), "archive", "HEAD", "calopc"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="dataset-2 showers in the timed files (default: %(default)s)")
    ap.add_argument("--trials", type=int, default=8, help="Ctrl-C trials per tree (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per command, best taken (default: %(default)s)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="source tree holding the baseline 'calopc' package (default: the last commit)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = ap.parse_args()

    here = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="calopc-hardening-") as tmp:
        tmp = Path(tmp)
        if args.baseline is None:
            (tmp / "baseline-src").mkdir()
            base = _export_head(tmp / "baseline-src")
        else:
            base = args.baseline.resolve()
        trees = {"baseline": base, "this tree": here}
        res: dict = {"n_showers": args.n, "trials": args.trials, "timings_s": {}, "interrupts": {}}
        cmds = (("synth", ["synth", "s.hdf5", "-n", str(args.n), "--seed", "1"]),
                ("convert", ["convert", "s.hdf5", "-o", "s.parquet"]),
                ("voxelize", ["voxelize", "s.parquet", "-o", "v.hdf5"]))
        for label in trees:
            (tmp / label.replace(" ", "_")).mkdir()
            res["timings_s"][label] = {cmd: float("inf") for cmd, _ in cmds}
        # the trees take turns, so that both see the same load on a shared machine; best of the repeats
        for _ in range(args.repeat):
            for cmd, argv in cmds:
                for label, tree in trees.items():
                    dt = _run(tree, argv, tmp / label.replace(" ", "_"))
                    res["timings_s"][label][cmd] = min(res["timings_s"][label][cmd], dt)
        res["validation_s"] = _check_overhead(here, tmp / "this_tree", args.repeat)
        for label, tree in trees.items():
            work = tmp / label.replace(" ", "_")
            trials = [_interrupt_trial(tree, work, 4000, 0.05 + 0.9 * k / max(1, args.trials - 1))
                      for k in range(args.trials)]
            res["interrupts"][label] = {
                "honoured": sum(ok for ok, _, _ in trials), "trials": len(trials),
                "exit_codes": [rc for _, _, rc in trials],
                "latency_s_max": max(lat for _, lat, _ in trials),
                "latency_s_mean": sum(lat for _, lat, _ in trials) / len(trials),
            }
    b, c = res["timings_s"]["baseline"], res["timings_s"]["this tree"]
    res["ratio_this_over_baseline"] = {k: c[k] / b[k] for k in b}
    print(f"{args.n} dataset-2 showers, best of {args.repeat} (wall seconds, fresh process each)")
    print(f"{'command':<10} {'baseline':>9} {'this tree':>10} {'ratio':>7}")
    for k in b:
        print(f"{k:<10} {b[k]:>9.2f} {c[k]:>10.2f} {c[k] / b[k]:>7.2f}")
    v = res["validation_s"]
    print(f"voxelize in one process, this tree: {v['checked']:.2f} s with the input checks, {v['unchecked']:.2f} s "
          f"without them (ratio {v['checked'] / v['unchecked']:.2f})")
    for label, d in res["interrupts"].items():
        print(f"Ctrl-C during synth, {label}: honoured {d['honoured']}/{d['trials']} (exit codes {d['exit_codes']}), "
              f"signal-to-exit {d['latency_s_mean']:.2f} s mean, {d['latency_s_max']:.2f} s max")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
