# Two entry points for a fresh machine (see README):
#   make demo   installs into .venv and runs the end-to-end demo on the embedded CT sample
#   make test   installs into .venv (with dev extras) and runs the whole test suite (what CI runs)
#   make test-fast  the same without the tests marked slow (end-to-end runs): the edit loop
#   make evidence  runs benchmarks/ssl_signal.py: stage 1 on real CT vs random init (probe + feature health)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
NNUNET_REFERENCE := "nnunetv2>=2.5" "batchgeneratorsv2>=0.3" "batchgenerators>=0.25" "acvl-utils>=0.2" \
                    "dynamic-network-architectures>=0.4"

.PHONY: venv demo test test-fast evidence clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch from the local wheel when no torch is present (an unpinned torch pulls a CUDA build)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e ".[dev,dicom]"
	# nnU-Net's code, the reference of the finetune tests (summary.json, splits, fingerprint, 2-D augmentation):
	# without dependencies, which would pull torchvision and a CUDA torch (their imports are in the dev extra)
	$(PIP) install -q --no-deps $(NNUNET_REFERENCE)
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m finetune.demo $(ARGS)

test: venv
	$(PY) -m pytest $(ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow" $(ARGS)

evidence: venv
	$(PY) benchmarks/ssl_signal.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
