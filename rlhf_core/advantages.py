"""Pure PPO math for RLHF: masked statistics, KL-shaped rewards, GAE and the KL controller.

Shapes: `B` sequences, `T` response tokens. `mask` is 1.0 on real response tokens (up to and
including the EOS/stop token) and 0.0 on the padding after it. Nothing here imports anything but
torch (DESIGN.md: advantages and losses are both pure), so every function can be checked on
hand-made tensors; `losses` takes its masked helpers from here.
"""

import torch

WHITEN_EPS = 1e-8


def zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # `where`, not `x * mask`: padding may hold inf/nan (e.g. logprobs of pad tokens) and
    # 0 * inf = nan would poison every masked sum.
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over entries where `mask` is non-zero (all of them, or along `dim`).

    An all-zero mask gives nan (0/0) rather than raising, so no GPU sync is forced here.
    """
    mask = mask.to(x.dtype)
    total = (zero_padding(x, mask) * mask).sum(dim=dim)  # () or x.shape without `dim`
    return total / mask.sum(dim=dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over the masked entries; Bessel-corrected when `unbiased`."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    # One .item() sync: a silent nan variance would whiten every advantage into nan.
    if n.item() == 0:
        raise ValueError("masked_var: the mask has no real tokens, the variance is undefined")
    if unbiased and n.item() == 1:
        raise ValueError("masked_var: an unbiased variance needs at least 2 real tokens, got 1")
    mean = masked_mean(x, mask)  # ()
    var = masked_mean((x - mean) ** 2, mask)  # () biased
    if unbiased:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise `x` to mean 0 / unbiased variance 1 over the masked entries.

    `shift_mean=False` adds the mean back (TRL's choice for rewards: rescale, keep the sign).
    Padding is ignored by the statistics and returned as 0, so it can never leak downstream.
    """
    mean = masked_mean(x, mask)  # ()
    var = masked_var(x, mask, unbiased=True)  # ()
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)  # (B,T)
    if not shift_mean:
        whitened = whitened + mean
    return zero_padding(whitened, mask)


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens -> (advantages, returns), (B,T).

    Rewards and values past the mask are treated as 0 and the value after the last real token
    (the bootstrap) is 0: the episode ends at EOS, so nothing flows back from padding.
    `returns = advantages + values` on real tokens; both are 0 on padding.
    Inputs are detached: advantages and returns are fixed targets for the PPO epochs, and a
    gradient through them would train the critic to move its own target.
    """
    mask = mask.to(values.dtype).detach()
    rewards = zero_padding(rewards.detach(), mask)  # (B,T)
    values = zero_padding(values.detach(), mask)  # (B,T)
    T = rewards.shape[1]
    lastgaelam = torch.zeros_like(rewards[:, 0])  # (B,)
    advantages_reversed = []
    for t in reversed(range(T)):
        # value of the next token, 0 past the end or on padding (masked above)
        next_values = values[:, t + 1] if t + 1 < T else torch.zeros_like(lastgaelam)  # (B,)
        delta = rewards[:, t] + gamma * next_values - values[:, t]  # (B,)
        lastgaelam = (delta + gamma * lam * lastgaelam) * mask[:, t]  # (B,) 0 on padding
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B,T)
    returns = advantages + values  # (B,T), values already 0 on padding
    return advantages, returns


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,T) mask -> (B,) index of the last real token; raises on rows without one."""
    real = mask > 0  # (B,T)
    empty = ~real.any(dim=1)  # (B,)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have an all-zero mask: no real token, so no last one")
    # cumsum peaks first at the last real token; argmax returns that first peak
    return real.long().cumsum(dim=1).argmax(dim=1)  # (B,)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from the sampled tokens' log-probs, same shape.

    k1 = logprobs - ref_logprobs (unbiased, can be negative per token);
    k3 = (r - 1) - log r with r = exp(ref_logprobs - logprobs) (unbiased and always >= 0).
    """
    log_ratio = logprobs - ref_logprobs  # log pi/pi_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        log_r = -log_ratio  # log pi_ref/pi
        return torch.expm1(log_r) - log_r  # expm1 keeps precision when r is close to 1
    raise ValueError(f"unknown KL estimator {estimator!r}, use 'k1' or 'k3'")


def shape_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards = -kl_coef * kl, plus the sequence score at the last real token.

    scores (B,), logprobs / ref_logprobs / mask (B,T) -> (rewards, kl), both (B,T), 0 on padding.
    `estimator`: "k1" or "k3" (see `kl_estimate`).
    """
    kl = zero_padding(kl_estimate(logprobs, ref_logprobs, estimator), mask)  # (B,T)
    last = last_token_index(mask)  # (B,)
    score_col = scores.to(kl.dtype).reshape(-1, 1)  # (B,1)
    # the reward model judges the whole response, so its score lands on the token that ends it
    score_at_last = torch.zeros_like(kl).scatter(1, last.unsqueeze(1), score_col)  # (B,T)
    rewards = -kl_coef * kl + score_at_last  # (B,T)
    return rewards, kl


