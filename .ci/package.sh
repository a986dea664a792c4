#!/usr/bin/env bash
# The package as a user gets it: build the sdist and the wheel, check them, install the wheel (not editable) into a
# fresh virtualenv with the core dependencies only, and run calopc from another folder. A file the wheel lacks
# (the binning XMLs of calopc/data) or a core command that needs an optional package fails here.
#
# Called by .ci/run with the project's virtualenv in $VENV (it has build and twine: the 'test' extra).
set -euo pipefail
VENV=${VENV:-.venv}
ROOT=$(pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$VENV/bin/python" -m build --sdist --wheel --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
"$VENV/bin/python" -m twine check --strict "$WORK"/dist/*
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --quiet "$WORK"/dist/calopc-*.whl
cd "$WORK" && mkdir elsewhere && cd elsewhere
# the core install: no torch, no optional package
"$WORK/venv/bin/python" - <<'PY'
import importlib.util, sys
for name in ("torch", "pooch", "sklearn", "dask"):
    assert importlib.util.find_spec(name) is None, f"{name} is installed with the core of calopc"
import calopc
assert "site-packages" in calopc.__file__, calopc.__file__
from calopc.geometry import DATASETS, load_geometry
for name in (*DATASETS, "hg"):                     # every shipped binning XML is in the wheel
    print(name, load_geometry(name).n_voxels)
PY
"$WORK/venv/bin/calopc" demo --out demo -n 200 --no-progress
"$WORK/venv/bin/calopc" download all --dry-run --dir data >/dev/null
# without the download extra: one line naming the extra, before any network access
if "$WORK/venv/bin/calopc" download 2 --dir data 2>"$WORK/err.txt"; then
  echo "calopc download ran without pooch"; exit 1
fi
grep -q "pip install 'calopc\[download\]'" "$WORK/err.txt" || { cat "$WORK/err.txt"; exit 1; }
echo "package: sdist and wheel built and checked; the wheel's calopc demo ran in a clean virtualenv"
cd "$ROOT"
