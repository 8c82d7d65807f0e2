# One command trains, one tests; each installs what it needs first (a .venv beside this file).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
ARGS ?=

.PHONY: install train test test-fast sweep tensorboard lint format clean

$(INSTALLED): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install -e ".[dev]"
	touch $@

install: $(INSTALLED)

train: $(INSTALLED)  ## the default 784-128-64-10 MLP; extra overrides: make train ARGS="model.lr=3e-3"
	$(PYTHON) -m mnist_lit.train $(ARGS)

test: $(INSTALLED)  ## everything, the slow real-MNIST tests included (they need MNIST_MIRROR or the network)
	$(PYTHON) -m pytest

test-fast: $(INSTALLED)
	$(PYTHON) -m pytest -m "not slow"

sweep: $(INSTALLED)  ## 4 jobs: two architectures x two learning rates
	$(PYTHON) -m mnist_lit.train -m 'model.hidden=[128,64],[256,128]' model.lr=1e-3,3e-3 $(ARGS)

tensorboard: $(INSTALLED)
	$(VENV)/bin/tensorboard --logdir outputs

lint: $(INSTALLED)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(INSTALLED)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:  ## run folders and caches; keeps the dataset (data/) and the .venv
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -not -path "./$(VENV)/*" -exec rm -rf {} +
