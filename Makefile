# make demo : create .venv, install ltsearch, run the main job (a search on the embedded digits default)
# make test : create .venv, install ltsearch with test extras, run the whole suite (slow tests included)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/ltsearch check search_spaces/quickstart.yaml
	$(BIN)/ltsearch tune search_spaces/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python -m benchmarks.pipeline --write && $(BIN)/python -m benchmarks.augmenters --write && \
	$(BIN)/python -m benchmarks.platform --write && $(BIN)/python -m benchmarks.search --write && \
	$(BIN)/python -m benchmarks.packing --write

clean:
	rm -rf runs .pytest_cache
