# make help — list the targets.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install test lint format clean

help:  ## Show this help.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0   # the CPU build on disk; must come before anything that depends on torch
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## Create .venv and install pard_train with its pinned dependencies.

test: $(STAMP)  ## Install if needed, then run the test suite.
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff check and format check.
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)  ## Apply ruff fixes and formatting.
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:  ## Remove the virtual environment and caches.
	rm -rf $(VENV) .pytest_cache .ruff_cache outputs
