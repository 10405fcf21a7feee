# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch and torchvision pinned as a matching pair: timm imports torchvision, and PyPI's
# torchvision only loads beside the CUDA torch it was built against (next to the CPU
# torch 2.13.0 it fails with "operator torchvision::nms does not exist"). This pair is a
# CUDA build that runs on the CPU; on the development machines pip takes both from local
# disk (docs/install.md: 3 min 20 s and 5.5 GB measured).
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test demo bench wheels clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev,ray]"
	touch $(STAMP)

# Ray binds to this machine's network address unless it runs in a network namespace that has
# loopback alone: where one can be made (root: CI, the development machines), the suite runs in
# one, so the Ray tests (tests/test_ray_engine.py) keep their traffic on 127.0.0.1.
test: $(STAMP)
	@if unshare -n sh -c 'ip link set lo up' 2>/dev/null; then \
		echo "tests in a loopback-only network namespace"; \
		unshare -n sh -c 'ip link set lo up && exec $(PY) -m pytest -q'; \
	else \
		$(PY) -m pytest -q; \
	fi

demo: $(STAMP)
	$(VENV)/bin/histoembed demo --out demo

bench: $(STAMP)
	$(PY) benchmarks/bench_crops.py
	$(PY) benchmarks/bench_embed.py
	$(PY) benchmarks/bench_fit.py

# What an air-gapped GPU server with its own torch lacks, as wheels (see docs/benchmarks.md, "A GPU server without network").
WHEELS_PYTHON ?= 3.12
# Needs only pip and `packaging`, not the venv.
wheels:
	$(PYTHON) benchmarks/bundle_wheels.py --dest wheels --python-version $(WHEELS_PYTHON)

clean:
	rm -rf $(VENV) demo .pytest_cache
