"""`ppo.critic_layers`: the value adapter on the top decoder layers only, its forwards entering
there from the reference's hidden states (issue 14), on a 4-layer tiny Llama with synthetic
rewards (as test_ppo.py)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlhf_core import models
from rlhf_core.policy.experience import rows_layout
from rlhf_core.policy.ppo import ppo_round
from rlhf_core.policy.rollout import LayerStates, critic_values, policy_logprobs
from rlhf_core.policy.setup import adapter_params
from rlhf_core.worker.runtime import Runtime
from tests.test_ppo import (
    LEARNING,
    TINY,
    assert_rounds_raise_mean_reward,
    low_id_reward,
    make_runtime,
    two_process_round,
)
from tests.test_trunk_critic import count_backbone_passes

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOP2 = replace(TINY, critic_layers=2)  # of 4 layers: the value adapter on layers 2 and 3


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory):
    """test_ppo's tiny Llama (10x embeddings) with 4 layers, so there are layers to skip."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import build_tiny_model
    path = build_tiny_model(tmp_path_factory.mktemp("deep") / "model", layers=4)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)
    model.save_pretrained(path)
    return path


@pytest.fixture
def deep(deep_model_dir, tmp_path):
    rt = make_runtime(deep_model_dir, tmp_path / "ws")
    yield rt
    rt.data.store.close()


def value_adapter_on(rt: Runtime, layers: list[int]) -> None:
    """A value adapter on `layers` with non-zero LoRA weights, and a value head."""
    rt.ensure_fresh_adapter("value", layers)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter_params(rt.model, "value").values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    rt.heads["value"] = models.ScalarHead(rt.hidden_size, init_std=0.5, seed=1)


def sampled_batch(rt: Runtime):
    """Eight rollout rows of different prompt and answer lengths (sharing the chat template's
    prefix)."""
    from rlhf_core.policy.rollout import generate
    prompts = ["hello world", "write a short poem about the sea", "one two", "python code",
               "the quick brown fox jumps", "yes", "how are you today", "list dict"]
    rt.model.set_adapter("policy")
    with torch.no_grad():
        return generate(rt.model, rt.tokenizer, prompts, list(range(8)), max_new_tokens=6,
                        temperature=1.0, max_prompt_tokens=64, batch_size=8, device="cpu")


@pytest.mark.parametrize("capture_cached,enter_cached", [(False, False), (True, True),
                                                         (True, False), (False, True)])
def test_values_entering_at_the_top_layers_equal_a_full_forward(deep, capture_cached,
                                                                enter_cached):
    """A value adapter on layers 2-3 of 4 computes, below layer 2, what the reference computes:
    its values from the reference's kept states equal its own full forward, for the whole
    batch and for a minibatch of it (trimmed to its own width), the shared prefix cached or
    not on either side."""
    rt = deep
    value_adapter_on(rt, [2, 3])
    batch = sampled_batch(rt)
    model, head = rt.model, rt.heads["value"]
    capture = LayerStates(2)
    with torch.no_grad():
        with rt.reference():
            policy_logprobs(model, batch, 1.0, prefix_cache=capture_cached, capture=capture)
        P, T = batch.query_ids.shape[1], batch.response_ids.shape[1]
        assert capture.states.shape == (8, P + T, rt.hidden_size)
        model.set_adapter("value")
        kept = batch.select(torch.arange(8))
        kept.critic_states, kept.critic_from = capture.states, 2
        full = critic_values(model, head, batch, prefix_cache=enter_cached)
        fast = critic_values(model, head, kept, prefix_cache=enter_cached)
        torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
        rows = torch.tensor([2, 5, 6])  # short prompts: the minibatch drops padding columns
        part = kept.select(rows)
        assert part.query_ids.shape[1] < P
        torch.testing.assert_close(critic_values(model, head, part, prefix_cache=enter_cached),
                                   critic_values(model, head, batch.select(rows),
                                                 prefix_cache=enter_cached),
                                   rtol=1e-5, atol=1e-5)
        assert full.abs().mean() > 0.1  # the values are not trivially zero
        with rt.reference():  # and the adapter mattered: the base's values differ
            base = critic_values(model, head, batch)
        assert (base - full).abs().max() > 1e-3


