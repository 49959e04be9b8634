import math

import pytest
import torch

from rlhf_core.losses import (
    bradley_terry_loss,
    dpo_loss,
    grpo_loss,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    reward_centering_loss,
    soft_bradley_terry_loss,
)

DTYPE = torch.float64


def softplus_neg(x: float) -> float:
    """-log sigmoid(x) = log(1 + exp(-x)), the Bradley-Terry loss of one pair."""
    return math.log(1.0 + math.exp(-x))


# ---- PPO policy loss -----------------------------------------------------------------------


def policy_example():
    # ratios 1.5, 0.5, 1.1, 0.5 on real tokens; the 5th token is padding with absurd numbers
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.5, 3.0]], dtype=DTYPE)
    old_logprobs = torch.tensor([[-1.0, -2.0, -0.3, -0.7, -5.0]], dtype=DTYPE)
    logprobs = (old_logprobs + ratios.log()).requires_grad_()
    advantages = torch.tensor([[1.0, 2.0, -1.0, -1.0, 100.0]], dtype=DTYPE)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]], dtype=DTYPE)
    return logprobs, old_logprobs, advantages, mask


def test_ppo_policy_loss_hand_example():
    logprobs, old_logprobs, advantages, mask = policy_example()
    loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
    # t0: A=+1, r=1.5: -1.5 vs clipped -1.2 -> -1.2 (clipped branch active)
    # t1: A=+2, r=0.5: -1.0 vs clipped -1.6 -> -1.0
    # t2: A=-1, r=1.1:  1.1 vs clipped  1.1 -> 1.1 (inside the trust region)
    # t3: A=-1, r=0.5:  0.5 vs clipped  0.8 -> 0.8 (clipped branch active)
    # mean (-1.2 - 1.0 + 1.1 + 0.8) / 4 = -0.075
    assert loss.item() == pytest.approx(-0.075)
    assert stats["clipfrac"].item() == pytest.approx(0.5)  # t0 and t3
    # 0.5 * mean(ln1.5^2, ln0.5^2, ln1.1^2, ln0.5^2)
    # = 0.5 * (0.164402 + 0.480453 + 0.009084 + 0.480453) / 4 = 0.141799
    assert stats["approx_kl"].item() == pytest.approx(0.14179900151, rel=1e-9)
    assert stats["ratio_mean"].item() == pytest.approx(0.9)  # (1.5+0.5+1.1+0.5)/4
    for value in stats.values():
        assert value.dim() == 0 and not value.requires_grad


def test_ppo_policy_loss_ratio_one():
    g = torch.Generator().manual_seed(0)
    logprobs = torch.randn(3, 4, generator=g, dtype=DTYPE)
    advantages = torch.randn(3, 4, generator=g, dtype=DTYPE)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=DTYPE)
    loss, stats = ppo_policy_loss(logprobs, logprobs.clone(), advantages, mask, 0.2)
    real = advantages[mask.bool()].tolist()  # 7 real tokens
    assert loss.item() == pytest.approx(-sum(real) / len(real))
    assert stats["approx_kl"].item() == 0.0
    assert stats["clipfrac"].item() == 0.0
    assert stats["ratio_mean"].item() == pytest.approx(1.0)


def test_ppo_policy_loss_gradient_flows_to_real_tokens_only():
    logprobs, old_logprobs, advantages, mask = policy_example()
    loss, _ = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2)
    loss.backward()
    grad = logprobs.grad[0]
    # clipped tokens (t0, t3) and padding get no gradient; t1: d(-A r)/dlogp / 4 = -2*0.5/4
    torch.testing.assert_close(grad, torch.tensor([0.0, -0.25, 0.275, 0.0, 0.0], dtype=DTYPE))


# ---- PPO value loss ------------------------------------------------------------------------


def test_ppo_value_loss_hand_example():
    values = torch.tensor([[1.0, 1.0, 0.1, 100.0]], dtype=DTYPE, requires_grad=True)
    old_values = torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=DTYPE)
    returns = torch.tensor([[0.0, 2.0, 1.0, 0.0]], dtype=DTYPE)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=DTYPE)
    loss, stats = ppo_value_loss(values, old_values, returns, mask, clip_eps=0.2)
    # t0: v=1, clip -> 0.7, R=0: (1)^2=1.0 vs 0.49 -> 1.0
    # t1: v=1, clip -> 0.7, R=2: (1)^2=1.0 vs 1.69 -> 1.69 (clipped strictly larger)
    # t2: v=0.1 within old+-0.2, R=1: 0.81 vs 0.81 -> 0.81 (equal: not counted)
    # 0.5 * (1.0 + 1.69 + 0.81) / 3 = 0.583333
    assert loss.item() == pytest.approx(0.5 * 3.5 / 3)
    assert stats["vf_clipfrac"].item() == pytest.approx(1.0 / 3.0)
    assert stats["vf_clipfrac"].dim() == 0 and not stats["vf_clipfrac"].requires_grad
    loss.backward()
    # t0: 0.5 * 2(v-R) / 3 = 1/3; t1: clipped branch is constant in v -> 0; t2: (0.1-1)/3
    torch.testing.assert_close(values.grad, torch.tensor([[1 / 3, 0.0, -0.3, 0.0]], dtype=DTYPE))


