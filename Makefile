# tritonq: the two commands of the README, and the ones behind them.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?= cpu

.PHONY: demo test lint proto proto-check install unit integration clean settings-table models models-check bench bench-priority chaos smoke compose-check

$(BIN)/tritonq: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/tritonq

demo: install
	$(BIN)/tritonq demo

test: install proto-check lint
	$(BIN)/pytest -q -p no:cacheprovider

unit: install
	$(BIN)/pytest -q tests/unit

integration: install
	$(BIN)/pytest -q tests/integration

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy worker devstack bench chaos

# Generated code is reproducible from protos/job.proto; proto-check fails when it is stale.
proto: install
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=worker/proto --pyi_out=worker/proto protos/job.proto
	cp protos/job.proto worker/proto/job.proto

proto-check: install
	@tmp=$$(mktemp -d); \
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=$$tmp --pyi_out=$$tmp protos/job.proto && \
	diff -q $$tmp/job_pb2.py worker/proto/job_pb2.py && diff -q $$tmp/job_pb2.pyi worker/proto/job_pb2.pyi \
	  && diff -q protos/job.proto worker/proto/job.proto \
	  || { echo "worker/proto is stale: run 'make proto'"; exit 1; }; rm -rf $$tmp

# cpu: re-renders triton/model_repository in place and exports its ONNX files;
# gpu: renders configs, code and ONNX files into build/model_repository_gpu.
models: install
	$(BIN)/python triton/scripts/render_repository.py --profile $(PROFILE)

models-check: install
	$(BIN)/python triton/scripts/render_repository.py --check
	$(BIN)/python triton/scripts/export_models.py --check

# The benchmark (not a test): real emulators and Triton, a simulated T4 model; writes build/bench.{json,md,png}.
bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

# The priority figure: 20 high-priority jobs against a 1,000-job low-priority backlog; writes build/priority.json.
bench-priority: install
	$(BIN)/python -m bench.priority

# Fault injection on the real stack (worker SIGKILLed, Triton restarted, storage cut, bad input, SIGTERM,
# a 5,000-message backlog); writes build/chaos.json.
chaos: install
	$(BIN)/python -m chaos

# The seed's smoke test against whatever the settings point at (compose, or GKE through a port-forward).
smoke: install
	$(BIN)/python scripts/smoke.py $(SMOKE_ARGS)

# docker-compose.yml run for real: dockerd (started if needed), local stand-ins for the pulled
# images, `up --build --wait`, smoke for every job model, one `publish --wait`, `down -v` (README Compose check).
compose-check: install
	scripts/compose_check.sh

# The README's settings table is generated from worker/config.py (a test fails when it is stale).
settings-table: install
	$(BIN)/python -c "import re, pathlib; from worker.config import settings_markdown; p = pathlib.Path('README.md'); \
	  s = p.read_text(); a, b = '<!-- settings:start -->\n', '<!-- settings:end -->'; \
	  p.write_text(s[:s.index(a) + len(a)] + settings_markdown() + s[s.index(b):])"

clean:
	rm -rf build .tritonq
