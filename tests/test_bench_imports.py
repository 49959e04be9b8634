"""The benchmarks stay runnable: every bench module imports against the current library, and
the figures' helpers answer (a full `make bench` takes about 45 minutes, so it is not a test)."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
# the TRL sides run inside the TRL venvs, not this one
PEER_SIDES = {"b2_trl_side", "b3_trl_side"}


@pytest.mark.parametrize("name", sorted(p.stem for p in BENCH.glob("*.py")
                                        if p.stem != "__init__" and p.stem not in PEER_SIDES))
def test_bench_module_imports(name):
    module = importlib.import_module(f"bench.{name}")
    assert module.__doc__, f"bench/{name}.py says what it measures"
