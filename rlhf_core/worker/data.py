"""The worker side's one door to the workspace's data: every read and write a job makes.

Jobs, the library code they call, and the worker loop reach the database only through these
verbs, never through SQL or a `Store`. `LocalData` serves them from the workspace's SQLite
file on this host (what `rlhf up` and `rlhf worker --workspace` use); a remote worker on a GPU
host gets the same verbs over HTTP. Model files are not data here: versions are written and
read as directories (rlhf_core.checkpoints).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from rlhf_core.config import AppConfig
from rlhf_core.data import annotation, arena, jobs, prompts, scores, workers
from rlhf_core.data.store import Store
from rlhf_core.workspace import read_config


class LocalData:
    """The verbs over a local workspace database."""

    def __init__(self, store: Store, workspace: Path | None = None, *,
                 lease_s: float = jobs.LEASE_S):
        self.store, self.lease_s = store, lease_s
        self.workspace = Path(workspace) if workspace else store.path.parent

    # -- configuration: read once per claimed job --------------------------------------------
    def config(self) -> AppConfig:
        return dataclasses.replace(read_config(self.store), workspace=self.workspace)

    # -- jobs ------------------------------------------------------------------------------------
    def claim(self, worker: str, kinds: list[str] | None = None) -> dict | None:
        return jobs.claim(self.store, worker, kinds=kinds, lease_s=self.lease_s)

    def report_progress(self, job_id: int, worker: str, fraction: float, message: str) -> None:
        jobs.report_progress(self.store, job_id, worker, fraction, message, self.lease_s)

    def renew_lease(self, job_id: int, worker: str) -> None:
        jobs.renew_lease(self.store, job_id, worker, self.lease_s)

    def finish(self, job_id: int, worker: str, *, result: dict | None = None,
               error: str | None = None) -> None:
        jobs.finish(self.store, job_id, result=result, error=error, worker=worker)

    def mark_cancelled(self, job_id: int, worker: str, reason: str) -> None:
        jobs.mark_cancelled(self.store, job_id, worker, reason)

    def get_job(self, job_id: int) -> dict | None:
        return jobs.get_job(self.store, job_id)

    def abandon(self, job_id: int, worker: str, reason: str) -> None:
        """A stopping worker hands its job back (re-queued; the attempt is not counted)."""
        jobs.abandon(self.store, job_id, worker, reason)

    # -- the workers registry: one beat every few seconds, idle or busy --------------------------
    def register_worker(self, worker: str, *, host: str, pid: int, scope: str | None = None,
                        kinds: list[str] | None = None, device: str | None = None) -> None:
        workers.register(self.store, worker, host=host, pid=pid, scope=scope, kinds=kinds,
                         device=device)

    def worker_beat(self, worker: str, job_id: int | None = None,
                    device: str | None = None) -> bool:
        return workers.beat(self.store, worker, job_id=job_id, device=device)

    def worker_stopped(self, worker: str, reason: str = "stopped") -> None:
        workers.stopped(self.store, worker, reason)

    def reap_workers(self, worker: str) -> list[str]:
        """Mark dead workers (beats stopped, or pid gone here) and release their jobs now."""
        return workers.reap(self.store, exclude=worker)

    # -- versions ----------------------------------------------------------------------------------
    def current_version(self, kind: str) -> dict | None:
        return self.store.current_version(kind)

    def get_version(self, kind: str, version: int) -> dict | None:
        return self.store.get_version(kind, version)

    def next_version_number(self, kind: str) -> int:
        return self.store.next_version_number(kind)

    def add_version(self, kind: str, version: int, **fields) -> dict:
        return self.store.add_version(kind, version, **fields)

    # -- prompts and labeling batches ------------------------------------------------------------
    def open_item_count(self) -> int:
        return annotation.open_item_count(self.store)

    def prompts_of_split(self, split: str, limit: int | None = None) -> list[dict]:
        return prompts.of_split(self.store, split, limit)

    def prompts_by_ids(self, ids: list[int]) -> list[dict]:
        return prompts.by_ids(self.store, ids)

    def least_labeled_prompts(self, n: int, *, seed: int) -> list[dict]:
        return prompts.least_labeled(self.store, n, seed=seed)

    def create_batch(self, **fields) -> int:
        return annotation.create_batch(self.store, **fields)

    def add_items(self, batch_id: int, items: list[dict], **fields) -> list[dict]:
        return annotation.add_items(self.store, batch_id, items, **fields)

    def retire_items(self, *, older_than_policy: int) -> int:
        return annotation.retire_items(self.store, older_than_policy=older_than_policy)

    def add_arena_item(self, job_id: int, worker: str, responses: list[dict], *,
                       policy_version: int, settings: dict | None = None) -> int:
        """The answers to an arena request, for the annotator who asked (only the worker that
        holds the job; over HTTP `worker` is the token's identity)."""
        return arena.add_arena_item(self.store, job_id, worker, responses,
                                    policy_version=policy_version, settings=settings)

    # -- what the reward model learns from, and its scores -----------------------------------
    def training_pairs(self) -> list[dict]:
        return annotation.training_pairs(self.store)

    def unscored_responses(self, reward_version: int, limit: int) -> list[dict]:
        return scores.unscored_responses(self.store, reward_version, limit)

    def unscored_count(self, reward_version: int) -> int:
        return scores.unscored_count(self.store, reward_version)

    def save_scores(self, reward_version: int, values: dict[int, float]) -> int:
        return scores.save_scores(self.store, reward_version, values)

    # -- metrics and events ------------------------------------------------------------------------
    def log_metrics(self, kind: str, values: dict, *, step: int | None = None,
                    version: int | None = None, job_id: int | None = None) -> None:
        self.store.log_metrics(kind, values, step=step, version=version, job_id=job_id)

    def last_metric_step(self, kind: str) -> int | None:
        return self.store.last_metric_step(kind)

    def log_event(self, kind: str, actor: str | None = None, **payload) -> None:
        self.store.log_event(kind, actor, **payload)


VERBS = sorted(n for n, v in vars(LocalData).items() if callable(v) and not n.startswith("_"))