# ---- Bradley-Terry -------------------------------------------------------------------------


def test_bradley_terry_matches_log1p_exp():
    chosen = torch.tensor([1.0, 0.0, -0.5], dtype=DTYPE)
    rejected = torch.tensor([0.0, 0.0, 0.5], dtype=DTYPE)
    # differences 1, 0, -1
    expected = (softplus_neg(1.0) + softplus_neg(0.0) + softplus_neg(-1.0)) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected)
    assert softplus_neg(0.0) == pytest.approx(math.log(2.0))  # an even pair costs ln 2


def test_bradley_terry_margin_scalar_and_per_pair():
    chosen = torch.tensor([1.0, 2.0], dtype=DTYPE)
    rejected = torch.tensor([0.0, 0.0], dtype=DTYPE)
    # per-pair margins 0.5 and 3: effective differences 0.5 and -1
    margin = torch.tensor([0.5, 3.0], dtype=DTYPE)
    expected = (softplus_neg(0.5) + softplus_neg(-1.0)) / 2
    assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(expected)
    # scalar margin 1: differences 0 and 1
    expected = (softplus_neg(0.0) + softplus_neg(1.0)) / 2
    assert bradley_terry_loss(chosen, rejected, 1.0).item() == pytest.approx(expected)


def test_bradley_terry_gradient_pushes_chosen_up():
    chosen = torch.zeros(2, requires_grad=True)
    rejected = torch.zeros(2, requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    # d/dx log(1+e^-x) at 0 = -1/2, averaged over 2 pairs -> -0.25
    torch.testing.assert_close(chosen.grad, torch.full((2,), -0.25))
    torch.testing.assert_close(rejected.grad, torch.full((2,), 0.25))


def test_soft_bradley_terry():
    chosen = torch.tensor([1.0, 0.0, -2.0], dtype=DTYPE)
    rejected = torch.tensor([0.0, 0.0, 1.0], dtype=DTYPE)
    # target 1 is the hard loss
    hard = bradley_terry_loss(chosen, rejected)
    assert soft_bradley_terry_loss(chosen, rejected, 1.0).item() == pytest.approx(hard.item())
    # target 0.5 at difference x: 0.5*log(1+e^-x) + 0.5*log(1+e^x); x = 1, 0, -3
    tie = [0.5 * (softplus_neg(x) + softplus_neg(-x)) for x in (1.0, 0.0, -3.0)]
    loss = soft_bradley_terry_loss(chosen, rejected, 0.5)
    assert loss.item() == pytest.approx(sum(tie) / 3)
    # a tie is symmetric and per-pair targets broadcast
    assert soft_bradley_terry_loss(rejected, chosen, 0.5).item() == pytest.approx(loss.item())
    targets = torch.tensor([1.0, 0.5, 0.0], dtype=DTYPE)
    # x = 1 target 1; x = 0 tie; x = -3 target 0 -> log(1+e^-3)
    expected = (softplus_neg(1.0) + math.log(2.0) + softplus_neg(3.0)) / 3
    assert soft_bradley_terry_loss(chosen, rejected, targets).item() == pytest.approx(expected)


def test_soft_bradley_terry_tie_gradient_pulls_together():
    chosen = torch.tensor([1.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    soft_bradley_terry_loss(chosen, rejected, 0.5).backward()
    # d/dx = sigmoid(1) - 0.5 = 0.2310586 > 0: gradient descent lowers the higher reward
    assert chosen.grad.item() == pytest.approx(1 / (1 + math.exp(-1.0)) - 0.5)


def test_reward_centering_loss():
    chosen = torch.tensor([1.0, 2.0])
    rejected = torch.tensor([-1.0, 1.0])
    # sums 0 and 3 -> mean(0, 9) = 4.5, times coef 0.01
    assert reward_centering_loss(chosen, rejected, 0.01).item() == pytest.approx(0.045)


def test_masked_mean_ignores_padding():
    x = torch.tensor([[2.0, 4.0, 99.0]])
    assert masked_mean(x, torch.tensor([[1.0, 1.0, 0.0]])).item() == pytest.approx(3.0)


# ---- GRPO ----------------------------------------------------------------------------------


def grpo_example():
    # row 0: A = +1, ratios 1.5, 1.0; row 1: A = -2, ratio 0.5, then padding with absurd numbers
    old = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]], dtype=DTYPE)
    ratios = torch.tensor([[1.5, 1.0], [0.5, 7.0]], dtype=DTYPE)
    logprobs = (old + ratios.log()).detach().requires_grad_()
    # log r = ref - logprobs on real tokens: 0.5, 0.0, -1.0
    ref = (logprobs.detach() + torch.tensor([[0.5, 0.0], [-1.0, 30.0]], dtype=DTYPE))
    advantages = torch.tensor([1.0, -2.0], dtype=DTYPE)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=DTYPE)
    return logprobs, old, ref, advantages, mask


