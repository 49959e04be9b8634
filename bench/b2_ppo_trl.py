"""B2 PPO round: ours (`rlhf_core.policy.ppo.ppo_round`) vs `trl.experimental.ppo.PPOTrainer` (trl==1.12.0).

Same embedded model, same 16 prompts x 2 rollouts, response length, epochs, minibatch size,
LoRA (r, alpha, targets), KL / clip / value settings and the same reward model (our trained
reward adapter + head; merged into a sequence classifier for TRL, see b2_trl_side.py). Each
side runs in its own subprocess (peak RSS = that process's ru_maxrss); sides alternate.
TRL runs in `bench/.venv-trl` (created by bench/trl_env.py), never in the project venv.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common

PROMPTS = common.PROMPTS


def ppo_config(quick: bool):
    from rlhf_core.config import PPOConfig
    cfg = PPOConfig()
    if quick:
        cfg = dataclasses.replace(cfg, prompts_per_round=8, epochs=2, max_new_tokens=32)
    return cfg


def rows(cfg) -> list[str]:
    return [p for p in PROMPTS[:cfg.prompts_per_round] for _ in range(cfg.rollouts_per_prompt)]


# -- set-up: a workspace with a trained reward model (our venv, subprocess) ---------------------
def setup(ws: Path) -> dict:
    from bench.bench_reward import add_rankings
    from rlhf_core.reward.round import train_reward
    from rlhf_core.worker.runtime import Runtime
    from rlhf_core.workspace import open_workspace
    common.set_threads()
    # a PPO bench needs a serving reward model, not evidence: 8 rankings never clear the
    # promotion gate (RewardConfig.promote_min_heldout_pairs), so it is off here
    store, cfg = open_workspace(ws, model=common.embedded_model_dir(), **{
        "reward.promote_min_heldout_pairs": 0, "reward.promote_min_accuracy": 0.0})
    add_rankings(store, 8, start=0, seed=0)
    runtime = Runtime(store, cfg, cpu=not _cuda())
    res = train_reward(runtime)
    path = Path(res["path"])
    out = {"ws": str(ws), "reward_version": res["version"], "reward_adapter": str(path / "reward"),
           "reward_head": str(path / "score_head.safetensors"), "model_dir": cfg.model,
           "pad_token_id": runtime.tokenizer.pad_token_id,
           "lora": common_lora(cfg.lora)}
    store.close()
    return out


def common_lora(lora) -> dict:
    return {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
            "target_modules": list(lora.target_modules)}


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


# -- our side (subprocess) -----------------------------------------------------------------
def ours_side(ws: Path, quick: bool) -> dict:
    import resource

    import torch

    from rlhf_core.policy.ppo import ppo_round
    from rlhf_core.worker.runtime import Runtime
    from rlhf_core.workspace import open_workspace
    threads = common.set_threads()
    store, cfg = open_workspace(ws)
    config = ppo_config(quick)
    t_load = time.perf_counter()
    runtime = Runtime(store, cfg, cpu=not _cuda())
    model = runtime.model
    with torch.no_grad():  # the same tiny warm-up as the TRL side
        ids = runtime.tokenizer("hello", return_tensors="pt")["input_ids"].to(runtime.device.device)
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False,
                       pad_token_id=runtime.tokenizer.pad_token_id)
    load_s = time.perf_counter() - t_load
    rss_loaded = _vm_rss_mb()
    t0 = time.perf_counter()
    res = ppo_round(runtime, config=config, prompts=PROMPTS[:config.prompts_per_round])
    wall = time.perf_counter() - t0
    m = res["metrics"]
    n_trainable = sum(p.numel() for n, p in model.named_parameters()
                      if ".policy." in n or ".value." in n)
    n_trainable += sum(p.numel() for p in runtime.heads["value"].parameters())
    store.close()
    return {"side": "ours", "wall_s": wall, "load_s": load_s, "threads": threads,
            "time_generate": m["time_generate"], "time_score": m["time_score"],
            "time_train": m["time_train"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_load_mb": rss_loaded, "trainable_params": n_trainable,
            "sequences": m["n_sequences"], "status": res["status"]}


def _vm_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- orchestration -------------------------------------------------------------------------
def _sub(cmd: list, env=None, timeout=3600) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          cwd=common.BENCH.parent, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def run(quick: bool = False) -> dict:
    from bench import trl_env
    trl_py = trl_env.ensure("ppo")
    cfg = ppo_config(quick)
    reps = 1 if quick else 2
    with tempfile.TemporaryDirectory(prefix="bench-b2-") as tmp:
        base_ws = Path(tmp) / "base"
        info = _sub([sys.executable, "-m", "bench.b2_ppo_trl", "--setup", str(base_ws)])
        spec = {**info, "rows": rows(cfg), "config": dataclasses.asdict(cfg),
                "max_prompt_tokens": cfg.max_prompt_tokens,
                "threads": int(os.environ.get("RLHF_BENCH_THREADS", os.cpu_count() or 2))}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        ours, trl = [], []
        for r in range(reps):
            ws = Path(tmp) / f"ours{r}"
            shutil.copytree(base_ws, ws)
            order = ["ours", "trl"] if r % 2 == 0 else ["trl", "ours"]
            for side in order:
                if side == "ours":
                    cmd = [sys.executable, "-m", "bench.b2_ppo_trl", "--side", str(ws)]
                    ours.append(_sub(cmd + (["--quick"] if quick else [])))
                else:
                    trl.append(_sub([str(trl_py), "-m", "bench.b2_trl_side", str(spec_path)]))
    keys = ("wall_s", "time_generate", "time_score", "time_train", "peak_rss_mb",
            "rss_after_load_mb")
    med = lambda runs: {k: round(common.median([x[k] for x in runs]), 2) for k in keys}  # noqa
    o, t = med(ours), med(trl)
    speed = {k: round(t[k] / o[k], 2) for k in ("wall_s", "time_generate", "time_score",
                                                 "time_train")}
    return {
        "bench": "B2 PPO round vs TRL", "trl_version": trl_env.versions("ppo"),
        "setting": {"sequences": len(rows(cfg)),
                    "prompts": len(rows(cfg)) // cfg.rollouts_per_prompt,
                    "rollouts_per_prompt": cfg.rollouts_per_prompt,
                    "max_new_tokens": cfg.max_new_tokens, "epochs": cfg.epochs,
                    "minibatch_size": cfg.minibatch_size, "lora": spec["lora"],
                    "reward": f"our reward v{info['reward_version']} (adapter+head; merged for TRL)"},
        "ours": o, "trl": t, "runs": {"ours": ours, "trl": trl},
        "speedup": speed["wall_s"], "speedup_by_phase": speed,
        "memory_ratio": round(o["peak_rss_mb"] / t["peak_rss_mb"], 3),
        "trainable_params": {"ours": ours[0]["trainable_params"],
                             "trl": trl[0]["trainable_params"]},
        "goal": "speedup >= 2x, memory_ratio <= 0.5",
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.setup:
        print("RESULT " + json.dumps(setup(Path(args.setup))), flush=True)
        return {}
    if args.side:
        print("RESULT " + json.dumps(ours_side(Path(args.side), args.quick)), flush=True)
        return {}
    res = run(args.quick)
    common.write_result("b2_ppo_trl", res)
    print(json.dumps({k: res[k] for k in ("ours", "trl", "speedup", "memory_ratio")}, indent=1))
    return res


if __name__ == "__main__":
    main()
