"""Every knob of the loop, as frozen dataclasses (stdlib only).

A config is saved beside every checkpoint (`to_dict`) so a version can be re-run.
Each section belongs to one module; defaults are tuned for the embedded
135M model on a 2-core CPU, and stay sensible on a GPU.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


class ModelLoadError(RuntimeError):
    """A model source that cannot be used; the message says what to do. Defined here, with the
    settings that name models, so the CLI can catch it without importing torch."""


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0  # dropout off: PPO's first minibatch must have ratio 1
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class SamplingConfig:
    k: int = 4  # responses per prompt, 2..8
    max_new_tokens: int = 64
    temperature: float = 0.9
    top_p: float = 1.0
    top_k: int = 0
    prompts_per_batch: int = 8
    batch_size: int = 16  # sequences per generate() call
    min_ready_items: int = 6  # the worker keeps this many unlabeled items ahead
    dedupe_retries: int = 2  # re-sample duplicates this often, then collapse them
    seed: int = 0

    def __post_init__(self):
        if not 2 <= self.k <= 8:
            raise ValueError(f"k must be between 2 and 8, got {self.k}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")


@dataclass(frozen=True)
class RewardConfig:
    lr: float = 2e-4
    epochs: int = 2
    rankings_per_step: int = 4  # all pairs of one ranking share a step
    max_length: int = 320
    heldout_fraction: float = 0.2
    replay_ratio: float = 1.0  # old pairs replayed per new pair
    soft_ties: bool = True
    use_margin: bool = False
    center_coef: float = 0.0
    promote_tolerance: float = 0.02
    min_pairs: int = 8
    head_init_std: float = 0.02
    seed: int = 0
    margin_scale: float = 1.0  # with use_margin: margin = scale * (tier distance - 1)
    max_grad_norm: float = 1.0
    eval_batch_size: int = 16


@dataclass(frozen=True)
class PPOConfig:
    # 64 rollouts x 32 tokens, 2 epochs of 8 minibatches: a round of about 2 minutes on 2 CPU
    # cores for the embedded 135M model. Measured there: lr 1e-4 (TRL-like) moved nothing in a
    # round (KL 0.00); 1e-3 on the LoRA adapter makes visible progress each round. Responses
    # are cut at 32 tokens with a missing-EOS penalty, so "finish your answer" is learnable.
    prompts_per_round: int = 32
    rollouts_per_prompt: int = 2
    max_new_tokens: int = 32
    temperature: float = 1.0
    kl_coef: float = 0.05
    adaptive_kl: bool = False
    target_kl: float = 6.0
    kl_horizon: int = 10000
    kl_estimator: str = "k1"
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    epochs: int = 2
    minibatch_size: int = 8
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    missing_eos_penalty: float = -1.0
    whiten_advantages: bool = True
    max_kl: float = 20.0  # health gate on mean KL per sequence
    max_approx_kl: float = 1.0  # health gate on a minibatch's approx_kl
    gradient_checkpointing: bool = False
    seed: int = 0
    max_prompt_tokens: int = 256  # longer chat-templated prompts keep their last tokens
    generation_batch_size: int = 16  # sequences per generate() call in a rollout
    # the rollout's old log-probs come from the sampling step's own logits (one policy forward
    # less per round); recomputed anyway under bf16, where incremental decoding and a full
    # forward round differently enough to move the first PPO ratio away from 1
    logprobs_from_sampling: bool = True
    # critic-free rounds (loop.algorithm grpo / rloo / dpo): the round's sample budget,
    # prompts_per_round x rollouts_per_prompt sequences, is spent as groups of `group_size`
    # samples of one prompt that are judged against each other (no value model)
    group_size: int = 4
    grpo_scale: str = "std"  # GRPO divides by the group's std; "none" only centres (Dr. GRPO)
    dpo_beta: float = 0.1
    dpo_label_smoothing: float = 0.0
    dpo_human_share: float = 0.25  # share of a DPO round's pairs taken from people's rankings

    def __post_init__(self):  # the settings of the critic-free rounds
        if self.group_size < 2:
            raise ValueError(f"ppo.group_size={self.group_size!r} is not allowed: use >= 2")
        if self.grpo_scale not in ("std", "none"):
            raise ValueError(f"ppo.grpo_scale={self.grpo_scale!r} is not allowed: std or none")
        if not (self.dpo_beta > 0 and 0 <= self.dpo_label_smoothing <= 0.5
                and 0 <= self.dpo_human_share <= 0.9):
            raise ValueError("ppo.dpo_beta must be > 0, ppo.dpo_label_smoothing in [0, 0.5], "
                             "ppo.dpo_human_share in [0, 0.9]")


@dataclass(frozen=True)
class LoopConfig:
    auto: bool = False
    retrain_every: int = 20  # new rankings between reward trainings
    ab_fraction: float = 0.25  # share of items mixing current policy and reference
    ab_baseline: str = "reference"  # or "v3" / "previous"
    retire_rule: str = "use_up"  # "use_up" | "retire" items of older policies
    selection: str = "random"  # "random" | "uncertainty"
    random_share: float = 0.5  # with "uncertainty", share still picked at random
    overlap: int = 1  # annotators per item (>1 for agreement studies)
    assignment_ttl_s: int = 1800
    score_items: bool = True  # score ranked responses for the researcher view (costs worker time)
    algorithm: str = "ppo"  # the policy round: "ppo" | "grpo" | "rloo" | "dpo" (see README)

    def __post_init__(self):
        if self.algorithm not in ("ppo", "grpo", "rloo", "dpo"):
            raise ValueError(f"loop.algorithm={self.algorithm!r} is not allowed: use one of "
                             "'ppo', 'grpo', 'rloo', 'dpo'")


@dataclass(frozen=True)
class AppConfig:
    workspace: Path = Path("workspace")
    model: str = EMBEDDED_MODEL
    reward_model: str | None = None  # None: a reward adapter on the policy's base
    host: str = "127.0.0.1"
    port: int = 7860
    auth_file: Path | None = None
    researchers: tuple[str, ...] = ()  # annotators allowed the researcher views
    torch_threads: int | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)


def default_workspace() -> Path:
    return Path(os.environ.get("RLHF_WORKSPACE", "workspace"))


def to_dict(cfg) -> dict:
    """JSON-ready dict of a (nested) config; Paths become strings."""
    def conv(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple):
            return list(v)
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(dataclasses.asdict(cfg))


def from_dict(cls, data: dict):
    """Build a config dataclass from a dict, ignoring unknown keys (old checkpoints)."""
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for name, f in hints.items():
        if name not in data:
            continue
        v = data[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default) and isinstance(v, dict):
            v = from_dict(type(default), v)
        elif isinstance(default, tuple) and isinstance(v, list):
            v = tuple(v)
        elif isinstance(default, Path) or name in ("workspace", "auth_file"):
            v = Path(v) if v is not None else None
        kwargs[name] = v
    return cls(**kwargs)


def with_overrides(section, params: dict):
    """`section` (a config dataclass) with the entries of a job's `params` that name its fields
    (a nested `params["config"]` dict counts too); other entries are not this section's."""
    names = {f.name for f in dataclasses.fields(section)}
    merged = {**params, **(params.get("config") or {})}
    overrides = {k: v for k, v in merged.items() if k in names}
    if not overrides:
        return section
    return from_dict(type(section), to_dict(section) | overrides)
