"""Active selection: uncertainty by the reward model's top-2 score gap, plus a random share."""
from __future__ import annotations

import pytest

from rlhf_core.worker.run import run_one
from rlhf_core.data import jobs  # noqa: F401  registers sample_batch
from rlhf_core.labeling.selection import CANDIDATE, choose_prompts, keep_uncertain, score_gap
from tests.conftest import publish_fresh_reward


def test_score_gap_is_the_distance_between_the_two_best():
    assert score_gap([0.1, 2.0, 1.5, -3.0]) == pytest.approx(0.5)
    assert score_gap([1.0, 1.0]) == 0.0
    assert score_gap([4.0]) == float("inf")


@pytest.fixture
def runtime_with_reward(tmp_path, tiny_model_dir):
    """A workspace on the tiny model with an (untrained, random-head) reward version 1."""
    from rlhf_core.worker.runtime import Runtime
    from rlhf_core.workspace import open_workspace
    store, cfg = open_workspace(tmp_path / "ws", model=str(tiny_model_dir), torch_threads=1, **{
        "sampling.max_new_tokens": 6, "sampling.prompts_per_batch": 4,
        "loop.selection": "uncertainty", "loop.random_share": 0.5, "loop.ab_fraction": 0.0})
    store.add_prompts([{"text": f"tell me about topic {i}"} for i in range(20)], source="t")
    runtime = Runtime(store, cfg, cpu=True)
    publish_fresh_reward(runtime, 1)
    return runtime


def test_random_only_without_a_reward_model(tmp_path, tiny_model_dir):
    from rlhf_core.worker.runtime import Runtime
    from rlhf_core.workspace import open_workspace
    store, cfg = open_workspace(tmp_path / "ws", model=str(tiny_model_dir),
                                **{"loop.selection": "uncertainty"})
    store.add_prompts([{"text": f"p{i}"} for i in range(10)], source="t")
    rows = choose_prompts(Runtime(store, cfg, cpu=True), cfg.loop, 4, seed=0)
    assert len(rows) == 4 and {r["selection"] for r in rows} == {"random"}


def test_candidates_are_twice_the_uncertain_share(runtime_with_reward):
    rt = runtime_with_reward
    rows = choose_prompts(rt, rt.config.loop, 4, seed=0)
    kinds = [r["selection"] for r in rows]
    assert kinds.count("random") == 2 and kinds.count(CANDIDATE) == 4


def test_keep_uncertain_keeps_the_smallest_gaps(runtime_with_reward):
    from rlhf_core.reward.round import load_reward
    texts = {i: f"tell me about topic {i}" for i in range(6)}
    answers = ["yes", "no", "one two", "the quick brown fox", "hello world", "maybe"]
    items = [{"prompt_id": i, "selection": CANDIDATE,
              "responses": [{"text": answers[(i + j) % 6] * (1 + j % 2)} for j in range(3)]}
             for i in range(6)]
    items.append({"prompt_id": 0, "selection": "random", "responses": [{"text": "x"}] * 2})
    # Gaps worked out independently with the same reward version.
    scorer = load_reward(runtime_with_reward)
    gaps = {}
    for it in items[:6]:
        s = scorer.score_texts([texts[it["prompt_id"]]] * 3, [r["text"] for r in it["responses"]])
        top = sorted(s, reverse=True)
        gaps[it["prompt_id"]] = top[0] - top[1]
    expected = sorted(gaps, key=gaps.get)[:3]
    kept = keep_uncertain(runtime_with_reward, items, texts)
    uncertain = [it for it in kept if it["selection"].startswith("uncertainty")]
    assert sorted(it["prompt_id"] for it in uncertain) == sorted(expected)
    assert all("reward v1" in it["selection"] for it in uncertain)
    assert any(it["selection"] == "random" for it in kept)  # the random share is untouched
    assert not any(it["selection"] == CANDIDATE for it in kept)


def test_sample_batch_records_the_rule_for_each_item(runtime_with_reward):
    store = runtime_with_reward.data.store
    jobs.enqueue(store, "sample_batch", {"seed": 3})
    done = run_one(runtime_with_reward, "w")
    assert done["status"] == "done", done["error"]
    rules = [r["selection"] for r in store.rows("SELECT selection FROM items")]
    assert len(rules) == 4
    assert sum(r == "random" for r in rules) == 2
    assert sum(r.startswith("uncertainty (reward v1 gap") for r in rules) == 2
