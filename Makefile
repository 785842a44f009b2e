# Entry points: `make demo` (whole pipeline on built-in data), `make test` and `make test-all` (the test tiers).
# Both install what is missing first: Debian packages FFCV builds against, then .venv.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
SYS_PKGS := libopencv-dev libturbojpeg0-dev pkg-config patchelf  # patchelf: make wheelhouse
# The install stamp is named by the content of what it installs from: editing those files reinstalls, touching
# or checking them out again does not.
INSTALL_INPUTS := requirements.txt requirements-test.txt pyproject.toml
INSTALLED := $(VENV)/.installed-$(shell cat $(INSTALL_INPUTS) | sha256sum | cut -c1-16)
DEMO_DIR ?= demo_out
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-all install clean-demo

install: $(INSTALLED)

$(INSTALLED):
	@dpkg -s $(SYS_PKGS) >/dev/null 2>&1 || { \
	  echo "installing system packages: $(SYS_PKGS)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(SYS_PKGS); }
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-* && touch $@

# Two test tiers (docs/testing.md): `make test` the fast one (unit, interpreter and small-CLI tests),
# `make test-all` the end-to-end one (marker e2e); `.ci/run` runs both. A tier whose markers select no test
# (pytest's status 5) tests nothing: it fails, saying so, rather than passing or reading like a failed test.
# The test files run side by side, one file per worker (its module fixtures built once), TEST_WORKERS at a time:
# most tests wait on one single-threaded child process at a time, so a 2-core machine runs two files at once.
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))
tier = $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 -m "$(1)" tests; status=$$?; \
  if [ $$status = 5 ]; then echo "make $@: no test is marked \"$(1)\" (see the markers in pyproject.toml)" >&2; fi; \
  exit $$status

test: $(INSTALLED)
	@$(call tier,not e2e and not wheelhouse)

test-all: $(INSTALLED)
	@$(call tier,e2e and not wheelhouse)

demo: $(INSTALLED)
	DEMO_DIR=$(DEMO_DIR) PY=$(PY) bash demo.sh

clean-demo:
	rm -rf $(DEMO_DIR)

# sm_90 compile sweep (no GPU needed): every fused kernel x every config it may pick x every shape it runs at
# (the recipes' calls and the kernel tests') x dtypes, compiled for H100/H200 and read back (registers, spills,
# wgmma), under the newest Triton (.venv) and the oldest supported one, the GPU image's (.venv-oldest).
# `make test-all` runs its --quick part.
.PHONY: check-sm90
check-sm90: $(INSTALLED) $(OLDEST)/.installed
	TRITON_INTERPRET=0 $(PY) -m kernels.sweep
	TRITON_INTERPRET=0 PYTHONPATH=$(CURDIR) $(OLDEST)/bin/python -m kernels.sweep

# ---------------------------------------------------------------- GPU readiness
# `make wheelhouse`: offline wheels (FFCV with its libraries bundled, zarr, numcodecs, google-crc32c, ...) for
# the GPU machine's Python (WHEELHOUSE_PYTHON, default 3.12) in wheelhouse/pyX.Y; fails over 60 MiB.
# `make test-oldest`: the unit and kernel tests (Triton interpreter) in .venv-oldest, a Python 3.12 venv with
# the oldest supported torch/torchvision/triton/timm and the GPU image's other packages, plus the wheelhouse.
# `make gpu-check`: the acceptance run (acceptance/gpu_check.py); on a GPU machine it needs no .venv: the
# image's python3 and the wheelhouse are enough. Without a GPU it runs its tiny CPU mode.
WHEELHOUSE_PYTHON ?= 3.12
WHEELHOUSE := wheelhouse/py$(WHEELHOUSE_PYTHON)
OLDEST := .venv-oldest
# numpy < 2.4: Triton 3.6's CPU interpreter converts 1-element arrays to int, which numpy 2.4 refuses (the
# compiled GPU path does not, so the GPU image's newer numpy is fine there).
# psutil: FFCV needs it, the GPU image has it, and requirements.txt leaves it to FFCV.
OLDEST_PINS := torch==2.11.0 torchvision==0.26.0 triton==3.6.0 timm==1.0.23 'numpy<2.4' psutil
OLDEST_SITE := $(OLDEST)/wheelhouse-site
GPU_CHECK_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_OUT ?= gpu_check_out
GPU_CHECK_BUDGET ?=

.PHONY: wheelhouse test-oldest test-wheelhouse gpu-check

wheelhouse: $(WHEELHOUSE)/requirements.txt

wheelhouse/py%/requirements.txt: acceptance/wheelhouse.py acceptance/wheelhouse.txt | $(INSTALLED)
	$(PY) acceptance/wheelhouse.py --python $* --out wheelhouse/py$*

# The GPU image's packages at the oldest supported versions: requirements.txt without what the wheelhouse brings.
$(OLDEST)/.installed: requirements.txt acceptance/wheelhouse.txt Makefile | $(INSTALLED)
	@test -x $(OLDEST)/bin/python || "$$($(PY) acceptance/wheelhouse.py --python 3.12 --print-python)" -m venv $(OLDEST)
	grep -v -i -E "^($$(sed -n 's/==.*//p' acceptance/wheelhouse.txt | paste -sd '|'))[<>=!~ ]" requirements.txt \
	  > $(OLDEST)/image-requirements.txt
	$(OLDEST)/bin/python -m pip install -q -r $(OLDEST)/image-requirements.txt -r requirements-test.txt $(OLDEST_PINS)
	@touch $@

# `make test-wheelhouse`: the wheelhouse installs offline into a 3.12 venv standing in for the GPU image (tests/test_wheelhouse.py).
test-wheelhouse: $(INSTALLED)
	$(PY) -m pytest -q -m wheelhouse tests

test-oldest: $(OLDEST)/.installed wheelhouse/py3.12/requirements.txt
	rm -rf $(OLDEST_SITE)
	$(OLDEST)/bin/python -m pip install -q --no-index --no-deps --target $(OLDEST_SITE) \
	  --find-links wheelhouse/py3.12 -r wheelhouse/py3.12/requirements.txt
	@$(OLDEST)/bin/python -c "import torch, triton, timm, torchvision; print('test-oldest: torch', \
	  torch.__version__, 'torchvision', torchvision.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"
	PYTHONPATH=$(CURDIR):$(CURDIR)/$(OLDEST_SITE) $(OLDEST)/bin/python -m pytest -q -p no:cacheprovider tests

gpu-check:
	$(GPU_CHECK_PY) acceptance/gpu_check.py $(if $(wildcard $(WHEELHOUSE)/requirements.txt),--wheelhouse $(WHEELHOUSE)) \
	  --out $(GPU_CHECK_OUT) $(if $(GPU_CHECK_BUDGET),--budget-s $(GPU_CHECK_BUDGET))
