# tritonq: the two commands of the README, and the ones behind them.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?= cpu

.PHONY: demo test lint proto proto-check install unit integration clean

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
	$(BIN)/mypy worker

# Generated code is reproducible from protos/job.proto; proto-check fails when it is stale.
proto: install
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=worker/proto --pyi_out=worker/proto protos/job.proto

proto-check: install
	@tmp=$$(mktemp -d); \
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=$$tmp --pyi_out=$$tmp protos/job.proto && \
	diff -q $$tmp/job_pb2.py worker/proto/job_pb2.py && diff -q $$tmp/job_pb2.pyi worker/proto/job_pb2.pyi \
	  || { echo "worker/proto is stale: run 'make proto'"; exit 1; }; rm -rf $$tmp

clean:
	rm -rf build .tritonq
