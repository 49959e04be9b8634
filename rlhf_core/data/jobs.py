"""The durable job queue: verbs over the jobs table (the worker loop is rlhf_core.worker.run).

States: queued -> running -> done | failed (| cancelled). A running job holds a
lease it renews with every heartbeat; when a worker dies, its lease goes stale
and the next worker re-takes the job (up to `max_attempts`). Which code a job kind
runs is the table in rlhf_core.worker.handlers.
"""
from __future__ import annotations

import time

from rlhf_core.data.store import Store, dumps, loads, now_iso

LEASE_S = 60.0


class JobCancelled(Exception):
    pass


# -- queue verbs -----------------------------------------------------------------
def enqueue(store: Store, kind: str, params: dict | None = None, *, requested_by: str | None = None,
            unique: bool = False, max_attempts: int = 3) -> int:
    """Queue a job. With `unique`, an already queued/running job of that kind is returned instead."""
    with store.write() as db:
        if unique:
            row = db.execute("SELECT id FROM jobs WHERE kind = ? AND status IN ('queued', 'running') "
                             "ORDER BY id LIMIT 1", [kind]).fetchone()
            if row:
                return row[0]
        job_id = db["jobs"].insert({
            "kind": kind, "params": dumps(params or {}), "status": "queued", "progress": 0.0,
            "requested_by": requested_by, "max_attempts": max_attempts,
            "created_at": now_iso()}).last_pk
    store.log_event("job_queued", requested_by, job_id=job_id, job_kind=kind)
    return job_id


# Scoring ranked responses for the researcher view is not on the path from a ranking to the
# next policy's batch: it runs when no other job is queued (measured in bench B5: it ran
# between the PPO round and the sampling of the new policy's batch).
BACKGROUND_KINDS = ("score_items",)
# A person watches these (the arena: an annotator typed a prompt and waits for its answers):
# claimed before any other queued job. A running job is not interrupted.
URGENT_KINDS = ("sample_arena",)
# An arena request is a one-prompt sampling job: a worker that samples batches takes it too.
IMPLIED_KINDS = {"sample_batch": ("sample_arena",)}


def with_implied(kinds: list[str]) -> list[str]:
    """`kinds` and the kinds they imply (a batch sampler also answers arena requests)."""
    return list(dict.fromkeys([*kinds, *(x for k in kinds for x in IMPLIED_KINDS.get(k, ()))]))


def _kinds_sql(kinds: tuple[str, ...]) -> str:
    return ", ".join(f"'{k}'" for k in kinds)  # constants of this module, never user input


CLAIM_ORDER = (f"CASE WHEN kind IN ({_kinds_sql(URGENT_KINDS)}) THEN 0 "
               f"WHEN kind IN ({_kinds_sql(BACKGROUND_KINDS)}) THEN 2 ELSE 1 END, id")


def claim(store: Store, worker: str, *, kinds: list[str] | None = None,
          lease_s: float = LEASE_S) -> dict | None:
    """Take the oldest queued job (urgent kinds first, background kinds last), or one whose
    lease went stale."""
    now = time.time()
    kinds = with_implied(kinds) if kinds else kinds
    with store.write() as db:
        _release_stale(db, now)
        sql = "SELECT * FROM jobs WHERE status = 'queued'"
        params: list = []
        if kinds:
            sql += f" AND kind IN ({','.join('?' * len(kinds))})"
            params += kinds
        # urgent first; background jobs wait behind any queued job of the loop's path
        row = db.execute(sql + f" ORDER BY {CLAIM_ORDER} LIMIT 1", params).fetchone()
        if row is None:
            return None
        job_id = row[0]
        db.execute("UPDATE jobs SET status = 'running', worker = ?, attempts = attempts + 1, "
                   "heartbeat_at = ?, lease_expires = ?, started_at = ?, error = NULL "
                   "WHERE id = ?", [worker, now, now + lease_s, now_iso(), job_id])
    return get_job(store, job_id)


def _release_stale(db, now: float, *, worker: str | None = None,
                   why: str = "lease expired") -> None:
    """The lease rules for a running job whose worker died (its lease went stale, or, with
    `worker`, the workers registry saw that worker die): a cancel it never saw still holds;
    a job out of attempts fails; the rest are re-queued."""
    mine, args = ("", []) if worker is None else (" AND worker = ?", [worker])
    db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ? WHERE status = 'running' "
               "AND lease_expires < ? AND message = 'cancel requested'" + mine,
               [now_iso(), now, *args])
    db.execute("UPDATE jobs SET status = 'failed', finished_at = ?, error = ? "
               "WHERE status = 'running' AND lease_expires < ? AND attempts >= max_attempts" + mine,
               [now_iso(), f"worker died ({why}) and no attempts are left", now, *args])
    db.execute("UPDATE jobs SET status = 'queued', message = ? "
               "WHERE status = 'running' AND lease_expires < ?" + mine,
               [f"{why}: re-queued", now, *args])


def release_jobs_of(store: Store, worker: str, why: str) -> None:
    """`worker` is dead: its running jobs go by the lease rules now, not when the lease ends."""
    with store.write() as db:
        _release_stale(db, float("inf"), worker=worker, why=why)


