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

.PHONY: demo test lint
demo: $(VENV)/.installed
	$(VENV)/bin/kvsculpt demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: lint
	$(VENV)/bin/pytest -q
