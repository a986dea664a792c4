r"""Training-data loading: in-memory vs streamed showers (CPU; not run in CI).

Writes a synthetic points file (or uses ``--data``), then, each in a fresh process so that
peak memory is its own, runs one epoch of CaloPointFlow II batches (dequantisation and
preprocessing included) from

* ``memory``: :class:`calopc.models.data.ShowerDataset` (all showers held, 8 bytes per point);
* ``stream``: :class:`calopc.models.data.StreamingShowerDataset` with a shuffle buffer of
  ``--buffer-showers``;

each with the host collate (``numpy``, :class:`~calopc.models.data.ShowerCollate`) and with
batches built by torch (``device``, :class:`~calopc.models.data.DeviceCollate` on the CPU).

Prints load time, showers/s of batch production and peak resident memory of each, and
their ratios.

Usage::

    python benchmarks/training_data.py --n 20000 --dataset 2 --buffer-showers 2000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from calopc.models.data import DeviceCollate, ShowerCollate, ShowerDataset, StreamingShowerDataset, iterate_batches

mode, path, buffer, batch, pipe = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
t = time.perf_counter()
ds = ShowerDataset.from_parquet(path) if mode == "memory" else StreamingShowerDataset(path, buffer_showers=buffer)
prep = ds.fit_preprocessor(seed=0, variant="II")
t_load = time.perf_counter() - t
t = time.perf_counter()
n = 0
col = ShowerCollate(prep, seed=0) if pipe == "numpy" else DeviceCollate(prep, "cpu", seed=0)
for b in iterate_batches(ds, col, batch, seed=0, epoch=0):
    n += len(b)
t_epoch = time.perf_counter() - t
print(json.dumps({"mode": mode, "pipeline": pipe, "showers": n, "load_s": t_load, "epoch_s": t_epoch, "showers_per_s": n / t_epoch,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="points Parquet file (default: synthesise one)")
    ap.add_argument("--dataset", default="2", help="synthetic dataset when --data is not given (default: %(default)s)")
    ap.add_argument("--n", type=int, default=20_000, help="synthetic showers (default: %(default)s)")
    ap.add_argument("--buffer-showers", type=int, default=2_000, help="shuffle buffer when streaming (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=32, help="showers per batch (default: %(default)s)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            from calopc.converters import convert_file
            from calopc.synth import write_synthetic

            h5 = Path(tmp) / "train.hdf5"
            write_synthetic(h5, dataset=args.dataset, n=args.n, seed=0)
            data = convert_file(h5, Path(tmp) / "train.parquet", step_size="64 MB", progress=False)
        res = {}
        for pipe in ("numpy", "device"):
            for mode in ("memory", "stream"):
                out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(data), str(args.buffer_showers),
                                      str(args.batch_size), pipe], check=True, capture_output=True, text=True).stdout
                res[mode, pipe] = json.loads(out.strip().splitlines()[-1])
                print(json.dumps(res[mode, pipe]))
    for pipe in ("numpy", "device"):
        m, s = res["memory", pipe], res["stream", pipe]
        print(f"{pipe}: stream / memory: peak RSS {s['peak_rss_mb'] / m['peak_rss_mb']:.2f}x, "
              f"batch throughput {s['showers_per_s'] / m['showers_per_s']:.2f}x, load {s['load_s'] / m['load_s']:.2f}x")
    for mode in ("memory", "stream"):
        a, b = res[mode, "numpy"], res[mode, "device"]
        print(f"{mode}: device / numpy batch throughput {b['showers_per_s'] / a['showers_per_s']:.2f}x, "
              f"peak RSS {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
