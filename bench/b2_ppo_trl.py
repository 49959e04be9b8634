"""B2 PPO round: ours (`rlhf_core.policy.ppo.ppo_round`) vs `trl.experimental.ppo.PPOTrainer` (trl==1.12.0).

    .venv/bin/python -m bench.b2_ppo_trl [--quick] [--reps N]

Three sides, each run in its own subprocess, 3 runs each (--quick: 1), interleaved with the order
rotated so each side runs first, second and third once: ours, TRL with its full value model
(`trl-full`, its default design) and TRL with a LoRA-wrapped value model (`trl-lora`, what a
user can pass). Same embedded model, same 32 prompts x 2 rollouts, response length, epochs,
minibatch size and optimizer steps (one per minibatch), LoRA (r, alpha, targets), KL / clip /
value settings and the same reward model (our trained reward adapter + head; merged into a
sequence classifier for TRL, see b2_trl_side.py); gradient checkpointing off on every side.
Per side and phase (generate / score / train): min / median / max seconds, peak RSS at each
phase's end, generated tokens, optimizer steps, package versions; every remaining design
asymmetry is listed in the result's "asymmetries". TRL runs in `bench/.venv-trl` (created by
bench/trl_env.py), never in the project venv.
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
def instrument_ours(model) -> dict:
    """Peak RSS at the end of each phase (ru_maxrss: monotone), generated tokens (the rollout's
    mask: response tokens up to and including the stop token), optimizer steps (a torch hook),
    checkpointing as it is at the first step. Wraps the round's step functions by name; the
    round's own timings stay those of its metrics."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from rlhf_core.policy import experience, ppo
    marks = {"optimizer_steps": 0, "tokens": None}

    def after(fn, phase, grab=None):
        def wrapped(*a, **kw):
            common.reset_peak_rss()
            out = fn(*a, **kw)
            marks[f"phase_peak_rss_{phase}_mb"] = common.window_peak_rss_mb()
            marks[f"peak_rss_{phase}_mb"] = common.peak_rss_mb()
            if grab:
                grab(out)
            return out
        return wrapped

    def tokens(rollout):
        marks["tokens"] = int(rollout.mask.sum().item())
    experience.rollout_step = after(experience.rollout_step, "generate", tokens)
    experience.score_step = after(experience.score_step, "score")
    ppo.train_step = after(ppo.train_step, "train")

    def count_step(optimizer, args, kwargs):
        if not marks["optimizer_steps"]:
            marks["checkpointing"] = any(getattr(m, "gradient_checkpointing", False)
                                         for m in model.modules())
        marks["optimizer_steps"] += 1
    marks["hook"] = register_optimizer_step_post_hook(count_step)
    return marks


