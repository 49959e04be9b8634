"""What every setting means, and the table `rlhf config` prints (stdlib only).

HELP holds one line per field of AppConfig and its sections, keyed as `--set` names them
("ppo.kl_coef"); tests/test_cli_help.py fails when a field has none. Types, defaults and
allowed values are read from the dataclasses and config.LIMITS, so they cannot drift.
"""
from __future__ import annotations

import dataclasses
import typing

from rlhf_core.config import LIMITS, NOT_EMPTY, AppConfig, OneOf, Range

HELP = {
    "workspace": "folder of the workspace (database, versions, cache); --workspace",
    "model": "policy base: embedded:smollm2-135m-instruct, a Hub id or a local directory",
    "reward_model": "a separate reward base; unset: a reward adapter on the policy's base",
    "system_prompt": "system message before every prompt (sampling, rollouts, reward scoring); "
                     "empty: the chat template's own default; a change needs a worker restart",
    "host": "address the UI binds (127.0.0.1: this machine only)",
    "port": "port of the UI",
    "auth_file": "JSON or CSV of user,password,role: turns login on",
    "researchers": "names allowed the researcher views and jobs (empty without login: everybody)",
    "torch_threads": "torch threads of a worker (unset: all cores)",
    "mixed_precision": "training and scoring math: auto (bf16 where the hardware multiplies "
                       "it natively), no (float32) or bf16 (restart the worker to change)",
    # sampling: labeling batches
    "sampling.k": "responses per prompt shown side by side",
    "sampling.max_new_tokens": "longest labeling response in tokens (bench/response_length.py)",
    "sampling.temperature": "sampling temperature of labeling responses",
    "sampling.top_p": "nucleus sampling: keep the smallest token set of this probability",
    "sampling.top_k": "keep the k likeliest tokens (0: off)",
    "sampling.prompts_per_batch": "prompts in one labeling batch",
    "sampling.batch_size": "sequences per decode call (a batch streams in call by call)",
    "sampling.min_ready_items": "unlabeled items the worker keeps ready for annotators",
    "sampling.dedupe_retries": "re-sample duplicate responses this often, then collapse them",
    "sampling.seed": "seed of labeling batches",
    "sampling.decode_dtype": "weights' precision while decoding: auto (bfloat16 where native), "
                             "float32 or bfloat16",
    # reward model
    "reward.lr": "learning rate of the reward adapter and head",
    "reward.epochs": "passes over the training pairs per reward version",
    "reward.prefix_cache": "run the prefix every sequence shares (system prompt) once per "
                           "forward in training and scoring, the rows sharing its keys/values",
    "reward.rankings_per_step": "rankings per optimizer step (all pairs of one share a step)",
    "reward.max_length": "tokens of prompt + response scored (longer: the end is kept)",
    "reward.heldout_fraction": "share of prompts held out to measure accuracy",
    "reward.replay_ratio": "old pairs replayed per new pair",
    "reward.soft_ties": "ties train towards equal scores (else they are dropped)",
    "reward.use_margin": "a margin in the Bradley-Terry loss from the tier distance",
    "reward.center_coef": "penalty pulling mean scores to zero",
    "reward.promote_tolerance": "a later version may trail the serving one by this much accuracy",
    "reward.promote_min_heldout_pairs": "strict held-out pairs needed before a version serves",
    "reward.promote_z": "z of the Wilson interval on held-out accuracy (1.96: 95%)",
    "reward.promote_min_accuracy": "the interval's low end must reach this accuracy",
    "reward.min_pairs": "training pairs needed to train at all",
    "reward.head_init_std": "init std of the scalar head",
    "reward.seed": "seed of reward training",
    "reward.margin_scale": "with use_margin: margin = scale x (tier distance - 1)",
    "reward.max_grad_norm": "gradient clipping norm",
    "reward.eval_batch_size": "sequences per scoring forward",
    # policy rounds
    "ppo.prompts_per_round": "prompts per policy round",
    "ppo.rollouts_per_prompt": "rollouts per prompt (PPO)",
    "ppo.max_new_tokens": "longest rollout in tokens (cut ones get missing_eos_penalty)",
    "ppo.temperature": "sampling temperature of rollouts",
    "ppo.kl_coef": "weight of the KL penalty to the reference policy",
    "ppo.adaptive_kl": "adapt kl_coef towards target_kl",
    "ppo.target_kl": "with adaptive_kl: the KL aimed at",
    "ppo.kl_horizon": "with adaptive_kl: horizon of the controller",
    "ppo.kl_estimator": "per-token KL estimate: k1 (log ratio) or k3",
    "ppo.clip_eps": "PPO ratio clip",
    "ppo.value_clip_eps": "value clip around the old values",
    "ppo.vf_coef": "weight of the value loss",
    "ppo.prefix_cache": "run the prefix every query shares (system prompt) once per forward "
                        "in scoring and training, the rows sharing its keys/values",
    "ppo.critic": "PPO's critic: adapter (its own value adapter + head) or trunk (a value "
                  "head on the policy's detached hidden states: one forward/backward a step)",
    "ppo.critic_layers": "the value adapter sits on the top N decoder layers only and reads "
                         "the reference's hidden states below them, computed once per round "
                         "(0: every layer)",
    "ppo.gamma": "discount",
    "ppo.lam": "GAE lambda",
    "ppo.epochs": "passes over a round's rollouts",
    "ppo.minibatch_size": "sequences per optimizer step",
    "ppo.lr": "learning rate of the policy (and value) adapters; DPO: ppo.dpo_lr",
    "ppo.max_grad_norm": "gradient clipping norm",
    "ppo.missing_eos_penalty": "score added to a rollout cut at max_new_tokens",
    "ppo.whiten_advantages": "normalise advantages per minibatch",
    "ppo.max_kl": "health gate: a round whose mean KL exceeds this is not published",
    "ppo.max_approx_kl": "health gate on one minibatch's approx_kl",
    "ppo.stop_approx_kl": "early stop: a minibatch with a higher approx_kl ends the round's "
                          "training, keeping the updates so far (0: off)",
    "ppo.fallback_approx_kl": "when the approx_kl gate trips mid-round: publish the policy from "
                              "before the first minibatch above this fraction of max_approx_kl "
                              "instead of aborting (0: abort)",
    "ppo.gradient_checkpointing": "trade compute for memory in training forwards",
    "ppo.seed": "seed of policy rounds",
    "ppo.max_prompt_tokens": "longer chat-templated prompts keep their last tokens",
    "ppo.generation_batch_size": "sequences per decode call in a rollout",
    "ppo.logprobs_from_sampling": "old log-probs from the sampling step's logits",
    "ppo.group_size": "GRPO/RLOO/DPO: samples of one prompt judged against each other",
    "ppo.grpo_scale": "GRPO advantages divided by the group std, or only centred (none)",
    "ppo.dpo_beta": "DPO beta",
    "ppo.dpo_label_smoothing": "DPO label smoothing",
    "ppo.dpo_human_share": "share of a DPO round's pairs taken from people's rankings",
    "ppo.dpo_lr": "learning rate of the policy adapter in DPO rounds (ppo.lr: the others)",
    # the loop
    "loop.auto": "automatic loop: train, run policy rounds and sample on its own",
    "loop.retrain_every": "new rankings between reward trainings",
    "loop.ab_fraction": "share of items mixing the current policy with ab_baseline",
    "loop.ab_baseline": "what A/B items compare against",
    "loop.retire_rule": "items of older policies: used up, or retired",
    "loop.selection": "which items annotators get first",
    "loop.random_share": "with uncertainty: share still picked at random",
    "loop.overlap": "annotators per item (>1 for agreement studies)",
    "loop.assignment_ttl_s": "a page renews its hold on an item at most this long",
    "loop.assignment_hold_s": "a hold lapses this long after the page's last heartbeat",
    "loop.max_newcomer_holds": "without login: names with no ranking yet holding items (0: any)",
    "loop.score_items": "score ranked responses for the Research tab",
    "loop.algorithm": "the policy round's algorithm",
    # LoRA
    "lora.r": "LoRA rank",
    "lora.alpha": "LoRA alpha (scale = alpha / r)",
    "lora.dropout": "LoRA dropout (0: PPO's first ratio is exactly 1)",
    "lora.target_modules": "modules that get adapters (comma-separated with --set)",
}


