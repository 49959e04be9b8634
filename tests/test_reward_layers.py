"""`reward.lora_layers`: the reward adapter on the top decoder layers only; training runs the
layers below once per response and enters its later epochs at the adapter's lowest layer
(issue 13: reward training was the largest share of a simulate round). A 4-layer tiny Llama,
the adapter on layers 2-3, with test_reward_model's marker rankings."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlhf_core import models
from rlhf_core.reward import model as reward_scoring
from rlhf_core.reward import round as reward_model
from rlhf_core.reward import train as reward_train
from tests.test_reward_model import (
    FINE_TUNE,
    LEARN,
    NO_GATE,
    assert_learned,
    make_runtime,
    seed_rankings,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOP2 = replace(LEARN, lora_layers=2)  # of 4 layers: the reward adapter on layers 2 and 3


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory):
    from tests.conftest import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("deep-reward") / "model", layers=4)


def saved_layers(store, runtime) -> set[int] | None:
    path = Path(store.current_version("reward")["path"]) / reward_scoring.ADAPTER_SUBDIR
    return models.saved_layers(path, runtime.model)


def count_layer_calls(runtime, monkeypatch) -> list[int]:
    """calls[i]: forward calls of decoder layer i (a layer that stands aside is not counted)."""
    calls = [0] * len(models.decoder_layers(runtime.model))
    for i, layer in enumerate(models.decoder_layers(runtime.model)):
        def counted(*args, _i=i, _orig=layer.forward, **kwargs):
            calls[_i] += 1
            return _orig(*args, **kwargs)
        monkeypatch.setattr(layer, "forward", counted)
    return calls


def test_top_layer_adapter_learns_and_its_bottom_layers_run_once_per_response(
        store, deep_model_dir, monkeypatch):
    seed_rankings(store, 40)
    runtime = make_runtime(store, deep_model_dir, cfg=TOP2)
    calls = count_layer_calls(runtime, monkeypatch)
    steps = []
    real_step = reward_train._step

    def step(bb, head, pairs, cfg, encoder, states=None):
        steps.append(list(calls))
        return real_step(bb, head, pairs, cfg, encoder, states)

    monkeypatch.setattr(reward_train, "_step", step)
    res = reward_model.train_reward(runtime)
    assert res["status"] == "promoted", res["reason"]
    assert_learned(res["metrics"])
    assert saved_layers(store, runtime) == {2, 3}
    manifest = json.loads((Path(res["path"]) / "version.json").read_text())
    assert manifest["config"]["lora_layers"] == 2
    lora = [n for n, _ in runtime.model.named_parameters() if ".reward." in n]
    assert lora and all(".layers.2." in n or ".layers.3." in n for n in lora)
    # Training: the first epoch's steps run every layer, the later epochs' run layers 2-3 only.
    per_epoch = res["metrics"]["train_steps"] // TOP2.epochs
    first_end, last = steps[per_epoch], steps[-1]
    assert first_end[0] == first_end[2] > 0
    assert last[0] == first_end[0]  # layer 0 ran in no step after the first epoch
    assert last[2] > first_end[2]  # layer 2 ran in every step


def test_entering_at_the_top_layers_trains_what_a_full_forward_trains(store, deep_model_dir,
                                                                      monkeypatch):
    """One fit with the kept states and one where every step runs every layer, from the same
    start: the same losses and the same trained adapter and head."""
    from rlhf_core.data import annotation
    from rlhf_core.reward import data as reward_data
    seed_rankings(store, 24)
    cfg = replace(TOP2, epochs=3)
    runtime = make_runtime(store, deep_model_dir, cfg=cfg)
    bb = reward_scoring.backbone(runtime)
    pairs = [p for p in reward_data.load_pairs(annotation.training_pairs(store))
             if p.split == "train"]

    def fit(entry: int | None):
        if entry is not None:
            monkeypatch.setattr(reward_train, "entry_layer", lambda bb: entry)
        head = reward_train.prepare_candidate(runtime, bb, None, cfg, version=1)
        stats = reward_train.fit(bb, head, pairs, cfg, seed=5, progress=lambda *a: None)
        weights = {n: p.detach().clone() for n, p in bb.model.named_parameters()
                   if f".{reward_scoring.CANDIDATE}." in n}
        return stats, weights, head.linear.weight.detach().clone()

    kept_stats, kept, kept_head = fit(None)
    assert reward_train.entry_layer(bb) == 2
    full_stats, full, full_head = fit(0)
    assert kept_stats["train_steps"] == full_stats["train_steps"] > 3
    assert kept_stats["train_loss_last"] == pytest.approx(full_stats["train_loss_last"], abs=1e-5)
    assert kept.keys() == full.keys() and kept
    for name in kept:
        torch.testing.assert_close(kept[name], full[name], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kept_head, full_head, rtol=1e-4, atol=1e-5)
    assert any((w.abs().sum() > 0) for n, w in kept.items() if "lora_B" in n)  # it trained


def test_scores_entering_from_kept_states_equal_a_full_forward(store, deep_model_dir):
    """forward_scores from the states kept at layer 2 (right-padded rows of other widths) equals
    the adapter's own full forward."""
    seed_rankings(store, 12)
    runtime = make_runtime(store, deep_model_dir, cfg=replace(NO_GATE, lora_layers=2))
    reward_model.train_reward(runtime)
    scorer = reward_model.load_reward(runtime)
    bb, enc = scorer.backbone, reward_scoring.Encoder(runtime.tokenizer, 320)
    seqs = [enc("hello world", "yes the sea"), enc("write a poem", "no"),
            enc("how are you today", "the quick brown fox jumps over the lazy dog")]
    states = reward_train.EntryStates(2)
    with torch.no_grad(), reward_scoring.using_adapter(bb.model, scorer.adapter_name):
        ids, mask = reward_scoring.collate(seqs, bb.pad_id, bb.device)
        capture = models.LayerStates(2)
        full = reward_scoring.forward_scores(bb.model, scorer.head, ids, mask, capture=capture)
        states.keep([0, 1, 2], capture, mask)
        assert [states.rows[i].shape[0] for i in range(3)] == [len(s) for s in seqs]
        ids2, mask2 = reward_scoring.collate([seqs[2], seqs[1]], bb.pad_id, bb.device)
        enter = states.enter([2, 1], ids2.shape[1])
        fast = reward_scoring.forward_scores(bb.model, scorer.head, ids2, mask2, enter=enter)
    torch.testing.assert_close(fast, full[[2, 1]], rtol=1e-5, atol=1e-5)
    assert states.enter([2, 7], ids2.shape[1]) is None  # a response not kept: a full forward
    small = reward_train.EntryStates(2, max_bytes=states.rows[1].numel() * 4)
    small.keep([0, 1, 2], capture, mask)
    assert list(small.rows) == [1]  # the budget holds one row (the shortest fits)


def test_changing_lora_layers_starts_the_next_version_from_scratch(store, deep_model_dir):
    seed_rankings(store, 40)
    runtime = make_runtime(store, deep_model_dir, cfg=TOP2)
    assert reward_model.train_reward(runtime)["status"] == "promoted"
    seed_rankings(store, 12, start=40)
    same = reward_model.train_reward(runtime, config=replace(FINE_TUNE, lora_layers=2))
    assert same["status"] == "promoted", same["reason"]
    assert store.current_version("reward")["parent"] == 1  # warm-started from v1
    assert saved_layers(store, runtime) == {2, 3}
    seed_rankings(store, 12, start=52)
    every = reward_model.train_reward(runtime, config=replace(LEARN, lora_layers=0,
                                                              promote_tolerance=0.2))
    assert every["counts"]["replay_pairs"] == 0  # all train pairs, from scratch
    assert every["counts"]["train_pairs"] > same["counts"]["train_pairs"]
    row = store.get_version("reward", every["version"])
    assert row["parent"] is None
    path = Path(row["path"]) / reward_scoring.ADAPTER_SUBDIR
    assert models.saved_layers(path, runtime.model) == {0, 1, 2, 3}