def ours_side(ws: Path, quick: bool, decode: str | None = None, critic: str = "adapter",
              prefix_cache: bool = True, precision: str = "float32",
              critic_layers: int | None = None) -> dict:
    import torch

    from rlhf_core.decoding import decode_dtype
    from rlhf_core.models import autocast
    from rlhf_core.policy.ppo import ppo_round
    from rlhf_core.worker.runtime import Runtime
    from rlhf_core.workspace import open_workspace
    threads = common.set_threads()
    store, cfg = open_workspace(ws, mixed_precision=MIXED[precision],
                                **({"sampling.decode_dtype": decode} if decode else {}))
    config = dataclasses.replace(ppo_config(quick), critic=critic, prefix_cache=prefix_cache)
    if critic_layers is not None:
        config = dataclasses.replace(config, critic_layers=critic_layers)
    t_load = time.perf_counter()
    runtime = Runtime(store, cfg, cpu=not _cuda())
    model = runtime.model
    with torch.no_grad(), autocast(runtime.device):  # the same tiny warm-up as the TRL side
        ids = runtime.tokenizer("hello", return_tensors="pt")["input_ids"].to(runtime.device.device)
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False,
                       pad_token_id=runtime.tokenizer.pad_token_id)
    load_s = time.perf_counter() - t_load
    rss_loaded = _vm_rss_mb()
    marks = instrument_ours(model)
    t0 = time.perf_counter()
    res = ppo_round(runtime, config=config, prompts=PROMPTS[:config.prompts_per_round])
    wall = time.perf_counter() - t0
    marks["hook"].remove()
    m = res["metrics"]
    n_trainable = sum(p.numel() for n, p in model.named_parameters()
                      if ".policy." in n or ".value." in n)
    n_value = sum(p.numel() for n, p in model.named_parameters() if ".value." in n)
    n_head = sum(p.numel() for p in runtime.heads["value"].parameters())
    store.close()
    tokens = marks["tokens"]
    if tokens is None:  # the step functions were renamed: the round's own mean length
        tokens = round(m["response_length"] * m["n_sequences"])
    return {"side": "ours", "wall_s": wall, "load_s": load_s, "threads": threads,
            "time_generate": m["time_generate"], "time_score": m["time_score"],
            "time_train": m["time_train"],
            "peak_rss_mb": common.peak_rss_mb(), "rss_after_load_mb": rss_loaded,
            **{k: v for k, v in marks.items() if k.startswith(("peak_rss_", "phase_peak_"))},
            "tokens": tokens, "optimizer_steps": marks["optimizer_steps"],
            "ppo_steps_metric": m.get("ppo_steps"),
            "trainable_params": n_trainable + n_head, "value_trainable_params": n_value + n_head,
            "gradient_checkpointing": {"config": config.gradient_checkpointing,
                                       "while_training": marks.get("checkpointing")},
            # what the rollout decoded in: float32 when it records the old log-probs (the
            # default since the B9 fix), else sampling.decode_dtype
            "decode_dtype": str(torch.float32 if config.logprobs_from_sampling
                                and runtime.device.mixed_precision != "bf16"
                                else decode_dtype(cfg.sampling.decode_dtype,
                                                  runtime.device.device)),
            "critic": config.critic, "prefix_cache": config.prefix_cache,
            "mixed_precision": runtime.device.mixed_precision,
            "sequences": m["n_sequences"], "status": res["status"],
            "versions": common.package_versions()}


def _vm_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- orchestration -------------------------------------------------------------------------
def _sub(cmd: list, env=None, timeout=3600) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          cwd=common.BENCH.parent, env=env, check=False)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][7:])


# ours: the project's defaults (a rollout that records its old log-probs decodes in float32
# since the B9 fix; before it, sampling.decode_dtype=auto decoded rollouts in bf16 here and
# paid a float32 forward for the old log-probs); ours-f32: float32 decoding forced (the same
# as ours now; kept to compare with results of before the fix); ours-trunk: the defaults with
# ppo.critic=trunk (a value head on the policy's hidden states, no value adapter);
# ours-noprefix: the defaults with ppo.prefix_cache=false (what the shared prefix saves);
# ours-allcritic: the defaults with ppo.critic_layers=0 (the value adapter on every layer, the
# default until 2026-12-01)
# --precision: one training math for every side (TRL's own models are float32 on a CPU)
MIXED = {"float32": "no", "bf16": "bf16"}
SIDES = ("ours", "ours-f32", "ours-trunk", "ours-noprefix", "ours-allcritic", "trl-full",
         "trl-lora")
DEFAULT_SIDES = ("ours", "ours-allcritic", "ours-trunk", "trl-full", "trl-lora")
OURS = ("ours", "ours-f32", "ours-trunk", "ours-noprefix", "ours-allcritic")
PEERS = ("trl-full", "trl-lora")
PHASES = ("wall_s", "time_generate", "time_score", "time_train")
KEYS = PHASES + ("peak_rss_mb", "peak_rss_generate_mb", "peak_rss_score_mb",
                 "peak_rss_train_mb", "phase_peak_rss_generate_mb", "phase_peak_rss_score_mb",
                 "phase_peak_rss_train_mb", "rss_after_load_mb", "tokens", "optimizer_steps",
                 "generate_tokens_per_s")


