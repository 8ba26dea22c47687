# openclaw: two set-up commands. `make quickstart` trains the digits example; `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_CPU := torch==2.13.0

.PHONY: help venv install install-test quickstart test test-unit data bench mlflow-server clean

help:
	@echo "make quickstart   create $(VENV), install, prepare digits, train it on a local Ray instance (2 workers)"
	@echo "make test         install test dependencies and run the whole suite"
	@echo "make test-unit    only the tests that need no Ray cluster"
	@echo "make data         prepare the digits and text datasets under datasets/"
	@echo "make bench        run the engine-overhead benchmark"
	@echo "make mlflow-server  an MLflow tracking server for a cluster (MLFLOW_BACKEND, MLFLOW_ARTIFACTS, MLFLOW_HOST, MLFLOW_PORT)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

venv: $(BIN)/python

# The CPU build of torch first, only where no torch is installed: pyproject's torch range would
# otherwise pull a multi-GB CUDA build. Users with their own (CUDA) torch keep it.
install: venv
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_CPU)
	$(BIN)/python -m pip install -q -e .

# The MLflow UI test drives Debian's chromium headless (no browser download from outside the registries).
install-test: install
	$(BIN)/python -m pip install -q -e ".[test]"
	@command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null || \
		(apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)

datasets/digits/stats.json: data/prepare.py | venv
	$(BIN)/python data/prepare.py digits --out datasets/digits

datasets/text/stats.json: data/prepare.py | venv
	$(BIN)/python data/prepare.py text --out datasets/text

data: datasets/digits/stats.json datasets/text/stats.json

quickstart: install datasets/digits/stats.json
	$(BIN)/openclaw train jobs/configs/digits.yaml

test: install-test
	$(BIN)/python -m pytest

test-unit: install-test
	$(BIN)/python -m pytest -m "not integration"

bench: install
	$(BIN)/python bench/engine_overhead.py

# The tracking server for a cluster: a database backend and an artifact root on shared storage, e.g.
#   make mlflow-server MLFLOW_BACKEND=postgresql://mlflow:PASS@db-host/mlflow MLFLOW_ARTIFACTS=s3://bucket/mlflow MLFLOW_HOST=0.0.0.0
# (PostgreSQL needs `pip install psycopg2-binary`, S3 needs boto3 and the AWS_* credentials). Clients and
# the job use `tracking.uri: http://HOST:PORT`, or MLFLOW_TRACKING_URI.
MLFLOW_BACKEND   ?= sqlite:///$(CURDIR)/mlflow-server.db
MLFLOW_ARTIFACTS ?= $(CURDIR)/mlartifacts
MLFLOW_HOST      ?= 127.0.0.1
MLFLOW_PORT      ?= 5000
mlflow-server: install
	$(BIN)/mlflow server --backend-store-uri $(MLFLOW_BACKEND) --artifacts-destination $(MLFLOW_ARTIFACTS) \
		--host $(MLFLOW_HOST) --port $(MLFLOW_PORT)

clean:
	rm -rf runs mlruns mlflow.db datasets .pytest_cache