class AdaptiveKLController:
    """Proportional KL controller (Ziegler et al. 2019): steer the observed KL towards `target`.

    The error is clipped to +-0.2 so one outlier batch cannot swing the coefficient.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over real tokens; a 0-dim diagnostic.

    1 is a perfect critic, 0 is no better than a constant, negative is worse. nan when the
    returns are constant (the ratio is undefined). Detached: it is a metric, not a loss.
    """
    values, returns = values.detach(), returns.detach()
    # the biased/unbiased factor cancels in the ratio; biased avoids the n == 1 error
    var_returns = masked_var(returns, mask, unbiased=False)  # ()
    var_residual = masked_var(returns - values, mask, unbiased=False)  # ()
    if var_returns.item() == 0:
        return torch.tensor(float("nan"), dtype=returns.dtype, device=returns.device)
    return 1.0 - var_residual / var_returns


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B,T,V) logits -> (B,T) entropy of the softmax, in nats."""
    return entropy_from_logp(torch.log_softmax(logits, dim=-1))


def entropy_from_logp(logp: torch.Tensor) -> torch.Tensor:
    """(...,V) log-probabilities -> (...) entropy, in nats, as a dot product of p and log p
    (no (...,V) product tensor). Differentiable."""
    p = logp.exp()  # (...,V)
    if torch.isneginf(logp).any():
        # tokens banned with -inf logits have p = 0 and logp = -inf: zero logp *before* the
        # product so neither the value (0 * -inf) nor its gradient becomes nan
        logp = torch.where(p > 0, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    return -(p.unsqueeze(-2) @ logp.unsqueeze(-1)).squeeze(-1).squeeze(-1)  # (...)


def logprobs_and_entropy(logits: torch.Tensor, ids: torch.Tensor, *, with_entropy: bool = True,
                         entropy_grad: bool = False):
    """(B,T,V) logits and (B,T) token ids -> (logprobs (B,T), entropy (B,T) or None) from ONE
    log-softmax: the log-prob of each id (gathered, differentiable) and the softmax's entropy
    (detached unless `entropy_grad`: a PPO metric, not a loss term)."""
    logp = torch.log_softmax(logits, dim=-1)  # (B,T,V): the one full-vocabulary copy
    logprobs = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (B,T)
    if not with_entropy:
        return logprobs, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = entropy_from_logp(logp if entropy_grad else logp.detach())  # (B,T)
    return logprobs, entropy


# -- critic-free baselines: K samples of one prompt judge each other -------------------------------
def _groups(scores: torch.Tensor, group_size: int, least: int) -> torch.Tensor:
    """(B,) -> (B/G, G), the G samples of one prompt in a row; checks B and G."""
    if group_size < least:
        raise ValueError(f"group_size must be at least {least}, got {group_size}")
    if scores.dim() != 1 or scores.shape[0] % group_size:
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not split into groups of "
                         f"{group_size}: pass (B,) with B a multiple of group_size")
    return scores.reshape(-1, group_size)


def group_advantages(scores: torch.Tensor, group_size: int, scale: str = "std") -> torch.Tensor:
    """GRPO's advantage (B,): each score minus its group's mean, divided by (the group's unbiased
    std + 1e-4) with `scale="std"`, not divided with `"none"` (Dr. GRPO). The `group_size`
    samples of one prompt are contiguous in `scores` (B,)."""
    if scale not in ("std", "none"):
        raise ValueError(f"group_advantages: unknown scale {scale!r}, use 'std' or 'none'")
    groups = _groups(scores, group_size, 2 if scale == "std" else 1)  # (B/G, G)
    centered = groups - groups.mean(dim=1, keepdim=True)  # (B/G, G)
    if scale == "std":  # a group of equal scores has std 0: advantages 0, not nan
        centered = centered / (groups.std(dim=1, keepdim=True) + 1e-4)
    return centered.reshape(-1)  # (B,)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (B,): each score minus the mean of the other `group_size - 1`
    scores of its group (contiguous in `scores`), an unbiased baseline without a critic."""
    groups = _groups(scores, group_size, 2)  # (B/G, G)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)  # (B/G, G)
    return (groups - others).reshape(-1)  # (B,)
