# Set-up and the main jobs. `make demo` and `make test` work on a fresh machine.
PY     ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build from the local wheel; GPU users: `make setup TORCH=` after installing their own torch in $(VENV)
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.calopc-installed

.PHONY: setup demo test docs bench clean minkowski

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH) -e ".[all,test,docs]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/calopc demo --out demo

# TEST_ARGS: extra pytest options, e.g. `make test TEST_ARGS="-n 2"` (pytest-xdist, as CI runs it)
TEST_ARGS ?=
test: setup
	MPLBACKEND=Agg $(BIN)/python -m pytest -q $(TEST_ARGS)

# the documentation site in docs/_build/html (opens offline), warnings are errors; the example notebooks run once
# (on synthetic data) and are cached in docs/_build/.jupyter_cache, so a rebuild re-runs only those that changed
docs: setup
	MPLBACKEND=Agg $(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

bench: setup
	$(BIN)/python benchmarks/convert.py

# MinkowskiEngine 0.5.4 (CPU), installed from a wheel cached OUTSIDE the clone, in
# $(WHEEL_CACHE)/py<X.Y>-torch<version>-me<version>-<machine>/ (the compiled extension matches exactly that Python and
# torch): a warm cache installs in seconds. Without a cached wheel (a fresh machine) it is built once from the PyPI
# sdist (about 5 min on 2 idle cores) and cached. See .ci/minkowski.sh; `make minkowski WHEEL_CACHE=` never caches.
ME_VERSION  ?= 0.5.4
WHEEL_CACHE ?= $(HOME)/.cache/calopc/wheels
minkowski: setup
	VENV="$(VENV)" ME_VERSION="$(ME_VERSION)" TORCH="$(TORCH)" WHEEL_CACHE="$(WHEEL_CACHE)" bash .ci/minkowski.sh

clean:
	rm -rf demo bench-out .pytest_cache docs/_build docs/generated docs/_generated docs/examples
