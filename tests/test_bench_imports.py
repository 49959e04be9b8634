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


def test_b2_sides_carry_their_precision_and_keep_the_goal_rows():
    from bench import b2_ppo_trl as b2
    from bench import run_all
    assert b2.parse_side("ours@bf16") == ("ours", "bf16")
    assert b2.parse_side("trl-lora", "bf16") == ("trl-lora", "bf16")
    assert b2.parse_side("ours-trunk") == ("ours-trunk", "float32")
    phases = {k: {"of_medians": 1.0, "per_run_min": 1.0, "per_run_max": 1.0}
              for k in b2.PHASES}
    pairs = ["ours@bf16_vs_trl-full@bf16", "ours-trunk_vs_trl-lora"]
    r = {"trl_version": "torch trl transformers peft", "speedup_by_pair": dict.fromkeys(pairs, 1.0),
         "ratios": dict.fromkeys(pairs, phases), "memory_ratio_by_pair": dict.fromkeys(pairs, 0.4)}
    rows = run_all.b2_rows(r)
    speed = [row for row in rows if "speed-up" in row[1]]
    assert [row[3] for row in speed] == [">= 2", "-"]  # the defaults' side, at either precision


def test_reward_settings_variants_parse():
    from bench.reward_settings import parse_variant
    assert parse_variant("base=") == ("base", {})
    assert parse_variant("x=reward.lr=1e-3,reward.soft_ties=false") == (
        "x", {"reward.lr": "1e-3", "reward.soft_ties": "false"})
    with pytest.raises(ValueError):
        parse_variant("=reward.lr=1")
    with pytest.raises(ValueError):
        parse_variant("x=reward.lr")


def test_phase_peak_rss_window_resets():
    """B2's per-phase peaks: a window opened after a large allocation was freed does not
    report it (ru_maxrss, which only grows, does)."""
    import sys

    from bench import common
    if not sys.platform.startswith("linux") or not common.reset_peak_rss():
        pytest.skip("VmHWM reset is Linux-only")
    base = common.window_peak_rss_mb()  # what the process holds now
    big = bytearray(300 * 1024 * 1024)
    big[::4096] = b"x" * len(big[::4096])  # touch every page
    del big
    assert common.peak_rss_mb() >= base + 280
    assert common.reset_peak_rss()
    assert common.window_peak_rss_mb() < base + 100  # the freed 300 MB is not this window's
    assert common.peak_rss_mb() >= base + 280  # the running peak keeps it
