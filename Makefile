# emq: `make book` sets everything up and builds the book; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu
CHAPTERS := $(sort $(wildcard book/[0-9][0-9]_*.ipynb))
FASHION := data/FashionMNIST/raw/t10k-labels-idx1-ubyte

.PHONY: all venv data chapters book html test test-reference bench clean

all: book

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

$(FASHION): | $(VENV)/.installed
	$(PY) -m emq data fetch --root data

data: $(FASHION)

# Execute every chapter in place at $(PROFILE) (cpu, the chapters' default, injects no
# parameters); finished runs are read back from results/, so a re-run computes only what is new.
chapters: venv data
	@for nb in $(CHAPTERS); do \
	  echo "== $$nb ($(PROFILE))"; \
	  $(VENV)/bin/papermill --cwd book $(if $(filter-out cpu,$(PROFILE)),-p profile $(PROFILE)) $$nb $$nb || exit 1; \
	done

html: venv
	$(VENV)/bin/jupyter-book build book/

book: chapters html
	@echo "book: book/_build/html/index.html"

test: venv data
	$(PY) -m pytest

# The smoke-profile copies of the chapters that nbval re-executes and compares, at one thread
# as the tests run them (tests/conftest.py).
test-reference: venv data
	@mkdir -p tests/notebooks
	@rm -rf _build/test-results
	@for nb in $(CHAPTERS); do \
	  out=tests/notebooks/$$(basename $$nb); \
	  OMP_NUM_THREADS=1 $(VENV)/bin/papermill --cwd tests/notebooks -p profile smoke -p results_dir _build/test-results $$nb $$out || exit 1; \
	done

bench: venv data
	$(PY) -m emq.bench --coreset

clean:
	rm -rf book/_build _build
