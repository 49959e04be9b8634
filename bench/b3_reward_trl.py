"""B3 reward-model training: ours (`rlhf_core.reward.round.train_reward`) vs `trl.RewardTrainer`.

Same pairs (the exact train / held-out split our trainer selects), same base model, same LoRA
(r, alpha, targets), same pairs per step (`rankings_per_step` whole rankings = 24 pairs), same
max length, epochs (hence steps) and learning rate. TRL is the current release, installed in
`bench/.venv-trl-latest` (trl 1.12.0 in `.venv-trl` pins an older release line for PPO; one venv
cannot hold both, so B3 gets its own). Each side runs in its own subprocess; sides alternate.
Reported: pairs/s (pair passes / training seconds) and held-out accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common


def n_rankings(quick: bool) -> int:
    return 12 if quick else 30


def setup(ws: Path, quick: bool) -> dict:
    """A workspace with synthetic rankings; export the pairs exactly as our trainer selects them."""
    from bench.bench_reward import add_rankings
    from rlhf_core.data import annotation
    from rlhf_core.reward import data as reward_data
    from rlhf_core.workspace import open_workspace
    store, cfg = open_workspace(ws, model=common.embedded_model_dir())
    add_rankings(store, n_rankings(quick), start=0, seed=0)
    # more held-out rankings (never trained on): accuracy is compared on ~150 pairs, not ~30
    add_rankings(store, 6 if quick else 20, start=n_rankings(quick), seed=0, heldout_fraction=1.0)
    rc = cfg.reward
    pairs = reward_data.load_pairs(annotation.training_pairs(store))
    data = reward_data.select_data(pairs, max_trained=0, replay_ratio=rc.replay_ratio,
                                   soft_ties=rc.soft_ties, min_pairs=rc.min_pairs, seed=rc.seed + 1, incremental=False)
    dump = lambda ps: [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,  # noqa
                        "label": p.label} for p in ps]
    per_step = rc.rankings_per_step * 6  # K=4 full orders: 6 pairs per ranking
    out = {"model_dir": cfg.model, "train": dump(data.train), "heldout": dump(data.heldout),
           "config": {"lr": rc.lr, "epochs": rc.epochs, "max_length": rc.max_length,
                      "pairs_per_step": per_step, "max_grad_norm": rc.max_grad_norm,
                      "seed": rc.seed},
           "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                    "target_modules": list(cfg.lora.target_modules)}}
    store.close()
    return out


def ours_side(ws: Path) -> dict:
    import torch

    from rlhf_core.reward.round import train_reward
    from rlhf_core.worker.runtime import Runtime
    from rlhf_core.workspace import open_workspace
    threads = common.set_threads()
    # float32 as TRL's RewardTrainer on a CPU (bf16 autocast would be a different math)
    store, cfg = open_workspace(ws, mixed_precision="no")
    runtime = Runtime(store, cfg, cpu=not torch.cuda.is_available())
    runtime.model  # load outside the timed part, as the TRL side does
    t0 = time.perf_counter()
    res = train_reward(runtime)
    wall = time.perf_counter() - t0
    m = res["metrics"]
    store.close()
    return {"side": "ours", "threads": threads, "pairs_per_s": m["train_pairs_per_s"],
            "train_s": m["train_seconds"], "steps": m["train_steps"], "wall_s": wall,
            "train_pairs": res["counts"]["train_pairs"],
            "heldout_accuracy": m.get("heldout_accuracy"), "heldout_pairs": m.get("heldout_pairs"),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _sub(cmd, timeout=3600) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          cwd=common.BENCH.parent)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def run(quick: bool = False) -> dict:
    from bench import trl_env
    trl_py = trl_env.ensure("reward")
    reps = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="bench-b3-") as tmp:
        base = Path(tmp) / "base"
        cmd = [sys.executable, "-m", "bench.b3_reward_trl", "--setup", str(base)]
        spec = _sub(cmd + (["--quick"] if quick else []))
        spec["threads"] = int(os.environ.get("RLHF_BENCH_THREADS", os.cpu_count() or 2))
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        ours, trl = [], []
        for r in range(reps):
            ws = Path(tmp) / f"ours{r}"
            shutil.copytree(base, ws)
            for side in (["ours", "trl"] if r % 2 == 0 else ["trl", "ours"]):
                if side == "ours":
                    ours.append(_sub([sys.executable, "-m", "bench.b3_reward_trl", "--side",
                                      str(ws)]))
                else:
                    trl.append(_sub([str(trl_py), "-m", "bench.b3_trl_side", str(spec_path)]))
    ratios = [o["pairs_per_s"] / t["pairs_per_s"] for o, t in zip(ours, trl)]

    def med(runs, k):
        xs = [x[k] for x in runs if x.get(k) is not None]
        return round(common.median(xs), 3) if xs else None

    def spread(runs, k):
        xs = [x[k] for x in runs if x.get(k) is not None]
        return {"min": round(min(xs), 3), "median": round(common.median(xs), 3),
                "max": round(max(xs), 3)} if xs else None
    return {
        "bench": "B3 reward training vs TRL RewardTrainer",
        "trl_version": trl_env.versions("reward"),
        "setting": {"train_pairs": len(spec["train"]), "heldout_pairs": len(spec["heldout"]),
                    **spec["config"], "lora": spec["lora"]},
        "ours": {k: med(ours, k) for k in ("pairs_per_s", "train_s", "heldout_accuracy",
                                            "peak_rss_mb")},
        "trl": {k: med(trl, k) for k in ("pairs_per_s", "train_s", "heldout_accuracy",
                                          "peak_rss_mb")},
        "ratio": round(common.median(ratios), 2),
        "ratio_spread": {"min": round(min(ratios), 2), "max": round(max(ratios), 2)},
        "pairs_per_s_spread": {"ours": spread(ours, "pairs_per_s"),
                               "trl": spread(trl, "pairs_per_s")},
        "peak_rss_mb_spread": {"ours": spread(ours, "peak_rss_mb"),
                               "trl": spread(trl, "peak_rss_mb")},
        "ours_versions": common.package_versions(),
        "gradient_checkpointing": {"ours": False, "trl": False},
        "forwards_per_ranking": "ours: one forward per distinct response of a ranking (4 for the "
                                "6 pairs of a K=4 ranking); trl: two per pair (12)",
        "runs": {"ours": ours, "trl": trl},
        "goal": "pairs/s ratio >= 1.2, held-out accuracy equal within noise",
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.setup:
        print("RESULT " + json.dumps(setup(Path(args.setup), args.quick)), flush=True)
        return {}
    if args.side:
        print("RESULT " + json.dumps(ours_side(Path(args.side))), flush=True)
        return {}
    res = run(args.quick)
    common.write_result("b3_reward_trl", res)
    print(json.dumps({k: res[k] for k in ("ours", "trl", "ratio")}, indent=1))
    return res


if __name__ == "__main__":
    main()
