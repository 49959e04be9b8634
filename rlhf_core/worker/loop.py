"""The loop policy: when to sample, retrain the reward model, and run PPO.

`decide(state)` is pure: given counts and flags it returns the jobs to queue.
`loop_tick(store)` gathers that state from the DB, applies the decision, and
remembers what triggered each job, so a restart neither repeats nor forgets one.
Rules (automatic mode; every step can also be started by hand):
  1. fewer than `min_ready_items` items still need labels -> sample a batch;
  2. `retrain_every` new rankings since the last reward training -> train_reward;
  3. a promoted reward version no PPO round has used yet -> ppo_round;
  4. a published policy with no batch sampled from it yet -> sample_batch
     (in manual mode too: a policy round never queues its own follow-up).
Only this module queues follow-up jobs; training code does not know the queue.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from rlhf_core.config import AppConfig
from rlhf_core.data import jobs, prompts, scores
from rlhf_core.data.store import Store
from rlhf_core.workspace import read_config

log = logging.getLogger(__name__)

MODEL_JOBS = ("train_reward", "ppo_round")


@dataclass(frozen=True)
class LoopState:
    auto: bool
    prompts: int
    open_items: int
    min_ready: int
    rankings: int
    rankings_at_last_training: int
    retrain_every: int
    reward_version: int | None
    reward_used_by_ppo: int
    policy_version: int
    policy_has_batch: bool
    active_jobs: frozenset  # kinds queued or running


def decide(s: LoopState) -> list[str]:
    """The job kinds to queue now, in order."""
    out: list[str] = []
    busy = s.active_jobs
    if s.prompts and "sample_batch" not in busy:
        if s.open_items < s.min_ready or not s.policy_has_batch:
            out.append("sample_batch")
    if not s.auto:
        return out
    if busy & set(MODEL_JOBS):
        return out  # one model job at a time: PPO must use the reward it was queued for
    if s.rankings - s.rankings_at_last_training >= s.retrain_every:
        out.append("train_reward")
    elif s.reward_version is not None and s.reward_version > s.reward_used_by_ppo:
        out.append("ppo_round")
    return out


def gather_state(store: Store, cfg: AppConfig) -> LoopState:
    policy = store.current_version("policy")
    reward = store.current_version("reward")
    pv = policy["version"] if policy else 0
    return LoopState(
        auto=cfg.loop.auto,
        prompts=prompts.count(store),
        open_items=store.open_item_count(),
        min_ready=cfg.sampling.min_ready_items,
        rankings=store.ranking_count(),
        rankings_at_last_training=store.get_setting("loop.rankings_at_last_training", 0),
        retrain_every=cfg.loop.retrain_every,
        reward_version=reward["version"] if reward else None,
        reward_used_by_ppo=store.get_setting("loop.reward_used_by_ppo", 0),
        policy_version=pv,
        policy_has_batch=bool(store.batch_count(pv)),
        active_jobs=frozenset(jobs.active_kinds(store)),
    )


def loop_tick(store: Store) -> list[int]:
    """Apply the policy once; returns the ids of the jobs it queued."""
    cfg = read_config(store)
    state = gather_state(store, cfg)
    queued = []
    for kind in decide(state):
        params = {}
        if kind == "train_reward":
            store.set_setting("loop.rankings_at_last_training", state.rankings)
        elif kind == "ppo_round":
            store.set_setting("loop.reward_used_by_ppo", state.reward_version)
            params = {"reward_version": state.reward_version}
        elif kind == "sample_batch":
            params = {"policy_version": state.policy_version}
        job_id = jobs.enqueue(store, kind, params, requested_by="loop", unique=True)
        log.info("loop queued %s (job %s)", kind, job_id)
        queued.append(job_id)
    if cfg.loop.score_items:
        queued += _queue_scoring(store, state)
    return queued


def _queue_scoring(store: Store, state: LoopState) -> list[int]:
    """Score newly ranked responses with the serving reward version (the researcher view).
    Tried once per (version, ranking count), so a failing scorer is not re-queued every tick."""
    if state.reward_version is None or "score_items" in state.active_jobs:
        return []
    attempt = [state.reward_version, state.rankings]
    if store.get_setting("loop.score_attempt") == attempt:
        return []
    if not scores.unscored_count(store, state.reward_version):
        return []
    store.set_setting("loop.score_attempt", attempt)
    return [jobs.enqueue(store, "score_items", {"version": state.reward_version},
                         requested_by="loop", unique=True)]