def test_grpo_loss_hand_example():
    logprobs, old, ref, advantages, mask = grpo_example()
    loss, stats = grpo_loss(logprobs, old, ref, advantages, mask, clip_eps=0.2, kl_coef=0.1)
    # clipped surrogate per token:
    #   (0,0) A=+1, r=1.5: max(-1.5, -1.2) = -1.2 (clipped branch)
    #   (0,1) A=+1, r=1.0: -1.0
    #   (1,0) A=-2, r=0.5: max(1.0, 1.6) = 1.6 (clipped branch)     mean -0.6/3 = -0.2
    # k3 = e^(log r) - 1 - log r: e^0.5 - 1.5 = 0.1487212707, 0, e^-1 = 0.3678794412
    #   mean 0.5166007119 / 3 = 0.1722002373
    # loss = -0.2 + 0.1 * 0.1722002373 = -0.1827799763
    assert loss.item() == pytest.approx(-0.1827799763, rel=1e-9)
    assert stats["kl"].item() == pytest.approx(0.1722002373, rel=1e-9)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["pg_loss"].item() == pytest.approx(-0.2)
    loss.backward()
    # d/dlp: the clipped tokens give no surrogate gradient, (0,1) gives -A*r/3 = -1/3;
    # d k3/d lp = 1 - e^(log r), times 0.1/3: (0,0) 0.1*(1-e^0.5)/3 = -0.0216240424,
    # (1,0) 0.1*(1-e^-1)/3 = 0.0210706853; padding: 0
    expected = [[-0.0216240424, -1 / 3], [0.0210706853, 0.0]]
    torch.testing.assert_close(logprobs.grad, torch.tensor(expected, dtype=DTYPE))


def test_grpo_loss_on_policy_is_minus_mean_advantage_per_token():
    """ratio 1 and logprobs = ref: the loss is the token-weighted mean of -A (no KL)."""
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]], dtype=DTYPE)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=DTYPE)
    loss, stats = grpo_loss(lp, lp.clone(), lp.clone(), torch.tensor([0.5, -1.0], dtype=DTYPE),
                            mask, 0.2, 0.5)
    # 3 tokens of -0.5 and one of +1.0: (-1.5 + 1.0) / 4 = -0.125
    assert loss.item() == pytest.approx(-0.125)
    assert stats["kl"].item() == 0.0 and stats["approx_kl"].item() == 0.0


# ---- DPO -----------------------------------------------------------------------------------


def dpo_example():
    t = lambda xs: torch.tensor(xs, dtype=DTYPE)  # noqa: E731
    chosen = t([-10.0, -8.0]).requires_grad_()
    rejected = t([-14.0, -6.0]).requires_grad_()
    return chosen, rejected, t([-11.0, -9.0]), t([-13.0, -8.0])


def test_dpo_loss_hand_example():
    chosen, rejected, ref_chosen, ref_rejected = dpo_example()
    loss, stats = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)
    # pair 0: (-10+14) - (-11+13) = 4 - 2 = 2 -> z = 1.0; pair 1: -2 - (-1) = -1 -> z = -0.5
    # loss = mean(log(1+e^-z)) = (0.3132616875 + 0.9740769842) / 2 = 0.6436693358
    z = [1.0, -0.5]
    assert loss.item() == pytest.approx(sum(softplus_neg(x) for x in z) / 2, rel=1e-12)
    assert loss.item() == pytest.approx(0.6436693358, rel=1e-9)
    assert stats["reward_accuracy"].item() == 0.5 and stats["margin"].item() == 0.25
    loss.backward()
    # d loss / d chosen = -beta * sigmoid(-z) / B: -0.25*0.2689414214, -0.25*0.6224593312
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.0672353553, -0.1556148328],
                                                         dtype=DTYPE))
    torch.testing.assert_close(rejected.grad, -chosen.grad)


def test_dpo_loss_label_smoothing_and_detached_reference():
    chosen, rejected, ref_chosen, ref_rejected = dpo_example()
    ref_chosen.requires_grad_()
    loss, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5, label_smoothing=0.1)
    # per pair 0.9*log(1+e^-z) + 0.1*log(1+e^z): z=1: 0.9*0.3132616875 + 0.1*1.3132616875
    # = 0.4132616875; z=-0.5: 0.9*0.9740769842 + 0.1*0.4740769842 = 0.9240769842
    assert loss.item() == pytest.approx((0.4132616875 + 0.9240769842) / 2, rel=1e-9)
    loss.backward()
    assert ref_chosen.grad is None  # the reference is a constant
