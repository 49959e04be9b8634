"""`ppo.critic = "trunk"`: PPO's critic as a value head on the policy adapter's hidden states
(issue 14), on the tiny Llama with synthetic rewards (as test_ppo.py)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlhf_core import models
from rlhf_core.policy.ppo import ppo_round
from rlhf_core.policy.rollout import critic_values, generate, policy_logprobs, trunk_forward
from rlhf_core.policy.setup import adapter_params, check_trunk_model
from rlhf_core.worker.runtime import Runtime
from tests.test_ppo import (  # noqa: F401 (ppo_model_dir, runtime are fixtures)
    LEARNING,
    TINY,
    assert_rounds_raise_mean_reward,
    direction_reward,
    evaluate,
    fixed_batch,
    low_id_reward,
    make_runtime,
    ppo_model_dir,
    runtime,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TRUNK = replace(TINY, critic="trunk")


def test_trunk_forward_equals_the_two_separate_forwards(runtime):
    """One pass gives the LM head's log-probs and the value head's values: each equals its own
    forward (policy_logprobs, critic_values) on the same adapter, at a temperature != 1."""
    model = runtime.model
    with torch.no_grad():
        for p in adapter_params(model, "policy").values():
            p.normal_(0.0, 0.05)  # LoRA B != 0: the adapter changes the hidden states
    head = models.ScalarHead(runtime.hidden_size, init_std=0.5, seed=1)
    batch = fixed_batch(runtime)
    model.set_adapter("policy")
    with torch.no_grad():
        logprobs, entropy, values = trunk_forward(model, head, batch, 0.7, with_entropy=True)
        ref_lp, ref_ent = policy_logprobs(model, batch, 0.7, with_entropy=True)
        ref_values = critic_values(model, head, batch)
        with runtime.reference():
            base_lp, _ = policy_logprobs(model, batch, 0.7)
    torch.testing.assert_close(logprobs, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-5)
    assert (logprobs - base_lp).abs().max() > 1e-3  # it read the adapter, not the base


def test_values_recorded_while_decoding_equal_a_forward(runtime):
    """The decode loop's values (the head on the float32 hidden state that produced each
    draw) equal `critic_values` over the finished rollout, padding 0; rows that stop early and
    a repeated prompt included."""
    model = runtime.model
    with torch.no_grad():
        for p in adapter_params(model, "policy").values():
            p.normal_(0.0, 0.05)
    head = models.ScalarHead(runtime.hidden_size, init_std=0.5, seed=2)
    model.set_adapter("policy")
    prompts = ["hello there", "say something about the sea", "hello there", "lists"]
    rollout = generate(model, runtime.tokenizer, prompts, [1, 2, 3, 4], max_new_tokens=10,
                       temperature=1.0, max_prompt_tokens=64, batch_size=4, device="cpu",
                       record_logprobs=True, value_head=head)
    assert rollout.values is not None and rollout.values.shape == rollout.mask.shape
    with torch.no_grad():
        expected = critic_values(model, head, rollout) * rollout.mask
    torch.testing.assert_close(rollout.values, expected, rtol=1e-4, atol=1e-4)
    assert expected.abs().max() > 0.1  # a head that says something
    assert (rollout.values[rollout.mask == 0] == 0).all()


def count_backbone_passes(model) -> list:
    calls = []
    base = model.get_base_model()
    backbone = getattr(base, base.base_model_prefix)
    backbone.register_forward_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    return calls


def test_trunk_round_publishes_a_head_only_critic_in_one_pass_per_minibatch(runtime):
    calls = count_backbone_passes(runtime.model)
    # (without the shared-prefix pass, which would add one small call per forward)
    result = ppo_round(runtime, config=replace(TRUNK, prefix_cache=False),
                       reward_fn=low_id_reward)
    m = result["metrics"]
    assert result["status"] == "published" and m["critic_init"] == "fresh"
    assert m["first_ratio"] == pytest.approx(1.0, abs=1e-5)  # still on-policy at step 1
    assert "value" not in runtime.model.peft_config  # no value adapter was made
    # training: one forward (with grad) per minibatch, where the adapter critic needs two;
    # scoring: the reference's forward per chunk of minibatch_size rows and nothing of the
    # policy's (the decode loop recorded its log-probs and values)
    assert sum(calls) == m["ppo_steps"] == TINY.epochs * 2
    assert calls.count(False) == 8 // TINY.minibatch_size
    for k in ("vf_loss", "explained_variance", "pg_loss", "entropy"):
        assert torch.isfinite(torch.tensor(m[k])), k
    path = Path(result["path"])
    assert (path / "value" / models.HEAD_FILE).is_file()
    assert not (path / "value" / "adapter_model.safetensors").exists()
    manifest = json.loads((path / "version.json").read_text())
    assert manifest["config"]["critic"] == "trunk"
    assert runtime.data.store.get_version("policy", 1)["config"]["critic"] == "trunk"


def test_adapter_round_makes_two_passes_per_minibatch(runtime):
    """The counterpart of the test above (the count is what the trunk critic saves)."""
    calls = count_backbone_passes(runtime.model)
    result = ppo_round(runtime, config=replace(TINY, epochs=1, prefix_cache=False),
                       reward_fn=low_id_reward)
    assert sum(calls) == 2 * result["metrics"]["ppo_steps"]


def test_value_loss_trains_the_head_and_never_the_policy(ppo_model_dir, tmp_path):
    """The trunk critic's head reads detached hidden states: the same first round with vf_coef
    0 and 1 publishes the same policy and different heads (gradient clipping off: the clip is
    over the global norm of policy and critic parameters). From v0 the fresh trunk critic and
    the fresh adapter critic compute the same values (the same seeded head on identity
    adapters), so the adapter round publishes that same policy too."""
    from safetensors.torch import load_file

    def after(critic: str, vf_coef: float) -> tuple[dict, torch.Tensor]:
        rt = make_runtime(ppo_model_dir, tmp_path / f"{critic}-{vf_coef}")
        cfg = replace(TINY, epochs=1, critic=critic, vf_coef=vf_coef, max_grad_norm=1e9)
        result = ppo_round(rt, config=cfg, reward_fn=low_id_reward)
        rt.data.store.close()
        path = Path(result["path"])
        head = models.load_head(path / "value", rt.hidden_size).linear.weight.detach()
        return load_file(str(path / "policy" / "adapter_model.safetensors")), head

    def differ(a, b) -> float:
        return max((a[k] - b[k]).abs().max().item() for k in a)
    (p0, h0), (p1, h1) = after("trunk", 0.0), after("trunk", 1.0)
    assert differ(p0, p1) < 1e-6
    assert (h0 - h1).abs().max() > 1e-6  # the head did learn from the value loss
    adapter_policy, _ = after("adapter", 1.0)
    assert differ(p1, adapter_policy) < 1e-6


def test_next_round_continues_the_head_from_disk_and_mixing_critics_starts_fresh(runtime):
    # a gentler lr than TINY's: five rounds in a row on the tiny model, gates included
    trunk, adapter = replace(TRUNK, epochs=1, lr=2e-3), replace(TINY, epochs=1, lr=2e-3)
    first = ppo_round(runtime, config=trunk, reward_fn=low_id_reward)
    saved_head = models.load_head(Path(first["path"]) / "value", runtime.hidden_size)
    fresh = Runtime(runtime.data.store, runtime.config, cpu=True)  # a restarted worker
    second = ppo_round(fresh, config=trunk, reward_fn=low_id_reward)
    assert second["parent"] == 1 and second["metrics"]["critic_init"] == "continued"
    assert second["metrics"]["first_ratio"] == pytest.approx(1.0, abs=1e-5)
    # the head it started from was v1's: the explained variance of the round's first values
    # is computed from it, and the published v2 head moved on from it
    v2_head = models.load_head(Path(second["path"]) / "value", runtime.hidden_size)
    assert not torch.equal(saved_head.linear.weight, v2_head.linear.weight)
    # same worker, next round, same critic: continued in memory
    third = ppo_round(fresh, config=trunk, reward_fn=low_id_reward)
    assert third["metrics"]["critic_init"] == "continued"
    # an adapter critic after trunk rounds has no value adapter to continue: a fresh one
    fourth = ppo_round(fresh, config=adapter, reward_fn=low_id_reward)
    assert fourth["metrics"]["critic_init"] == "fresh"
    # and a trunk round after it does not take the adapter critic's head
    fifth = ppo_round(fresh, config=trunk, reward_fn=low_id_reward)
    assert fifth["metrics"]["critic_init"] == "fresh"


def test_trunk_rounds_raise_mean_reward(runtime):
    """The trunk critic learns as the adapter critic does (test_ppo's
    test_rounds_raise_mean_reward, same settings and threshold)."""
    assert_rounds_raise_mean_reward(runtime, replace(LEARNING, critic="trunk"))


def test_models_whose_logits_are_not_the_plain_projection_are_refused(runtime):
    model = runtime.model
    check_trunk_model(model)  # the tiny Llama: fine
    model.get_base_model().config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="ppo.critic=adapter"):
        ppo_round(runtime, config=TRUNK, reward_fn=low_id_reward)
    assert runtime.data.store.current_version("policy")["version"] == 0  # nothing published
