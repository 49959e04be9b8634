"""B9 critic-free rounds: our GRPO / RLOO / online DPO vs TRL's GRPOTrainer / RLOOTrainer / OnlineDPOTrainer.

One policy round per run on the same work: the embedded model, the same LoRA (r, alpha, targets,
dropout) on the policy, the same prompts (`common.PROMPTS`, chat-templated by our tokenizer and
handed to TRL as text), the same group size, response length, temperature, KL coefficient / beta,
clip range, learning rate, epochs and minibatch size, and the same reward model (our trained
reward adapter + head; merged into a sequence classifier for TRL, as B2 does). Gradient
checkpointing is off on both sides (TRL's configs default it on; it is turned off). The current
TRL release runs in `bench/.venv-trl-latest` (bench/b9_trl_side.py). Our side runs twice: `ours`
(the project's defaults: on a CPU with native bf16 the rollout decodes with bf16 weights) and
`ours-f32` (float32 decoding: TRL's precision in every phase, the same-work comparison).
`--precision` sets the training precision of every side alike: `bf16` (bf16 autocast over
float32 models on both sides, TRL's `bf16=True`; ours also stores the frozen base's decoder
matrices in bf16, as the project does under bf16 on a CPU), `no` (float32 everywhere, the
default of this bench until 2026-12-01) or `auto` (the project's default: bf16 on a CPU with
native bf16 or a bf16 GPU, else float32); results of a `bf16` run go to
`b9_algorithms_trl_bf16.json`. Each
side runs in its own subprocess (peak RSS = that process's ru_maxrss); the order of the sides
rotates run by run, so each runs first, second and third once in 3 runs. Optimizer steps
are counted on both sides by one global `torch.optim.Optimizer` step hook; generated tokens are
counted up to and including each response's stop token. Every design difference the TRL
trainers do not let us remove is listed in the result's "asymmetries".

    .venv/bin/python -m bench.b9_algorithms_trl [--quick] [--algorithms grpo,rloo,dpo] [--runs 3]
                                               [--sides ours,ours-f32,trl] [--precision no]
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
from bench.b9_trl_side import count_optimizer_steps

ALGORITHMS = ("grpo", "rloo", "dpo")
TRL_TRAINER = {"grpo": "trl.GRPOTrainer", "rloo": "trl.RLOOTrainer",
               "dpo": "trl.experimental.online_dpo.OnlineDPOTrainer"}


def bench_config(quick: bool):
    """The round's settings: our defaults, with people's pairs off in online DPO (TRL's online
    DPO has no such mix: both sides train on sampled pairs only)."""
    from rlhf_core.config import PPOConfig
    cfg = dataclasses.replace(PPOConfig(), dpo_human_share=0.0)
    if quick:
        cfg = dataclasses.replace(cfg, max_new_tokens=8)
    return cfg


def n_prompts(cfg, quick: bool) -> int:
    """The round's sequence budget spent as groups: 32 x 2 = 64 sequences = 16 prompts x G=4."""
    if quick:
        return 2
    return cfg.prompts_per_round * cfg.rollouts_per_prompt // cfg.group_size


# -- set-up (our venv, subprocess): a workspace with a trained reward model, the TRL spec -------
def setup(ws: Path, quick: bool, precision: str = "no") -> dict:
    from bench.b2_ppo_trl import setup as b2_setup
    from rlhf_core.sampling import chat_prompts, stop_token_ids
    from rlhf_core.worker.runtime import Runtime
    from rlhf_core.workspace import open_workspace
    info = b2_setup(ws)  # reward model trained on 8 synthetic rankings (as B2), promotion gate off
    cfg = bench_config(quick)
    prompts = common.PROMPTS[:n_prompts(cfg, quick)]
    store, app_cfg = open_workspace(ws, mixed_precision=precision)
    runtime = Runtime(store, app_cfg, cpu=True)
    tok = runtime.tokenizer
    # the precision every side trains at: "auto" resolved here, once, for both venvs
    spec = {**info, "mixed_precision": runtime.device.mixed_precision,
            "prompts": prompts, "prompt_texts": chat_prompts(tok, prompts),
            "system_prompt": getattr(tok, "rlhf_system_prompt", ""),
            "stop_ids": stop_token_ids(tok, runtime.model), "config": dataclasses.asdict(cfg),
            "group_size": cfg.group_size}
    store.close()
    from safetensors.torch import load_file
    spec["reward_head_bias"] = float(load_file(info["reward_head"])["linear.bias"].item())
    return spec


