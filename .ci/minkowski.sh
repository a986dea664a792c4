#!/usr/bin/env bash
# MinkowskiEngine (CPU) into the virtualenv $VENV, from a wheel cached OUTSIDE the clone when there is one.
#
# The compiled extension matches exactly one Python, torch and ME version (and machine), so the wheel is kept in
#   $WHEEL_CACHE/py<X.Y>-torch<torch version>-me<ME version>-<machine>/MinkowskiEngine-*.whl
# (default ~/.cache/calopc/wheels). A warm cache installs in seconds; a fresh machine, or a cached wheel that does not
# install or import, builds from the PyPI sdist (about 5 min on 2 idle cores) and caches the result. The build:
# system openblas, no build isolation (it compiles against the venv's torch), the stdlib distutils for numpy.distutils'
# BLAS lookup; ME's setup.py calls `pip uninstall`, so the venv's bin goes first on PATH. After installing, the
# collections.abc fix for Python >= 3.10. WHEEL_CACHE= (empty) builds without caching.
#
# Called by `make minkowski` (VENV, ME_VERSION, TORCH, WHEEL_CACHE come from the Makefile).
set -euo pipefail
VENV=${VENV:-.venv}
BIN="$VENV/bin"
ME_VERSION=${ME_VERSION:-0.5.4}
WHEEL_CACHE=${WHEEL_CACHE-$HOME/.cache/calopc/wheels}
TORCH=${TORCH-}

if "$BIN/python" -c "import MinkowskiEngine" 2>/dev/null; then
  echo "MinkowskiEngine already installed"
  exit 0
fi
if ! ldconfig -p | grep -q libopenblas; then
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq libopenblas-dev
fi

KEY=$("$BIN/python" -c 'import platform, sys, torch; v = sys.version_info; print(f"py{v[0]}.{v[1]}-torch{torch.__version__}-me'"$ME_VERSION"'-{platform.machine()}")')
DIR="$WHEEL_CACHE/$KEY"

install_wheel() {  # install $1, patch it, import it; non-zero when any step fails
  "$BIN/python" -m pip install --quiet --no-deps --force-reinstall "$1" || return 1
  local sp
  sp=$("$BIN/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/MinkowskiEngine
  sed -i -e 's/^from collections import Sequence, namedtuple$/from collections import namedtuple\nfrom collections.abc import Sequence/' \
         -e 's/^from collections import Sequence$/from collections.abc import Sequence/' "$sp"/*.py "$sp"/utils/*.py || return 1
  "$BIN/python" -c "import MinkowskiEngine as ME; print('MinkowskiEngine', ME.__version__)"
}

WHL=""
if [ -n "$WHEEL_CACHE" ]; then
  # setuptools >= 69 writes the name in lower case (minkowskiengine-0.5.4-...): match either spelling
  WHL=$(ls "$DIR"/[Mm]inkowski[Ee]ngine-"$ME_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
fi
if [ -n "$WHL" ]; then
  echo "MinkowskiEngine $ME_VERSION: installing the cached wheel $WHL"
  if install_wheel "$WHL"; then
    exit 0
  fi
  echo "the cached wheel $WHL does not install or import: building it again"
  rm -f "$WHL"
  "$BIN/python" -m pip uninstall --quiet -y MinkowskiEngine 2>/dev/null || true
fi

echo "MinkowskiEngine $ME_VERSION: building from source ($KEY; about 5 min on 2 idle cores)"
# shellcheck disable=SC2086 # TORCH is empty or one requirement
"$BIN/python" -m pip install --quiet $TORCH setuptools ninja wheel
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
PATH="$(cd "$BIN" && pwd):$PATH" SETUPTOOLS_USE_DISTUTILS=stdlib MAX_JOBS=${MAX_JOBS:-2} \
  "$BIN/python" -m pip wheel --quiet --no-build-isolation --no-deps --no-cache-dir \
  "MinkowskiEngine==$ME_VERSION" -w "$BUILD"
WHL=$(ls "$BUILD"/*.whl | head -n 1)
if [ -n "$WHEEL_CACHE" ] && mkdir -p "$DIR" 2>/dev/null; then
  NAME=$(basename "$WHL")
  # written under a temporary name and renamed: a concurrent or killed build never leaves half a wheel there
  if cp "$WHL" "$DIR/.$NAME.$$.part" && mv "$DIR/.$NAME.$$.part" "$DIR/$NAME"; then
    echo "cached $DIR/$NAME"
    WHL="$DIR/$NAME"
  else
    rm -f "$DIR/.$NAME.$$.part"
  fi
fi
install_wheel "$WHL"