def parse_side(side: str, default: str = "float32") -> tuple[str, str]:
    """"ours@bf16" -> ("ours", "bf16"); a side without "@" takes --precision."""
    base, _, precision = side.partition("@")
    return base, precision or default


def run_side(side: str, ws: Path, spec_path: Path, trl_py: Path, quick: bool,
             precision: str = "float32") -> dict:
    side, precision = parse_side(side, precision)
    if side in OURS:
        res = _sub([sys.executable, "-m", "bench.b2_ppo_trl", "--side", str(ws),
                    "--precision", precision]
                   + (["--quick"] if quick else [])
                   + (["--decode-dtype", "float32"] if side == "ours-f32" else [])
                   + (["--critic", "trunk"] if side == "ours-trunk" else [])
                   + (["--no-prefix-cache"] if side == "ours-noprefix" else [])
                   + (["--critic-layers", "0"] if side == "ours-allcritic" else []))
    else:
        res = _sub([str(trl_py), "-m", "bench.b2_trl_side", str(spec_path),
                    side.split("-", 1)[1], precision])
    res["generate_tokens_per_s"] = res["tokens"] / res["time_generate"]
    return res


def spread(runs: list[dict], k: str) -> dict | None:
    xs = [x[k] for x in runs if x.get(k) is not None]
    return {"min": round(min(xs), 2), "median": round(common.median(xs), 2),
            "max": round(max(xs), 2)} if xs else None


def ratios(ours: list[dict], peer: list[dict]) -> dict:
    """Peer time / our time per phase: the ratio of medians, and the spread of the ratios of
    the runs made in the same interleaved repetition."""
    out = {}
    for k in PHASES:
        per_rep = [p[k] / o[k] for o, p in zip(ours, peer)]
        med = common.median([p[k] for p in peer]) / common.median([o[k] for o in ours])
        out[k] = {"of_medians": round(med, 2), "per_run_min": round(min(per_rep), 2),
                  "per_run_max": round(max(per_rep), 2)}
    return out


def suite_precision() -> str:
    """`make bench`'s precision for every side: the project's own training math on this
    machine (`mixed_precision=auto`: bf16 autocast on a CPU that multiplies bf16 natively, bf16
    on a CUDA GPU that has it), so the suite measures what a user's round runs."""
    import torch

    from rlhf_core.models import native_bf16_cpu, resolve_mixed_precision
    cuda = torch.cuda.is_available()
    auto = resolve_mixed_precision("auto", "cuda" if cuda else "cpu",
                                   native_cpu=not cuda and native_bf16_cpu(),
                                   cuda_bf16=cuda and torch.cuda.is_bf16_supported())
    return "bf16" if auto == "bf16" else "float32"


def run(quick: bool = False, reps: int | None = None, sides=DEFAULT_SIDES,
        precision: str | None = None) -> dict:
    """precision None (`make bench`): `suite_precision()`; the CLI's default is float32."""
    from bench import trl_env
    precision = precision or suite_precision()
    trl_py = trl_env.ensure("ppo")
    cfg = ppo_config(quick)
    reps = reps or (1 if quick else 3)
    runs = {s: [] for s in sides}
    with tempfile.TemporaryDirectory(prefix="bench-b2-") as tmp:
        base_ws = Path(tmp) / "base"
        info = _sub([sys.executable, "-m", "bench.b2_ppo_trl", "--setup", str(base_ws)])
        spec = {**info, "rows": rows(cfg), "config": dataclasses.asdict(cfg),
                "max_prompt_tokens": cfg.max_prompt_tokens, "precision": precision,
                "threads": int(os.environ.get("RLHF_BENCH_THREADS", os.cpu_count() or 2))}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for r in range(reps):
            order = sides[r % len(sides):] + sides[:r % len(sides)]  # rotated run by run
            for side in order:
                ws = Path(tmp) / f"{side}{r}"
                if parse_side(side)[0] in OURS:
                    shutil.copytree(base_ws, ws)
                print(f"rep {r + 1}/{reps}: {side}", file=sys.stderr, flush=True)
                runs[side].append(run_side(side, ws, spec_path, trl_py, quick, precision))
    return summary(runs, cfg, spec, info, quick)


