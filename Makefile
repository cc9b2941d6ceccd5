# `make demo` and `make test` each build .venv on first use (Python 3.11 + pip only).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
DEMO_RAW := data/raw/synthetic
DEMO_STORE := data/stores/synthetic-minilm
DEMO_ENCODER := sentence-transformers/all-MiniLM-L6-v2

comma := ,

.PHONY: demo test benchmark reproduce-mosi reproduce-mosei clean

# One stamp per set of extras ("demo+test" installs .[demo,test]); re-made when
# pyproject.toml changes. torch goes first, by its plain pin, so that pip takes the
# wheel the index serves before anything else can ask for another build.
$(VENV)/.installed-%: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[$(subst +,$(comma),$*)]'
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/mmim data synth --out $(DEMO_RAW)
	$(BIN)/mmim extract --source mult --input $(DEMO_RAW) --out $(DEMO_STORE) --encoder $(DEMO_ENCODER) --overwrite
	$(BIN)/mmim train --config configs/demo.yaml
	@echo "MLflow UI:  $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db   (http://127.0.0.1:5000)"
	@echo "registry:   $(BIN)/mmim registry list --name mmim-synthetic"
	@echo "serve:      $(BIN)/mmim serve --model models:/mmim-synthetic@champion"

test: $(VENV)/.installed-demo+test
	$(BIN)/python -m pytest -q

benchmark: $(VENV)/.installed-demo
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/extract.py

# The published table, for a user who has the real files in data/raw/<dataset>/.
reproduce-mosi reproduce-mosei: reproduce-%: $(VENV)/.installed-demo
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro extract@$*
	$(BIN)/mmim train --config configs/$*.yaml

clean:
	rm -rf $(VENV) data/stores runs .pytest_cache
