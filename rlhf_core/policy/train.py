"""Policy rounds, step 4 (+ gate 5b): epochs over the rollout, one minibatch at a time.

Each PPO minibatch does a policy forward/backward with `policy` active, then a value
forward/backward with `value` active (disjoint parameters: the summed gradients are those of
`pg_loss + vf_coef * vf_loss`); gradients are all-reduced by hand across ranks. The policy
loss is an `objective` (PPO's clipped surrogate by default; GRPO's in grpo.py); a round
without a critic passes `critic=False`. `run_epochs` is the loop every round shares (DPO's
minibatches are pairs): shuffle, update, gate, step, log.
"""
from __future__ import annotations

import time

import torch

from rlhf_core.config import PPOConfig
from rlhf_core.losses import ppo_policy_loss, ppo_value_loss
from rlhf_core.models import autocast
from rlhf_core.policy.rollout import (
    Rollout,
    critic_values,
    policy_logprobs,
    trunk_forward,
)
from rlhf_core.policy.setup import Plan, PPOHealthError, aborted, adapter_params


def ppo_objective(logprobs, batch: Rollout, config: PPOConfig, plan: Plan):
    """PPO's (and RLOO's) policy loss: the clipped surrogate on per-token advantages."""
    return ppo_policy_loss(logprobs, batch.logprobs, batch.advantages, batch.mask,
                           config.clip_eps)


# -- 4. epochs -------------------------------------------------------------------------------------
def train_step(runtime, rollout: Rollout, config: PPOConfig, plan: Plan, dist, out, *,
               objective=ppo_objective, critic: bool = True) -> dict:
    model = runtime.model
    policy = list(adapter_params(model, "policy").values())
    head = list(runtime.heads["value"].parameters()) if critic else []
    # a trunk critic is the value head alone on the policy's hidden states
    critic_params = (head if config.critic == "trunk"
                     else list(adapter_params(model, "value").values()) + head)
    params = policy + critic_params
    mb = config.minibatch_size // dist.world_size  # this rank's share of a minibatch
    if mb < 1:
        raise ValueError("minibatch_size must be at least the number of processes")

    def update(idx):
        batch = rollout.select(idx.to(rollout.mask.device))
        return minibatch_update(runtime, batch, config, dist, params, policy, critic_params,
                                objective=objective, plan=plan)
    return run_epochs(runtime, len(rollout), mb, config, plan, dist, out, params, update)


