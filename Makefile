PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= routes.yaml

.PHONY: install run test lint typecheck pytest bench docker-test clean

$(BIN)/tokenrelay: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/tokenrelay

run: install
	$(BIN)/python -m proxy.demo_run --config $(CONFIG) --log-format console

lint: install
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest

test: lint typecheck pytest

bench: install
	$(BIN)/python bench/run.py

docker-test:
	PYTHON=$(PYTHON) $(SHELL) deploy/docker-test.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
