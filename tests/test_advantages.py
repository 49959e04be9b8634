import math

import pytest
import torch

from rlhf_core.advantages import (
    AdaptiveKLController,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    group_advantages,
    kl_estimate,
    logprobs_and_entropy,
    masked_mean,
    masked_var,
    masked_whiten,
    rloo_advantages,
    shape_rewards,
)

DTYPE = torch.float64


def ragged_mask(lengths, T):
    """(B,T) mask with lengths[b] leading ones."""
    return torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=DTYPE)


def gae_loop(rewards, values, lengths, gamma, lam):
    """Reference GAE over plain python floats, one row at a time (CleanRL style)."""
    advantages = []
    for r_row, v_row, n in zip(rewards, values, lengths):
        adv = [0.0] * len(r_row)
        lastgaelam = 0.0
        for t in reversed(range(n)):
            next_value = v_row[t + 1] if t + 1 < n else 0.0  # the episode ends at EOS
            delta = r_row[t] + gamma * next_value - v_row[t]
            lastgaelam = delta + gamma * lam * lastgaelam
            adv[t] = lastgaelam
        advantages.append(adv)
    return advantages


# ---- masked statistics -------------------------------------------------------------------


def test_masked_mean_and_var_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 1e6], [3.0, float("nan"), float("inf")]], dtype=DTYPE)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=DTYPE)
    # real entries 1, 2, 3: mean 2, squared deviations 1 + 0 + 1 = 2
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2.0 / 3.0)
    assert masked_var(x, mask).item() == pytest.approx(1.0)  # 2 / (3 - 1)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.0], dtype=DTYPE))


def test_masked_var_needs_tokens():
    x = torch.ones(1, 3)
    with pytest.raises(ValueError, match="no real tokens"):
        masked_var(x, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, torch.tensor([[1.0, 0.0, 0.0]]))


def test_masked_whiten_mean0_var1_on_real_tokens_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g, dtype=DTYPE) * 3.0 + 5.0
    mask = ragged_mask([6, 4, 1, 3], 6)
    white = masked_whiten(x, mask)
    real = white[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert real.var(unbiased=True).item() == pytest.approx(1.0, abs=1e-6)
    assert (white[~mask.bool()] == 0).all()
    # padding content must not matter
    x_padded = torch.where(mask.bool(), x, torch.full_like(x, 1e9))
    torch.testing.assert_close(masked_whiten(x_padded, mask), white)


def test_masked_whiten_without_shift_keeps_mean():
    x = torch.tensor([[1.0, 3.0, 100.0]], dtype=DTYPE)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=DTYPE)
    # mean 2, unbiased var ((1-2)^2 + (3-2)^2) / 1 = 2 -> whitened -1/sqrt2, +1/sqrt2, then + 2
    out = masked_whiten(x, mask, shift_mean=False)
    s = 1.0 / math.sqrt(2.0)
    torch.testing.assert_close(out, torch.tensor([[2.0 - s, 2.0 + s, 0.0]], dtype=DTYPE))


# ---- GAE -----------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_plain_loop_on_ragged_masks(gamma, lam):
    g = torch.Generator().manual_seed(1)
    lengths, T = [7, 4, 1, 5], 7
    rewards = torch.randn(4, T, generator=g, dtype=DTYPE)
    values = torch.randn(4, T, generator=g, dtype=DTYPE)
    mask = ragged_mask(lengths, T)
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    expected = gae_loop(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor(expected, dtype=DTYPE))
    # returns = advantages + values on real tokens, 0 on padding
    torch.testing.assert_close(returns, (advantages + values) * mask)
    assert (advantages[~mask.bool()] == 0).all()