def run_epochs(runtime, n: int, mb: int, config: PPOConfig, plan: Plan, dist, out, params,
               update, label: str = "step", lr: float | None = None) -> dict:
    """`config.epochs` passes over `n` rows in seeded random minibatches of `mb`:
    `update(idx)` computes the gradients and returns the minibatch's stats, then the gate,
    the optimizer step and the metrics (Adam at `lr`, default `config.lr`). A minibatch whose
    approx_kl exceeds `config.stop_approx_kl` (when set) ends the loop without its step: the
    updates so far stand (`early_stop` = its step number, else 0). A minibatch past the
    approx_kl gate after some steps falls back (`config.fallback_approx_kl`) to the parameters
    from before the first minibatch whose approx_kl exceeded that fraction of the gate, kept
    (one copy) when it was seen: the round ends as that early stop would have ended it
    (`gate_fallback` = the step that tripped the gate, else 0). Returns the last epoch's mean
    stats (the epoch reached) and the time."""
    t0 = time.perf_counter()
    model = runtime.model
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=config.lr if lr is None else lr,
                                 eps=1e-5)  # CleanRL's eps
    steps_per_epoch = -(-n // mb)
    total, step, history = config.epochs * steps_per_epoch, 0, []
    name = plan.algorithm.upper()
    stopped = tripped = 0
    fallback = config.fallback_approx_kl * config.max_approx_kl
    safe = None  # (steps taken, parameters then): before the first minibatch past `fallback`
    _train_mode(model, config.gradient_checkpointing)
    try:
        for epoch in range(config.epochs):
            gen = torch.Generator().manual_seed(plan.seed + 7919 * epoch + dist.rank)
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, mb):
                stats = update(perm[start:start + mb])
                stats["epoch"] = epoch
                # the same stats on every rank (all-reduced): every rank decides alike
                kl = stats["approx_kl"]
                if fallback and safe is None and step and kl > fallback:
                    safe = (step, [p.detach().clone() for p in params])
                try:
                    _gate_minibatch(stats, config, plan)
                except ApproxKLGateError:
                    if safe is None:
                        raise
                    tripped, stopped = step + 1, safe[0] + 1
                    with torch.no_grad():
                        for p, v in zip(params, safe[1]):
                            p.copy_(v)
                    optimizer.zero_grad(set_to_none=True)
                    history = history[:safe[0]]
                    out.metrics({"gate_fallback_approx_kl": kl}, step=out.step0 + step,
                                version=plan.version)
                    out.event("approx_kl_fallback", version=plan.version, algorithm=plan.algorithm,
                              tripped_at=tripped, kept_steps=safe[0], approx_kl=kl)
                    out.progress(0.95, f"v{plan.version}: {name} {label} {tripped}/{total}: "
                                 f"approx_kl {kl:.3g} > max_approx_kl {config.max_approx_kl}; "
                                 f"kept the policy of {label} {safe[0]} (the last before "
                                 f"approx_kl passed {fallback:.3g})")
                    break
                if config.stop_approx_kl and kl > config.stop_approx_kl:
                    stopped, stopped_kl = step + 1, kl
                    optimizer.zero_grad(set_to_none=True)
                    out.metrics({"early_stop_approx_kl": kl},
                                step=out.step0 + step, version=plan.version)
                    out.progress(0.95, f"v{plan.version}: {name} stopped early at {label} "
                                 f"{stopped}/{total}: approx_kl {kl:.3g} > "
                                 f"stop_approx_kl {config.stop_approx_kl}")
                    break
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                history.append(stats)
                out.metrics(stats, step=out.step0 + step, version=plan.version)
                step += 1
                out.progress(0.3 + 0.65 * step / total,
                             f"v{plan.version}: {name} {label} {step}/{total}")
            if stopped:
                break
    finally:
        _eval_mode(model, config.gradient_checkpointing)
        model.set_adapter("policy")
    if not history:  # past stop_approx_kl before any step: the threshold is below the noise
        reason = (f"approx_kl {stopped_kl:.3g} > stop_approx_kl {config.stop_approx_kl} on the "
                  "first minibatch, before any step: raise ppo.stop_approx_kl")
        raise PPOHealthError(reason, aborted(plan, reason))
    last = [h for h in history if h["epoch"] == history[-1]["epoch"]]
    summary = {k: sum(h[k] for h in last) / len(last) for k in last[0] if k != "epoch"}
    seconds = time.perf_counter() - t0
    out.metrics({"time_train": seconds}, step=out.step0, version=plan.version)
    return summary | {"first_ratio": history[0]["ratio_mean"], "time_train": seconds,
                      "first_approx_kl": history[0]["approx_kl"], "ppo_steps": len(history),
                      "early_stop": stopped, "gate_fallback": tripped}


def minibatch_update(runtime, batch: Rollout, config: PPOConfig, dist, params, policy,
                     critic, *, objective=ppo_objective, plan: Plan | None = None) -> dict:
    """Backward of the objective (+ vf_coef * vf_loss with a critic), each a global token mean,
    then all-reduce and clip."""
    n_tokens = batch.mask.sum()
    global_tokens = dist.sum(n_tokens.clone())
    # each rank's masked mean, re-weighted so the mean over ranks is the global token mean
    scale = n_tokens * dist.world_size / global_tokens
    if critic and config.critic == "trunk":
        local = _trunk_losses(runtime, batch, config, policy + critic, scale, objective, plan)
    else:
        local = _two_pass_losses(runtime, batch, config, policy, critic, scale, objective, plan)
    grad_norm = reduce_and_clip(dist, params, config.max_grad_norm)
    # token-weighted means over ranks: equal to the single-process minibatch's statistics
    stats = {k: (dist.sum(v.float() * n_tokens) / global_tokens).item() for k, v in local.items()}
    if critic:
        stats["loss"] += config.vf_coef * stats["vf_loss"]
    stats["grad_norm"] = grad_norm
    return stats


