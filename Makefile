# Two entry points for a fresh machine with Python 3.11 and the package registries:
#   make demo   set up .venv and train the embedded MNIST default end to end
#   make test   set up .venv, lint, and run the test suite
# and, for the inner loop: make test-fast (no subprocess, notebook or benchmark tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/mnist

.PHONY: demo test test-fast lint bench clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	touch $@

# make demo: the training program only (the [train] extra; no torch, no test tools).
$(VENV)/.installed-train: setup.cfg pyproject.toml | $(VENV)/.created
	$(PY) -m pip install -q -e '.[train]'
	touch $@

# make test: everything the suite uses ([test] includes [train], [export] and [report]).
$(VENV)/.installed: setup.cfg pyproject.toml | $(VENV)/.created
	# torch: the CPU build only (an optional extra, used by the PyTorch parity tests).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed-train

demo: $(VENV)/.installed-train
	$(PY) main.py --config=configs/mnist.py --workdir=$(WORKDIR)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -n 2 -q tests

test-fast: $(VENV)/.installed
	$(PY) -m pytest -n 2 -q -m "not slow" tests

bench: $(VENV)/.installed
	$(PY) bench/performance.py step --models resnet20 --dtypes float32

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
