# One-command set-up: every target below creates .venv on a fresh machine first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dpseg-installed
TORCH  ?= torch==2.13.0
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu)

.PHONY: demo test bench lint format clean nnunet nnunet-core

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH)
	# --no-build-isolation: the extension must compile against the torch just installed.
	$(PY) -m pip install -q --no-build-isolation -e '.[dev,flower,nnunet]'
	$(MAKE) --no-print-directory nnunet-core
	touch $(STAMP)

# nnU-Net itself, without its dependency chain (timm -> torchvision -> another torch; see
# dpseg/nnunet/requirement.py): the `nnunet` extra brings the rest.
NNUNET := nnunetv2==2.8.1 dynamic-network-architectures==0.4.4
nnunet-core:
	$(PY) -m pip install -q --no-deps $(NNUNET)

nnunet: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dpseg demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) -m pytest -q bench --benchmark-only --benchmark-columns=min,median,max,rounds
	$(VENV)/bin/dpseg bench --out bench/results

lint: $(STAMP)
	$(VENV)/bin/ruff check dpseg kernels tests bench setup.py
	$(VENV)/bin/ruff format --check dpseg kernels tests bench setup.py

format: $(STAMP)
	$(VENV)/bin/ruff format dpseg kernels tests bench setup.py
	$(VENV)/bin/ruff check --fix dpseg kernels tests bench setup.py

clean:
	rm -rf build dpseg/_C*.so *.egg-info
