# The two commands: `make run` (a demo on a default region) and `make test` (the whole suite).
# Both install what they need first: Debian packages, a virtualenv, this package.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := python3 python3-venv python3-dev gcc linux-libc-dev pkg-config fuse3 libfuse3-dev fio ndctl e2fsprogs util-linux
STAMP := .make

.PHONY: run test lint bench docs sysdeps clean

sysdeps:
	@scripts/install-system-packages $(APT_PACKAGES)

# setup.py and the .pyx too: the install compiles pmemfs/*.pyx in place.
$(STAMP)/venv: pyproject.toml setup.py $(wildcard pmemfs/*.pyx) | sysdeps
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,lint,plot]'
	@mkdir -p $(STAMP) && touch $@

run: sysdeps $(STAMP)/venv
	$(PY) scripts/demo.py

# Two test processes (pytest-xdist) halve the suite's time on two CPUs: a mount test spends most of
# its time waiting for a daemon. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: sysdeps $(STAMP)/venv
	$(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

lint: $(STAMP)/venv
	$(VENV)/bin/ruff check pmemfs tests scripts examples
	$(VENV)/bin/ruff format --check pmemfs tests scripts examples
	$(VENV)/bin/mypy pmemfs

bench: sysdeps $(STAMP)/venv
	$(PY) scripts/bench.py

# The README's pictures (heatmap, top, a Perfetto trace) from a scripted scenario, into docs/_build/.
docs: sysdeps $(STAMP)/venv
	$(PY) scripts/docs_heatmap.py

clean:
	rm -rf $(VENV) $(STAMP) build docs/_build pmemfs/*.c pmemfs/*.so
