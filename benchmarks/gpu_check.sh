#!/usr/bin/env bash
# One GPU check of calopc: training and generation throughput of every model, the sparse
# benchmark, `calopc evaluate` 10k vs 10k and the classifier epoch time, in <= 8 minutes on one GPU,
# without network. Writes one JSON file and prints one table (Markdown).
#
#   benchmarks/gpu_check.sh                         # CUDA, JSON in gpu_check.json, table in gpu_check.md
#   benchmarks/gpu_check.sh --device cpu --quick    # smoke test of the whole check on a CPU (a few minutes)
#   OUT=results/h200 benchmarks/gpu_check.sh        # results/h200.json and results/h200.md
#
# Python: $PYTHON, else the repository's .venv, else python3. Extra arguments go to benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT="${OUT:-gpu_check}"
mkdir -p "$(dirname "$OUT")"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 NO_PROXY='*'
export MPLBACKEND=Agg
# on a GPU the whole check is cut at 8 minutes (its own budget is 460 s); what was measured is still written
LIMIT=480
for a in "$@"; do [[ "$a" == "--quick" ]] && LIMIT=3600; done
timeout --signal=INT --kill-after=30 "$LIMIT" "$PY" benchmarks/gpu_check.py --out "$OUT.json" "$@" | tee "$OUT.md"