def test_gae_hand_example():
    # one row, 2 real tokens, gamma 0.5, lam 0.5, values [1, 2], rewards [0, 4]
    # t=1: delta = 4 + 0 - 2 = 2 -> A1 = 2
    # t=0: delta = 0 + 0.5*2 - 1 = 0 -> A0 = 0 + 0.25*2 = 0.5
    rewards = torch.tensor([[0.0, 4.0, 9.0]])
    values = torch.tensor([[1.0, 2.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    advantages, returns = compute_gae(rewards, values, mask, 0.5, 0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.5, 2.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.5, 4.0, 0.0]]))


def test_gae_nothing_flows_past_the_mask():
    g = torch.Generator().manual_seed(2)
    mask = ragged_mask([3, 5, 2], 6)
    rewards = torch.randn(3, 6, generator=g)
    values = torch.randn(3, 6, generator=g)
    adv, ret = compute_gae(rewards, values, mask, 0.99, 0.95)
    padding = ~mask.bool()
    junk = torch.randn(3, 6, generator=g) * 100
    adv2, ret2 = compute_gae(
        torch.where(padding, junk, rewards), torch.where(padding, -junk, values), mask, 0.99, 0.95
    )
    torch.testing.assert_close(adv2, adv)
    torch.testing.assert_close(ret2, ret)


def test_gae_outputs_are_detached_targets():
    rewards = torch.randn(2, 3, requires_grad=True)
    values = torch.randn(2, 3, requires_grad=True)
    adv, ret = compute_gae(rewards, values, torch.ones(2, 3), 1.0, 0.95)
    assert not adv.requires_grad and not ret.requires_grad


# ---- reward shaping ------------------------------------------------------------------------

# Row 0 has 3 real tokens, row 1 has 2 (the last column is padding holding garbage).
LOGPROBS = [[-1.0, -2.0, -0.5], [-0.3, -1.2, -9.0]]
REF_LOGPROBS = [[-1.5, -1.0, -0.5], [-0.1, -1.2, 0.0]]
MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
SCORES = [2.0, -1.0]


def _shape(estimator):
    t = lambda rows: torch.tensor(rows, dtype=DTYPE)  # noqa: E731
    return shape_rewards(t(SCORES), t(LOGPROBS), t(REF_LOGPROBS), t(MASK), 0.1, estimator)


def test_shape_rewards_k1_hand_example():
    rewards, kl = _shape("k1")
    # k1 = logprobs - ref: row0 [0.5, -1.0, 0.0], row1 [-0.2, 0.0, (pad) 0]
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [-0.2, 0.0, 0.0]], dtype=DTYPE))
    # -0.1*kl, score 2.0 on row0's last token (t=2), -1.0 on row1's last real token (t=1)
    expected = [[-0.05, 0.1, 0.0 + 2.0], [0.02, 0.0 - 1.0, 0.0]]
    torch.testing.assert_close(rewards, torch.tensor(expected, dtype=DTYPE))


def test_shape_rewards_k3_hand_example():
    rewards, kl = _shape("k3")
    # log r = ref - logprobs: row0 [-0.5, 1.0, 0.0], row1 [0.2, 0.0]; k3 = e^lr - 1 - lr
    # e^-0.5 - 1 + 0.5 = 0.1065306597, e - 2 = 0.7182818285, e^0.2 - 1.2 = 0.0214027582
    expected_kl = [[0.1065306597, 0.7182818285, 0.0], [0.0214027582, 0.0, 0.0]]
    torch.testing.assert_close(kl, torch.tensor(expected_kl, dtype=DTYPE))
    expected = [[-0.01065306597, -0.07182818285, 2.0], [-0.00214027582, -1.0, 0.0]]
    torch.testing.assert_close(rewards, torch.tensor(expected, dtype=DTYPE))
    assert (kl >= 0).all()


def test_shape_rewards_rejects_empty_rows_and_unknown_estimator():
    scores, lp = torch.zeros(2), torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"rows \[1\].*all-zero mask"):
        shape_rewards(scores, lp, lp, mask, 0.1)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        shape_rewards(scores, lp, lp, torch.ones(2, 3), 0.1, estimator="k2")


