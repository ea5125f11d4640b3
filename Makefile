# Quickstart targets. Each creates .venv and installs the package on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[test]'
	# The LPIPS oracle of the tests, without the torchvision it declares (the test gives it its VGG16).
	$(PY) -m pip install -q --no-deps lpips==0.1.4
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed  ## train the small text-to-image model on captioned_shapes, then sample
	$(PY) -m diffusion_jax.main --config=configs/t2i_shapes.py --workdir=workdirs/t2i_shapes

test: $(VENV)/.installed  ## the whole test suite on 2 workers
	$(PY) -m pytest -n 2 --dist loadgroup -q -p no:cacheprovider --compile-report=15
