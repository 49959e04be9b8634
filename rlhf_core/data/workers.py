"""The workers registry: is a worker alive, where, and what is it doing?

Every worker process registers (name, host, pid, job kinds, device), then beats every
`BEAT_S` seconds, idle or busy, and at once when a job starts or ends; on a clean exit it says
`stopped`. A worker is dead when its beats stop (`STALE_S`: three beats missed) or, seen from
the same host and pid namespace, its process is gone. Its running job is then released by the
lease rules (rlhf_core.data.jobs) at once, instead of when its 60 s lease runs out.
Heartbeat times are this process's clock: every write of a remote worker runs on the app host.
"""
from __future__ import annotations

import functools
import os
import socket
import time
from pathlib import Path

from rlhf_core.data import jobs
from rlhf_core.data.store import Store, dumps, loads, now_iso

BEAT_S = 2.0
STALE_S = 3 * BEAT_S + 1.0  # three beats missed (one second of slack for a busy database)
LIVE = ("idle", "running")
FORGET_S = 7 * 24 * 3600.0


@functools.cache
def pid_scope() -> str:
    """Where a pid means the same process: the host, its kernel boot and its pid namespace
    (two containers may share a hostname, or a kernel, and still not see each other's pids)."""
    parts = [socket.gethostname()]
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                 lambda: os.readlink("/proc/self/ns/pid")):
        try:
            parts.append(read())
        except OSError:  # no /proc (macOS): the hostname alone
            pass
    return "|".join(parts)


def pid_alive(pid: int) -> bool:
    """Is process `pid` running here? A zombie (killed, not yet waited for) is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): os.kill said it exists


# -- verbs of a worker about itself -------------------------------------------------------------
def register(store: Store, name: str, *, host: str, pid: int, scope: str | None = None,
             kinds: list[str] | None = None, device: str | None = None) -> None:
    """A worker starts (a restarted name starts afresh). `kinds` None: every kind.
    Rows of workers gone for over `FORGET_S` are dropped (every start is a new name)."""
    with store.write() as db:
        db.execute("DELETE FROM workers WHERE status IN ('stopped', 'dead') AND heartbeat_at < ?",
                   [time.time() - FORGET_S])
        db.execute("INSERT OR REPLACE INTO workers (name, host, pid, pid_scope, kinds, device, "
                   "started_at, heartbeat_at, job_id, reason, status) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, 'idle')",
                   [name, host, int(pid), scope, dumps(kinds) if kinds else None, device,
                    now_iso(), time.time()])
    store.log_event("worker_started", name, host=host, pid=pid, kinds=kinds, device=device)


def beat(store: Store, name: str, *, job_id: int | None = None,
         device: str | None = None) -> bool:
    """I am alive, running `job_id` (None: idle). False if this name never registered."""
    with store.write() as db:
        cur = db.execute("UPDATE workers SET heartbeat_at = ?, job_id = ?, reason = NULL, "
                         "status = CASE WHEN ? IS NULL THEN 'idle' ELSE 'running' END, "
                         "device = COALESCE(?, device) WHERE name = ?",
                         [time.time(), job_id, job_id, device, name])
    return bool(cur.rowcount)


def stopped(store: Store, name: str, reason: str = "stopped") -> None:
    with store.write() as db:
        db.execute("UPDATE workers SET status = 'stopped', job_id = NULL, reason = ?, "
                   "heartbeat_at = ? WHERE name = ?", [reason, time.time(), name])
    store.log_event("worker_stopped", name, reason=reason)


# -- finding the dead ----------------------------------------------------------------------------
def reap(store: Store, *, exclude: str | None = None, stale_s: float = STALE_S) -> list[str]:
    """Mark dead every live-listed worker that stopped beating, or whose process is gone (when
    it shares our pid scope), and release its running jobs now. Returns the names marked."""
    now, here = time.time(), pid_scope()
    dead = []
    for w in store.rows("SELECT name, pid, pid_scope, heartbeat_at FROM workers "
                        "WHERE status IN ('idle', 'running')"):
        if w["name"] == exclude:
            continue
        if w["heartbeat_at"] < now - stale_s:
            dead.append((w, f"no heartbeat for {now - w['heartbeat_at']:.0f} s"))
        elif w["pid_scope"] == here and not pid_alive(w["pid"]):
            dead.append((w, f"process {w['pid']} is gone"))
    marked = []
    for w, why in dead:
        with store.write() as db:
            # the same beat as read: a worker that beat meanwhile is alive after all
            cur = db.execute("UPDATE workers SET status = 'dead', job_id = NULL, reason = ? "
                             "WHERE name = ? AND status IN ('idle', 'running') "
                             "AND heartbeat_at = ?", [why, w["name"], w["heartbeat_at"]])
            if cur.rowcount:
                jobs.release_jobs_of(store, w["name"], f"worker died: {why}")
                marked.append(w["name"])
        if cur.rowcount:
            store.log_event("worker_died", w["name"], reason=why)
    return marked


# -- reading -------------------------------------------------------------------------------------
def list_workers(store: Store, *, limit: int = 20) -> list[dict]:
    """Live workers first, then the most recently seen; `age_s` since the last beat, and the
    current job's kind and progress."""
    rows = store.rows(
        "SELECT w.*, j.kind AS job_kind, j.progress AS job_progress FROM workers w "
        "LEFT JOIN jobs j ON j.id = w.job_id "
        "ORDER BY w.status IN ('idle', 'running') DESC, w.heartbeat_at DESC LIMIT ?", [limit])
    now = time.time()
    for r in rows:
        r["kinds"] = loads(r["kinds"], None)
        r["age_s"] = max(0.0, now - r["heartbeat_at"])
    return rows


def alive(store: Store, *, stale_s: float = STALE_S) -> list[dict]:
    """Workers that beat within `stale_s`, whatever has not been reaped yet."""
    return [w for w in list_workers(store, limit=1000)
            if w["status"] in LIVE and w["age_s"] <= stale_s]
