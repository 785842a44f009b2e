# Two entry points: `make demo` (whole pipeline on built-in data) and `make test`.
# Both install what is missing first: Debian packages FFCV builds against, then .venv.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
SYS_PKGS := libopencv-dev libturbojpeg0-dev pkg-config
INSTALLED := $(VENV)/.installed
DEMO_DIR ?= demo_out
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test install clean-demo

install: $(INSTALLED)

$(INSTALLED): requirements.txt pyproject.toml
	@dpkg -s $(SYS_PKGS) >/dev/null 2>&1 || { \
	  echo "installing system packages: $(SYS_PKGS)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(SYS_PKGS); }
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

test: $(INSTALLED)
	$(PY) -m pytest -q tests

demo: $(INSTALLED)
	DEMO_DIR=$(DEMO_DIR) PY=$(PY) bash demo.sh

clean-demo:
	rm -rf $(DEMO_DIR)

# sm_90 compile sweep (no GPU needed): every fused kernel x every config it may pick x recipe shapes x
# dtypes, compiled for H100/H200 and read back (registers, spills, wgmma). `make test` runs its --quick part.
.PHONY: check-sm90
check-sm90: $(INSTALLED)
	TRITON_INTERPRET=0 $(PY) -m kernels.sweep
