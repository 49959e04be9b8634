"""PPO round, step 0 and shared types: the plan, the reward source, the actor and the critic.

`Plan` is what a round fixes up front; `SingleProcess` the collective operations of one process
(DDP: launch.AccelerateDist); `PPOHealthError` what every health gate raises (in every policy
round: PPO, GRPO, RLOO, DPO). The actor is the `policy` LoRA adapter, the critic the `value`
adapter plus a scalar head (initialised from the reward model when it shares the base; the
critic-free rounds have none). `snapshot_adapters` / `restore_adapters` / `guard_round` let an
aborted round leave the in-memory policy as it found it.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging

import torch

from rlhf_core import models
from rlhf_core.config import PPOConfig
from rlhf_core.policy.rollout import Rollout, logit_transforms

log = logging.getLogger(__name__)


class PPOHealthError(RuntimeError):
    """A health gate stopped the round; nothing was published. `.result` says why."""

    def __init__(self, reason: str, result: dict):
        super().__init__(f"PPO round aborted, nothing published: {reason}")
        self.reason, self.result = reason, result


class SingleProcess:
    """The collective operations of a round, for one process (DDP: launch.AccelerateDist)."""
    world_size, rank, is_main = 1, 0, True

    def gather_rows(self, t):  # (b,...) per rank -> (B,...) all ranks, dim 1 padded with 0
        return t

    def sum(self, t):
        return t

    def all_reduce_grads(self, params):
        pass

    def broadcast(self, obj):
        return obj

    def barrier(self):
        pass


@dataclasses.dataclass
class Plan:
    version: int  # the version this round publishes
    parent: int  # the policy it starts from (0 = base)
    seed: int
    kl_coef: float
    reward_version: int | None = None
    critic_init: str = ""
    algorithm: str = "ppo"  # which round: ppo | grpo | rloo | dpo (recorded with the version)
    scorer: object = dataclasses.field(default=None, repr=False)  # the reward model, if used


def aborted(plan: Plan, reason: str) -> dict:
    return {"status": "aborted", "reason": reason, "version": plan.version, "parent": plan.parent}


# -- 0. plan, reward, actor and critic ----------------------------------------------------
def plan_round(runtime, config: PPOConfig, dist, algorithm: str = "ppo") -> Plan:
    data = runtime.data
    cur = data.current_version("policy")
    parent = cur["version"] if cur else 0
    version = dist.broadcast(data.next_version_number("policy"))
    kl_coef = config.kl_coef
    if config.adaptive_kl and cur and "kl_coef_next" in (cur.get("metrics") or {}):
        kl_coef = float(cur["metrics"]["kl_coef_next"])  # the controller continues
    return Plan(version=version, parent=parent, seed=config.seed * 100_003 + version,
                kl_coef=kl_coef, algorithm=algorithm)


def reward_source(runtime, reward_fn, plan: Plan):
    """A callable (rollout) -> scores (B,): the injected reward_fn, or the reward model."""
    if reward_fn is not None:
        def from_fn(rollout: Rollout):
            return reward_fn(rollout.prompts, rollout.responses, rollout.response_lists())
        plan.critic_init = "fresh"
        return from_fn
    from rlhf_core.reward.model import load_reward
    scorer = load_reward(runtime)
    plan.reward_version, plan.scorer = scorer.version, scorer
    plan.critic_init = "reward" if scorer.shares_base else "fresh"

    def from_model(rollout: Rollout):  # the texts, encoded exactly as in reward training
        return scorer.score_texts(rollout.prompts, rollout.responses)
    from_model.scorer = scorer
    return from_model


def adapter_params(model, name: str) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if f".{name}." in n}


def reset_adapter(model, name: str, seed: int) -> None:
    """Re-initialise a LoRA adapter from `seed` (B = 0: the adapter starts as the identity)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_lora_parameters") and name in getattr(module, "lora_A", {}):
                module.reset_lora_parameters(name, True)


def setup_actor(runtime, plan: Plan) -> dict:
    """Make `policy` hold the parent version (no critic); return a snapshot of it."""
    model = runtime.model
    if plan.parent == 0:
        reset_adapter(model, "policy", plan.seed)  # the base model, as a seeded identity adapter
        runtime.loaded["policy"] = 0
    else:
        runtime.use_policy(plan.parent)  # loads the parent's adapter into `policy` if needed
    model.set_adapter("policy")
    return snapshot_adapters(runtime, roles=("policy",))


def setup_actor_critic(runtime, plan: Plan, config: PPOConfig) -> dict:
    """Make `policy` hold the parent version and `value` + head the critic (with `ppo.critic =
    "trunk"`: a value head on the policy's own hidden states); return a snapshot."""
    model = runtime.model
    if config.critic == "trunk":
        return setup_trunk_critic(runtime, plan)
    setup_actor(runtime, plan)
    layers = critic_layers(model, config)
    want = models.covered_layers(model, layers)
    parent_dir = runtime.policy_dir(plan.parent) / "value" if plan.parent else None
    if (runtime.loaded.get("value") == plan.parent and plan.parent and "value" in runtime.heads
            and models.adapter_layers(model, "value") == want):
        plan.critic_init = "continued"
    elif (parent_dir is not None and (parent_dir / "adapter_model.safetensors").exists()
          and saved_layers(parent_dir, model) == want):
        runtime.load_adapter_dir("value", parent_dir, version=plan.parent, trainable=True)
        runtime.heads["value"] = models.load_head(parent_dir, runtime.hidden_size,
                                                  runtime.device.device)
        plan.critic_init = "continued"
    else:  # no critic to continue, or one on other layers (ppo.critic_layers changed)
        init_critic(runtime, plan, layers)
    model.set_adapter("policy")
    return snapshot_adapters(runtime)


