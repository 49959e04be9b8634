"""Pure losses: the clipped PPO policy and value losses, GRPO's and DPO's policy losses, and the
Bradley-Terry reward losses.

Shapes: `B` sequences, `T` response tokens, `mask` (B,T) 1.0 on real tokens. PPO losses are
token-level masked means (every real token weighs the same, whatever its sequence length).
Stats are detached 0-dim tensors, ready for logging without keeping the graph alive.
"""

import torch
import torch.nn.functional as F

from rlhf_core.advantages import kl_estimate, masked_mean

__all__ = [
    "masked_mean",
    "ppo_policy_loss",
    "ppo_value_loss",
    "grpo_loss",
    "dpo_loss",
    "policy_drift",
    "bradley_terry_loss",
    "soft_bradley_terry_loss",
    "reward_centering_loss",
]


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: masked_mean(max(-A*ratio, -A*clip(ratio, 1-eps, 1+eps))).

    `old_logprobs` and `advantages` are detached: they are rollout-time constants, and a
    gradient through `old_logprobs` would cancel the ratio's own gradient.
    Stats: `clipfrac` (share of tokens where the clipped branch is the active, larger one),
    `approx_kl` (0.5 * mean squared log-ratio) and `ratio_mean`.
    """
    old_logprobs, advantages = old_logprobs.detach(), advantages.detach()
    log_ratio = logprobs - old_logprobs  # (B,T)
    ratio = torch.exp(log_ratio)  # (B,T)
    pg_losses = -advantages * ratio  # (B,T)
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)  # (B,T)
    # the max is the pessimistic bound: no credit for moving the ratio beyond the trust region
    loss = masked_mean(torch.maximum(pg_losses, pg_losses_clipped), mask)  # ()
    with torch.no_grad():
        clipfrac = masked_mean((pg_losses_clipped > pg_losses).to(ratio.dtype), mask)
    return loss, {"clipfrac": clipfrac.detach(), **policy_drift(logprobs, old_logprobs, mask)}


def policy_drift(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                 mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """How far the policy moved from the one that sampled (B,T): `approx_kl`
    (0.5 * masked mean of the squared log-ratio) and `ratio_mean`; detached."""
    with torch.no_grad():
        log_ratio = logprobs - old_logprobs  # (B,T)
        return {"approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
                "ratio_mean": masked_mean(torch.exp(log_ratio), mask)}


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * masked_mean(max((v-R)^2, (clip(v, old+-eps)-R)^2)).

    Clipping keeps the critic near the values it had at rollout time, like the policy's ratio.
    Stats: `vf_clipfrac`, the share of tokens where the clipped term is strictly larger.
    """
    old_values, returns = old_values.detach(), returns.detach()
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)  # (B,T)
    vf_losses = (values - returns) ** 2  # (B,T)
    vf_losses_clipped = (values_clipped - returns) ** 2  # (B,T)
    loss = 0.5 * masked_mean(torch.maximum(vf_losses, vf_losses_clipped), mask)  # ()
    with torch.no_grad():
        vf_clipfrac = masked_mean((vf_losses_clipped > vf_losses).to(values.dtype), mask)
    return loss, {"vf_clipfrac": vf_clipfrac.detach()}


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    kl_coef: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO: per token max(-A*ratio, -A*clip(ratio, 1+-eps)) + kl_coef * k3(ref, logprobs),
    masked mean over every real token of the batch. `advantages` (B,) (one per sequence, e.g.
    `group_advantages`) is broadcast over the tokens; the KL to the reference is in the loss,
    not in the reward. Stats: `kl` (masked mean of k3), `clipfrac`, `approx_kl`, `ratio_mean`.
    """
    advantages = advantages.reshape(-1, 1).expand_as(logprobs)  # (B,) -> (B,T)
    pg_loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps)
    kl = masked_mean(kl_estimate(logprobs, ref_logprobs.detach(), "k3"), mask)  # ()
    # the two terms are masked means over the same tokens: their sum is the per-token mean
    loss = pg_loss + kl_coef * kl
    return loss, {**stats, "kl": kl.detach(), "pg_loss": pg_loss.detach()}


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO on (B,) summed response log-probs: z = beta*((chosen - rejected) - (ref_chosen -
    ref_rejected)); loss = mean(-(1-ls)*logsigmoid(z) - ls*logsigmoid(-z)) (ls > 0: cDPO, a
    share of flipped labels). Stats: `reward_accuracy` (share of z > 0), `margin` (mean z)."""
    ref_chosen_logps, ref_rejected_logps = ref_chosen_logps.detach(), ref_rejected_logps.detach()
    z = beta * ((chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps))  # (B,)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    with torch.no_grad():
        stats = {"reward_accuracy": (z > 0).to(z.dtype).mean(), "margin": z.mean()}
    return losses.mean(), {k: v.detach() for k, v in stats.items()}


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """-log sigmoid(chosen - rejected - margin), mean over pairs. chosen/rejected (N,).

    `margin` (scalar or (N,)) asks the chosen reward to win by at least that much
    (Llama 2's graded preference strength); None means 0.
    """
    diff = chosen - rejected  # (N,)
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def soft_bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, target: torch.Tensor | float
) -> torch.Tensor:
    """Bradley-Terry with a soft label: BCE-with-logits on (chosen - rejected) against target.

    target 1.0 is exactly `bradley_terry_loss`; 0.5 is a tie, pulling both rewards together.
    """
    diff = chosen - rejected  # (N,)
    target = torch.as_tensor(target, dtype=diff.dtype, device=diff.device).expand_as(diff)
    return F.binary_cross_entropy_with_logits(diff, target)


def reward_centering_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, coef: float
) -> torch.Tensor:
    """coef * mean((chosen + rejected)^2): BT only sees differences, so pin the level near 0."""
    return coef * ((chosen + rejected) ** 2).mean()