# -- our side (subprocess) ---------------------------------------------------------------------
def ours_side(ws: Path, algorithm: str, quick: bool, decode: str | None = None,
              precision: str = "no") -> dict:
    import torch

    from rlhf_core.decoding import decode_dtype
    from rlhf_core.policy.rounds import policy_round
    from rlhf_core.policy.setup import PPOHealthError
    from rlhf_core.worker.runtime import Runtime
    from rlhf_core.workspace import open_workspace
    threads = common.set_threads()
    # the TRL side's training precision ("no": float32; "bf16": bf16 autocast on both sides)
    store, cfg = open_workspace(ws, mixed_precision=precision,
                                **{"sampling.decode_dtype": decode})
    config = bench_config(quick)
    prompts = common.PROMPTS[:n_prompts(config, quick)]
    runtime = Runtime(store, cfg, cpu=not torch.cuda.is_available())
    model = runtime.model  # loaded outside the timed part, as the TRL side's trainer is built
    with torch.no_grad():  # the same tiny warm-up generate as the TRL side
        ids = runtime.tokenizer("hello", return_tensors="pt")["input_ids"].to(runtime.device.device)
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False,
                       pad_token_id=runtime.tokenizer.pad_token_id)
    steps = count_optimizer_steps(model)
    t0 = time.perf_counter()
    try:
        res = policy_round(runtime, algorithm=algorithm, config=config, prompts=prompts)
    except PPOHealthError as exc:  # a gate stopped it: less work than a round, so no timing
        res = exc.result
    round_s = time.perf_counter() - t0
    m = res.get("metrics") or {}
    store.close()
    if res["status"] != "published":
        return {"side": "ours", "algorithm": algorithm, "status": res["status"],
                "reason": res.get("reason"), "aborted_after_s": round_s}
    return {"side": "ours", "algorithm": algorithm, "round_s": round_s, "threads": threads,
            "status": res["status"], "optimizer_steps": steps["n"],
            "checkpointing_while_training": steps["checkpointing"],
            "mixed_precision": runtime.device.mixed_precision,
            "decode_dtype": str(decode_dtype(cfg.sampling.decode_dtype, runtime.device.device)),
            "optimizer_steps_reported": m.get("ppo_steps"),
            "sequences": m["n_sequences"],
            "tokens_generated": round(m["response_length"] * m["n_sequences"]),
            "time_generate": m.get("time_generate"), "time_score": m.get("time_score"),
            "time_train": m.get("time_train"),
            "pairs": m.get("pairs_sampled"), "reward_mean": m.get("reward_mean"),
            "kl": m.get("kl"), "stop_rate": m.get("stop_rate"),
            "peak_rss_mb": common.peak_rss_mb()}


# count_optimizer_steps / checkpointing_active: one copy, in b9_trl_side.py (stdlib-only at
# import time, so both venvs can import it)