def abandon(store: Store, job_id: int, worker: str, reason: str) -> None:
    """A stopping worker hands its job back: re-queued without counting the attempt (or
    cancelled, if a cancel was requested). Only our own run, as for `mark_cancelled`."""
    with store.write() as db:
        db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ? WHERE id = ? "
                   "AND status = 'running' AND worker = ? AND message = 'cancel requested'",
                   [now_iso(), job_id, worker])
        db.execute("UPDATE jobs SET status = 'queued', attempts = MAX(attempts - 1, 0), "
                   "message = ? WHERE id = ? AND status = 'running' AND worker = ?",
                   [f"{reason}: re-queued", job_id, worker])


def get_job(store: Store, job_id: int) -> dict | None:
    row = store.one("SELECT * FROM jobs WHERE id = ?", [job_id])
    if row:
        row["params"] = loads(row["params"], {})
        row["result"] = loads(row["result"], None)
    return row


def list_jobs(store: Store, limit: int = 50) -> list[dict]:
    return store.rows("SELECT id, kind, status, progress, message, error, attempts, created_at, "
                      "started_at, finished_at FROM jobs ORDER BY id DESC LIMIT ?", [limit])


def cancel(store: Store, job_id: int) -> bool:
    """Cancel a queued job now; a running one stops at its next progress report."""
    with store.write() as db:
        cur = db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ? "
                         "WHERE id = ? AND status = 'queued'", [now_iso(), job_id])
        if cur.rowcount:
            return True
        cur = db.execute("UPDATE jobs SET message = 'cancel requested' "
                         "WHERE id = ? AND status = 'running'", [job_id])
        return bool(cur.rowcount)


def report_progress(store: Store, job_id: int, worker: str, fraction: float, message: str,
                    lease_s: float = LEASE_S) -> None:
    """Progress is also the heartbeat. Raises JobCancelled when the job is no longer ours
    (re-leased to another worker) or a cancel was requested."""
    now = time.time()
    with store.write() as db:
        row = db.execute("SELECT status, worker, message FROM jobs WHERE id = ?",
                         [job_id]).fetchone()
        if row is None or row[0] != "running" or row[1] != worker:
            raise JobCancelled(f"job {job_id} is no longer ours ({row and row[0]})")
        if row[2] == "cancel requested":
            raise JobCancelled(f"job {job_id} was cancelled")
        db.execute("UPDATE jobs SET progress = ?, message = ?, heartbeat_at = ?, "
                   "lease_expires = ? WHERE id = ?",
                   [max(0.0, min(1.0, fraction)), message, now, now + lease_s, job_id])


def renew_lease(store: Store, job_id: int, worker: str, lease_s: float = LEASE_S) -> None:
    now = time.time()
    with store.write() as db:
        db.execute("UPDATE jobs SET heartbeat_at = ?, lease_expires = ? "
                   "WHERE id = ? AND status = 'running' AND worker = ?",
                   [now, now + lease_s, job_id, worker])


def mark_cancelled(store: Store, job_id: int, worker: str, reason: str) -> None:
    """Only our own run: a worker that lost its lease must not cancel its successor's."""
    with store.write() as db:
        db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ?, error = ? "
                   "WHERE id = ? AND status = 'running' AND worker = ?",
                   [now_iso(), reason, job_id, worker])


def active_kinds(store: Store) -> set[str]:
    """Kinds of the jobs queued or running."""
    return {r["kind"] for r in store.rows(
        "SELECT DISTINCT kind FROM jobs WHERE status IN ('queued', 'running')")}


def finish(store: Store, job_id: int, *, result: dict | None = None, error: str | None = None,
           worker: str | None = None) -> None:
    status = "failed" if error else "done"
    with store.write() as db:
        db.execute("UPDATE jobs SET status = ?, result = ?, error = ?, finished_at = ?, "
                   "progress = CASE WHEN ? = 'done' THEN 1.0 ELSE progress END "
                   "WHERE id = ? AND status = 'running' AND (? IS NULL OR worker = ?)",
                   [status, dumps(result) if result is not None else None, error, now_iso(),
                    status, job_id, worker, worker])
    store.log_event(f"job_{status}", worker, job_id=job_id, error=error)


def typical_duration_s(store: Store, kind: str, *, last: int = 5) -> float | None:
    """The median run time of the last `last` finished jobs of `kind` (None before any ran):
    how long the loop and the waiting annotators may expect the next one to take."""
    from datetime import datetime
    rows = store.rows("SELECT started_at, finished_at FROM jobs WHERE status = 'done' "
                      "AND kind = ? AND started_at IS NOT NULL AND finished_at IS NOT NULL "
                      "ORDER BY id DESC LIMIT ?", [kind, last])
    spans = sorted((datetime.fromisoformat(r["finished_at"])
                    - datetime.fromisoformat(r["started_at"])).total_seconds() for r in rows)
    return spans[len(spans) // 2] if spans else None


def current_jobs(store: Store) -> list[dict]:
    """Running jobs, then queued ones, in the order the worker takes them."""
    return store.rows("SELECT id, kind, status, progress, message, started_at, created_at "
                      "FROM jobs WHERE status IN ('running', 'queued') "
                      f"ORDER BY status = 'queued', {CLAIM_ORDER}")
