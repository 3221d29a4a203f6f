# transferlab: `make run` (the pipeline) and `make test` set everything up themselves.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
TF ?= cpu
# Optional extras, comma- or space-separated: ray (Ray + hydra-ray-launcher), postgres (the
# PostgreSQL driver of the tracking server). `make test` installs both.
EXTRAS ?=
# Test processes (pytest-xdist); tests sharing a costly fixture stay on one (tests/conftest.py).
# Each may run TensorFlow on every core: more than the cores slows the suite. 1: no xdist.
TEST_WORKERS ?= 2
PYTEST_WORKERS := $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-$(TF)
# `dvc plots show` renders offline with this template (Vega inlined from an installed package; git-ignored).
PLOTS_TEMPLATE := .dvc/offline_plots.html
comma := ,
EXTRA_STAMPS := $(foreach extra,$(subst $(comma), ,$(EXTRAS)),$(VENV)/.extra-$(extra))
export PATH := $(BIN):$(PATH)
export TF_CPP_MIN_LOG_LEVEL ?= 2
# Quiet DVC's anonymous usage report (it cannot reach its server from offline machines anyway).
export DVC_NO_ANALYTICS := 1
# Nor does MLflow (its UI server and clients) call home; `transferlab` commands set the same default.
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: help setup test test-fast run demo sweep exps ui bench study study-sizes study-cv params lint format lock clean tracking-server tracking-server-stop

help:                  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 24

setup: $(STAMP) $(PLOTS_TEMPLATE) $(EXTRA_STAMPS) ## the virtualenv with the pinned dependencies (EXTRAS=ray,postgres for the extras)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q -e '.[$(TF),dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

$(PLOTS_TEMPLATE): $(STAMP)
	$(BIN)/python -m transferlab.offline_plots $@

# Extras come from their own exact lock files, installed --no-deps on top of requirements.lock
# (see the comment in requirements-ray.lock and README "Scaling out").
$(VENV)/.extra-%: requirements-%.lock $(STAMP)
	$(BIN)/python -m pip install -q --no-deps -r $<
	@touch $@

test: setup $(VENV)/.extra-ray $(VENV)/.extra-postgres ## the whole test suite, on TEST_WORKERS processes (15-19 minutes on 2 cores)
	$(BIN)/pytest $(PYTEST_WORKERS)

test-fast: setup       ## skip the tests that train models or start servers
	$(BIN)/pytest $(PYTEST_WORKERS) -m "not slow"

run: setup             ## the main job: download -> split -> train -> evaluate with DVC (dvc repro)
	$(BIN)/transferlab repro

demo: setup            ## the whole pipeline offline on synthetic images, in a scratch copy
	$(BIN)/python -m transferlab.demo

sweep: setup           ## an example Hydra multirun sweep on the prepared splits: feature power x label smoothing (4 jobs)
	$(BIN)/transferlab-train -m model.feature_power=0.5,1.0 train.label_smoothing=0,0.1

exps: setup            ## compare DVC experiments: params that differ, test accuracy, F1, ECE, MLflow run
	$(BIN)/transferlab exps

ui: setup              ## the MLflow UI on this project's store
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
		--default-artifact-root $(CURDIR)/mlruns/artifacts --host 127.0.0.1 --port 5000

tracking-server: setup $(VENV)/.extra-postgres ## a local MLflow server on PostgreSQL, 127.0.0.1:5050 (data in build/tracking-server)
	$(BIN)/python -m transferlab.tracking_server start

tracking-server-stop: setup ## stop it (its data stays)
	$(BIN)/python -m transferlab.tracking_server stop

bench: setup           ## benchmark figures; writes reports/bench.json
	$(BIN)/python bench/run.py

study: setup           ## rerun the study that chose the defaults (../shared data, about an hour); reports/study.md
	$(BIN)/python bench/study.py

study-sizes: setup     ## cross-validate input sizes and test-time flipping on the study's train + val photos (after `make study`)
	$(BIN)/python bench/sizes.py

study-cv: setup        ## the study's settings and fine-tuning presets on 6 re-splits of its train + val photos
	$(BIN)/python bench/crossval.py

params: setup          ## save OVERRIDES="a=b c=d" as project settings, rewrite params.yaml from conf/
	$(BIN)/transferlab compose $(OVERRIDES)

lint: setup            ## ruff check and ruff format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup          ## fix what ruff can fix, format the code
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

lock: setup            ## refresh requirements.lock from the current venv (extras stay in their own locks)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -E '^tensorflow' \
		| grep -v -x -F -f <(grep -h -v '^#' requirements-*.lock) \
		| sed '1i # Exact versions installed by `make setup` (Python 3.11), except TensorFlow: see pyproject extras. `make lock` regenerates.' \
		> requirements.lock

clean:                 ## remove build/, outputs/ and tool caches
	rm -rf build outputs .pytest_cache .ruff_cache
