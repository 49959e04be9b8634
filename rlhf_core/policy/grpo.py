"""GRPO and RLOO rounds: the K samples of a prompt judge each other; no value model.

The PPO round's checklist (ppo.py) with the critic taken out:
  0. plan, reward source, actor (setup.py; the `value` adapter is not touched)
  1-2. `group_size` samples per prompt from the policy, a prompt's samples contiguous, with
       the round's sequence budget; reward-model scores and reference log-probs
  3. one advantage per sequence, from its group (`group_step`):
       GRPO: `group_advantages(scores)`; the KL to the reference is a loss term (k3, grpo_loss)
       RLOO: the score shaped with -kl_coef * the sequence KL, then `rloo_advantages`
  5a. the gates (non-finite, KL) before any update
  4. epochs of the clipped policy loss, the advantage broadcast over the response tokens
     (+ 5b: non-finite and approx-KL gates per minibatch)
  6. publish `policy/` (no critic) with the algorithm and its settings
"""
from __future__ import annotations

from rlhf_core.advantages import group_advantages, rloo_advantages, zero_padding
from rlhf_core.config import PPOConfig
from rlhf_core.losses import grpo_loss
from rlhf_core.policy.experience import checked_stats, collect_experience, kl_step
from rlhf_core.policy.publish import Output, publish_step
from rlhf_core.policy.rollout import Rollout
from rlhf_core.policy.setup import (
    Plan,
    SingleProcess,
    guard_round,
    plan_round,
    reward_source,
    setup_actor,
)
from rlhf_core.policy.train import ppo_objective, train_step


def grpo_round(runtime, **kwargs) -> dict:
    """One GRPO round (see `group_round`)."""
    return group_round(runtime, algorithm="grpo", **kwargs)


def rloo_round(runtime, **kwargs) -> dict:
    """One RLOO round (see `group_round`)."""
    return group_round(runtime, algorithm="rloo", **kwargs)


def group_round(runtime, *, algorithm: str, **kwargs) -> dict:
    """Run one critic-free round ("grpo" or "rloo") and publish the next policy version.
    Raises PPOHealthError on a gate. Keywords as `ppo_round` (`config`, `reporter`,
    `reward_fn`, `prompts`: each prompt gets `group_size` responses, `dist`)."""
    if algorithm not in ("grpo", "rloo"):
        raise ValueError(f"group_round runs grpo or rloo, not {algorithm!r}")

    def update(rollout: Rollout, times: dict, config: PPOConfig, plan: Plan, dist, out) -> dict:
        group_step(rollout, config, plan, dist)  # 3. an advantage per sequence
        stats = checked_stats(rollout, config, plan, dist, out, times)  # 5a. gates first
        objective = grpo_objective if algorithm == "grpo" else ppo_objective
        return stats | train_step(runtime, rollout, config, plan, dist, out, objective=objective,
                                  critic=False)  # 4. epochs (+5b)
    return critic_free_round(runtime, algorithm, update, **kwargs)


def critic_free_round(runtime, algorithm: str, update, *, config: PPOConfig | None = None,
                      reporter=None, reward_fn=None, prompts: list[str] | None = None,
                      dist=None) -> dict:
    """The frame GRPO, RLOO and online DPO share: 0. plan, reward source, actor; 1-2. groups of
    `group_size` samples, scores, reference log-probs; then `update(rollout, times, config,
    plan, dist, out) -> stats` (steps 3-5); 6. publish `policy/`. Any failure restores the
    parent policy."""
    config = config or runtime.config.ppo
    dist = dist or SingleProcess()
    out = Output(runtime.data, reporter, dist)
    with runtime.lock:
        plan = plan_round(runtime, config, dist, algorithm)
        score_fn = reward_source(runtime, reward_fn, plan)
        saved = setup_actor(runtime, plan)
        with guard_round(runtime, saved, plan, out):  # any failure: the parent keeps serving
            rollout, times = collect_experience(runtime, config, plan, dist, score_fn, out,
                                                prompts, per_prompt=config.group_size,
                                                critic=False)  # 1-2.
            stats = update(rollout, times, config, plan, dist, out)  # 3-5.
        return publish_step(runtime, config, plan, stats, dist, out, critic=False)  # 6.


def group_step(rollout: Rollout, config: PPOConfig, plan: Plan, dist) -> None:
    """3. `seq_advantages` (B,) from each sequence's group (over every rank's rows, as one
    batch), and `advantages` (B,T): the same number on every real token, 0 on padding."""
    kl_step(rollout, config, plan)  # finite gate, per-token KL (stats, gate), shaped rewards
    if plan.algorithm == "rloo":  # the KL in the reward: score - kl_coef * sequence KL
        returns = rollout.rewards.sum(dim=1)  # (B,)
        advantages = rloo_advantages(dist.gather_rows(returns), config.group_size)
    else:  # GRPO: the KL to the reference is in the loss (grpo_objective)
        advantages = group_advantages(dist.gather_rows(rollout.scores), config.group_size,
                                      config.grpo_scale)
    n = len(rollout)
    rollout.seq_advantages = advantages[dist.rank * n:(dist.rank + 1) * n]  # (B,)
    broadcast = rollout.seq_advantages.reshape(-1, 1).expand_as(rollout.mask)  # (B,T)
    rollout.advantages = zero_padding(broadcast, rollout.mask)


def grpo_objective(logprobs, batch: Rollout, config: PPOConfig, plan: Plan):
    """GRPO's loss: clipped surrogate + kl_coef * k3 to the reference, per token."""
    loss, stats = grpo_loss(logprobs, batch.logprobs, batch.ref_logprobs, batch.seq_advantages,
                            batch.mask, config.clip_eps, plan.kl_coef)
    stats["kl_k3"] = stats.pop("kl")  # per token; the round's "kl" metric is per sequence
    return loss, stats
