"""Remote workers' tokens: created once (the secret is shown once), stored as a hash, revocable.

A token is 32 random bytes (URL-safe); its SHA-256 is what the table keeps, so a copy of the
database does not let anyone act as a worker. A revoked token is refused at its next call.
"""
from __future__ import annotations

import hashlib
import re
import secrets

from rlhf_core.data.store import Store, now_iso

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create(store: Store, name: str) -> str:
    """A new token for worker `name`; returns the secret (not stored anywhere)."""
    if not NAME.match(name or ""):
        raise ValueError(f"worker token name {name!r}: use 1-64 letters, digits, '_', '.', '-'")
    token = "rlw_" + secrets.token_urlsafe(32)
    with store.write() as db:
        if db.execute("SELECT 1 FROM worker_tokens WHERE name = ?", [name]).fetchone():
            raise ValueError(f"a worker token named {name!r} exists: revoke it or pick a name")
        db.execute("INSERT INTO worker_tokens (name, token_hash, created_at) VALUES (?, ?, ?)",
                   [name, token_hash(token), now_iso()])
    store.log_event("worker_token_created", None, name=name)
    return token


def list_tokens(store: Store) -> list[dict]:
    return store.rows("SELECT id, name, created_at, revoked_at, last_used_at FROM worker_tokens "
                      "ORDER BY id")


def revoke(store: Store, name: str) -> bool:
    with store.write() as db:
        cur = db.execute("UPDATE worker_tokens SET revoked_at = ? WHERE name = ? AND "
                         "revoked_at IS NULL", [now_iso(), name])
    if cur.rowcount:
        store.log_event("worker_token_revoked", None, name=name)
    return bool(cur.rowcount)


def verify(store: Store, token: str) -> dict | None:
    """The active token row for `token`, or None (unknown or revoked)."""
    if not token or len(token) > 200:
        return None
    row = store.one("SELECT id, name, revoked_at FROM worker_tokens WHERE token_hash = ?",
                    [token_hash(token)])
    if row is None or row["revoked_at"] is not None:
        return None
    return row


def touch(store: Store, token_id: int) -> None:
    with store.write() as db:
        db.execute("UPDATE worker_tokens SET last_used_at = ? WHERE id = ?", [now_iso(), token_id])


def any_active(store: Store) -> bool:
    return bool(store.scalar("SELECT COUNT(*) FROM worker_tokens WHERE revoked_at IS NULL"))


def holds_running_job(store: Store, worker: str, job_id: int | None = None) -> bool:
    """Does `worker` hold a running job (that one, if `job_id`)? Remote writes need one."""
    sql = "SELECT COUNT(*) FROM jobs WHERE status = 'running' AND worker = ?"
    params: list = [worker]
    if job_id is not None:
        sql, params = sql + " AND id = ?", params + [int(job_id)]
    return bool(store.scalar(sql, params))
