"""One PPO round: rollout -> score -> advantages -> PPO epochs -> health gates -> publish.

`ppo_round` reads as that checklist; each step is a named function below it. Roles share one
base model (DESIGN.md): the `policy` LoRA adapter is the actor, the `value` adapter plus a
scalar head the critic, the reference is the base with adapters disabled, and the reward model
is its own adapter + head (or a separate base). peft runs one adapter at a time, so each
minibatch does a policy forward/backward with `policy` active, then a value forward/backward
with `value` active; the two parameter sets are disjoint, so the summed gradients equal those
of `pg_loss + vf_coef * vf_loss`.

Multi-process (DDP via `accelerate launch`, see ppo_launch.py): every rank samples its shard of
the rollout, statistics (whitening, metrics, gates) are computed over all ranks, each loss is a
token sum over the global token count, and gradients are all-reduced by hand (the adapter switch
between two backward passes is not something DDP's reducer hooks support). With a minibatch that
covers the whole rollout the multi-process round equals the single-process one up to float error.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import random
import time
from pathlib import Path

import torch

from rlhf_core import jobs, models
from rlhf_core.advantages import (AdaptiveKLController, FixedKLController, compute_gae,
                                  explained_variance, masked_whiten, shape_rewards)
from rlhf_core.checkpoints import publish
from rlhf_core.config import PPOConfig, from_dict, to_dict
from rlhf_core.losses import ppo_policy_loss, ppo_value_loss
from rlhf_core.rollout import Rollout, autocast, critic_values, generate, policy_logprobs

log = logging.getLogger(__name__)


class PPOHealthError(RuntimeError):
    """A health gate stopped the round; nothing was published. `.result` says why."""

    def __init__(self, reason: str, result: dict):
        super().__init__(f"PPO round aborted, nothing published: {reason}")
        self.reason, self.result = reason, result


class SingleProcess:
    """The collective operations of a round, for one process (DDP: ppo_launch.AccelerateDist)."""
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
    scorer: object = dataclasses.field(default=None, repr=False)  # the reward model, if used


def ppo_round(runtime, *, config: PPOConfig | None = None, reporter=None, reward_fn=None,
              prompts: list[str] | None = None, dist=None, enqueue_sampling: bool = True) -> dict:
    """Run one PPO round and publish the next policy version. Raises PPOHealthError on a gate.

    `reward_fn(prompts, responses, response_ids) -> Tensor(B)` replaces the reward model
    (`response_ids`: one 1-D tensor per response, cut after its stop token).
    `prompts` replaces the sampled train prompts (each gets `rollouts_per_prompt` responses).
    """
    config = config or runtime.config.ppo
    dist = dist or SingleProcess()
    out = _Output(runtime.store, reporter, dist)
    with runtime.lock:
        plan = plan_round(runtime, config, dist)
        score_fn = reward_source(runtime, reward_fn, plan)
        saved = setup_actor_critic(runtime, plan, config)
        try:
            times = {}
            out.progress(0.02, f"v{plan.version}: generating")
            t0 = time.perf_counter()
            rollout = rollout_step(runtime, config, plan, dist, prompts)  # 1. rollout
            times["time_generate"] = time.perf_counter() - t0
            out.progress(0.25, f"v{plan.version}: scoring")
            t0 = time.perf_counter()
            score_step(runtime, rollout, config, score_fn)  # 2. scores, ref, values
            times["time_score"] = time.perf_counter() - t0
            advantages_step(rollout, config, plan, dist)  # 3. KL shaping, GAE, whitening
            stats = rollout_stats(rollout, plan, dist) | times
            check_rollout(stats, config, plan)  # 5a. gates before any update
            out.metrics(stats, step=out.step0, version=plan.version)
            t0 = time.perf_counter()
            train = train_step(runtime, rollout, config, plan, dist, out)  # 4. PPO epochs (+5b)
            stats |= train | {"time_train": time.perf_counter() - t0}
            out.metrics({"time_train": stats["time_train"]}, step=out.step0, version=plan.version)
        except PPOHealthError as exc:
            restore_adapters(runtime, saved)
            out.event("ppo_aborted", version=plan.version, reason=exc.reason)
            raise
        except BaseException:
            restore_adapters(runtime, saved)
            raise
        return publish_step(runtime, config, plan, stats, dist, out, enqueue_sampling)  # 6.


# -- 0. plan, reward, actor and critic ----------------------------------------------------
def plan_round(runtime, config: PPOConfig, dist) -> Plan:
    store = runtime.store
    cur = store.current_version("policy")
    parent = cur["version"] if cur else 0
    version = dist.broadcast(store.next_version_number("policy"))
    kl_coef = config.kl_coef
    if config.adaptive_kl and cur and "kl_coef_next" in (cur.get("metrics") or {}):
        kl_coef = float(cur["metrics"]["kl_coef_next"])  # the controller continues
    return Plan(version=version, parent=parent, seed=config.seed * 100_003 + version,
                kl_coef=kl_coef)


def reward_source(runtime, reward_fn, plan: Plan):
    """A callable (rollout) -> scores (B,): the injected reward_fn, or the reward model."""
    if reward_fn is not None:
        def from_fn(rollout: Rollout):
            return reward_fn(rollout.prompts, rollout.responses, rollout.response_lists())
        plan.critic_init = "fresh"
        return from_fn
    from rlhf_core.reward_model import load_reward
    scorer = load_reward(runtime)
    plan.reward_version, plan.scorer = scorer.version, scorer
    plan.critic_init = "reward" if scorer.shares_base else "fresh"

    def from_model(rollout: Rollout):
        if hasattr(scorer, "score_texts"):  # encoded exactly as in reward training
            return scorer.score_texts(rollout.prompts, rollout.responses)
        ids = torch.cat([rollout.query_ids, rollout.response_ids], dim=1)  # (B,P+T)
        attn = torch.cat([rollout.query_mask, rollout.mask.long()], dim=1)  # (B,P+T)
        return scorer.score_ids(ids, attn)
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


def setup_actor_critic(runtime, plan: Plan, config: PPOConfig) -> dict:
    """Make `policy` hold the parent version and `value` + head the critic; return a snapshot."""
    model = runtime.model
    if plan.parent == 0:
        reset_adapter(model, "policy", plan.seed)  # the base model, as a seeded identity adapter
        runtime.loaded["policy"] = 0
    else:
        runtime.use_policy(plan.parent)  # loads the parent's adapter into `policy` if needed
    parent_dir = runtime.policy_dir(plan.parent) / "value" if plan.parent else None
    if runtime.loaded.get("value") == plan.parent and plan.parent and "value" in runtime.heads:
        plan.critic_init = "continued"
    elif parent_dir is not None and (parent_dir / "adapter_model.safetensors").exists():
        runtime.load_adapter_dir("value", parent_dir, version=plan.parent, trainable=True)
        runtime.heads["value"] = models.load_head(parent_dir, runtime.hidden_size,
                                                  runtime.device.device)
        plan.critic_init = "continued"
    else:
        init_critic(runtime, plan)
    model.set_adapter("policy")
    return snapshot_adapters(runtime)


def init_critic(runtime, plan: Plan) -> None:
    """A new critic: a copy of the reward adapter and head when they share the base, else fresh."""
    model = runtime.model
    runtime.ensure_fresh_adapter("value")
    runtime.loaded["value"] = -1  # not a published critic: the next round re-initialises
    scorer = plan.scorer
    if plan.critic_init == "reward" and scorer is not None:
        src = adapter_params(model, scorer.adapter_name)
        dst = adapter_params(model, "value")
        pairs = {n: n.replace(f".{scorer.adapter_name}.", ".value.") for n in src}
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


def snapshot_adapters(runtime) -> dict:
    model = runtime.model
    return {"policy": {n: p.detach().clone() for n, p in adapter_params(model, "policy").items()},
            "value": {n: p.detach().clone() for n, p in adapter_params(model, "value").items()},
            "head": copy.deepcopy(runtime.heads["value"].state_dict()),
            "loaded": dict(runtime.loaded)}


def restore_adapters(runtime, saved: dict) -> None:
    """Undo an aborted round's updates: the in-memory policy keeps serving the parent."""
    model = runtime.model
    with torch.no_grad():
        for role in ("policy", "value"):
            params = adapter_params(model, role)
            for n, v in saved[role].items():
                params[n].copy_(v)
    runtime.heads["value"].load_state_dict(saved["head"])
    runtime.loaded.update(saved["loaded"])
    model.set_adapter("policy")


