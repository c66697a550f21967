# `make test` and `make demo` set up .venv on first use, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# These two releases lie on this machine's disk; pip takes them from there.
TORCH := torch==2.14.1 torchvision==0.29.1
EXTRAS := test,lite,bench,onnx,safe,dask,da,timm,dev
# foolbox only ships the 20 labelled ImageNet JPEGs the accuracy tests use;
# its own dependencies are not needed.
FOOLBOX := foolbox==3.3.4

.PHONY: setup test demo lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH) -e ".[$(EXTRAS)]"
	$(PY) -m pip install --no-deps $(FOOLBOX)
	touch $@

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/skt demo

lint: setup
	$(VENV)/bin/ruff check skt tests benchmarks examples

clean:
	rm -rf $(VENV) demo-results compare-results bench-results .pytest_cache