# ---- KL controllers, diagnostics -----------------------------------------------------------


def test_adaptive_kl_controller_clips_error():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # kl 12 -> error 12/6 - 1 = 1, clipped to 0.2 -> mult 1 + 0.2*256/10000 = 1.00512
    assert ctl.update(12.0, 256) == pytest.approx(0.2 * 1.00512)
    assert ctl.value == pytest.approx(0.201024)
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # kl 5.4 -> error -0.1 (inside the clip) -> mult 1 - 0.1*100/10000 = 0.999
    ctl.update(5.4, 100)
    assert ctl.value == pytest.approx(0.1998)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 50.0]], dtype=DTYPE)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=DTYPE)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(returns), returns, mask).item() == pytest.approx(0.0)
    # residual [1, 0, 1]: biased var 2/9; returns var 2/3 -> 1 - (2/9)/(2/3) = 2/3
    values = torch.tensor([[0.0, 2.0, 2.0, 0.0]], dtype=DTYPE)
    assert explained_variance(values, returns, mask).item() == pytest.approx(2.0 / 3.0)


def test_entropy_from_logits():
    logits = torch.zeros(2, 3, 4)  # uniform over 4 tokens: entropy ln 4
    torch.testing.assert_close(entropy_from_logits(logits), torch.full((2, 3), math.log(4.0)))
    # two live tokens at p = 1/2 and two banned with -inf: ln 2, and no nan in the gradient
    banned = torch.tensor([[[0.0, 0.0, float("-inf"), float("-inf")]]], requires_grad=True)
    ent = entropy_from_logits(banned)
    assert ent.item() == pytest.approx(math.log(2.0))
    ent.sum().backward()
    assert torch.isfinite(banned.grad).all()


def test_logprobs_and_entropy_from_one_log_softmax():
    # row 0: logits [0, ln 3] -> p = [1/4, 3/4]; row 1: [ln 2, ln 2] -> p = [1/2, 1/2]
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(2.0), math.log(2.0)]]], dtype=DTYPE,
                          requires_grad=True)  # (B=1, T=2, V=2)
    ids = torch.tensor([[1, 0]])
    logprobs, entropy = logprobs_and_entropy(logits, ids)
    torch.testing.assert_close(logprobs, torch.tensor([[math.log(0.75), math.log(0.5)]],
                                                      dtype=DTYPE))
    h0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(entropy, torch.tensor([[h0, math.log(2.0)]], dtype=DTYPE))
    assert not entropy.requires_grad  # a metric: no graph kept for it
    # d log p(id) / d logits = onehot(id) - p
    logprobs.sum().backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[[-0.25, 0.25], [0.5, -0.5]]],
                                                         dtype=DTYPE))
    lp, none = logprobs_and_entropy(logits, ids, with_entropy=False)
    assert none is None
    torch.testing.assert_close(lp.detach(), logprobs.detach())


def test_logprobs_and_entropy_with_banned_tokens_and_entropy_grad():
    banned = torch.tensor([[[0.0, 0.0, float("-inf"), float("-inf")]]], requires_grad=True)
    logprobs, entropy = logprobs_and_entropy(banned, torch.tensor([[1]]), entropy_grad=True)
    assert logprobs.item() == pytest.approx(math.log(0.5))
    assert entropy.item() == pytest.approx(math.log(2.0))
    (logprobs.sum() + entropy.sum()).backward()
    assert torch.isfinite(banned.grad).all()
    # the same entropy as the reference, on random logits of a realistic vocabulary
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 97, generator=g, dtype=DTYPE)
    _, ent = logprobs_and_entropy(logits, torch.zeros(3, 5, dtype=torch.long))
    torch.testing.assert_close(ent, entropy_from_logits(logits))
    p = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1))


# ---- critic-free baselines: GRPO and RLOO --------------------------------------------------


GROUP_SCORES = [1.0, 2.0, 3.0, 6.0, 0.0, 0.0]  # two prompts x G = 3, contiguous


