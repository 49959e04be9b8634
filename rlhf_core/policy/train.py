"""PPO round, step 4 (+ gate 5b): PPO epochs over the rollout, one minibatch at a time.

Each minibatch does a policy forward/backward with `policy` active, then a value
forward/backward with `value` active (disjoint parameters: the summed gradients are those of
`pg_loss + vf_coef * vf_loss`); gradients are all-reduced by hand across ranks.
"""
from __future__ import annotations

import torch

from rlhf_core.config import PPOConfig
from rlhf_core.losses import ppo_policy_loss, ppo_value_loss
from rlhf_core.policy.rollout import Rollout, autocast, critic_values, policy_logprobs
from rlhf_core.policy.setup import Plan, PPOHealthError, aborted, adapter_params


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
    raise PPOHealthError(reason, aborted(plan, reason) | {"metrics": stats})


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