# -- orchestration -------------------------------------------------------------------------
def _sub(cmd: list, timeout=3600) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          cwd=common.BENCH.parent, check=False)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(f"{' '.join(map(str, cmd[:5]))} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def _run_side(cmd: list) -> dict:
    """One side's run; a failure is recorded (and timed as missing), the bench goes on."""
    try:
        return _sub(cmd)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return {"status": "failed", "error": str(exc)[-1500:]}


def spread(runs: list[dict], key: str) -> dict | None:
    xs = [r[key] for r in runs if r.get(key) is not None]
    if not xs:
        return None
    return {"min": round(min(xs), 2), "median": round(common.median(xs), 2),
            "max": round(max(xs), 2)}


SIDES = ("ours", "ours-f32", "trl")
# ours: the project's defaults (on a CPU with native bf16, rollouts decode with bf16 weights:
# sampling.decode_dtype=auto); ours-f32: decode_dtype=float32, TRL's precision in every phase


def summarize(algorithm: str, runs: dict[str, list[dict]]) -> dict:
    same = lambda xs, k: sorted({r.get(k) for r in xs}, key=str)
    per = lambda k: {side: spread(xs, k) for side, xs in runs.items()}
    secs, rss = per("round_s"), per("peak_rss_mb")
    out = {"trl_trainer": TRL_TRAINER[algorithm], "round_s": secs,
           "completed_runs": {side: sum("round_s" in r for r in xs)
                              for side, xs in runs.items()}}
    trl = runs.get("trl", [])
    for side in (s for s in runs if s != "trl"):
        if not (secs.get(side) and secs.get("trl") and rss.get(side) and rss.get("trl")):
            out[f"incomplete_{side}"] = True  # a side never completed a round: no ratio
            continue
        out[f"ratio_trl_over_{side}"] = round(secs["trl"]["median"] / secs[side]["median"], 2)
        out[f"ratio_per_run_trl_over_{side}"] = [
            round(b["round_s"] / a["round_s"], 2) for a, b in zip(runs[side], trl)
            if a.get("round_s") and b.get("round_s")]
        out[f"rss_ratio_{side}_over_trl"] = round(rss[side]["median"] / rss["trl"]["median"], 2)
    return out | {
        "generate_s": per("time_generate"), "peak_rss_mb": rss,
        "tokens_generated": {side: same(xs, "tokens_generated") for side, xs in runs.items()},
        "sequences_generated": {side: same(xs, "sequences") for side, xs in runs.items()},
        "optimizer_steps": {side: same(xs, "optimizer_steps") for side, xs in runs.items()},
        "checkpointing_while_training": {side: same(xs, "checkpointing_while_training")
                                         for side, xs in runs.items()},
        "mixed_precision": {side: same(xs, "mixed_precision") for side, xs in runs.items()},
        "decode_dtype": {side: same(xs, "decode_dtype") for side, xs in runs.items()},
        "stop_rate": per("stop_rate"),
        # ours: the reward model's score + missing-EOS penalty; TRL: the raw merged model's
        # score (no head bias, no penalty, no EOS in the text): a sanity check, not a figure
        "reward_mean": {side: spread(xs, "reward_model_mean" if side == "trl" else "reward_mean")
                        for side, xs in runs.items()},
        "runs": runs,
    }


def side_cmd(side: str, algorithm: str, ws: Path, spec_path: Path, trl_py, quick: bool,
             precision: str = "no") -> list:
    if side == "trl":
        return [str(trl_py), "-m", "bench.b9_trl_side", str(spec_path), algorithm]
    return ([sys.executable, "-m", "bench.b9_algorithms_trl", "--side", str(ws),
             "--algorithm", algorithm, "--precision", precision] + (["--quick"] if quick else [])
            + (["--decode-dtype", "float32"] if side == "ours-f32" else []))


def result_name(precision: str) -> str:
    """The float32 bench keeps its file; a bf16 run writes its own beside it."""
    return "b9_algorithms_trl" + ("_bf16" if precision == "bf16" else "")


def run(quick: bool = False, algorithms=ALGORITHMS, reps: int | None = None,
        sides=SIDES, precision: str = "no") -> dict:
    from bench import trl_env
    trl_py = trl_env.ensure("reward")  # bench/.venv-trl-latest: the current TRL release
    reps = reps or (1 if quick else 3)
    result = {"bench": "B9 GRPO / RLOO / online DPO round vs the current TRL's trainers",
              "quick": quick, "runs_per_side": reps, "sides": list(sides),
              "machine": common.machine(),
              "versions": {"ours": common.package_versions()}, "algorithms": {}}
    with tempfile.TemporaryDirectory(prefix="bench-b9-") as tmp:
        base = Path(tmp) / "base"
        spec = _sub([sys.executable, "-m", "bench.b9_algorithms_trl", "--setup", str(base),
                     "--precision", precision] + (["--quick"] if quick else []))
        precision = result["precision"] = spec["mixed_precision"]  # "auto" resolved
        spec["threads"] = int(os.environ.get("RLHF_BENCH_THREADS", os.cpu_count() or 2))
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        result["settings"] = settings(spec, quick)
        result["asymmetries"] = ASYMMETRIES
        for algorithm in algorithms:
            runs: dict[str, list[dict]] = {side: [] for side in sides}
            for r in range(reps):
                order = list(sides[r % len(sides):]) + list(sides[:r % len(sides)])  # rotated
                for side in order:
                    ws = Path(tmp) / f"{algorithm}-{side}-{r}"  # a fresh copy: every run is round 1
                    if side != "trl":
                        shutil.copytree(base, ws)
                    runs[side].append(_run_side(side_cmd(side, algorithm, ws, spec_path, trl_py,
                                                         quick, precision)))
                    shutil.rmtree(ws, ignore_errors=True)
                    last = runs[side][-1]
                    print(f"B9 {algorithm} run {r} {side}: {last.get('round_s', 'no')} s "
                          f"{last.get('status', '')}", flush=True)
            result["algorithms"][algorithm] = summarize(algorithm, runs)
            result["versions"]["trl"] = next((t["versions"] for t in runs.get("trl", [])
                                              if "versions" in t), result["versions"].get("trl"))
            if not quick:  # a partial result survives an interrupted run
                common.write_result(result_name(precision), result)
    return result


def settings(spec: dict, quick: bool) -> dict:
    c = spec["config"]
    P, G = len(spec["prompts"]), spec["group_size"]
    return {"model": "embedded (SmolLM2-135M-Instruct)", "prompts": P, "group_size": G,
            "sequences_per_round": P * G, "max_new_tokens": c["max_new_tokens"],
            "temperature": c["temperature"], "top_k": 0, "top_p": 1.0,
            "kl_coef_grpo_rloo": c["kl_coef"], "kl_estimator_rloo": c["kl_estimator"],
            "dpo_beta": c["dpo_beta"], "dpo_human_share": c["dpo_human_share"],
            "clip_eps": c["clip_eps"], "lr": c["lr"], "lr_schedule": "constant",
            "adam_eps": 1e-5, "weight_decay": 0.0, "max_grad_norm": c["max_grad_norm"],
            "epochs": c["epochs"], "minibatch_sequences": c["minibatch_size"],
            "dpo_minibatch_pairs": max(1, c["minibatch_size"] // 2),
            "missing_eos_penalty": c["missing_eos_penalty"], "lora": spec["lora"],
            "gradient_checkpointing": {"ours": c["gradient_checkpointing"], "trl": False},
            "dtype": (("training, reference and reward forwards under bf16 autocast over "
                       "float32 models on every side (TRL bf16=True); ours stores the frozen "
                       "base's decoder Linear weights in bf16 (the same products under "
                       "autocast)") if spec.get("mixed_precision") == "bf16" else
                      "training, reference and reward forwards float32 on every side (TRL's "
                      "bf16 default turned off)") + "; decoding: ours bf16 weights by default "
                     "on this CPU, ours-f32 float32, TRL the model's float32 weights",
            "dropout": "off on both sides (LoRA dropout 0; TRL disable_dropout=True)",
            "threads": spec["threads"],
            "reward": f"our reward v{spec['reward_version']} (adapter + head; merged into a "
                      "sequence classifier for TRL)",
            "reward_head_bias": spec.get("reward_head_bias"),
            "system_prompt": spec["system_prompt"],
            "timed": "the round only: ours policy_round() incl. publishing the adapter; TRL "
                     "trainer.train(). Model loading and trainer construction excluded on "
                     "both sides; one 2-token warm-up generate on both sides"}


ASYMMETRIES = [
    ("Reward model: ours scores with the reward LoRA adapter + head on the policy's own base "
     "weights (one set of base weights in memory for policy, reference and reward); TRL gets the "
     "same weights merged into a separate AutoModelForSequenceClassification (a second copy of "
     "the 135M base), as TRL documents a reward model. This is our design and is part of the "
     "RSS ratio."),
    ("Reward text: ours scores chat(prompt) + response + EOS, exactly as in reward training; TRL "
     "scores prompt text + decoded completion (its reward-model path decodes with "
     "skip_special_tokens, so no EOS at the end): one token less per scored sequence on TRL's "
     "side, and different reward values (checked on two texts: our scorer 0.752 / 0.523, the "
     "merged model with the EOS appended 0.752 / 0.523, without it 0.986 / 1.214). So the "
     "merge is exact, but TRL's documented path feeds it a text it was not trained on; the "
     "work is the same. The merged model's score layer has no bias (ours is about -3e-4): a "
     "constant shift."),
    ("Missing-EOS penalty: ours adds -1 to the score of a response without a stop token; "
     "GRPOTrainer and RLOOTrainer have no such option, so TRL gets a second reward function (a "
     "plain Python function, weight 1) giving the same -1; OnlineDPOTrainer has its own "
     "missing_eos_penalty=1.0."),
    ("Decoding: ours runs the project's hand-written KV-cache loop (rlhf_core/decoding.py: the "
     "LoRA adapter merged into a weight snapshot per call, q/k/v and gate/up fused, one prefill "
     "per distinct prompt shared by its G samples, stopped rows leave the batch) in chunks of "
     "generation_batch_size=16 rows, with a seeded Gumbel-max sampler. Side 'ours' keeps the "
     "project default sampling.decode_dtype=auto, which on this CPU (AVX512-BF16) decodes with "
     "bfloat16 weights (norms, attention, logits float32); side 'ours-f32' decodes in float32. "
     "TRL calls model.generate on the peft model (adapter unmerged), float32, multinomial "
     "sampling: GRPO/RLOO the whole round's sequences in one call, online DPO each step's "
     "prompts x 2. Same temperature, top_k=0, top_p=1.0; different random draws, so the "
     "tokens generated (reported per side) differ somewhat."),
    ("Old log-probs: 'ours' (bf16 decoding) recomputes the rollout's log-probs with one "
     "float32 no-grad policy forward, as GRPOTrainer (num_iterations=2) and RLOOTrainer do; "
     "'ours-f32' takes them from the sampling step's own logits (exact in float32), one policy "
     "forward less. A design difference, not disabled."),
    ("Epochs: ours reshuffles the rollout into new minibatches each epoch; GRPO/RLOOTrainer with "
     "num_iterations=2 reuse the same minibatch slices in the same order twice."),
    ("RLOO loss: RLOOTrainer clips a sequence-level ratio (exp of summed log-prob differences) "
     "and averages per sequence; ours clips per token and averages over tokens (PPO's surrogate "
     "with the sequence advantage broadcast). Same forwards and backwards."),
    ("GRPO loss: TRL loss_type='bnpo' (masked mean over the minibatch's tokens, as ours) and "
     "use_bias_correction_kl=False (plain k3, as ours); both are set, not TRL's defaults "
     "('dapo', True)."),
    ("Online DPO: OnlineDPOTrainer samples 2 completions per prompt at every optimizer step "
     "(fully online: a step's pair comes from the current policy), and runs its policy forward "
     "on both completions with gradients before knowing which is chosen; it computes the full "
     "logits over prompt + completion (no logits_to_keep). Ours samples G=4 per prompt once per "
     "round, pairs the best with the worst by reward, forwards each pair's sequences once more "
     "(policy and reference, no grad) and trains 2 epochs over the pairs. With 16 prompts, TRL "
     "runs 2 epochs over the 16 prompts (2 x 16 x 2 = 64 sequences generated, the same as our "
     "16 x 4) and 4 pairs per step (4 steps per epoch, 8 in all), like ours (16 pairs, 4 per "
     "step, 2 epochs = 8 steps); the pairs differ in origin (best-vs-worst of 4 vs the 2 "
     "samples)."),
    ("Health gates and provenance: ours checks finite values and KL gates before and during "
     "the update and publishes the adapter with its manifest and a DB row inside the timed "
     "round; TRL does neither (save_strategy='no'). Ours also loads the reward adapter (a few "
     "MB) from the workspace inside the timed round; TRL's reward model is built before its "
     "timer."),
    ("Logging: TRL logs every 1000 steps (effectively never within the round) and prints "
     "nothing; ours writes its per-step metrics to the workspace DB inside the round."),
]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 prompts, 8 tokens, 1 run per side")
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS))
    ap.add_argument("--runs", type=int, default=None, help="runs per side (default 3; quick 1)")
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--algorithm", help=argparse.SUPPRESS)
    ap.add_argument("--decode-dtype", help=argparse.SUPPRESS)
    ap.add_argument("--precision", choices=("no", "bf16", "auto"), default="no",
                    help="training precision of every side: no (float32, default), bf16, or "
                         "auto (the project's default on this machine)")
    ap.add_argument("--sides", default=",".join(SIDES),
                    help="ours (defaults), ours-f32 (float32 decoding), trl")
    args = ap.parse_args(argv)
    if args.setup:
        print("RESULT " + json.dumps(setup(Path(args.setup), args.quick, args.precision)),
              flush=True)
        return {}
    if args.side:
        print("RESULT " + json.dumps(ours_side(Path(args.side), args.algorithm, args.quick,
                                               args.decode_dtype, args.precision)), flush=True)
        return {}
    algorithms = [a for a in args.algorithms.split(",") if a]
    bad = set(algorithms) - set(ALGORITHMS)
    if bad:
        ap.error(f"unknown algorithms {sorted(bad)}: one of {', '.join(ALGORITHMS)}")
    sides = tuple(x for x in args.sides.split(",") if x)
    if set(sides) - set(SIDES) or "trl" not in sides:
        ap.error(f"--sides: some of {', '.join(SIDES)}, with trl")
    res = run(args.quick, algorithms, args.runs, sides, args.precision)
    if args.quick:  # a smoke test: never over the committed full result
        path = Path(tempfile.gettempdir()) / "b9_algorithms_trl_quick.json"
        path.write_text(json.dumps(res, indent=2, default=str) + "\n")
    else:
        path = common.write_result(result_name(res["precision"]), res)
    print(f"written: {path}", flush=True)
    print(json.dumps({a: {k: v for k, v in s.items() if k.startswith(("ratio", "rss", "round"))}
                      for a, s in res["algorithms"].items()}, indent=1))
    return res


if __name__ == "__main__":
    main()
