"""The shared chat-template prefix run once per reward forward (`reward.prefix_cache`,
reward/model.forward_scores), in training and scoring, on the tiny Llama with
test_reward_model's marker rankings."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rlhf_core import models
from rlhf_core.reward import model as reward_scoring
from rlhf_core.reward import round as reward_model
from rlhf_core.reward.model import shared_start
from tests.test_reward_model import LEARN, make_runtime, seed_rankings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rows(seqs: list[list[int]], side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    return models.pad_sequences(seqs, 0, side=side)


def test_shared_start_counts_the_rows_common_start():
    pre = [5, 6, 7, 8, 9]
    assert shared_start(*rows([pre + [1, 2, 3], pre + [4], pre + [10, 11]])) == 5
    assert shared_start(*rows([pre + [1, 2], pre])) == 4  # the whole-prefix row keeps one token
    assert shared_start(*rows([pre + [1, 2, 3], pre[:4] + [1, 2]])) == 4  # stops where they differ
    assert shared_start(*rows([pre + [1], [6] + pre + [1]])) == 0
    assert shared_start(*rows([[5, 6, 7, 1], [5, 6, 7, 2]])) == 0  # 3 shared: under the minimum
    assert shared_start(*rows([pre + [1, 2]])) == 0  # one row: nothing to share
    assert shared_start(*rows([pre + [1, 2, 3], pre + [4]], side="left")) == 0  # left-padded
    assert shared_start(*rows([pre + [1, 2], pre + [3, 4]], side="left")) == 5  # same length


@pytest.fixture
def trained(store, tiny_model_dir):
    seed_rankings(store, 24)
    runtime = make_runtime(store, tiny_model_dir, cfg=replace(LEARN, epochs=2))
    assert reward_model.train_reward(runtime)["status"] == "promoted"
    return runtime


def encoded(runtime) -> list[list[int]]:
    enc = reward_scoring.Encoder(runtime.tokenizer, 320)
    return [enc("hello world", "yes the sea"), enc("write a poem", "no"),
            enc("how are you today", "the quick brown fox jumps over the lazy dog yes")]


def test_scores_and_gradients_with_the_prefix_run_once_equal_one_call(trained):
    """Scores and the LoRA + head gradients of a right-padded batch (chat-template rows sharing
    the system prompt) equal those of one call over the whole rows; the prefix ran at batch 1."""
    scorer = reward_model.load_reward(trained)
    bb = scorer.backbone
    ids, mask = reward_scoring.collate(encoded(trained), bb.pad_id, bb.device)
    S = shared_start(ids, mask)
    assert S >= 8  # the system prompt and role markers
    shapes = []
    embed = bb.model.get_input_embeddings()
    hook = embed.register_forward_hook(lambda m, a, out: shapes.append(tuple(a[0].shape)))
    params = [p for n, p in bb.model.named_parameters() if ".reward." in n]
    params += list(scorer.head.parameters())

    def scores_and_grads(prefix_cache: bool):
        with reward_scoring.using_adapter(bb.model, scorer.adapter_name, trainable=params):
            for p in params:
                p.grad = None
            out = reward_scoring.forward_scores(bb.model, scorer.head, ids, mask,
                                                prefix_cache=prefix_cache)
            (out * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
            return out.detach(), [p.grad.clone() for p in params]
    try:
        full, full_grads = scores_and_grads(False)
        assert shapes == [tuple(ids.shape)]
        shared, shared_grads = scores_and_grads(True)
        assert shapes[1:] == [(1, S), (3, ids.shape[1] - S)]
    finally:
        hook.remove()
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-5)
    for a, b in zip(shared_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in full_grads)
    # serving: score_texts (right-padded, prefix shared) equals one call per response
    texts = scorer.score_texts(["hello world", "write a poem"], ["yes the sea", "no"])
    singles = [scorer.score_ids(torch.tensor([s]), torch.ones(1, len(s))).item()
               for s in encoded(trained)[:2]]
    assert texts == pytest.approx(singles, abs=1e-5)


def test_training_with_the_prefix_cache_trains_the_same_version(store, tiny_model_dir, tmp_path):
    """Two workspaces with the same rankings, one with reward.prefix_cache off: the same
    losses, held-out accuracy and trained weights."""
    from rlhf_core.data.store import Store
    results = []
    for i, on in enumerate((True, False)):
        st = store if i == 0 else Store(tmp_path / "off" / "rlhf.db")
        seed_rankings(st, 24)
        rt = make_runtime(st, tiny_model_dir, cfg=replace(LEARN, epochs=2, prefix_cache=on))
        res = reward_model.train_reward(rt)
        weights = {n: p.detach().clone() for n, p in rt.model.named_parameters()
                   if ".reward." in n}
        results.append((res, weights, reward_model.load_reward(rt).head.linear.weight.detach()))
        if i:
            st.close()
    (on, w_on, h_on), (off, w_off, h_off) = results
    assert on["metrics"]["heldout_accuracy"] == off["metrics"]["heldout_accuracy"]
    assert on["metrics"]["train_loss_last"] == pytest.approx(off["metrics"]["train_loss_last"],
                                                             abs=1e-5)
    assert w_on.keys() == w_off.keys() and w_on
    for name in w_on:
        torch.testing.assert_close(w_on[name], w_off[name], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h_on, h_off, rtol=1e-4, atol=1e-5)


def test_a_steps_rows_split_by_length_train_the_same_version(store, tiny_model_dir, tmp_path,
                                                              monkeypatch):
    """reward/train._step runs a step's rows in passes of similar length
    (`reward_data.length_chunks`): with every split allowed (no cost per pass) the same
    losses, held-out accuracy and weights as one pass per step, in more passes."""
    from rlhf_core.data.store import Store
    from rlhf_core.reward import train as reward_train
    results = []
    for i, overhead in enumerate((10 ** 9, 0)):
        monkeypatch.setattr(reward_train, "PASS_OVERHEAD_TOKENS", overhead)
        st = store if i == 0 else Store(tmp_path / "split" / "rlhf.db")
        seed_rankings(st, 24)
        rt = make_runtime(st, tiny_model_dir, cfg=replace(LEARN, epochs=2))
        passes = []
        embed = rt.model.get_input_embeddings()
        hook = embed.register_forward_hook(
            lambda m, a, out: passes.append(a[0].shape[0]) if torch.is_grad_enabled() else None)
        try:
            res = reward_model.train_reward(rt)
        finally:
            hook.remove()
        weights = {n: p.detach().clone() for n, p in rt.model.named_parameters()
                   if ".reward." in n}
        results.append((res, weights, len(passes)))
        if i:
            st.close()
    (one, w_one, n_one), (split, w_split, n_split) = results
    steps = one["metrics"]["train_steps"]
    assert split["metrics"]["train_steps"] == steps
    assert n_split > n_one  # the split run made more (smaller) passes per step
    assert one["metrics"]["heldout_accuracy"] == split["metrics"]["heldout_accuracy"]
    assert one["metrics"]["train_loss_last"] == pytest.approx(
        split["metrics"]["train_loss_last"], abs=1e-5)
    assert w_one.keys() == w_split.keys() and w_one
    for name in w_one:
        torch.testing.assert_close(w_one[name], w_split[name], rtol=1e-4, atol=1e-5)
