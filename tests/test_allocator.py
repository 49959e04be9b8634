"""jemalloc for model-holding processes: found, preloaded once, off on request."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app import allocator


def test_preload_is_added_once_and_can_be_turned_off(tmp_path):
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    env = allocator.with_jemalloc({"RLHF_JEMALLOC": str(lib), "LD_PRELOAD": "other.so"})
    assert env["LD_PRELOAD"] == f"{lib} other.so"
    assert allocator.with_jemalloc(env) == env  # already there: unchanged
    off = {"RLHF_JEMALLOC": "0"}
    assert allocator.with_jemalloc(off) is off
    missing = {"RLHF_JEMALLOC": str(tmp_path / "nope.so")}
    assert allocator.with_jemalloc(missing) is missing


@pytest.mark.skipif(allocator.jemalloc_path({}) is None, reason="libjemalloc2 is not installed")
def test_the_worker_environment_really_loads_jemalloc():
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "RLHF_JEMALLOC")}
    maps = subprocess.run([sys.executable, "-c", "print(open('/proc/self/maps').read())"],
                          env=allocator.with_jemalloc(env), capture_output=True, text=True,
                          timeout=60)
    assert maps.returncode == 0 and "jemalloc" in maps.stdout
    plain = subprocess.run([sys.executable, "-c", "print(open('/proc/self/maps').read())"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert "jemalloc" not in plain.stdout
