# One command trains, one tests; each installs what it needs first (a .venv beside this file).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The run targets install the project alone; test, lint and the search and export targets add an extra.
# The dev extras' mlflow brings scipy, which torchmetrics imports at every start: +0.7 s a run.
INSTALLED := $(VENV)/.installed
DEV := $(VENV)/.installed-dev
ARGS ?=
# pytest-xdist: one worker per core (at most 4); each test trains with one thread. Each file goes to one
# worker, so its module-scoped runs (a trained model, a DDP run, a built wheel) happen once. PARALLEL= runs serially.
PARALLEL ?= -n auto --maxprocesses=4 --dist loadfile

.DEFAULT_GOAL := help

.PHONY: help install train test test-fast sweep search dashboard report results bench answers schemas predict export tensorboard lint format clean

$(INSTALLED): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install -e .
	touch $@

$(VENV)/.installed-%: $(INSTALLED)  # an extra of pyproject.toml: dev, search, onnx
	$(PYTHON) -m pip install -e ".[$*]"
	touch $@

help:  ## this list (`make` alone shows it too)
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(DEV)  ## .venv with the project (editable) and its dev extras; redone when pyproject.toml changes

train: $(INSTALLED)  ## the default 784-128-64-10 MLP; extra overrides: make train ARGS="model.lr=3e-3"
	$(PYTHON) -m mnist_lit.train $(ARGS)

test: $(DEV)  ## everything, the slow real-MNIST tests included (they need MNIST_MIRROR or the network)
	$(PYTHON) -m pytest $(PARALLEL)

test-fast: $(DEV)  ## without the slow tests (real MNIST, DDP ranks, the installed wheel) and the browser ones
	$(PYTHON) -m pytest $(PARALLEL) -m "not slow and not browser"

sweep: $(INSTALLED)  ## 4 jobs: two architectures x two learning rates; side by side: ARGS=hydra/launcher=joblib
	$(PYTHON) -m mnist_lit.train -m 'model.hidden=[128,64],[256,128]' model.lr=1e-3,3e-3 $(ARGS)

search: $(VENV)/.installed-search  ## short Optuna search, a few minutes on CPU; resume: python -m mnist_lit.train resume=outputs/multiruns/<sweep>
	$(PYTHON) -m mnist_lit.train hparams_search=optuna hydra.sweeper.n_trials=6 trainer.max_epochs=2 data.batch_size=256 $(ARGS)

dashboard: $(VENV)/.installed-dashboard  ## optuna-dashboard on localhost:8080: make dashboard STORAGE=sqlite:///outputs/multiruns/<sweep>/optuna.db
	$(VENV)/bin/optuna-dashboard $(STORAGE) --host 127.0.0.1 --port 8080

report: $(INSTALLED)  ## compare runs: make report RUNS=outputs/multiruns/<sweep> (default: everything under outputs)
	$(PYTHON) -m mnist_lit.report $(or $(RUNS),outputs) --csv outputs/report.csv --plot outputs/report.png $(ARGS)

PRESETS := $(sort $(basename $(notdir $(wildcard conf/experiment/*.yaml))))

results: $(INSTALLED)  ## the default over 5 seeds and every conf/experiment preset over 3, into README's results table (~2 h on 2 cores); PRESET=<name>: that preset alone, the other rows kept
ifndef PRESET
	rm -rf outputs/results
	$(PYTHON) -m mnist_lit.train -m seed=0,1,2,3,4 hydra.sweep.dir=outputs/results/default
endif
	set -e; for preset in $(or $(PRESET),$(PRESETS)); do \
		rm -rf outputs/results/$$preset; \
		$(PYTHON) -m mnist_lit.train -m experiment=$$preset seed=0,1,2 hydra.sweep.dir=outputs/results/$$preset; \
	done
	$(PYTHON) -m mnist_lit.report outputs/results$(if $(PRESET),/$(PRESET) --keep-other-rows) --by-seed --readme README.md

predict: $(INSTALLED)  ## make predict ARGS="ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt inputs=[photos/]"
	$(PYTHON) -m mnist_lit.predict $(ARGS)

export: $(VENV)/.installed-onnx  ## make export ARGS="ckpt_path=... output=model.onnx"
	$(PYTHON) -m mnist_lit.export $(ARGS)

bench: $(INSTALLED)  ## epoch times of mnist_lit vs the classic pipeline, a plain loop, NumPy; e.g. ARGS="--repeats 3"
	$(PYTHON) -m mnist_lit.bench --whole-runs 3 --json outputs/bench.json $(ARGS)

answers: $(INSTALLED)  ## how fast --help, --cfg job, a refused setting and a Tab answer: 5 interleaved rounds
	$(PYTHON) -m mnist_lit.bench --answers 5 --json outputs/answers.json

schemas: $(INSTALLED)  ## regenerate mnist_lit/schemas.json, the config schemas, from the constructors' signatures
	$(PYTHON) -m mnist_lit.schemas

tensorboard: $(INSTALLED)  ## TensorBoard over every run under outputs/
	$(VENV)/bin/tensorboard --logdir outputs

lint: $(DEV)  ## ruff format --check and ruff check, the checks .pre-commit-config.yaml runs
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(DEV)  ## ruff format, then ruff check --fix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:  ## run folders and caches; keeps the dataset (data/) and the .venv
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -not -path "./$(VENV)/*" -exec rm -rf {} +
