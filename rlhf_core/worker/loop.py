"""The loop policy: when to sample, retrain the reward model, and run PPO.

`decide(state)` is pure: given counts and flags it returns the jobs to queue.
`loop_tick(store)` gathers that state from the DB, applies the decision, and
remembers what triggered each job, so a restart neither repeats nor forgets one.
Rules (automatic mode; every step can also be started by hand):
  1. fewer than `min_ready_items` items still need labels -> sample a batch;
  2. `retrain_every` new rankings since the last reward training -> train_reward;
  3. a promoted reward version no PPO round has used yet -> ppo_round;
  4. a published policy with no batch sampled from it yet -> sample_batch
     (in manual mode too: a policy round never queues its own follow-up);
  5. before rule 2 or 3 queues a model job, enough items are open for the annotators active
     lately to rank until it ends (`buffer_needed`), else a batch is sampled first: nobody
     waits while a model trains.
Only this module queues follow-up jobs; training code does not know the queue.
"""
from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass, field
from datetime import datetime

from rlhf_core.config import AppConfig
from rlhf_core.data import annotation, jobs, prompts, scores
from rlhf_core.data.store import Store
from rlhf_core.workspace import read_config

log = logging.getLogger(__name__)

MODEL_JOBS = ("train_reward", "ppo_round")
ACTIVE_WINDOW_S = 600.0  # an annotator who ranked in the last 10 minutes is ranking now
DEFAULT_JOB_S = {"train_reward": 120.0, "ppo_round": 600.0}  # before a kind has run here
DEFAULT_PACE_S = 30.0  # seconds per ranking of an annotator whose pace is not known yet
MAX_BUFFER_ITEMS = 200
MAX_BUFFER_SAMPLES = 3  # then the model job runs anyway: a sampler that yields nothing must
                        # not stall the loop


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
    paces_s: tuple[float, ...] = ()  # seconds per ranking of each annotator active lately
    expected_job_s: dict = field(default_factory=dict)  # kind -> median of its past runs
    buffer_samples: int = 0  # batches sampled for the buffer since the last model job


def model_job_due(s: LoopState) -> str | None:
    if s.rankings - s.rankings_at_last_training >= s.retrain_every:
        return "train_reward"
    if s.reward_version is not None and s.reward_version > s.reward_used_by_ppo:
        return "ppo_round"
    return None


def buffer_needed(s: LoopState, kind: str) -> int:
    """Open items the active annotators rank while a `kind` job runs: the job's expected
    seconds over each one's seconds per ranking, summed (capped at MAX_BUFFER_ITEMS)."""
    job_s = s.expected_job_s.get(kind) or DEFAULT_JOB_S.get(kind, 0.0)
    need = sum(job_s / max(pace, 1.0) for pace in s.paces_s)
    return min(math.ceil(need), MAX_BUFFER_ITEMS)


def short_of_buffer(s: LoopState, kind: str) -> bool:
    """Would the annotators run dry during `kind`, and can sampling first still help?"""
    can_sample = bool(s.prompts)
    return (can_sample and s.buffer_samples < MAX_BUFFER_SAMPLES
            and s.open_items < buffer_needed(s, kind))


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
    kind = model_job_due(s)
    if kind is None:
        return out
    if short_of_buffer(s, kind):  # sample first; the model job waits for the next tick
        if "sample_batch" not in busy and "sample_batch" not in out:
            out.append("sample_batch")
        return out
    out.append(kind)
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
        paces_s=annotator_paces(annotation.recent_rankings(store, ACTIVE_WINDOW_S)),
        expected_job_s={k: jobs.typical_duration_s(store, k) for k in MODEL_JOBS},
        buffer_samples=store.get_setting("loop.buffer_samples", 0),
    )


def annotator_paces(rows: list[dict]) -> tuple[float, ...]:
    """Seconds per ranking of each annotator in `rows` (recent rankings, oldest first): the
    median time they spent per item, else the mean gap between their rankings."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["annotator"], []).append(r)
    paces = []
    for own in by.values():
        spent = [r["time_spent_s"] for r in own if r["time_spent_s"]]
        if spent:
            paces.append(float(statistics.median(spent)))
        elif len(own) > 1:
            first, last = (datetime.fromisoformat(own[i]["created_at"]) for i in (0, -1))
            paces.append(max((last - first).total_seconds() / (len(own) - 1), 1.0))
        else:
            paces.append(DEFAULT_PACE_S)
    return tuple(paces)


def loop_tick(store: Store) -> list[int]:
    """Apply the policy once; returns the ids of the jobs it queued."""
    cfg = read_config(store)
    state = gather_state(store, cfg)
    queued = []
    kinds = decide(state)
    if kinds and kinds[-1] in MODEL_JOBS:
        store.set_setting("loop.buffer_samples", 0)
    elif "sample_batch" in kinds and state.auto and model_job_due(state) \
            and not state.active_jobs & set(MODEL_JOBS):
        store.set_setting("loop.buffer_samples", state.buffer_samples + 1)
    for kind in kinds:
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