def group_loop(scores, G, fn):
    """Apply fn(score, the other scores of its group, the whole group) with plain python."""
    out = []
    for start in range(0, len(scores), G):
        group = scores[start:start + G]
        for i, s in enumerate(group):
            out.append(fn(s, group[:i] + group[i + 1:], group))
    return out


def test_group_advantages_std_hand_example():
    adv = group_advantages(torch.tensor(GROUP_SCORES, dtype=DTYPE), 3)
    # group [1,2,3]: mean 2, unbiased std sqrt((1+0+1)/2) = 1 -> [-1, 0, 1] / 1.0001
    # group [6,0,0]: mean 2, unbiased std sqrt((16+4+4)/2) = sqrt(12) = 3.4641016
    #   -> [4, -2, -2] / 3.4642016 = [1.1546672, -0.5773336, -0.5773336]
    expected = [-0.99990001, 0.0, 0.99990001, 1.1546672060, -0.5773336030, -0.5773336030]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=DTYPE))

    def by_hand(s, others, group):
        mean = sum(group) / len(group)
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (len(group) - 1))
        return (s - mean) / (std + 1e-4)
    torch.testing.assert_close(adv, torch.tensor(group_loop(GROUP_SCORES, 3, by_hand),
                                                 dtype=DTYPE))


def test_group_advantages_without_scale_and_equal_scores():
    adv = group_advantages(torch.tensor(GROUP_SCORES, dtype=DTYPE), 3, scale="none")
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 4.0, -2.0, -2.0], dtype=DTYPE))
    # a group whose samples all scored the same teaches nothing: 0, not nan (std 0 + 1e-4)
    same = group_advantages(torch.tensor([5.0, 5.0, 1.0, 3.0], dtype=DTYPE), 2)
    torch.testing.assert_close(same, torch.tensor([0.0, 0.0, -1 / (math.sqrt(2) + 1e-4),
                                                   1 / (math.sqrt(2) + 1e-4)], dtype=DTYPE))


def test_rloo_advantages_hand_example():
    adv = rloo_advantages(torch.tensor(GROUP_SCORES, dtype=DTYPE), 3)
    # [1,2,3]: 1-(2+3)/2 = -1.5, 2-(1+3)/2 = 0, 3-(1+2)/2 = 1.5
    # [6,0,0]: 6-(0+0)/2 = 6, 0-(6+0)/2 = -3, -3
    torch.testing.assert_close(adv, torch.tensor([-1.5, 0.0, 1.5, 6.0, -3.0, -3.0], dtype=DTYPE))
    loop = group_loop(GROUP_SCORES, 3, lambda s, others, _: s - sum(others) / len(others))
    torch.testing.assert_close(adv, torch.tensor(loop, dtype=DTYPE))
    # G = 2: each sample against the other one
    torch.testing.assert_close(rloo_advantages(torch.tensor([1.0, 4.0]), 2),
                               torch.tensor([-3.0, 3.0]))


def test_group_baselines_reject_bad_shapes():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.zeros(3), 1)
    assert group_advantages(torch.tensor([3.0, 4.0]), 1, scale="none").tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="unknown scale"):
        group_advantages(torch.zeros(4), 2, scale="mad")


def test_kl_estimate_k1_k3():
    lp = torch.tensor([-1.0, -2.0], dtype=DTYPE)
    ref = torch.tensor([-0.5, -3.0], dtype=DTYPE)
    torch.testing.assert_close(kl_estimate(lp, ref, "k1"), torch.tensor([-0.5, 1.0], dtype=DTYPE))
    # log r = ref - lp = [0.5, -1]: e^0.5 - 1.5 = 0.1487212707, e^-1 - 1 + 1 = 0.3678794412
    torch.testing.assert_close(kl_estimate(lp, ref, "k3"),
                               torch.tensor([0.1487212707, 0.3678794412], dtype=DTYPE))
