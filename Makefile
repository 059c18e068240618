# The two commands of the README: `make run` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.cascade-clip-installed
# torch 2.14.1 + torchvision 0.29.1 install from this platform's local wheel files (a CUDA build that runs on the CPU);
# open_clip needs torchvision, which fails to import beside the CPU-only torch 2.13 file.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install run test bench clean

install: $(STAMP)

$(STAMP): setup.py requirements.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(TORCH_PINS) -r requirements.txt
	$(PIP) install -q --disable-pip-version-check --no-build-isolation -e .
	touch $(STAMP)

run: install
	$(PY) -m cascade_clip.quickstart

# The C++ extension and Triton (interpreted on the CPU) must load: a backend that fails to load would otherwise only
# skip its tests (tests/conftest.py stops the run with the load error instead).
test: install
	CASCADE_CLIP_REQUIRE_BACKENDS=cpp,triton $(PY) -m pytest -q tests

bench: install
	$(PY) -m pytest -q bench --benchmark-only

clean:
	rm -rf build *.egg-info cascade_clip/_C*.so