# -- 1. rollout ------------------------------------------------------------------------------
def choose_prompts(store, n: int, seed: int) -> list[str]:
    """`n` train prompts (never held-out ones), a seeded sample without replacement."""
    rows = store.rows("SELECT id, text FROM prompts WHERE split = 'train' ORDER BY id")
    if not rows:
        raise ValueError("no train prompts in the workspace: import some first")
    rng = random.Random(seed)
    picked = rng.sample(rows, min(n, len(rows)))
    return [r["text"] for r in picked]


def rollout_step(runtime, config: PPOConfig, plan: Plan, dist, prompts=None) -> Rollout:
    """This rank's shard of prompts x rollouts_per_prompt responses from the policy."""
    prompts = prompts or choose_prompts(runtime.store, config.prompts_per_round, plan.seed)
    rows = [p for p in prompts for _ in range(config.rollouts_per_prompt)]
    if len(rows) % dist.world_size:
        raise ValueError(f"{len(rows)} rollouts do not split over {dist.world_size} processes")
    n = len(rows) // dist.world_size
    lo = dist.rank * n  # contiguous shards: the global row order is rank-major
    seeds = [plan.seed * 10_007 + g for g in range(lo, lo + n)]  # one noise stream per row
    model = runtime.model
    model.set_adapter("policy")
    with autocast(runtime.device):
        return generate(model, runtime.tokenizer, rows[lo:lo + n], seeds,
                        max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                        max_prompt_tokens=config.max_prompt_tokens,
                        batch_size=config.generation_batch_size, device=runtime.device.device)


