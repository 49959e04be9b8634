"""A durable job queue in the jobs table, and the worker loop that drains it.

States: queued -> running -> done | failed (| cancelled). A running job holds a
lease it renews with every heartbeat; when a worker dies, its lease goes stale
and the next worker re-takes the job (up to `max_attempts`). Handlers are
plain functions `handler(runtime, params, reporter) -> dict` registered in
`HANDLERS` by name; they never hold a DB transaction while a model runs.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from typing import Callable

from rlhf_core.data.store import Store, dumps, loads, now_iso

log = logging.getLogger(__name__)

LEASE_S = 60.0
HANDLERS: dict[str, Callable] = {}


class JobCancelled(Exception):
    pass


def handler(name: str):
    def register(fn):
        HANDLERS[name] = fn
        return fn
    return register


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


def claim(store: Store, worker: str, *, kinds: list[str] | None = None,
          lease_s: float = LEASE_S) -> dict | None:
    """Take the oldest queued job (background kinds last), or one whose lease went stale."""
    now = time.time()
    with store.write() as db:
        # Stale leases: the worker died. A cancel it never saw still holds; fail jobs out of
        # attempts, re-queue the rest.
        db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ? WHERE status = 'running' "
                   "AND lease_expires < ? AND message = 'cancel requested'", [now_iso(), now])
        db.execute("UPDATE jobs SET status = 'failed', finished_at = ?, error = "
                   "'worker died (lease expired) and no attempts are left' "
                   "WHERE status = 'running' AND lease_expires < ? AND attempts >= max_attempts",
                   [now_iso(), now])
        db.execute("UPDATE jobs SET status = 'queued', message = 'lease expired: re-queued' "
                   "WHERE status = 'running' AND lease_expires < ?", [now])
        sql = "SELECT * FROM jobs WHERE status = 'queued'"
        params: list = []
        if kinds:
            sql += f" AND kind IN ({','.join('?' * len(kinds))})"
            params += kinds
        # background jobs wait behind any queued job of the loop's path to the next batch
        order = f" ORDER BY kind IN ({','.join('?' * len(BACKGROUND_KINDS))}), id LIMIT 1"
        row = db.execute(sql + order, params + list(BACKGROUND_KINDS)).fetchone()
        if row is None:
            return None
        job_id = row[0]
        db.execute("UPDATE jobs SET status = 'running', worker = ?, attempts = attempts + 1, "
                   "heartbeat_at = ?, lease_expires = ?, started_at = ?, error = NULL "
                   "WHERE id = ?", [worker, now, now + lease_s, now_iso(), job_id])
    return get_job(store, job_id)


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


class Reporter:
    """Handed to a job handler: progress (which is also the heartbeat) and metrics."""

    def __init__(self, store: Store, job_id: int, worker: str, lease_s: float = LEASE_S):
        self.store, self.job_id, self.worker, self.lease_s = store, job_id, worker, lease_s

    def progress(self, fraction: float, message: str = "") -> None:
        now = time.time()
        with self.store.write() as db:
            row = db.execute("SELECT status, worker, message FROM jobs WHERE id = ?",
                             [self.job_id]).fetchone()
            if row is None or row[0] != "running" or row[1] != self.worker:
                raise JobCancelled(f"job {self.job_id} is no longer ours ({row and row[0]})")
            if row[2] == "cancel requested":
                raise JobCancelled(f"job {self.job_id} was cancelled")
            db.execute("UPDATE jobs SET progress = ?, message = ?, heartbeat_at = ?, "
                       "lease_expires = ? WHERE id = ?",
                       [max(0.0, min(1.0, fraction)), message, now, now + self.lease_s,
                        self.job_id])

    def heartbeat(self) -> None:
        row = self.store.one("SELECT progress, message FROM jobs WHERE id = ?", [self.job_id])
        self.progress(row["progress"] if row else 0.0, row["message"] if row else "")

    def metrics(self, kind: str, values: dict, *, step: int | None = None,
                version: int | None = None) -> None:
        self.store.log_metrics(kind, values, step=step, version=version, job_id=self.job_id)


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


# -- the worker loop ------------------------------------------------------------------
def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 10000}"


def run_one(runtime, store: Store, worker: str, kinds: list[str] | None = None) -> dict | None:
    """Claim and run one job. Returns the finished job row, or None if the queue was empty."""
    job = claim(store, worker, kinds=kinds)
    if job is None:
        return None
    reporter = Reporter(store, job["id"], worker)
    fn = HANDLERS.get(job["kind"])
    try:
        if fn is None:
            raise ValueError(f"unknown job kind {job['kind']!r}")
        with _Heartbeat(reporter):
            result = fn(runtime, job["params"], reporter)
        finish(store, job["id"], result=result or {}, worker=worker)
    except JobCancelled as exc:
        with store.write() as db:
            # Only our own run: a worker that lost its lease must not cancel its successor's.
            db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ?, error = ? "
                       "WHERE id = ? AND status = 'running' AND worker = ?",
                       [now_iso(), str(exc), job["id"], worker])
    except Exception as exc:  # a failed job must never take the worker down
        log.error("job %s (%s) failed:\n%s", job["id"], job["kind"], traceback.format_exc())
        finish(store, job["id"], error=f"{type(exc).__name__}: {exc}", worker=worker)
    return get_job(store, job["id"])


class _Heartbeat:
    """Renews the lease from a thread, so one long forward pass is not mistaken for death."""

    def __init__(self, reporter: Reporter, every_s: float = LEASE_S / 4):
        self.reporter, self.every_s = reporter, every_s
        self._stop = threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.every_s):
            try:
                now = time.time()
                with self.reporter.store.write() as db:
                    db.execute("UPDATE jobs SET heartbeat_at = ?, lease_expires = ? "
                               "WHERE id = ? AND status = 'running' AND worker = ?",
                               [now, now + self.reporter.lease_s, self.reporter.job_id,
                                self.reporter.worker])
            except Exception:  # a busy DB must not kill the job; the next beat retries
                log.warning("heartbeat failed", exc_info=True)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        return False


def worker_loop(runtime, store: Store, *, stop: threading.Event, idle: Callable | None = None,
                poll_s: float = 1.0, kinds: list[str] | None = None) -> None:
    """Run jobs until `stop` is set. `idle()` runs when the queue is empty (the loop policy)."""
    worker = worker_name()
    log.info("worker %s started", worker)
    while not stop.is_set():
        try:
            ran = run_one(runtime, store, worker, kinds)
            if ran is None and idle is not None:
                idle()
        except Exception:
            log.error("worker loop error:\n%s", traceback.format_exc())
            ran = None
        if ran is None:
            stop.wait(poll_s)