def summary(runs: dict, cfg, spec: dict, info: dict, quick: bool) -> dict:
    """Medians and spreads per side; ratios (peer time / our time, peer RSS / ...) for every
    pair of one of our sides and one TRL side that ran."""
    from bench import trl_env
    sides = list(runs)
    med = {s: {k: (spread(runs[s], k) or {}).get("median") for k in KEYS} for s in sides}
    pairs = [(o, p) for o in sides for p in sides
             if parse_side(o)[0] in OURS and parse_side(p)[0] in PEERS]
    ratio = {f"{o}_vs_{p}": ratios(runs[o], runs[p]) for o, p in pairs}
    memory = {f"{o}_vs_{p}": round(med[o]["peak_rss_mb"] / med[p]["peak_rss_mb"], 3)
              for o, p in pairs}
    # each phase's own peak (VmHWM reset at its start), ours / the peer's
    phase_memory = {f"{o}_vs_{p}": {ph: round(med[o][k] / med[p][k], 3)
                                    for ph in ("generate", "score", "train")
                                    for k in [f"phase_peak_rss_{ph}_mb"]
                                    if med[o].get(k) and med[p].get(k)}
                    for o, p in pairs}
    first = runs[sides[0]]
    legacy = {}
    if "ours_vs_trl-full" in ratio:  # the keys bench/run_all.py reads (project defaults vs
        r = ratio["ours_vs_trl-full"]  # TRL with its full value model)
        legacy = {"ours": med["ours"], "trl": med["trl-full"],
                  "speedup": r["wall_s"]["of_medians"],
                  "speedup_by_phase": {k: v["of_medians"] for k, v in r.items()},
                  "memory_ratio": memory["ours_vs_trl-full"]}
    return {
        "bench": "B2 PPO round vs TRL", "trl_version": trl_env.versions("ppo"),
        "setting": {"sequences": len(rows(cfg)),
                    "prompts": len(rows(cfg)) // cfg.rollouts_per_prompt,
                    "rollouts_per_prompt": cfg.rollouts_per_prompt,
                    "max_new_tokens": cfg.max_new_tokens, "epochs": cfg.epochs,
                    "minibatch_size": cfg.minibatch_size,
                    "generation_batch_size": cfg.generation_batch_size, "lora": spec["lora"],
                    "reward": f"our reward v{info['reward_version']} (adapter+head; merged for TRL)",
                    "sides": sides, "runs_per_side": len(first),
                    "precision": {side: parse_side(side, spec.get("precision", "float32"))[1]
                                  for side in sides},
                    "order": "interleaved; the order of the sides rotates run by run"},
        **legacy,
        "median": med,
        "speedup_by_pair": {k: v["wall_s"]["of_medians"] for k, v in ratio.items()},
        "ratios": ratio, "memory_ratio_by_pair": memory,
        "phase_memory_ratio_by_pair": phase_memory,
        "spread": {s: {k: spread(runs[s], k) for k in KEYS} for s in sides},
        "trainable_params": {s: runs[s][0]["trainable_params"] for s in sides},
        "value_trainable_params": {s: runs[s][0]["value_trainable_params"] for s in sides},
        "optimizer_steps": {s: sorted({x["optimizer_steps"] for x in runs[s]}) for s in sides},
        "gradient_checkpointing": {s: runs[s][0]["gradient_checkpointing"] for s in sides},
        "decode_dtype": {s: sorted({x.get("decode_dtype", "torch.float32") for x in runs[s]})
                         for s in sides},
        "mixed_precision": {s: sorted({str(x.get("mixed_precision", "no")) for x in runs[s]})
                            for s in sides},
        "versions": {s: runs[s][0]["versions"] for s in sides},
        "rss_note": "peak_rss_<phase>_mb is the process's ru_maxrss read at the end of that "
                    "phase: a running peak, so monotone (a phase's own peak only where it rises)",
        "asymmetries": ASYMMETRIES,
        "runs": runs,
        "quick": quick, "machine": common.machine(),
        "goal": "speedup >= 2x vs TRL (full value model), >= 1.5x vs TRL with a LoRA critic, on "
                "the same work (ours-f32); memory_ratio <= 0.5",
    }


