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
	@echo "make bench        every CPU benchmark in a quick mode (about 27 minutes): bench/results.md and the README table"
	@echo "make mlflow-server  a basic-auth MLflow server for a cluster (deploy/mlflow-server.sh says its settings)"

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
	$(BIN)/python -m pip install -q -e ".[test,quantize]"
	@command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null || \
		(apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)

datasets/digits/stats.json: data/prepare.py | install
	$(BIN)/python data/prepare.py digits --out datasets/digits

datasets/text/stats.json: data/prepare.py | install
	$(BIN)/python data/prepare.py text --out datasets/text

data: datasets/digits/stats.json datasets/text/stats.json

quickstart: install datasets/digits/stats.json
	$(BIN)/openclaw train jobs/configs/digits.yaml

test: install-test
	$(BIN)/python -m pytest

test-unit: install-test
	$(BIN)/python -m pytest -m "not integration"

bench: install-test
	$(BIN)/python bench/run_all.py

# A tracking server for a cluster, safe by default (deploy/mlflow-server.sh): basic-auth with a generated
# admin password kept 0600 in ~/openclaw/mlflow-server, host checks, and no secret on the command line, e.g.
#   MLFLOW_BACKEND_STORE_URI_FILE=/etc/openclaw/db-uri MLFLOW_ARTIFACTS=s3://bucket/mlflow \
#   MLFLOW_HOST=0.0.0.0 MLFLOW_ALLOWED_HOSTS=mlflow.internal:5000 make mlflow-server
# (PostgreSQL needs `pip install psycopg2-binary`; S3 needs boto3.) Put TLS in front of it.
mlflow-server: install
	$(BIN)/python -m pip install -q -e ".[server]"
	PYTHON=$(BIN)/python deploy/mlflow-server.sh

clean:
	rm -rf runs mlruns mlflow.db datasets .pytest_cache
