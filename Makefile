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

.PHONY: demo test lint peers
peers: .venv-peers/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/kvsculpt demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: lint
	$(VENV)/bin/pytest -q