ASYMMETRIES = [
    ("Value model: trl-full trains TRL's separate value model in full (a 135M-parameter "
     "sequence classifier); ours (since 2026-12-01) trains a LoRA adapter on the top 6 of the "
     "30 decoder layers plus a scalar head on the shared base (ppo.critic_layers=6, r16 on "
     "q/k/v/o: 0.37M + 577 parameters), whose forwards start at layer 24 from the reference's "
     "hidden states kept in the score phase (below its layers the value adapter computes what "
     "the reference computes); ours-allcritic (ppo.critic_layers=0, the default before) puts "
     "that adapter on every layer (1.84M + 577) and runs all 30 layers per value forward; "
     "trl-lora wraps TRL's value model with peft.get_peft_model and the LoRA settings of "
     "ours-allcritic (its score head trains through modules_to_save: 1.84M + 576). TRL cannot "
     "share the reference's states with its value model (separate models), so ours vs trl-lora "
     "compares critics of different size: ours-allcritic vs trl-lora is the like-for-like "
     "critic. ours-trunk (ppo.critic=trunk) has no value adapter: its "
     "critic is a scalar head (577 parameters) on the policy adapter's detached hidden states, "
     "one forward/backward per minibatch, values recorded while decoding; TRL has no such "
     "option, so ours-trunk vs TRL compares designs, not the same critic."),
    ("Shared prefix: ours runs the chat-template prefix every query shares once per forward "
     "in scoring and training (ppo.prefix_cache); TRL runs every row in full."),
    ("Models held: TRL holds three copies of the base weights (policy with its LoRA, whose "
     "disabled adapter is the reference; value model; reward model with our reward adapter "
     "merged in); ours holds one base with policy, value and reward adapters."),
    ("trl-lora's critic forward runs the whole LoRA-wrapped classifier (TRL reaches the "
     "backbone as getattr(value_model, 'model'), which on a PeftModel is the classifier), so it "
     "also computes the 576->1 score on every position: a negligible extra."),
    ("Optimizer steps: equal, one per minibatch of 8 (16 per round, counted). TRL gets "
     "per_device_train_batch_size = the 64-row rollout, gradient_accumulation_steps = 1, "
     "num_mini_batches = 8 (before 2026-11-30 it ran gradient_accumulation_steps = 8: one step "
     "per epoch, 2 per round)."),
    ("Phase boundaries: generate = sampling (ours records the old log-probs while sampling; TRL "
     "keeps the generation logits and takes log-probs from them in its score phase); score = "
     "reference, value and reward forwards (TRL's also holds its KL shaping, GAE and "
     "whitening, ours has them between score and train, in wall time only); train = the PPO "
     "epochs. TRL's score phase now ends at its first training forward (before, at the first "
     "backward, which put one policy+value forward into score: time_score_to_first_backward)."),
    ("Training passes: TRL runs the critic forward and the policy forward, then one backward of "
     "pg_loss + vf_coef*vf_loss; ours runs a policy forward/backward then a value "
     "forward/backward (disjoint parameters, same gradients)."),
    ("Decoding precision: side 'ours' is the project default sampling.decode_dtype=auto, which "
     "on this CPU (AVX512-BF16) decodes with bfloat16 weights; the rollout's old log-probs then "
     "come from a float32 policy forward in the score phase (one forward more than TRL, which "
     "takes them from its float32 generation logits). Side 'ours-f32' decodes in float32 and "
     "records the log-probs while sampling: TRL's precision in every phase, the same work."),
    ("Training precision (--precision, or a side's @bf16 / @float32): float32 on every side by "
     "default; bf16 = our mixed_precision=bf16 and TRL's bf16=True, on a CPU both bf16 autocast "
     "with float32 optimizer state. TRL's weights stay float32 (autocast rounds them to bf16 at "
     "every product); ours store the frozen base's decoder matrices in bf16 once (since "
     "2026-12-01, models.store_frozen_linears: the same products, ~300 MB less resident, no "
     "cast per product), LoRA, embedding and norms float32. Under bf16 our rollout decodes at "
     "sampling.decode_dtype and the old log-probs come from a bf16-autocast forward in the "
     "score phase (the same math as training's), as on CUDA."),
    ("Batching of the no-grad passes: TRL's local_rollout_forward_batch_size (set to our "
     "generation_batch_size, which is also TRL's default of 64) sizes both its generate calls "
     "and its reference / value / reward forwards; ours generates in batches of "
     "generation_batch_size and runs those forwards in chunks of minibatch_size (8)."),
    ("Sampling: both sides sample with their own seeds, so the responses (and token counts) "
     "differ; tokens are counted per side (non-pad response tokens up to and including the "
     "stop token)."),
    ("Gradient checkpointing: off on both sides (ours PPOConfig.gradient_checkpointing=False; "
     "TRL activation_checkpointing=False, and PPOTrainer's own train() never enables it); "
     "checked on the modules at the first optimizer step."),
    ("Optimizers: ours Adam (eps 1e-5), TRL AdamW (Trainer default, weight decay 0, linear "
     "schedule stepped once per round); the same learning rate and gradient clipping."),
]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, help="runs per side (default 3, --quick 1)")
    ap.add_argument("--sides", default=",".join(DEFAULT_SIDES), help="comma-separated, of: "
                    + ", ".join(SIDES) + "; NAME@bf16 / NAME@float32 overrides --precision")
    ap.add_argument("--precision", choices=tuple(MIXED), default="float32",
                    help="training math of every side: float32, or bf16 (our mixed_precision="
                         "bf16, TRL's bf16=True: bf16 autocast over float32 weights on a CPU)")
    ap.add_argument("--out", default="b2_ppo_trl",
                    help="results name (bench/results/NAME.json), e.g. for a run of some sides")
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--decode-dtype", help=argparse.SUPPRESS)
    ap.add_argument("--critic", default="adapter", help=argparse.SUPPRESS)
    ap.add_argument("--no-prefix-cache", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--critic-layers", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.setup:
        print("RESULT " + json.dumps(setup(Path(args.setup))), flush=True)
        return {}
    if args.side:
        print("RESULT " + json.dumps(ours_side(Path(args.side), args.quick, args.decode_dtype,
                                               args.critic, not args.no_prefix_cache,
                                               args.precision, args.critic_layers)),
              flush=True)
        return {}
    sides = tuple(args.sides.split(","))
    bad = [s for s in sides if parse_side(s)[0] not in SIDES or parse_side(s)[1] not in MIXED]
    if bad:
        ap.error(f"unknown sides: {bad} (a side may end in @float32 or @bf16)")
    t0 = time.perf_counter()
    res = run(args.quick, args.reps, sides, args.precision)
    res["bench_seconds"] = round(time.perf_counter() - t0, 1)
    res["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    common.write_result(args.out, res)
    print(json.dumps({k: res[k] for k in ("median", "speedup_by_pair", "memory_ratio_by_pair",
                                          "phase_memory_ratio_by_pair",
                                          "optimizer_steps", "decode_dtype",
                                          "mixed_precision")}, indent=1))
    return res


if __name__ == "__main__":
    main()
