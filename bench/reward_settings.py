"""Reward-model settings compared on a workspace's own rankings: held-out accuracy per variant.

Each variant trains a reward version from scratch on a copy of the workspace (the same train
pairs, the same held-out pairs, `train_reward(from_scratch=True)`), with `--set` values on top
of the workspace's settings, and prints held-out accuracy (strict pairs), its Wilson interval,
mean P(chosen), the train loss first -> last, steps and seconds:

    python -m bench.reward_settings --workspace sim --out reward_settings_sim \\
        --variant base= --variant lr1e-3=reward.lr=1e-3 \\
        --variant hard-ties=reward.soft_ties=false,reward.lr=1e-3

A variant is NAME=KEY=VALUE[,KEY=VALUE...] (empty: the workspace's own settings). Which
setting learns the annotators' rule from the fewest labels is a question of the data, so this
runs on the data you have (a `rlhf simulate` workspace, or your own). Results go to
bench/results/NAME.json. A quality comparison, not a speed goal: seconds are for context.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import common


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition("=")
    if not name:
        raise ValueError(f"variant {text!r}: NAME=KEY=VALUE[,KEY=VALUE...]")
    sets = {}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"variant {text!r}: {part!r} is not KEY=VALUE")
        sets[key.strip()] = value.strip()
    return name, sets


def run_variant(workspace: Path, sets: dict) -> dict:
    from rlhf_core.reward.round import train_reward
    from rlhf_core.worker.runtime import Runtime
    from rlhf_core.workspace import open_workspace
    common.set_threads()  # RLHF_BENCH_THREADS, else every core
    with tempfile.TemporaryDirectory(prefix="reward-settings-") as tmp:
        ws = Path(tmp) / "ws"
        shutil.copytree(workspace, ws, ignore=shutil.ignore_patterns("*-wal", "*-shm"))
        store, cfg = open_workspace(ws, create=False, **sets)
        try:
            runtime = Runtime(store, cfg, cpu=True)
            runtime.model  # loaded outside the timed part
            t0 = time.perf_counter()
            res = train_reward(runtime, from_scratch=True)
            seconds = time.perf_counter() - t0
        finally:
            store.close()
    m = res["metrics"]
    keys = ("heldout_accuracy", "heldout_strict_pairs", "heldout_mean_p_chosen",
            "heldout_loss", "train_loss_first", "train_loss_last", "train_steps")
    return {"status": res["status"], "reason": res["reason"], "seconds": round(seconds, 1),
            "mixed_precision": runtime.device.mixed_precision,
            **{k: m.get(k) for k in keys}, "counts": res["counts"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", required=True, type=Path)
    ap.add_argument("--variant", action="append", required=True,
                    help="NAME=KEY=VALUE[,KEY=VALUE...]; repeat for each variant")
    ap.add_argument("--out", default="reward_settings")
    args = ap.parse_args(argv)
    from rlhf_core.evaluation import wilson_interval
    variants = [parse_variant(v) for v in args.variant]
    results = {}
    for name, sets in variants:
        print(f"variant {name}: {sets or 'the workspace settings'}", file=sys.stderr, flush=True)
        r = run_variant(args.workspace.expanduser().resolve(), sets)
        n, acc = r["heldout_strict_pairs"] or 0, r["heldout_accuracy"]
        lo, hi = wilson_interval(round(acc * n), n) if n and acc is not None else (None, None)
        results[name] = {"set": sets, **r, "heldout_ci": [lo, hi]}
        print(f"  held-out accuracy {acc} on {n} strict pairs [{lo}, {hi}], train loss "
              f"{r['train_loss_first']:.3f} -> {r['train_loss_last']:.3f}, {r['train_steps']} "
              f"steps, {r['seconds']} s, {r['status']}", file=sys.stderr, flush=True)
    out = {"bench": "reward settings on a workspace's rankings", "workspace": str(args.workspace),
           "variants": results, "versions": common.package_versions(),
           "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    common.write_result(args.out, out)
    print(json.dumps({k: {x: v[x] for x in ("heldout_accuracy", "heldout_strict_pairs",
                                            "train_loss_last", "seconds")}
                      for k, v in results.items()}, indent=1))
    return out


if __name__ == "__main__":
    main()