def _trunk_losses(runtime, batch: Rollout, config: PPOConfig, params, scale, objective,
                  plan) -> dict:
    """`ppo.critic = "trunk"`: one forward of the policy adapter feeds the LM head and the value
    head; one backward of `pg_loss + vf_coef * vf_loss` (the head reads detached hidden
    states: the value loss trains the head alone)."""
    model = runtime.model
    with autocast(runtime.device):
        model.set_adapter("policy")
        logprobs, entropy, values = trunk_forward(model, runtime.heads["value"], batch,
                                                  config.temperature, with_entropy=True,
                                                  prefix_cache=config.prefix_cache)
        pg_loss, pg_stats = objective(logprobs, batch, config, plan)
        vf_loss, vf_stats = ppo_value_loss(values, batch.values, batch.returns, batch.mask,
                                           config.value_clip_eps)
    backward_if_finite((pg_loss + config.vf_coef * vf_loss) * scale, params)
    return {"loss": pg_loss.detach(), "pg_loss": pg_loss.detach(),
            "entropy": (entropy * batch.mask).sum() / batch.mask.sum(), **pg_stats,
            "vf_loss": vf_loss.detach(), **vf_stats}


def _two_pass_losses(runtime, batch: Rollout, config: PPOConfig, policy, critic, scale,
                     objective, plan) -> dict:
    """The policy's forward/backward with `policy` active, then (with a critic) the value
    adapter's with `value` active: disjoint parameters, so the summed gradients are those of
    `pg_loss + vf_coef * vf_loss`."""
    model = runtime.model
    n_tokens = batch.mask.sum()
    with autocast(runtime.device):
        model.set_adapter("policy")
        logprobs, entropy = policy_logprobs(model, batch, config.temperature, with_entropy=True,
                                            prefix_cache=config.prefix_cache)
        pg_loss, pg_stats = objective(logprobs, batch, config, plan)
    backward_if_finite(pg_loss * scale, policy)
    # an objective may report its surrogate part as pg_loss; "loss" is what was minimised
    local = {"loss": pg_loss.detach(), "pg_loss": pg_loss.detach(),
             "entropy": (entropy * batch.mask).sum() / n_tokens, **pg_stats}
    if critic:
        with autocast(runtime.device):
            model.set_adapter("value")
            values = critic_values(model, runtime.heads["value"], batch,
                                   prefix_cache=config.prefix_cache)
            vf_loss, vf_stats = ppo_value_loss(values, batch.values, batch.returns, batch.mask,
                                               config.value_clip_eps)
        backward_if_finite(config.vf_coef * vf_loss * scale, critic)
        local |= {"vf_loss": vf_loss.detach(), **vf_stats}
    return local


def reduce_and_clip(dist, params, max_grad_norm: float) -> float:
    """All-reduce the gradients over ranks, clip their global norm; the norm before clipping."""
    dist.all_reduce_grads(params)
    return torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item()


def backward_if_finite(loss, params) -> None:
    if torch.isfinite(loss):
        loss.backward()
    else:  # keep the collectives in step; the gate on the gathered loss aborts the round
        for p in params:
            p.grad = torch.full_like(p, float("nan"))


class ApproxKLGateError(PPOHealthError):
    """The approx_kl gate (not a non-finite value): `run_epochs` may fall back from it."""


def _gate_minibatch(stats: dict, config: PPOConfig, plan: Plan) -> None:
    bad = [k for k in ("loss", "pg_loss", "vf_loss", "grad_norm")
           if k in stats and not torch.isfinite(torch.tensor(stats[k]))]
    if bad:
        reason = f"non-finite {', '.join(bad)} in a {plan.algorithm.upper()} minibatch"
        raise PPOHealthError(reason, aborted(plan, reason) | {"metrics": stats})
    if stats["approx_kl"] > config.max_approx_kl:
        reason = f"approx_kl {stats['approx_kl']:.3g} > max_approx_kl {config.max_approx_kl}"
        raise ApproxKLGateError(reason, aborted(plan, reason) | {"metrics": stats})


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
