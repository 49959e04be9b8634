"""Reward-model training speed on the embedded model (SmolLM2-135M) on this machine.

Prints pairs/s of reward training and the wall time of an incremental update after +100
pairs, against a baseline run in the same process: a full retrain from scratch on all pairs.
Writes bench/results/reward.json.

    .venv/bin/python -m bench.bench_reward            # ~3 min on 2 idle CPU cores
    .venv/bin/python -m bench.bench_reward --initial-rankings 12 --no-baseline   # ~1.5 min
(Beside other jobs it is several times slower: the JSON records the load average.)
The first version trains `--first-epochs` (1) epoch only: it just has to exist. With the
default replay_ratio 1.0 an update costs ~2x the new pairs whatever the history, a full
retrain costs all of it: the baseline is only informative once history >> new pairs.

Synthetic annotators: each item has K=4 responses holding 0..3 copies of a marker phrase;
more copies rank higher (a full order: 6 strict pairs per ranking).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from rlhf_core.config import AppConfig, RewardConfig
from rlhf_core.data import annotation
from rlhf_core.data.store import Store
from rlhf_core.models import resolve_model_source
from rlhf_core.reward import round as reward_model
from rlhf_core.worker.runtime import Runtime

WORDS = ("the a river mountain city garden music history science a quick simple answer about "
         "weather travel cooking books friends learning water light energy small large").split()
MARKER = "thank you"
RESULTS = Path(__file__).resolve().parent / "results" / "reward.json"


def add_rankings(store: Store, n: int, *, start: int, seed: int,
                 heldout_fraction: float = 0.2, words_per_answer=None) -> int:
    """n prompts, one K=4 item each, ranked by marker count. Returns pairs added.
    `words_per_answer(rng)`: each answer's length in words (default 18-30)."""
    rng = random.Random(seed + start)
    before = store.scalar("SELECT COUNT(*) FROM pairs")
    recs = [{"text": f"Question {i}: tell me something about "
             + " ".join(rng.choice(WORDS) for _ in range(6))} for i in range(start, start + n)]
    store.add_prompts(recs, source="bench", heldout_fraction=heldout_fraction)
    ids = [store.scalar("SELECT id FROM prompts WHERE text = ?", [r["text"]]) for r in recs]
    items = []
    for pid in ids:
        responses = []
        for quality in range(4):
            length = words_per_answer(rng) if words_per_answer else rng.randint(18, 30)
            words = [rng.choice(WORDS) for _ in range(length)]
            for _ in range(quality):
                words.insert(rng.randint(0, len(words)), MARKER)
            responses.append({"text": " ".join(words)})
        items.append({"prompt_id": pid, "responses": responses})
    annotation.create_batch(store, policy_version=0, k=4, items=items)
    while (item := annotation.next_item(store, "bench")) is not None:
        ranked = sorted(item["responses"], key=lambda r: -r["text"].count(MARKER))
        annotation.submit_ranking(store, annotator="bench", item_id=item["id"], token=item["token"],
                                  submission_key=f"bench-{item['id']}",
                                  tiers=[[r["id"]] for r in ranked])
    return store.scalar("SELECT COUNT(*) FROM pairs") - before


def timed_train(runtime, **kwargs) -> dict:
    t0 = time.perf_counter()
    res = reward_model.train_reward(runtime, **kwargs)
    wall = time.perf_counter() - t0
    m = res["metrics"]
    return {"version": res["version"], "status": res["status"], "wall_s": round(wall, 2),
            "train_s": round(m["train_seconds"], 2),
            "pairs_per_s": round(m["train_pairs_per_s"], 3),
            "train_pairs": res["counts"]["train_pairs"], "new_pairs": res["counts"]["new_pairs"],
            "replay_pairs": res["counts"]["replay_pairs"],
            "heldout_accuracy": m.get("heldout_accuracy"), "heldout_pairs": m.get("heldout_pairs"),
            "eval_s": round(m["eval_current_seconds"] + m["eval_candidate_seconds"], 2)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--initial-rankings", type=int, default=24)
    ap.add_argument("--added-pairs", type=int, default=100)
    ap.add_argument("--first-epochs", type=int, default=1)
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                    help="also time a full retrain from scratch on all pairs")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    default_cache = str(Path(tempfile.gettempdir()) / "rlhf-bench")
    ap.add_argument("--cache", default=os.environ.get("RLHF_BENCH_CACHE", default_cache),
                    help="workspace whose cache/ holds the converted embedded model")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_source("embedded", Path(args.cache))  # converted once, cached

    with tempfile.TemporaryDirectory(prefix="bench-reward-") as tmp:
        store = Store(Path(tmp) / "rlhf.db")
        cfg = RewardConfig()
        app = AppConfig(workspace=Path(tmp), model=model_dir, reward=cfg)
        runtime = Runtime(store, app, cpu=True)
        n0 = add_rankings(store, args.initial_rankings, start=0, seed=cfg.seed)
        load_before = os.getloadavg()
        first = timed_train(runtime, config=replace(cfg, epochs=args.first_epochs))
        print(f"v1 from scratch on {n0} pairs: {first}")
        added = add_rankings(store, -(-args.added_pairs // 6), start=args.initial_rankings,
                             seed=cfg.seed)
        incremental = timed_train(runtime)
        print(f"v2 incremental after +{added} pairs: {incremental}")
        full = None
        if args.baseline:
            full = timed_train(runtime, from_scratch=True)
            print(f"v3 baseline, full retrain from scratch on {n0 + added} pairs: {full}")
        load_after = os.getloadavg()
        store.close()

    result = {
        "bench": "reward", "model": "embedded:smollm2-135m-instruct", "threads": args.threads,
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "config": {
            "epochs": cfg.epochs, "rankings_per_step": cfg.rankings_per_step,
            "replay_ratio": cfg.replay_ratio, "lr": cfg.lr, "k": 4},
        "initial_pairs": n0, "added_pairs": added,
        "first_version": first, "incremental": incremental, "full_retrain": full,
        "pairs_per_s": incremental["pairs_per_s"],
        "incremental_wall_s": incremental["wall_s"],
        "full_retrain_wall_s": full["wall_s"] if full else None,
        "speedup_incremental_vs_full": (round(full["wall_s"] / incremental["wall_s"], 2)
                                        if full else None),
        # Other jobs on this machine skew every number: the load average says how much.
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
    }
    print(f"reward training: {result['pairs_per_s']:.2f} pairs/s (pair passes / train seconds)")
    print(f"incremental update (+{added} pairs): {result['incremental_wall_s']:.1f} s wall")
    if full:
        print(f"baseline full retrain: {result['full_retrain_wall_s']:.1f} s wall "
              f"(full / incremental = {result['speedup_incremental_vs_full']}x)")
    print(f"load average before/after: {result['loadavg_before']} / {result['loadavg_after']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
