"""The benchmarks stay runnable: every bench module imports against the current library, and
the figures' helpers answer (a full `make bench` takes about an hour, so it is not a test)."""
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
    # each phase's own peak, ours / the peer's, where the run recorded it
    peaks = ("phase_peak_rss_generate_mb", "phase_peak_rss_score_mb", "phase_peak_rss_train_mb")
    r["median"] = {"ours@bf16": dict(zip(peaks, (1000, 500, 2000))),
                   "trl-full@bf16": dict(zip(peaks, (2000, 2000, 5000)))}
    phase = [row for row in run_all.b2_rows(r) if "each phase" in row[1]]
    assert [(row[2], row[3]) for row in phase] == [("0.500 / 0.250 / 0.400", "<= 0.5")]


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


def test_suite_table_shows_spreads_and_the_policy_algorithm():
    """`make bench`'s table: B1's ratio with its per-round spread, B3's with its runs' spread,
    and B4/B5 name the policy round that ran (the workspace default's; PPO for older files)."""
    from bench import run_all
    b1 = {"ratio": 3.0, "ratio_lora": 2.0, "decode_dtype_auto": "torch.bfloat16",
          "batch1_fraction_of_bound": 0.3, "tokens_per_s": {}, "batch1_bound_tokens_per_s": {},
          "read_bandwidth_gb_s": 30, "matmul_kernel_gb_s": 20,
          "batch1_kernel_bound_tokens_per_s": 70,
          "responses_per_s": {"per_round": {"ours_v0": [2.0, 4.0], "ours_lora": [1.0, 3.0],
                                            "peer": [1.0, 1.0]}}}
    b3 = {"ratio": 3.3, "ratio_spread": {"min": 3.1, "max": 3.5}, "trl_version": "t 1.16.0 x y",
          "setting": {"heldout_pairs": 0}, "ours": {"heldout_accuracy": None},
          "trl": {"heldout_accuracy": None}}
    lat = {"p50_ms": 1, "p95_ms": 2, "p99_ms": 3, "failed": 0, "lost": 0}
    b4 = {"idle": {"32": lat}, "ppo": {"32": lat}, "policy_algorithm": "rloo"}
    b5 = {"total_s": 90, "split": {}, "policy_algorithm": "rloo"}
    rows = run_all.ratio_rows({"B1": b1, "B3": b3, "B4": b4, "B5": b5})
    values = {row[1]: row[2] for row in rows}
    assert values["labeling responses/s, ours/plain generate (v0 = base), per round"] == (
        "3.00 (2.00-4.00)")
    assert values["same, with a LoRA policy adapter (un-merged)"] == "2.00 (1.00-3.00)"
    assert any(v == "3.30 (3.10-3.50)" for v in values.values())
    assert any(k.startswith("RLOO round running, 32 annotators") for k in values)
    assert any("RLOO round" in k for k in values if k.startswith("loop latency"))
    b1_row = next(k for k in values if k.startswith("batch-1 decode"))
    assert values[b1_row] == "0.30" and "paired" not in b1_row  # an older file: one figure
    b1.update(batch1_fraction_paired_median=0.28, read_bandwidth_gb_s_probes=[25.0, 30])
    rows = run_all.ratio_rows({"B1": b1})
    values = {row[1]: row[2] for row in rows}
    b1_row = next(k for k in values if k.startswith("batch-1 decode"))
    assert values[b1_row] == "0.30; 0.28" and "paired median" in b1_row
    assert values["batch-1 bound: read GB/s -> tokens/s"].startswith("30 (probes 25.0-30) ->")
    del b4["policy_algorithm"], b5["policy_algorithm"]
    labels = [row[1] for row in run_all.ratio_rows({"B4": b4, "B5": b5})]
    assert any(k.startswith("PPO round running") for k in labels)
    assert any("PPO round" in k for k in labels if k.startswith("loop latency"))