def critic_layers(model, config: PPOConfig) -> list[int] | None:
    """The decoder layers the value adapter covers: the top `ppo.critic_layers` (None: every
    layer, also for architectures whose layers `rollout.response_states` cannot enter)."""
    stack = models.decoder_layers(model)
    n = len(stack) if stack is not None else 0
    if not config.critic_layers or config.critic_layers >= n:
        return None
    return list(range(n - config.critic_layers, n))


def saved_layers(adapter_dir, model) -> set[int] | None:
    """The decoder layers a saved adapter covers (its `layers_to_transform`, else all the
    policy adapter's)."""
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    chosen = cfg.get("layers_to_transform")
    return models.covered_layers(model, [chosen] if isinstance(chosen, int) else chosen)


def critic_entry(model) -> int:
    """The decoder layer the value adapter's forwards start at: its lowest layer when it has
    none below (0: it covers the bottom layer, so forwards run every layer)."""
    layers = models.adapter_layers(model, "value")
    return min(layers) if layers and models.decoder_layers(model) is not None else 0


TRUNK = "trunk"  # runtime.loaded["value"] names a trunk head as ("trunk", version)


def check_trunk_model(model) -> None:
    """The trunk critic computes the LM head's logits itself (`rollout.trunk_forward`): only for
    models whose logits are the plain projection of the last hidden state."""
    base = model.get_base_model()
    odd = logit_transforms(base)
    if odd:
        raise ValueError(f"ppo.critic=trunk does not support {base.config.model_type} "
                         f"({', '.join(odd)} on its logits): use ppo.critic=adapter")


def setup_trunk_critic(runtime, plan: Plan) -> dict:
    """`policy` holds the parent version; the critic is a value head on its hidden states:
    the parent's head when the parent was trained with one, else a fresh head (a reward head
    reads the reward adapter's features, not the policy's). Returns a snapshot."""
    check_trunk_model(runtime.model)
    setup_actor(runtime, plan)
    parent_dir = runtime.policy_dir(plan.parent) / "value" if plan.parent else None
    if runtime.loaded.get("value") == (TRUNK, plan.parent) and plan.parent:
        plan.critic_init = "continued"
    elif (parent_dir is not None and (parent_dir / models.HEAD_FILE).exists()
          and not (parent_dir / "adapter_model.safetensors").exists()):
        runtime.heads["value"] = models.load_head(parent_dir, runtime.hidden_size,
                                                  runtime.device.device)
        runtime.loaded["value"] = (TRUNK, plan.parent)
        plan.critic_init = "continued"
    else:
        runtime.heads["value"] = models.ScalarHead(runtime.hidden_size, seed=plan.seed + 1).to(
            runtime.device.device)
        runtime.loaded["value"] = (TRUNK, -1)  # not a published head
        plan.critic_init = "fresh"
    snap = snapshot_adapters(runtime, roles=("policy",))
    return snap | {"head": copy.deepcopy(runtime.heads["value"].state_dict())}


def init_critic(runtime, plan: Plan, layers: list[int] | None = None) -> None:
    """A new critic (its adapter on the decoder `layers`, None: all): a copy of the reward
    adapter and head when they share the base (on those layers), else fresh."""
    model = runtime.model
    runtime.ensure_fresh_adapter("value", layers)
    runtime.loaded["value"] = -1  # not a published critic: the next round re-initialises
    scorer = plan.scorer
    if plan.critic_init == "reward" and scorer is not None:
        src = adapter_params(model, scorer.adapter_name)
        dst = adapter_params(model, "value")
        pairs = {n: n.replace(f".{scorer.adapter_name}.", ".value.") for n in src}
        pairs = {s: d for s, d in pairs.items() if d in dst}  # the value adapter's layers
        if set(pairs.values()) == set(dst) and all(
                src[s].shape == dst[d].shape for s, d in pairs.items()):
            with torch.no_grad():
                for s, d in pairs.items():
                    dst[d].copy_(src[s])
            runtime.heads["value"] = copy.deepcopy(scorer.head)
            return
        log.warning("reward adapter does not match the value adapter's shape: fresh critic")
    plan.critic_init = "fresh"
    reset_adapter(model, "value", plan.seed + 1)
    runtime.heads["value"] = models.ScalarHead(runtime.hidden_size, seed=plan.seed + 1).to(
        runtime.device.device)


def snapshot_adapters(runtime, roles: tuple[str, ...] = ("policy", "value")) -> dict:
    """The trainable adapters of `roles` (and the value head with `value`), copied."""
    model = runtime.model
    saved = {role: {n: p.detach().clone() for n, p in adapter_params(model, role).items()}
             for role in roles}
    if "value" in roles:
        saved["head"] = copy.deepcopy(runtime.heads["value"].state_dict())
    return saved | {"loaded": dict(runtime.loaded)}


def restore_adapters(runtime, saved: dict) -> None:
    """Undo an aborted round's updates: the in-memory policy keeps serving the parent."""
    model = runtime.model
    with torch.no_grad():
        for role in ("policy", "value"):
            params = adapter_params(model, role)
            for n, v in saved.get(role, {}).items():
                params[n].copy_(v)
    if "head" in saved:
        runtime.heads["value"].load_state_dict(saved["head"])
    runtime.loaded.update(saved["loaded"])
    model.set_adapter("policy")


@contextlib.contextmanager
def guard_round(runtime, saved: dict, plan: Plan, out):
    """Any failure inside restores the snapshot `saved`; a health gate also logs the abort."""
    try:
        yield
    except PPOHealthError as exc:
        restore_adapters(runtime, saved)
        out.event("ppo_aborted", version=plan.version, reason=exc.reason,
                  algorithm=plan.algorithm)
        raise
    except BaseException:
        restore_adapters(runtime, saved)
        raise
