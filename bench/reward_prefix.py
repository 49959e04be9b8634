"""Reward training with and without `reward.prefix_cache`, interleaved in one process.

The chat-template prefix every reward sequence starts with (the system prompt and role markers:
24 tokens on the embedded model) runs once per forward call with the cache on. This trains the
reward model from scratch `--reps` times per side, alternating on / off, on bench_reward's
synthetic rankings (K=4, 18-30-word answers), and prints train seconds (min, median, max), the
ratio off / on of the medians, and held-out accuracy (each training is seeded by its version
number, so those differ run to run; that the cache changes no number is
tests/test_reward_prefix.py's, on equal seeds):

    .venv/bin/python -m bench.reward_prefix --rankings 24 --reps 3    # ~6 min on 2 idle cores

Writes bench/results/reward_prefix.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from bench.bench_reward import add_rankings, timed_train
from rlhf_core.config import AppConfig, RewardConfig
from rlhf_core.data.store import Store
from rlhf_core.models import resolve_model_source

RESULTS = Path(__file__).resolve().parent / "results" / "reward_prefix.json"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rankings", type=int, default=24)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--cache", default=os.environ.get(
        "RLHF_BENCH_CACHE", str(Path(tempfile.gettempdir()) / "rlhf-bench")))
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from rlhf_core.worker.runtime import Runtime
    model_dir = resolve_model_source("embedded", Path(args.cache))
    runs = {"on": [], "off": []}
    with tempfile.TemporaryDirectory(prefix="bench-reward-prefix-") as tmp:
        store = Store(Path(tmp) / "rlhf.db")
        cfg = RewardConfig(epochs=args.epochs)
        runtime = Runtime(store, AppConfig(workspace=Path(tmp), model=model_dir, reward=cfg),
                          cpu=True)
        pairs = add_rankings(store, args.rankings, start=0, seed=cfg.seed)
        timed_train(runtime, config=replace(cfg, epochs=1))  # warm-up (and a version to replace)
        for rep in range(args.reps):
            for side in ("on", "off"):
                r = timed_train(runtime, from_scratch=True,
                                config=replace(cfg, prefix_cache=side == "on"))
                runs[side].append(r)
                print(f"rep {rep + 1} prefix_cache {side}: train {r['train_s']} s, "
                      f"eval {r['eval_s']} s, held-out {r['heldout_accuracy']}", flush=True)
        store.close()
    summary = {}
    for side, rs in runs.items():
        train = [r["train_s"] for r in rs]
        summary[side] = {"train_s_median": statistics.median(train), "train_s_min": min(train),
                         "train_s_max": max(train),
                         "eval_s_median": statistics.median(r["eval_s"] for r in rs),
                         "heldout_accuracy": [r["heldout_accuracy"] for r in rs]}
    ratio = summary["off"]["train_s_median"] / summary["on"]["train_s_median"]
    result = {"bench": "reward_prefix", "model": "embedded:smollm2-135m-instruct",
              "threads": args.threads, "rankings": args.rankings, "pairs": pairs,
              "epochs": args.epochs, "reps": args.reps, "runs": runs, "summary": summary,
              "train_speedup_on_vs_off": round(ratio, 3), "loadavg": os.getloadavg()}
    print(f"train seconds, median (min-max): on {summary['on']['train_s_median']} "
          f"({summary['on']['train_s_min']}-{summary['on']['train_s_max']}), off "
          f"{summary['off']['train_s_median']} ({summary['off']['train_s_min']}-"
          f"{summary['off']['train_s_max']}): {ratio:.2f}x with the prefix cache")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