def test_suite_table_keeps_b9_at_each_precision_apart():
    """B9 runs in float32 (`B9`) and at the project's bf16 (`B9-BF16`, its own result file):
    the table labels each row with its math, and the float32 run reads its `ours-f32` side."""
    from bench import run_all
    from bench.b9_algorithms_trl import result_name

    def b9(precision, ratio, rss):
        side = {"trl_trainer": "trl.RLOOTrainer", "ratio_trl_over_ours": ratio,
                "ratio_per_run_trl_over_ours": [ratio - 0.1, ratio + 0.1],
                "rss_ratio_ours_over_trl": rss}
        return {"precision": precision, "algorithms": {"rloo": side}}
    rows = run_all.ratio_rows({"B9": b9("no", 1.8, 0.66), "B9-BF16": b9("bf16", 2.5, 0.45)})
    got = {(bid, label): value for bid, label, value, _ in rows}
    assert got[("B9", "rloo peak RSS, ours/TRL (float32)")] == "0.66"
    assert got[("B9-BF16", "rloo peak RSS, ours/TRL (bf16 autocast)")] == "0.45"
    assert got[("B9-BF16", "rloo round speed-up vs trl.RLOOTrainer (bf16 autocast; TRL s / "
                           "ours s)")] == "2.50 (2.40-2.60)"
    assert (result_name("no"), result_name("bf16")) == ("b9_algorithms_trl",
                                                        "b9_algorithms_trl_bf16")
    assert run_all.SUITE["B9-BF16"][2] == {"precision": "bf16"}


def test_b1_batch1_pairs_each_decode_with_the_probes_around_it(tiny_model_dir, monkeypatch):
    """B1's batch-1 figure: rounds of probe, each path's decode, ..., probe (round 0 a warm-up).
    The headline fraction is the best decode over the best probe's bound; each counted decode
    is also read against the better of its two neighbouring probes. Real decodes of the tiny
    model; the probes' GB/s and the decodes' seconds are scripted so the arithmetic is exact.
    Each path's RLHF_NATIVE_DECODE holds during its decode and the variable is restored."""
    import os

    from bench import b1_sampling as b1
    from bench import common
    from tests.test_decoding import tiny_with_lora
    from rlhf_core import decoding
    model, tok = tiny_with_lora(tiny_model_dir, ("q_proj", "v_proj"))
    dev = common.device_settings()
    nbytes = b1.weight_bytes(model.get_base_model(), decoding.decode_dtype("auto", dev.device))
    unit = nbytes / 1e9  # a probe of `unit` GB/s bounds batch-1 at 1 token/s
    probes = iter([1.0 * unit, 6.0 * unit, 4.0 * unit, 8.0 * unit])
    seconds = iter([9.0, 9.0, 2.0, 4.0, 1.0, 8.0, 4.0, 2.0])  # (a, b) x (warm-up + 3 rounds)
    seen = []

    def timed(fn, dev):
        fn()  # the decode runs for real
        seen.append(os.environ.get("RLHF_NATIVE_DECODE"))
        return None, next(seconds)
    monkeypatch.setattr(b1, "read_bandwidth", lambda dev, nbytes: next(probes))
    monkeypatch.setattr(b1, "timed", timed)
    monkeypatch.setenv("RLHF_NATIVE_DECODE", "1")
    res = b1.batch1_vs_bound(model, tok, dev, {"a": "0", "b": None}, rounds=3, new_tokens=4)
    assert seen == ["0", "0"] * 4 and os.environ["RLHF_NATIVE_DECODE"] == "1"
    assert res["weight_bytes"] == nbytes and res["bound_tokens_per_s"] == 8.0
    # path a: 4 tokens in 2, 1, 4 s; path b: in 4, 8, 2 s; bounds of the neighbouring probes'
    # better: 6, 6, 8 tokens/s
    assert res["a"]["tokens_per_s_rounds"] == [2.0, 4.0, 1.0]
    assert res["a"]["fraction_of_bound"] == 0.5  # 4 / 8: best decode over the best probe
    assert res["a"]["fraction_paired"] == [0.333, 0.667, 0.125]
    assert res["a"]["fraction_paired_median"] == 0.333
    assert res["b"]["fraction_paired"] == [0.167, 0.083, 0.25]
    assert res["b"]["tokens_per_s"] == 2.0 and res["b"]["ms_per_token"] == 500.0
