# emq: `make book` sets everything up and builds the book; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu
CHAPTERS := $(sort $(wildcard book/[0-9][0-9]_*.ipynb))
FASHION := data/FashionMNIST/raw/t10k-labels-idx1-ubyte

.PHONY: all venv data chapters book html test test-reference bench runs gpu-evidence clean

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

# Warnings are errors (-W -n): a broken reference, citation or glue fails the build.
html: venv
	$(VENV)/bin/jupyter-book build -W -n --keep-going book/

book: chapters html
	@echo "book: book/_build/html/index.html"

test: venv data
	$(PY) -m pytest

# The smoke-profile copies of the chapters that nbval re-executes and compares, at one thread
# as the tests run them (tests/conftest.py), and their headline numbers, which
# tests/test_chapter_numbers.py compares within the spread measured between CPUs.
test-reference: venv data
	@mkdir -p tests/notebooks/reference
	@rm -rf _build/test-results
	@for nb in $(CHAPTERS); do \
	  name=$$(basename $$nb .ipynb); \
	  OMP_NUM_THREADS=1 $(VENV)/bin/papermill --cwd tests/notebooks -p profile smoke -p train_missing True -p train_extended True \
	    -p results_dir _build/test-results $$nb tests/notebooks/$$name.ipynb || exit 1; \
	  cp _build/test-results/chapters/$$name.json tests/notebooks/reference/$$name.json; \
	done

# Train every missing run of the chapters' grids at $(PROFILE) (emq.book.grids.CHAPTER_GRIDS; python -m
# emq grid NAME --dry-run lists a grid's runs and their tier), in one queue, two single-thread workers
# at a time; interrupted runs resume, finished ones are read back. By default the core of each grid, the book's
# budget; EXTENDED=1 adds the grids' extended tiers and then the scale study's grid (chapter 00 shows
# that grid as far as the store has it and never trains it).
GRIDS := 01_quantization_bias 02_shared_bn 03_knowledge_transfer 04_coreset_pruning 06_methods
SCALE_GRID := 00_scale
JOBS ?= 2
runs: venv data
	$(PY) -m emq grid $(GRIDS) $(if $(EXTENDED),$(SCALE_GRID)) --profile $(PROFILE) --jobs $(JOBS) \
	  $(if $(EXTENDED),--extended)

# On a GPU box with PyTorch installed (no venv, no network): the throughput figures at full size
# and chapter 02's headline grid on all 60k images with ResNet-20, into results/ to commit.
# Needs data/FashionMNIST/raw (carry it). DRY_RUN=1 lists the runs and trains nothing.
GPU_PY ?= python3
gpu-evidence:
	@mkdir -p results/gpu
	$(if $(DRY_RUN),,"$(GPU_PY)" -m emq bench --throughput --no-book --size full --device cuda | tee results/gpu/throughput.txt)
	"$(GPU_PY)" -m emq grid gpu_evidence --profile gpu --device $(if $(DRY_RUN),cpu,cuda) --jobs 6 --threads 2 $(if $(DRY_RUN),--dry-run)

bench: venv data
	$(PY) -m emq.bench --coreset --speed-options --activation --runner --budget --no-book

clean:
	rm -rf book/_build _build