def _type_name(annotation) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = type(None) in typing.get_args(annotation)
    base = args[0] if optional and len(args) == 1 else annotation
    origin = typing.get_origin(base) or base
    name = "list of str" if origin is tuple else getattr(origin, "__name__", str(origin))
    name = {"Path": "path"}.get(name, name)
    return f"{name} or unset" if optional else name


def _allowed(name: str, type_name: str) -> str:
    limit = LIMITS.get(name)
    if limit is None:
        return "true / false" if type_name == "bool" else "any"
    if limit is NOT_EMPTY:
        return "not empty"
    return limit.describe() if isinstance(limit, (Range, OneOf)) else str(limit)


def settings_table() -> list[dict]:
    """One row per setting: name, type, default, allowed, help."""
    rows = []
    cfg = AppConfig()
    hints = typing.get_type_hints(AppConfig)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            sub_hints = typing.get_type_hints(type(value))
            items = [(f"{f.name}.{g.name}", getattr(value, g.name), sub_hints[g.name])
                     for g in dataclasses.fields(value)]
        else:
            items = [(f.name, value, hints[f.name])]
        for name, default, annotation in items:
            type_name = _type_name(annotation)
            shown = (",".join(default) or "none") if isinstance(default, tuple) else default
            rows.append({"name": name, "type": type_name,
                         "default": "unset" if shown is None else str(shown),
                         "allowed": _allowed(name, type_name), "help": HELP.get(name, "")})
    return rows


def with_values(rows: list[dict], cfg: AppConfig) -> list[dict]:
    """Each row with the workspace's current value ("value") beside the default."""
    out = []
    for r in rows:
        section, _, field = r["name"].rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, field)
        value = (",".join(value) or "none") if isinstance(value, tuple) else value
        out.append({**r, "value": "unset" if value is None else str(value)})
    return out


def format_table(rows: list[dict]) -> str:
    cols = ["name", "type", "default"] + (["value"] if rows and "value" in rows[0] else [])
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in cols}
    lines = ["  ".join(f"{k:<{widths[k]}}" for k in cols) + "  allowed · help"]
    for r in rows:
        lines.append("  ".join(f"{r[k]:<{widths[k]}}" for k in cols)
                     + f"  {r['allowed']} · {r['help']}")
    return "\n".join(lines)