# -- 2. score, reference log-probs, values -----------------------------------------------------
@torch.no_grad()
def score_step(runtime, rollout: Rollout, config: PPOConfig, score_fn) -> None:
    model, head = runtime.model, runtime.heads["value"]
    chunks = list(_chunks(len(rollout), config.minibatch_size))
    parts = {"logprobs": [], "entropy": [], "ref_logprobs": [], "values": []}
    with autocast(runtime.device):
        for idx in chunks:
            batch = rollout.select(idx)
            model.set_adapter("policy")
            logprobs, entropy = policy_logprobs(model, batch, config.temperature, with_entropy=True)
            with runtime.reference():
                ref_logprobs, _ = policy_logprobs(model, batch, config.temperature)
            model.set_adapter("value")
            values = critic_values(model, head, batch)
            for k, v in zip(parts, (logprobs, entropy, ref_logprobs, values)):
                parts[k].append(v.float())
        scores = torch.as_tensor(score_fn(rollout), dtype=torch.float32).to(rollout.mask.device)
    model.set_adapter("policy")
    for k, v in parts.items():
        setattr(rollout, k, torch.where(rollout.mask.bool(), torch.cat(v), 0.0))  # 0 on padding
    # a response that never stopped is penalised (TRL's missing_eos_penalty)
    rollout.scores = scores.reshape(-1) + config.missing_eos_penalty * (~rollout.has_stop).float()


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield torch.arange(start, min(n, start + size))


