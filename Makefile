# bsm-relay: two commands do all the set-up.
#   make run   - virtualenv, install, state dir + database + key, demo data, serve on 127.0.0.1:2525
#   make test  - virtualenv, install, run the whole test suite
#   make test-pg - the same suite against PostgreSQL (TEST_DATABASE_URL; each test in its own schema)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
CONFIG ?=
CFG     = $(if $(CONFIG),--config $(CONFIG),)

.PHONY: run test test-pg init bench lint clean fuzz

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

init: $(STAMP)
	$(BIN)/bsm-relay $(CFG) init

# The demo serves on the embedded defaults. Sender authentication (SPF/DKIM, the production
# default) needs DNS records for the sender's domain, which the demo's example domains cannot
# have: without CONFIG it is switched off for this run only, and the relay says so in its log.
DEMO_ENV = $(if $(CONFIG),,BSM_RELAY_AUTH_SENDER_AUTHENTICATION=none)

run: init
	$(DEMO_ENV) $(BIN)/bsm-relay $(CFG) demo
	$(DEMO_ENV) $(BIN)/bsm-relay $(CFG) serve

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The whole suite again on PostgreSQL: every relay and every delivery test gets a fresh schema
# t_<hex> in this database (dropped at the end), so runs never see each other's rows.
TEST_DATABASE_URL ?= postgresql+asyncpg://postgres@127.0.0.1:5432/test

test-pg: $(STAMP)
	BSM_RELAY_TEST_DATABASE_URL=$(TEST_DATABASE_URL) $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

# Coverage-guided fuzzing of the parser, masking and rewrite for FUZZ_SECONDS (not part of `make test`;
# see fuzz/README.md).  The seed corpus is copied to FUZZ_DIR, which keeps what the run found.
FUZZ_SECONDS ?= 300
FUZZ_DIR     ?= var/fuzz

fuzz: $(STAMP)
	$(BIN)/python -c 'import atheris' 2>/dev/null || $(BIN)/python -m pip install --quiet atheris
	mkdir -p $(FUZZ_DIR)/corpus $(FUZZ_DIR)/crashes && cp -n fuzz/corpus/* $(FUZZ_DIR)/corpus/
	$(BIN)/python fuzz/fuzz_rewrite.py $(FUZZ_DIR)/corpus -dict=fuzz/rewrite.dict \
		-max_total_time=$(FUZZ_SECONDS) -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
		-artifact_prefix=$(FUZZ_DIR)/crashes/ -print_final_stats=1 $(FUZZ_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
