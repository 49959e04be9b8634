"""The loop's trigger rules (pure) and their application to a real store."""
from dataclasses import replace

from rlhf_core.data import jobs
from rlhf_core.worker.loop import LoopState, decide, gather_state, loop_tick
from rlhf_core.workspace import read_config, set_auto

BASE = LoopState(auto=True, prompts=10, open_items=10, min_ready=6, rankings=0,
                 rankings_at_last_training=0, retrain_every=20, reward_version=None,
                 reward_used_by_ppo=0, policy_version=0, policy_has_batch=True,
                 active_jobs=frozenset())


def test_nothing_to_do_when_items_ready_and_few_labels():
    assert decide(BASE) == []


def test_sample_when_below_min_ready_even_in_manual_mode():
    assert decide(replace(BASE, open_items=5)) == ["sample_batch"]
    assert decide(replace(BASE, auto=False, open_items=5)) == ["sample_batch"]


def test_no_second_sample_while_one_is_queued_or_without_prompts():
    assert decide(replace(BASE, open_items=0, active_jobs=frozenset({"sample_batch"}))) == []
    assert decide(replace(BASE, open_items=0, prompts=0)) == []


def test_retrain_after_n_new_rankings_only_in_auto_mode():
    s = replace(BASE, rankings=45, rankings_at_last_training=25)
    assert decide(s) == ["train_reward"]
    assert decide(replace(s, rankings=44)) == []
    assert decide(replace(s, auto=False)) == []


def test_ppo_when_a_promoted_reward_is_unused():
    s = replace(BASE, reward_version=3, reward_used_by_ppo=2)
    assert decide(s) == ["ppo_round"]
    assert decide(replace(s, reward_used_by_ppo=3)) == []


def test_one_model_job_at_a_time():
    s = replace(BASE, rankings=100, reward_version=3, reward_used_by_ppo=2)
    assert decide(replace(s, active_jobs=frozenset({"ppo_round"}))) == []
    assert decide(replace(s, active_jobs=frozenset({"train_reward"}))) == []


def test_retraining_comes_before_ppo_when_both_are_due():
    s = replace(BASE, rankings=100, reward_version=3, reward_used_by_ppo=2)
    assert decide(s) == ["train_reward"]


def test_new_policy_without_a_batch_is_sampled():
    s = replace(BASE, policy_version=2, policy_has_batch=False)
    assert decide(s) == ["sample_batch"]


def test_loop_tick_on_a_store_queues_and_remembers(store):
    store.add_prompts([{"text": f"prompt {i}"} for i in range(5)], source="test")
    set_auto(store, True)
    assert read_config(store).loop.auto is True
    first = loop_tick(store)
    assert len(first) == 1  # sample_batch: no items yet
    assert jobs.get_job(store, first[0])["kind"] == "sample_batch"
    assert loop_tick(store) == []  # the same job is still queued: nothing new
    # A promoted reward version -> PPO, remembered so it is not queued twice.
    store.add_version("reward", 1, status="promoted")
    with store.write() as db:
        db.execute("UPDATE jobs SET status = 'done'")
    state = gather_state(store, read_config(store))
    assert state.reward_version == 1
    queued = loop_tick(store)
    kinds = [jobs.get_job(store, j)["kind"] for j in queued]
    assert "ppo_round" in kinds
    assert store.get_setting("loop.reward_used_by_ppo") == 1
    with store.write() as db:
        db.execute("UPDATE jobs SET status = 'done'")
    assert "ppo_round" not in [jobs.get_job(store, j)["kind"] for j in loop_tick(store)]
