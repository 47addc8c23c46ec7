# heclave: `make demo` sets everything up and runs the demo; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test fuzz lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# he/_rns.c is compiled by the editable install, so a change to it reinstalls.
$(STAMP): pyproject.toml he/_rns.c | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,dcap,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/heclave demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The fuzz tests of `make test`, with many more examples.
fuzz: $(STAMP)
	HECLAVE_FUZZ_EXAMPLES=5000 $(BIN)/python -m pytest -q tests/e2e/test_fuzz.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis he/_rns.*.so
