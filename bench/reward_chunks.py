"""Reward training with a step's rows split into passes of similar length vs one padded pass.

`reward/train._step` scores a step's distinct responses (4 rankings x K=4 = 16 rows) in passes
cut by `reward_data.length_chunks` (`PASS_OVERHEAD_TOKENS` per pass); before, one pass padded
every row to the step's longest. The same rankings are trained from scratch with each setting
in turn (interleaved, same seed, so the same steps and, within rounding, the same weights) on
the embedded model, for two length profiles:

- `labeling`: answers like the app's labeling batches on the embedded model (median 87 tokens,
  p90 417, cut at 448: `bench/results/response_length.json`), a log-normal with that median
  and p90;
- `simulate`: answers of 16-64 tokens (`rlhf simulate --max-new-tokens 64`), uniform.

Prints train seconds (min of the runs), pairs/s, the tokens the passes computed (padding
included) against the real ones, and the ratio against one pass; writes
bench/results/reward_chunks.json.

    .venv/bin/python -m bench.reward_chunks            # ~10 min on 2 idle cores
    .venv/bin/python -m bench.reward_chunks --quick    # ~3 min
"""
from __future__ import annotations

import argparse
import functools
import math
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench import common
from bench.bench_reward import add_rankings

ONE_PASS = 10 ** 9  # every step in one pass: the behaviour before the split


def answer_length(profile: str, rng: random.Random) -> int:
    """Words in one answer (about a token each here: bench_reward's vocabulary)."""
    if profile == "labeling":  # log-normal: median 87, p90 417 (z 1.2816), cut at 448
        mu, sigma = math.log(87), (math.log(417) - math.log(87)) / 1.2816
        return max(4, min(448, round(rng.lognormvariate(mu, sigma))))
    return rng.randint(16, 64)


def train_once(runtime, overhead: int) -> dict:
    """One from-scratch training with `overhead` per pass; counts the tokens its passes ran."""
    from rlhf_core.reward import round as reward_round
    from rlhf_core.reward import train as reward_train
    counted = {"computed": 0, "real": 0, "passes": 0}
    collate = reward_train.collate

    def counting(seqs, pad_id, device):
        ids, mask = collate(seqs, pad_id, device)
        counted["computed"] += ids.numel()
        counted["real"] += int(mask.sum())
        counted["passes"] += 1
        return ids, mask
    before = reward_train.PASS_OVERHEAD_TOKENS
    reward_train.PASS_OVERHEAD_TOKENS, reward_train.collate = overhead, counting
    try:
        # every run the same steps: the training seed is reward.seed + the version's number
        cfg = runtime.config.reward
        seed = 1000 - runtime.data.next_version_number("reward")
        t0 = time.perf_counter()
        res = reward_round.train_reward(runtime, config=replace(cfg, seed=seed),
                                        from_scratch=True)
        wall = time.perf_counter() - t0
    finally:
        reward_train.PASS_OVERHEAD_TOKENS, reward_train.collate = before, collate
    m = res["metrics"]
    return {"train_s": round(m["train_seconds"], 2), "wall_s": round(wall, 2),
            "pairs_per_s": round(m["train_pairs_per_s"], 3), "steps": m["train_steps"],
            "train_loss_last": round(m["train_loss_last"], 5),
            "heldout_accuracy": m.get("heldout_accuracy"), **counted}


def run(quick: bool = False, runs: int | None = None, threads: int | None = None,
        overheads: tuple[int, ...] = ()) -> dict:
    """`overheads`: more split sides (`split@N`: N tokens per pass) beside the default's."""
    from rlhf_core.config import AppConfig, RewardConfig
    from rlhf_core.data.store import Store
    from rlhf_core.reward import train as reward_train
    from rlhf_core.worker.runtime import Runtime
    runs = runs or (1 if quick else 2)
    if threads:
        torch.set_num_threads(threads)
    else:
        common.set_threads()
    rankings = 12 if quick else 32
    sides = {"one-pass": ONE_PASS, "split": reward_train.PASS_OVERHEAD_TOKENS}
    sides.update({f"split@{n}": n for n in overheads if n != reward_train.PASS_OVERHEAD_TOKENS})
    out = {"bench": "reward training: a step's rows in passes by length vs one padded pass",
           "machine": common.machine(), "rankings": rankings, "runs_per_side": runs,
           "pass_overhead_tokens": reward_train.PASS_OVERHEAD_TOKENS, "profiles": {}}
    for profile in ("labeling", "simulate"):
        with tempfile.TemporaryDirectory(prefix="bench-chunks-") as tmp:
            store = Store(Path(tmp) / "rlhf.db")
            cfg = replace(RewardConfig(), promote_min_heldout_pairs=0, promote_min_accuracy=0.0)
            app = AppConfig(workspace=Path(tmp), model=common.embedded_model_dir(), reward=cfg)
            runtime = Runtime(store, app, cpu=True)
            add_rankings(store, rankings, start=0, seed=0,
                         words_per_answer=functools.partial(answer_length, profile))
            res = {s: [] for s in sides}
            for r in range(runs):
                for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                    res[side].append(x := train_once(runtime, sides[side]))
                    print(f"{profile} run {r + 1} {side}: {x}", flush=True)
            store.close()
        best = {s: min(v, key=lambda x: x["train_s"]) for s, v in res.items()}
        one, split = best["one-pass"], best["split"]
        out["profiles"][profile] = {
            "runs": res, "best": best,
            "speedup_by_side": {s: round(one["train_s"] / b["train_s"], 3)
                                for s, b in best.items()},
            "speedup": round(one["train_s"] / split["train_s"], 3),
            "speedup_per_run": [round(a["train_s"] / b["train_s"], 3)
                                for a, b in zip(res["one-pass"], res["split"])],
            "padding_share": {s: round(1 - b["real"] / b["computed"], 3)
                              for s, b in best.items()},
            "loss_last_diff": abs(one["train_loss_last"] - split["train_loss_last"]),
        }
    common.write_result("reward_chunks", out)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, help="runs per side and profile (default 2; quick 1)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--overheads", default="",
                    help="comma-separated token costs per pass to try beside the default's")
    args = ap.parse_args(argv)
    out = run(args.quick, args.runs, args.threads,
              tuple(int(x) for x in args.overheads.split(",") if x.strip()))
    for profile, p in out["profiles"].items():
        one, split = p["best"]["one-pass"], p["best"]["split"]
        print(f"{profile}: split {split['train_s']} s vs one pass {one['train_s']} s -> "
              f"{p['speedup']}x (per run {p['speedup_per_run']}); padding "
              f"{p['padding_share']['split']:.0%} vs {p['padding_share']['one-pass']:.0%}; "
              f"passes {split['passes']} vs {one['passes']}; last loss differs by "
              f"{p['loss_last_diff']:.2g}; every side vs one pass {p['speedup_by_side']}")
    return out


if __name__ == "__main__":
    main()
