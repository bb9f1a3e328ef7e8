# bsm-relay: two commands do all the set-up.
#   make run   - virtualenv, install, state dir + database + key, demo data, serve on 127.0.0.1:2525
#   make test  - virtualenv, install, run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
CONFIG ?=
CFG     = $(if $(CONFIG),--config $(CONFIG),)

.PHONY: run test init bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

init: $(STAMP)
	$(BIN)/bsm-relay $(CFG) init

run: init
	$(BIN)/bsm-relay $(CFG) demo
	$(BIN)/bsm-relay $(CFG) serve

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