def test_rows_layout_puts_each_chunk_back_in_the_rollouts_columns():
    """Hand-made chunks: query columns right-aligned, response columns left-aligned."""
    a = torch.arange(1, 6, dtype=torch.float32).reshape(1, 5, 1)  # P_c 3, T_c 2
    b = torch.arange(11, 16, dtype=torch.float32).reshape(1, 5, 1)  # P_c 2, T_c 3
    out = rows_layout([(a, 3), (b, 2)], P=4, T=3)
    assert out[..., 0].tolist() == [[0, 1, 2, 3, 4, 5, 0], [0, 0, 11, 12, 13, 14, 15]]


def count_layer_calls(model) -> list[int]:
    """How often each decoder layer runs (a layer standing aside is not one of them)."""
    per_layer = [0] * len(models.decoder_layers(model))
    for i, layer in enumerate(models.decoder_layers(model)):
        layer.register_forward_hook(lambda *a, i=i: per_layer.__setitem__(i, per_layer[i] + 1))
    return per_layer


def test_round_runs_the_value_forwards_through_the_top_layers_only(deep):
    """A PPO round with critic_layers=2: the value adapter exists on layers 2-3 only, the bottom
    layers run for the policy and the reference but never for the critic, the round publishes
    a value adapter saved with its layers, and the first ratio is 1."""
    calls, per_layer = count_backbone_passes(deep.model), count_layer_calls(deep.model)
    cfg = replace(TOP2, epochs=1, prefix_cache=False)
    result = ppo_round(deep, config=cfg, reward_fn=low_id_reward)
    m = result["metrics"]
    assert result["status"] == "published"
    assert m["first_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert models.adapter_layers(deep.model, "value") == {2, 3}
    steps, chunks = m["ppo_steps"], 8 // cfg.minibatch_size
    # backbone calls: per scoring chunk the reference and the critic; per step policy + critic
    assert len(calls) == 2 * chunks + 2 * steps
    # the bottom layers: the reference per chunk, the policy per step, never the critic
    assert per_layer[0] == per_layer[1] == chunks + steps
    assert per_layer[2] == per_layer[3] == 2 * chunks + 2 * steps
    for k in ("vf_loss", "explained_variance"):
        assert torch.isfinite(torch.tensor(m[k])), k
    saved = json.loads((Path(result["path"]) / "value" / "adapter_config.json").read_text())
    assert sorted(saved["layers_to_transform"]) == [2, 3]


def test_the_critic_trains_to_the_same_numbers_as_a_full_forward_critic(deep_model_dir,
                                                                       tmp_path, monkeypatch):
    """Entering at layer 2 is only a shortcut: a round whose value adapter covers layers 2-3
    with the kept states equals (to float error) the same round with the shortcut turned off
    (the adapter on the same layers, every layer run), in its metrics and its trained
    weights."""
    import rlhf_core.policy.experience as experience

    def run(shortcut: bool, ws: str):
        rt = make_runtime(deep_model_dir, tmp_path / ws)
        with monkeypatch.context() as mp:
            if not shortcut:  # forwards from the bottom layer: the kept states are never made
                mp.setattr(experience, "critic_entry", lambda model: 0)
            result = ppo_round(rt, config=replace(TOP2, epochs=1), reward_fn=low_id_reward)
        value = {n: p.detach().clone() for n, p in adapter_params(rt.model, "value").items()}
        rt.data.store.close()
        return result["metrics"], value

    fast, fast_w = run(True, "fast")
    slow, slow_w = run(False, "slow")
    for k in ("vf_loss", "explained_variance", "pg_loss", "approx_kl", "loss"):
        assert fast[k] == pytest.approx(slow[k], rel=1e-4, abs=1e-6), k
    assert fast_w.keys() == slow_w.keys()
    for n in fast_w:
        torch.testing.assert_close(fast_w[n], slow_w[n], rtol=1e-4, atol=1e-6)


def test_a_changed_critic_layers_starts_a_fresh_critic_and_same_layers_continue(deep):
    """The next round continues the published value adapter when it covers the configured
    layers (from memory, and from disk in a restarted worker); after ppo.critic_layers changes
    it starts a fresh one on the new layers."""
    cfg = replace(TOP2, epochs=1, lr=2e-3)
    ppo_round(deep, config=cfg, reward_fn=low_id_reward)
    second = ppo_round(deep, config=cfg, reward_fn=low_id_reward)
    assert second["metrics"]["critic_init"] == "continued"
    restarted = Runtime(deep.data.store, deep.config, cpu=True)
    third = ppo_round(restarted, config=cfg, reward_fn=low_id_reward)
    assert third["metrics"]["critic_init"] == "continued"
    assert models.adapter_layers(restarted.model, "value") == {2, 3}
    every = replace(cfg, critic_layers=0)
    fourth = ppo_round(restarted, config=every, reward_fn=low_id_reward)
    assert fourth["metrics"]["critic_init"] == "fresh"
    assert models.adapter_layers(restarted.model, "value") == {0, 1, 2, 3}
    fifth = ppo_round(restarted, config=cfg, reward_fn=low_id_reward)
    assert fifth["metrics"]["critic_init"] == "fresh"
    assert models.adapter_layers(restarted.model, "value") == {2, 3}


def test_more_critic_layers_than_the_model_has_means_every_layer(deep):
    result = ppo_round(deep, config=replace(TINY, critic_layers=9, epochs=1),
                       reward_fn=low_id_reward)
    assert result["status"] == "published"
    assert models.adapter_layers(deep.model, "value") == {0, 1, 2, 3}


def test_rounds_with_a_top_layers_critic_raise_mean_reward(deep):
    """The top-layers critic learns as the full one does (test_ppo's
    test_rounds_raise_mean_reward, same settings and threshold)."""
    assert_rounds_raise_mean_reward(deep, replace(LEARNING, critic_layers=2))


def test_gradient_checkpointing_round_with_a_top_layers_critic_stays_on_policy(deep):
    """Under checkpointing (no prefix cache) the critic still enters at its layer: the round is
    on-policy at its first step and trains a finite critic."""
    result = ppo_round(deep, config=replace(TOP2, gradient_checkpointing=True, epochs=1),
                       reward_fn=low_id_reward)
    m = result["metrics"]
    assert m["first_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert torch.isfinite(torch.tensor(m["vf_loss"]))
    assert not deep.model.training


@pytest.mark.timeout(180)
def test_multiprocess_round_with_a_top_layers_critic_matches_single_process(deep_model_dir,
                                                                           tmp_path):
    """test_ppo's two-process check with the value adapter on layers 2-3 of 4: each rank keeps
    the states of its own shard, and the round equals the single-process one."""
    config = replace(TOP2, minibatch_size=8, epochs=2)
    single = ppo_round(make_runtime(deep_model_dir, tmp_path / "one"), config=config,
                       reward_fn=low_id_reward)
    multi = two_process_round(deep_model_dir, tmp_path / "two", config, port=29521,
                              keys=("critic_layers",))
    for k in ("reward_mean", "kl", "explained_variance", "pg_loss", "vf_loss", "approx_kl",
              "first_ratio", "grad_norm"):
        assert multi["metrics"][k] == pytest.approx(single["metrics"][k], rel=1e-3, abs=1e-3), k
    saved = json.loads((Path(multi["path"]) / "value" / "adapter_config.json").read_text())
    assert sorted(saved["layers_to_transform"]) == [2, 3]
