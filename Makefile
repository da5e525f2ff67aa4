# Everything runs from the project's own virtualenv, created by `make install`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
DIR ?= weights
PORT ?= 5000
TINY := .tiny-weights

.PHONY: install demo test test-browser soak serve serve-cog tiny-weights schema lint bench clean

# Idempotent: re-running only installs what changed (the stamp follows pyproject.toml).
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python scripts/requirements.py --dev > $(VENV)/requirements.txt
	$(BIN)/python -m pip install --quiet -r $(VENV)/requirements.txt
	@touch $@

# A one-shot `cog predict` on the tiny random weights: writes output.0.webp.
demo: install $(TINY)/FLUX.1-dev
	FLUX_WEIGHTS_DIR=$(TINY) $(BIN)/python scripts/cog_predict.py \
		-i prompt="an ascii art cat" -i num_inference_steps=4 -i aspect_ratio=custom -i width=256 -i height=256

$(TINY)/FLUX.1-dev:
	$(BIN)/python scripts/tiny_weights.py $(TINY)

test: install
	$(BIN)/ruff check .
	$(BIN)/python scripts/gen_schema.py --check
	$(BIN)/python -m pytest -q

# The playground in a real browser (Debian's chromium and chromium-driver; CI installs them).
test-browser: install
	$(BIN)/python -m pytest -q -m browser tests/test_playground.py

# The long soak (1,000 predictions over HTTP, ≈ 2.5 min on 2 cores); CI runs it after `make test`.
soak: install
	$(BIN)/python -m pytest -q -m slow tests/test_soak.py -s

# The public front on $(PORT) (front/: what strangers may reach), with one Cog server behind it on a
# loopback port, on the weights in FLUX_WEIGHTS_DIR; with the image's allocator environment
# (cog.yaml), the tcmalloc preload only where Debian's libtcmalloc-minimal4 is installed (else
# glibc's malloc, 2 arenas, workarounds.HeapTrim).
TCMALLOC := /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
PRELOAD := MALLOC_ARENA_MAX=2 $(if $(wildcard $(TCMALLOC)),LD_PRELOAD=$(TCMALLOC) TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=1099511627776 TCMALLOC_MAX_TOTAL_THREAD_CACHE_BYTES=8388608)
serve: install
	$(PRELOAD) PORT=$(PORT) $(BIN)/python -m front

# Cog's own server alone, as the container runs it (local development; what Replicate's platform
# calls). On 127.0.0.1: it must never face strangers (README, "The public front").
serve-cog: install
	$(PRELOAD) COG_PREDICT_TYPE_STUB=predict.py:Predictor PORT=$(PORT) $(BIN)/python -m cog.server.http --host 127.0.0.1

# The same API on REPLICAS Cog servers behind Ray Serve, routed by LoRA (cluster/): a local Ray
# instance in the foreground, one GPU per replica where Ray finds GPUs; Ctrl-C stops all of it.
REPLICAS ?= 2
.PHONY: serve-cluster
serve-cluster: install
	$(PRELOAD) $(BIN)/python -m cluster --replicas $(REPLICAS) --port $(PORT)

tiny-weights: install
	$(BIN)/python scripts/tiny_weights.py $(DIR)

schema: install
	$(BIN)/python scripts/gen_schema.py

# CPU benchmarks: ratios against baselines run side by side (bench/README.md); GPU ones: bench/GPU.md.
bench: install
	$(BIN)/python bench/run.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(TINY) .pytest_cache .ruff_cache
