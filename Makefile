# wsiseg: everything a fresh machine needs is here.
#   make demo   set up and run the demo job
#   make test   set up and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/wsiseg demo --out demo-out

test: $(STAMP)
	$(BIN)/ruff check wsiseg tests
	$(BIN)/ruff format --check wsiseg tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -m "not slow" -q

bench: $(STAMP)
	$(BIN)/wsiseg bench all --out docs/benchmarks.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
