# Two commands set everything up on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv, install torch (pinned), the dev requirements, DeepSpeed (requirements-deepspeed.txt, without its
# dependencies so that torch stays as pinned) and this package (with its compiled extension: the C++ CPU kernels
# always, the CUDA kernels too when a CUDA toolkit is found). `make test` includes the multi-process trainer tests
# (tests/test_crab_distributed.py, marked `distributed`: about 3 minutes on 2 cores).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# the oldest PEFT in ilora_kernels.peft_integration.SUPPORTED_PEFT: its tests also run against it (requirements-dev pins
# the newest)
PEFT_OLDEST ?= 0.19.1
# CUDA toolkit for the CUDA kernels (compiled and linked even without a GPU); empty = CPU kernels only
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda))
export MAX_JOBS ?= 2

ifneq ($(CUDA_HOME),)
BUILD_ENV := CUDA_HOME=$(CUDA_HOME) ILORA_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}"
else
BUILD_ENV :=
endif

SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: demo demo-kernels test test-peft-oldest lint dist bench-cpu gpu-check env sanitize clean

$(VENV)/.deps: requirements-dev.txt requirements-deepspeed.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -r requirements-deepspeed.txt
	$(PY) -c "import cpuinfo, einops, hjson, msgpack, pydantic; from importlib.metadata import version as v; \
		t = v('torch').split('+')[0]; assert t == '$(patsubst torch==%,%,$(word 1,$(TORCH_PINS)))', t; \
		print('deepspeed', v('deepspeed'), 'beside torch', t)"
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(BUILD_ENV) $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# the main job: synthetic AV-UIE v2 data, tiny Qwen2.5-Omni thinker fine-tuned with I-LoRA, evaluation, transfer table
demo: $(VENV)/.built
	$(PY) -m ilora_kernels.crab demo

# the kernel demo: a tiny Qwen2 patched with I-LoRA, loss and per-layer router statistics
demo-kernels: $(VENV)/.built
	$(PY) -m ilora_kernels.demo

# the PEFT tests once more against the oldest supported PEFT, installed beside the venv's (no dependency changes)
$(VENV)/peft-$(PEFT_OLDEST)/.done: $(VENV)/.deps
	$(PY) -m pip install -q --no-deps --target $(VENV)/peft-$(PEFT_OLDEST) peft==$(PEFT_OLDEST)
	touch $@

test-peft-oldest: $(VENV)/.built $(VENV)/peft-$(PEFT_OLDEST)/.done
	PYTHONPATH=$(VENV)/peft-$(PEFT_OLDEST) $(PY) -c "import peft; assert peft.__version__ == '$(PEFT_OLDEST)', peft.__file__"
	PYTHONPATH=$(VENV)/peft-$(PEFT_OLDEST) $(PY) -m pytest -q -p no:cacheprovider tests/test_peft_method.py \
		tests/test_peft_interop.py

lint: $(VENV)/.built
	$(PY) -m ruff check .

dist: $(VENV)/.built
	ILORA_SKIP_EXTENSION=1 $(PY) -m build --no-isolation --outdir dist .

test: $(VENV)/.built
	$(PY) -m ruff check .
	@if [ -n "$(CUDA_HOME)" ]; then bash scripts/check_cuda_sources.sh; fi
	$(PY) -m pytest -q tests
	$(MAKE) --no-print-directory test-peft-oldest
	$(PY) -m pytest -q benchmarks --benchmark-disable
	PYTHON=$(PY) SANITIZE_K="$(SANITIZE_QUICK)" bash scripts/sanitize_cuda_emulation.sh

# the CUDA kernels' host emulation under ThreadSanitizer and AddressSanitizer (about 3 minutes; `make test` runs
# the SANITIZE_QUICK subset, about 1.5 minutes)
SANITIZE_QUICK := every_output_mask or launch_counts or non_contiguous or shared_hash or (many_heads and float32 and 37)
sanitize: $(VENV)/.built
	PYTHON=$(PY) bash scripts/sanitize_cuda_emulation.sh

env: $(VENV)/.built
	$(PY) -m ilora_kernels.env

bench-cpu: $(VENV)/.built
	$(PY) -m benchmarks.run --suite cpu

# On a machine with a CUDA GPU: build with CUDA, run the GPU tests and the GPU benchmark suite.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build dist *.egg-info ilora_kernels/_C*.so .pytest_cache .benchmarks