# -- 3. KL-shaped rewards, GAE, whitening ---------------------------------------------------------
def advantages_step(rollout: Rollout, config: PPOConfig, plan: Plan, dist) -> None:
    _gate_finite(rollout, plan)  # before shaping: a nan score must not reach GAE
    rollout.rewards, rollout.kl = shape_rewards(rollout.scores, rollout.logprobs,
                                                rollout.ref_logprobs, rollout.mask,
                                                plan.kl_coef, config.kl_estimator)
    advantages, rollout.returns = compute_gae(rollout.rewards, rollout.values, rollout.mask,
                                              config.gamma, config.lam)  # (B,T) each
    if config.whiten_advantages:  # over every rank's tokens, like one big batch
        n, T = advantages.shape
        all_adv = masked_whiten(dist.gather_rows(advantages), dist.gather_rows(rollout.mask))
        advantages = all_adv[dist.rank * n:(dist.rank + 1) * n, :T]
    rollout.advantages = advantages


def _gate_finite(rollout: Rollout, plan: Plan) -> None:
    m = rollout.mask.bool()
    for name in ("scores", "logprobs", "ref_logprobs", "values"):
        t = getattr(rollout, name)
        t = t if name == "scores" else t[m]
        if not torch.isfinite(t).all():
            raise PPOHealthError(f"non-finite {name} in the rollout",
                                 _aborted(plan, f"non-finite {name}"))


def _aborted(plan: Plan, reason: str) -> dict:
    return {"status": "aborted", "reason": reason, "version": plan.version, "parent": plan.parent}


def rollout_stats(rollout: Rollout, plan: Plan, dist) -> dict:
    """Round metrics over all ranks (gathered), so every rank takes the same gate decisions."""
    g = dist.gather_rows
    mask = g(rollout.mask)  # (B,T)
    scores = g(rollout.scores)  # (B,)
    kl_seq = g(rollout.kl.sum(dim=1))  # (B,) KL of each sequence
    lengths = mask.sum(dim=1)  # (B,)
    entropy = g(rollout.entropy).sum() / mask.sum()
    ev = explained_variance(g(rollout.values), g(rollout.returns), mask)
    return {"reward_mean": scores.mean().item(), "reward_std": scores.std().item(),
            "kl": kl_seq.mean().item(), "kl_coef": plan.kl_coef,
            "rlhf_reward": (scores - plan.kl_coef * kl_seq).mean().item(),
            "entropy": entropy.item(), "explained_variance": ev.item(),
            "response_length": lengths.mean().item(),
            "stop_rate": g(rollout.has_stop.float()).mean().item(),
            "n_sequences": int(mask.shape[0])}


def check_rollout(stats: dict, config: PPOConfig, plan: Plan) -> None:
    if stats["kl"] > config.max_kl:
        reason = f"mean KL per sequence {stats['kl']:.3g} > max_kl {config.max_kl}"
        raise PPOHealthError(reason, _aborted(plan, reason) | {"metrics": stats})


