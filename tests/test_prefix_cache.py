"""The shared query prefix (chat template, system prompt) run once per forward in scoring and
training (`ppo.prefix_cache`, policy/rollout.response_states), on the tiny Llama."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rlhf_core import models
from rlhf_core.policy.ppo import ppo_round
from rlhf_core.policy.rollout import (
    Rollout,
    critic_values,
    left_pad,
    policy_logprobs,
    right_pad,
    shared_prefix_len,
    trunk_forward,
)
from rlhf_core.policy.setup import adapter_params
from rlhf_core.worker.runtime import Runtime
from tests.test_ppo import (  # noqa: F401 (ppo_model_dir, runtime are fixtures)
    TINY,
    low_id_reward,
    make_runtime,
    ppo_model_dir,
    runtime,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PAD = 0


def batch_of(queries: list[list[int]], responses: list[list[int]]) -> Rollout:
    q, qm = left_pad(queries, PAD)
    r, m = right_pad(responses, PAD)
    n = len(queries)
    return Rollout(prompts=["p"] * n, responses=["r"] * n, query_ids=q, query_mask=qm,
                   response_ids=r, mask=m, has_stop=torch.ones(n, dtype=torch.bool))


def test_shared_prefix_len_counts_after_each_rows_padding():
    pre = [5, 6, 7, 8, 9]
    b = batch_of([pre + [1, 2, 3], pre + [4], pre + [10, 11]], [[1], [2], [3]])
    assert shared_prefix_len(b) == 5  # the row of 6 tokens keeps one of its own
    b = batch_of([pre + [1, 2, 3], pre[:4] + [1, 2]], [[1], [2]])
    assert shared_prefix_len(b) == 4  # stops where the rows differ
    assert shared_prefix_len(batch_of([pre + [1], [6] + pre + [1]], [[1], [2]])) == 0
    assert shared_prefix_len(batch_of([[5, 6, 7, 1], [5, 6, 7, 2]], [[1], [2]])) == 0  # < 4
    assert shared_prefix_len(batch_of([pre + [1, 2]], [[1]])) == 0  # one row: nothing to share
    assert shared_prefix_len(batch_of([pre, pre + [1]], [[1], [2]])) == 4  # whole-prefix query


def prefix_batch(rt) -> Rollout:
    """Rows that share a 12-token prefix, then queries and responses of different lengths
    (so the rows' left padding and right padding differ)."""
    tok = rt.tokenizer
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    prefix = enc("system: you are a helpful assistant named tiny.")[:12]
    assert len(prefix) == 12
    tails = ["hello", "say something about the sea", "numbers and lists please", "ok"]
    answers = ["the quick brown fox", "one two", "python code def return print", "maybe"]
    return batch_of([prefix + enc(t) for t in tails], [enc(a) for a in answers])


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in adapter_params(model, "policy").items()}


def test_cached_prefix_gives_the_same_logprobs_values_and_gradients(runtime):
    model = runtime.model
    with torch.no_grad():
        for p in adapter_params(model, "policy").values():
            p.normal_(0.0, 0.05)  # the adapter changes the prefix's keys and values too
    head = models.ScalarHead(runtime.hidden_size, init_std=0.5, seed=1)
    batch = prefix_batch(runtime)
    assert shared_prefix_len(batch) == 12
    model.set_adapter("policy")
    for p in adapter_params(model, "policy").values():
        p.requires_grad_(True)
    out, g = {}, {}
    for cached in (False, True):
        lp, ent = policy_logprobs(model, batch, 0.7, with_entropy=True, prefix_cache=cached)
        values = critic_values(model, head, batch, prefix_cache=cached)
        t_lp, _, t_values = trunk_forward(model, head, batch, 0.7, prefix_cache=cached)
        ((lp * batch.mask).sum() + (values * batch.mask).sum()).backward()
        g[cached] = grads(model)
        model.zero_grad(set_to_none=True)
        with torch.no_grad(), runtime.reference():
            ref, _ = policy_logprobs(model, batch, 0.7, prefix_cache=cached)
        out[cached] = (lp.detach(), ent, values.detach(), t_lp.detach(), t_values.detach(), ref)
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(a * batch.mask, b * batch.mask, rtol=1e-5, atol=1e-5)
    for n in g[False]:
        torch.testing.assert_close(g[False][n], g[True][n], rtol=1e-4, atol=1e-6)
    assert (out[False][0] - out[False][5]).abs().max() > 1e-3  # policy != reference here


def test_the_cache_makes_one_prefix_pass_and_shorter_rows(runtime):
    seen = []
    base = runtime.model.get_base_model()
    getattr(base, base.base_model_prefix).register_forward_hook(
        lambda mod, args, kwargs, out: seen.append(kwargs["input_ids"].shape), with_kwargs=True)
    batch = prefix_batch(runtime)
    with torch.no_grad():
        policy_logprobs(runtime.model, batch, 1.0, prefix_cache=True)
    P, T = batch.query_ids.shape[1], batch.response_ids.shape[1]
    assert seen == [torch.Size([1, 12]), torch.Size([4, P - 12 + T])]


def test_round_with_a_system_prompt_matches_the_uncached_round(ppo_model_dir, tmp_path):
    """A real chat template with a system prompt: the cached and the uncached round publish the
    same metrics and policy (float error only)."""
    from safetensors.torch import load_file
    results = {}
    for cached in (False, True):
        rt = make_runtime(ppo_model_dir, tmp_path / f"ws{cached}")
        rt = Runtime(rt.data.store, replace(rt.config, system_prompt="be brief and kind"),
                     cpu=True)
        res = ppo_round(rt, config=replace(TINY, prefix_cache=cached), reward_fn=low_id_reward)
        results[cached] = (res["metrics"], load_file(
            f"{res['path']}/policy/adapter_model.safetensors"))
        rt.data.store.close()
    (m0, a0), (m1, a1) = results[False], results[True]
    for k in ("reward_mean", "kl", "entropy", "pg_loss", "vf_loss", "approx_kl",
              "explained_variance", "first_ratio"):
        assert m1[k] == pytest.approx(m0[k], rel=1e-4, abs=1e-5), k
    assert max((a0[k] - a1[k]).abs().max().item() for k in a0) < 1e-4
