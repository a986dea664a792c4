# Set-up and the main jobs. `make demo` and `make test` work on a fresh machine.
PY     ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build from the local wheel; GPU users: `make setup TORCH=` after installing their own torch in $(VENV)
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.calopc-installed

.PHONY: setup demo test bench clean minkowski

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH) -e ".[all,test]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/calopc demo --out demo

test: setup
	MPLBACKEND=Agg $(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/convert.py

# MinkowskiEngine 0.5.4 (CPU) from the PyPI sdist into $(VENV): system openblas, no build isolation, the stdlib
# distutils for numpy.distutils' BLAS lookup, and the collections.abc fix for Python >= 3.10. ME's setup.py calls
# `pip uninstall`, so the venv's bin goes first on PATH. About 5 min on 2 cores.
ME_VERSION ?= 0.5.4
minkowski: setup
	@if $(BIN)/python -c "import MinkowskiEngine" 2>/dev/null; then echo "MinkowskiEngine already installed"; else \
	  if ! ldconfig -p | grep -q libopenblas; then apt-get -o DPkg::Lock::Timeout=600 update -qq && \
	    apt-get -o DPkg::Lock::Timeout=600 install -y -qq libopenblas-dev || exit 1; fi; \
	  $(BIN)/python -m pip install --quiet $(TORCH) setuptools ninja && \
	  PATH="$(abspath $(BIN)):$$PATH" SETUPTOOLS_USE_DISTUTILS=stdlib MAX_JOBS=$${MAX_JOBS:-2} \
	    $(BIN)/python -m pip install --no-build-isolation --no-cache-dir MinkowskiEngine==$(ME_VERSION) && \
	  SP=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/MinkowskiEngine && \
	  sed -i -e 's/^from collections import Sequence, namedtuple$$/from collections import namedtuple\nfrom collections.abc import Sequence/' \
	         -e 's/^from collections import Sequence$$/from collections.abc import Sequence/' $$SP/*.py $$SP/utils/*.py && \
	  $(BIN)/python -c "import MinkowskiEngine as ME; print('MinkowskiEngine', ME.__version__)"; fi

clean:
	rm -rf demo bench-out .pytest_cache