# -- 4. PPO epochs ----------------------------------------------------------------------------------
def train_step(runtime, rollout: Rollout, config: PPOConfig, plan: Plan, dist, out) -> dict:
    model, head = runtime.model, runtime.heads["value"]
    policy = list(adapter_params(model, "policy").values())
    critic = list(adapter_params(model, "value").values()) + list(head.parameters())
    params = policy + critic
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=config.lr, eps=1e-5)  # CleanRL's eps
    mb = config.minibatch_size // dist.world_size  # this rank's share of a minibatch
    if mb < 1:
        raise ValueError("minibatch_size must be at least the number of processes")
    steps_per_epoch = -(-len(rollout) // mb)
    total, step, history = config.epochs * steps_per_epoch, 0, []
    _train_mode(model, config.gradient_checkpointing)
    try:
        for epoch in range(config.epochs):
            gen = torch.Generator().manual_seed(plan.seed + 7919 * epoch + dist.rank)
            perm = torch.randperm(len(rollout), generator=gen)
            for start in range(0, len(rollout), mb):
                batch = rollout.select(perm[start:start + mb].to(rollout.mask.device))
                stats = minibatch_update(runtime, batch, config, dist, params, policy, critic)
                stats["epoch"] = epoch
                _gate_minibatch(stats, config, plan)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                history.append(stats)
                out.metrics(stats, step=out.step0 + step, version=plan.version)
                step += 1
                out.progress(0.3 + 0.65 * step / total, f"v{plan.version}: PPO step {step}/{total}")
    finally:
        _eval_mode(model, config.gradient_checkpointing)
        model.set_adapter("policy")
    last = [h for h in history if h["epoch"] == config.epochs - 1]
    summary = {k: sum(h[k] for h in last) / len(last) for k in last[0] if k != "epoch"}
    return summary | {"first_ratio": history[0]["ratio_mean"],
                      "first_approx_kl": history[0]["approx_kl"], "ppo_steps": len(history)}


def minibatch_update(runtime, batch: Rollout, config: PPOConfig, dist, params, policy,
                     critic) -> dict:
    """Backward of pg_loss + vf_coef * vf_loss (global token mean), then all-reduce and clip."""
    model, head = runtime.model, runtime.heads["value"]
    n_tokens = batch.mask.sum()
    global_tokens = dist.sum(n_tokens.clone())
    # each rank's masked mean, re-weighted so the mean over ranks is the global token mean
    scale = n_tokens * dist.world_size / global_tokens
    with autocast(runtime.device):
        model.set_adapter("policy")
        logprobs, entropy = policy_logprobs(model, batch, config.temperature, with_entropy=True)
        pg_loss, pg_stats = ppo_policy_loss(logprobs, batch.logprobs, batch.advantages,
                                            batch.mask, config.clip_eps)
    _backward_if_finite(pg_loss * scale, policy)
    with autocast(runtime.device):
        model.set_adapter("value")
        values = critic_values(model, head, batch)
        vf_loss, vf_stats = ppo_value_loss(values, batch.values, batch.returns, batch.mask,
                                           config.value_clip_eps)
    _backward_if_finite(config.vf_coef * vf_loss * scale, critic)
    dist.all_reduce_grads(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    local = {"pg_loss": pg_loss.detach(), "vf_loss": vf_loss.detach(),
             "entropy": (entropy * batch.mask).sum() / n_tokens, **pg_stats, **vf_stats}
    # token-weighted means over ranks: equal to the single-process minibatch's statistics
    stats = {k: (dist.sum(v.float() * n_tokens) / global_tokens).item() for k, v in local.items()}
    stats["loss"] = stats["pg_loss"] + config.vf_coef * stats["vf_loss"]
    stats["grad_norm"] = grad_norm.item()
    return stats


def _backward_if_finite(loss, params) -> None:
    if torch.isfinite(loss):
        loss.backward()
    else:  # keep the collectives in step; the gate on the gathered loss aborts the round
        for p in params:
            p.grad = torch.full_like(p, float("nan"))


def _gate_minibatch(stats: dict, config: PPOConfig, plan: Plan) -> None:
    bad = [k for k in ("loss", "pg_loss", "vf_loss", "grad_norm")
           if not torch.isfinite(torch.tensor(stats[k]))]
    if bad:
        reason = f"non-finite {', '.join(bad)} in a PPO minibatch"
    elif stats["approx_kl"] > config.max_approx_kl:
        reason = f"approx_kl {stats['approx_kl']:.3g} > max_approx_kl {config.max_approx_kl}"
    else:
        return
    raise PPOHealthError(reason, _aborted(plan, reason) | {"metrics": stats})


def _train_mode(model, checkpointing: bool) -> None:
    """Dropout stays off (ratio 1 on the first minibatch); train mode only for checkpointing."""
    if checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.eval()


def _eval_mode(model, checkpointing: bool) -> None:
    if checkpointing:
        disable = (getattr(model, "activation_checkpointing_disable", None)
                   or model.gradient_checkpointing_disable)
        disable()
    model.eval()


# -- 6. publish ---------------------------------------------------------------------------------------
def publish_step(runtime, config: PPOConfig, plan: Plan, stats: dict, dist, out,
                 enqueue_sampling: bool) -> dict:
    """Rank 0 writes policy/ + value/ (adapter, head) atomically, then the version row."""
    if config.adaptive_kl:
        ctl = AdaptiveKLController(plan.kl_coef, config.target_kl, config.kl_horizon)
        stats["kl_coef_next"] = ctl.update(stats["kl"], stats["n_sequences"])
    else:
        stats["kl_coef_next"] = FixedKLController(plan.kl_coef).value
    stats["critic_init"] = plan.critic_init
    result = {"status": "published", "version": plan.version, "parent": plan.parent,
              "reward_version": plan.reward_version, "metrics": stats}
    if dist.is_main:
        model, head = runtime.model, runtime.heads["value"]

        def write(tmp: Path) -> None:
            models.save_adapter(model, "policy", tmp)
            models.save_adapter(model, "value", tmp)
            models.save_head(head, tmp / "value", meta={"role": "value", "version": plan.version})

        manifest = {k: result[k] for k in ("version", "parent", "reward_version")}
        manifest |= {"kind": "policy", "config": to_dict(config), "metrics": stats,
                     "base_model": runtime.config.model}
        path = publish(runtime.workspace, "policy", plan.version, write, manifest)
        runtime.store.add_version("policy", plan.version, status="published", path=str(path),
                                  parent=plan.parent, reward_version=plan.reward_version,
                                  base_model=str(runtime.config.model), config=to_dict(config),
                                  metrics=stats, job_id=out.job_id)
        result["path"] = str(path)
        if enqueue_sampling:
            result["sample_job"] = jobs.enqueue(runtime.store, "sample_batch",
                                                {"policy_version": plan.version})
    dist.barrier()  # other ranks return once the version exists
    runtime.loaded["policy"] = runtime.loaded["value"] = plan.version
    out.progress(1.0, f"published policy v{plan.version}")
    return result


# -- the job ---------------------------------------------------------------------------------------------
class _Output:
    """Metrics, progress and events: written by rank 0 only, to the job's reporter or the DB."""

    def __init__(self, store, reporter, dist):
        self.store, self.reporter, self.is_main = store, reporter, dist.is_main
        self.job_id = getattr(reporter, "job_id", None)
        last = store.scalar("SELECT MAX(step) FROM metrics WHERE kind = 'ppo'") if self.is_main else 0
        self.step0 = (last or 0) + 1 if last is not None else 0  # steps run on across rounds

    def metrics(self, values: dict, *, step: int, version: int) -> None:
        if not self.is_main:
            return
        values = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self.reporter is not None:
            self.reporter.metrics("ppo", values, step=step, version=version)
        else:
            self.store.log_metrics("ppo", values, step=step, version=version)

    def progress(self, fraction: float, message: str) -> None:
        if self.is_main and self.reporter is not None:
            self.reporter.progress(fraction, message)

    def event(self, kind: str, **payload) -> None:
        if self.is_main:
            self.store.log_event(kind, None, job_id=self.job_id, **payload)


@jobs.handler("ppo_round")
def ppo_round_job(runtime, params: dict, reporter) -> dict:
    """Job params: any PPOConfig field overrides the workspace's PPO settings."""
    overrides = {k: v for k, v in (params or {}).items()
                 if k in {f.name for f in dataclasses.fields(PPOConfig)}}
    config = from_dict(PPOConfig, to_dict(runtime.config.ppo) | overrides)
    return ppo_round(runtime, config=config, reporter=reporter)
