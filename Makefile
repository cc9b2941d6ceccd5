# `make demo` and `make test` each build .venv on first use (Python 3.11 + pip only).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
comma := ,
# Python caches compiled modules (__pycache__/, which `make clean` removes) even where the
# environment says not to: the tests start a few hundred Python processes (CLI runs, Ray
# workers, extractor children), and each would compile the project again.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test test-fast lint benchmark reproduce-mosi reproduce-mosei clean distclean

# One stamp per set of extras ("demo+test" installs .[demo,test]); re-made when
# pyproject.toml changes. torch goes first, by its plain pin, so that pip takes the
# wheel the index serves before anything else can ask for another build.
$(VENV)/.installed-%: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet --quiet -e '.[$(subst +,$(comma),$*)]'
	touch $@

# The retraining flow on the synthetic sample: DVC extraction (pushed to the local remote
# data/dvc-remote) -> 2 Ray CPU workers -> MLflow (./mlflow.db) -> registry. The commands
# it prints (mlflow, prefect, mmim) are in .venv/bin.
demo: $(VENV)/.installed-demo
	$(BIN)/python -m flows.retrain --dataset synthetic --config configs/demo.yaml

# Everything: lint, types, and every test (service tests start a local Ray cluster, MLflow
# servers, PostgreSQL/S3 clients, Prefect's harness). About 19 minutes on 2 cores.
test: lint
	$(BIN)/python -m pytest -q --durations=25

# The edit-test loop: the tests that start no service (about 50 seconds on 2 cores).
test-fast: $(VENV)/.installed-demo+test
	$(BIN)/python -m pytest -q -m "not service"

lint: $(VENV)/.installed-demo+test
	$(BIN)/ruff check mmim tasks flows tests benchmarks docs/generate_config_reference.py
	$(BIN)/ruff format --check mmim tasks flows tests benchmarks docs/generate_config_reference.py
	$(BIN)/mypy

benchmark: $(VENV)/.installed-demo
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/efficiency.py
	$(BIN)/python benchmarks/extract.py
	$(BIN)/python benchmarks/extract_recordings.py

# The published table, for a user who has the real files in data/raw/<dataset>/.
reproduce-mosi reproduce-mosei: reproduce-%: $(VENV)/.installed-demo
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro extract@$*
	$(BIN)/mmim train --config configs/$*.yaml

# What runs made, and nothing else: stores and generated samples, DVC's cache and the local
# remote, MLflow's database and artifacts, Ray's storage (runs/), the tools' caches. It leaves
# a fresh clone plus .venv; a release you put in data/raw/<name>/ stays. `make distclean`
# removes .venv too.
clean:
	rm -rf data/stores data/raw/synthetic data/raw/recordings-sample data/dvc-remote data/cache \
		.dvc/cache .dvc/tmp runs mlflow.db mlartifacts mlruns \
		.pytest_cache .mypy_cache .ruff_cache *.egg-info build
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	-rmdir data/raw data 2>/dev/null
	@# dvc.lock, which DVC stages in git (core.autostage), unless this checkout's history has one
	@if ! git cat-file -e HEAD:dvc.lock 2>/dev/null; then \
		git rm -q --cached --ignore-unmatch dvc.lock 2>/dev/null; rm -f dvc.lock; fi

distclean: clean
	rm -rf $(VENV)
