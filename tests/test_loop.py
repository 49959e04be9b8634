"""The loop's trigger rules (pure) and their application to a real store."""
import math
from dataclasses import replace

from rlhf_core.data import annotation, jobs
from rlhf_core.worker.loop import (DEFAULT_JOB_S, DEFAULT_PACE_S, MAX_BUFFER_ITEMS,
                                   MAX_BUFFER_SAMPLES, LoopState, annotator_paces,
                                   buffer_needed, decide, gather_state, loop_tick)
from rlhf_core.workspace import read_config, set_auto
from tests.test_annotation import make_batch

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


# -- issue 11.3a: a buffer for the annotators before a model job starts ------------------------
DUE = replace(BASE, reward_version=3, reward_used_by_ppo=2, paces_s=(30.0, 30.0, 30.0),
              expected_job_s={"ppo_round": 600.0})  # 3 annotators at 30 s, PPO took 10 min


def test_a_model_job_waits_until_the_active_annotators_have_enough_to_rank():
    assert buffer_needed(DUE, "ppo_round") == 60  # 3 x 600 s / 30 s
    assert decide(replace(DUE, open_items=10)) == ["sample_batch"]
    assert decide(replace(DUE, open_items=60)) == ["ppo_round"]
    # a batch already on its way: wait for it, queue nothing twice
    assert decide(replace(DUE, open_items=10, active_jobs=frozenset({"sample_batch"}))) == []
    # retraining the reward model is sized on its own past runs
    s = replace(DUE, rankings=45, rankings_at_last_training=25, open_items=10,
                expected_job_s={"ppo_round": 600.0, "train_reward": 60.0})
    assert buffer_needed(s, "train_reward") == 6
    assert decide(s) == ["train_reward"]


def test_the_buffer_sums_each_annotators_own_pace():
    s = replace(DUE, paces_s=(10.0, 60.0))
    assert buffer_needed(s, "ppo_round") == 60 + 10
    assert buffer_needed(replace(s, paces_s=()), "ppo_round") == 0  # nobody ranking now
    assert buffer_needed(replace(s, expected_job_s={}), "train_reward") == \
        math.ceil(DEFAULT_JOB_S["train_reward"] / 10 + DEFAULT_JOB_S["train_reward"] / 60)
    assert buffer_needed(replace(s, paces_s=(1.0,) * 50), "ppo_round") == MAX_BUFFER_ITEMS


def test_the_buffer_never_stalls_the_loop():
    short = replace(DUE, open_items=10)
    assert decide(replace(short, buffer_samples=MAX_BUFFER_SAMPLES)) == ["ppo_round"]
    assert decide(replace(short, prompts=0)) == ["ppo_round"]  # sampling cannot help
    assert decide(replace(short, auto=False)) == []  # by hand only, as before


def test_annotator_paces_from_time_spent_else_from_gaps():
    rows = [{"annotator": "a", "time_spent_s": t, "created_at": "2025-01-01T00:00:00+00:00"}
            for t in (10.0, 20.0, 90.0)]
    rows += [{"annotator": "b", "time_spent_s": None, "created_at": f"2025-01-01T00:0{m}:00+00:00"}
             for m in (0, 1, 2)]
    rows += [{"annotator": "c", "time_spent_s": None, "created_at": "2025-01-01T00:00:00+00:00"}]
    assert annotator_paces(rows) == (20.0, 60.0, DEFAULT_PACE_S)


def _rank_some(store, who: str, n: int, spent: float) -> None:
    for i in range(n):
        item = annotation.next_item(store, who)
        annotation.submit_ranking(store, annotator=who, item_id=item["id"], token=item["token"],
                                  submission_key=f"{who}-{i}", time_spent_s=spent,
                                  tiers=[[r["id"]] for r in item["responses"]])


def test_gather_state_reads_paces_and_past_job_lengths(store):
    make_batch(store, n_items=6)
    _rank_some(store, "ann", 2, 20.0)
    _rank_some(store, "bob", 2, 40.0)
    job = jobs.enqueue(store, "ppo_round")
    jobs.claim(store, "w")
    jobs.finish(store, job, result={})
    with store.write() as db:  # a round that took five minutes
        db.execute("UPDATE jobs SET started_at = '2025-01-01T00:00:00.000+00:00', "
                   "finished_at = '2025-01-01T00:05:00.000+00:00' WHERE id = ?", [job])
    state = gather_state(store, read_config(store))
    assert sorted(state.paces_s) == [20.0, 40.0]
    assert state.expected_job_s == {"ppo_round": 300.0, "train_reward": None}
    assert buffer_needed(state, "ppo_round") == 15 + 8


def test_loop_tick_samples_before_a_round_while_annotators_would_run_dry(store):
    make_batch(store, n_items=4)
    _rank_some(store, "ann", 2, 5.0)  # one fast annotator: PPO's default 10 min = 120 items
    set_auto(store, True)
    store.add_version("reward", 1, status="promoted")
    def tick():  # the loop's path (scoring for the researcher view runs beside it)
        return [k for k in (jobs.get_job(store, j)["kind"] for j in loop_tick(store))
                if k != "score_items"]
    for n in range(1, MAX_BUFFER_SAMPLES + 1):
        assert tick() == ["sample_batch"], n
        assert store.get_setting("loop.buffer_samples") == n
        with store.write() as db:  # the sampler ran (and, here, added nothing)
            db.execute("UPDATE jobs SET status = 'done'")
    # the loop does not stall on a sampler that yields nothing (rule 1 still keeps sampling)
    assert tick() == ["sample_batch", "ppo_round"]
    assert store.get_setting("loop.buffer_samples") == 0
