# Two commands matter: `make serve` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= .demo-models
MODEL ?= $(DEMO_DIR)/tiny
STAMP := $(VENV)/.installed

.PHONY: setup serve test lint typecheck pytest bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, from the CPU build on disk: a plain `torch` requirement would pull a CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

$(DEMO_DIR)/tiny/config.json: | $(STAMP)
	$(BIN)/moe-cluster demo-model --out $(DEMO_DIR)/tiny --preset tiny

serve: $(STAMP) $(DEMO_DIR)/tiny/config.json
	$(BIN)/moe-cluster generate --model $(MODEL) --prompt "The experts of a mixture" --max-tokens 48

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python bench/model_core.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .mypy_cache .pytest_cache .ruff_cache
