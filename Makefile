# Set-up and the main jobs. `make demo` and `make test` work on a fresh machine.
PY     ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build from the local wheel; GPU users: `make setup TORCH=` after installing their own torch in $(VENV)
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.calopc-installed

.PHONY: setup demo test bench clean

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

clean:
	rm -rf demo bench-out .pytest_cache
