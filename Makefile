# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU build of torch (a plain `torch` would pull a multi-GB CUDA build).
TORCH  ?= torch==2.13.0

.PHONY: install test demo bench wheels clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/histoembed demo --out demo

bench: $(STAMP)
	$(PY) benchmarks/bench_crops.py
	$(PY) benchmarks/bench_embed.py
	$(PY) benchmarks/bench_fit.py

# What an air-gapped GPU server with its own torch lacks, as wheels (see README, "A GPU server without network").
WHEELS_PYTHON ?= 3.12
wheels: $(STAMP)
	$(PY) benchmarks/bundle_wheels.py --dest wheels --python-version $(WHEELS_PYTHON)

clean:
	rm -rf $(VENV) demo .pytest_cache
