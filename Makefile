# Two commands matter: `make serve` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= .demo-models
STAMP := $(VENV)/.installed

.PHONY: setup serve test lint typecheck pytest bench proto demo-models clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, from the CPU build on disk: a plain `torch` requirement would pull a CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

$(DEMO_DIR)/%/config.json: | $(STAMP)
	$(BIN)/moe-cluster demo-model --out $(DEMO_DIR)/$* --preset $*

demo-models: $(DEMO_DIR)/fast/config.json $(DEMO_DIR)/tiny/config.json

# Local Ray + Serve with the demo tiers on gRPC 127.0.0.1:9000; a sample call streams tokens.
serve: demo-models
	$(BIN)/moe-cluster up --demo-dir $(DEMO_DIR) --sample "The experts of a mixture"

PROTO := deploy/proto/moecluster_v1.proto
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck pytest

# Every bench, one after the other (about an hour): `make bench BENCH=dispatch` for one,
# `make bench ARGS=--quick` for smoke runs. Each is `python -m bench.NAME` from this folder.
BENCH ?= model_core engine_throughput dispatch serve_load overload tracing_overhead gil_contention \
	expert_kernels
bench: $(STAMP)
	for name in $(BENCH); do $(BIN)/python -m bench.$$name $(ARGS) || exit 1; done

clean:
	rm -rf $(VENV) $(DEMO_DIR) .mypy_cache .pytest_cache .ruff_cache
