"""Arena verbs: an annotator's own prompt, answered K times by the current policy, ranked by them.

`request_arena` validates the prompt with the upload rules (rlhf_core.prompt_io), adds it to the
prompts (source "arena", split "train"; an identical prompt already present is reused) and
queues a `sample_arena` job, which the worker claims before any other queued job
(jobs.URGENT_KINDS). The worker writes its answer through `add_arena_item`: one item of kind
"arena" with an assignment for the requester alone.

An arena item never enters the shared pool: it is written with `overlap` 0, so the open-items
triggers (store.py) never list it. Nothing serves it to anyone else, it is in nobody's counts
nor the loop's buffer, and no newer policy retires it; its one assignment lets
`submit_ranking` record the requester's ranking, and the pairs train the reward model like
any other item's.
"""
from __future__ import annotations

import secrets
import time

from rlhf_core.data import jobs
from rlhf_core.data.annotation import LABELS, Refused, add_items
from rlhf_core.data.store import Store, dumps, loads, now_iso
from rlhf_core.prompt_io import ImportRejected, check_prompt_text, prompt_key

KIND = "sample_arena"
MAX_QUEUED = 8  # arena requests waiting at once, over all annotators: each costs a sampling run


def request_arena(store: Store, annotator: str, text, *, seed: int | None = None) -> dict:
    """Queue the policy's answers to `text` for `annotator` alone (`seed`: reproducible
    samples, for scripts and tests). Returns `{"job_id", "prompt_id", "reused"}`; raises
    `Refused` (nothing written) for a bad prompt, a request of theirs still in flight, or a
    full queue. An unranked arena item of theirs is withdrawn: the new request replaces it."""
    if not isinstance(annotator, str) or not annotator:
        raise Refused("missing annotator name")
    try:
        text = check_prompt_text(text)
    except ImportRejected as exc:  # the file's wording, said of a typed prompt
        reason = exc.reason.replace("empty 'prompt'", "the prompt is empty")
        raise Refused(reason.replace("'prompt'", "the prompt")) from None
    key = prompt_key(text)
    with store.write() as db:
        busy = db.execute("SELECT id, status FROM jobs WHERE kind = ? AND requested_by = ? "
                          "AND status IN ('queued', 'running') ORDER BY id LIMIT 1",
                          [KIND, annotator]).fetchone()
        if busy:
            raise Refused(f"your arena request #{busy[0]} is still {busy[1]}: one request at a "
                          "time, its answers appear here when the worker is done")
        waiting = db.execute("SELECT COUNT(*) FROM jobs WHERE kind = ? AND status = 'queued'",
                             [KIND]).fetchone()[0]
        if waiting >= MAX_QUEUED:
            raise Refused(f"{waiting} arena requests are waiting for the worker: try again in a "
                          "minute")
        added = db.execute(
            "INSERT INTO prompts (key, text, source, meta, split, created_at) "
            "VALUES (?, ?, 'arena', '{}', 'train', ?) ON CONFLICT(key) DO NOTHING",
            [key, text, now_iso()]).rowcount
        prompt_id = db.execute("SELECT id FROM prompts WHERE key = ?", [key]).fetchone()[0]
        db.execute("UPDATE items SET status = 'withdrawn', closed_at = ? WHERE kind = 'arena' "
                   "AND status = 'ready' AND id IN (SELECT item_id FROM assignments "
                   "WHERE annotator = ? AND status = 'open')", [now_iso(), annotator])
        params = {"prompt_id": prompt_id, "annotator": annotator}
        job_id = jobs.enqueue(store, KIND, params if seed is None else {**params, "seed": seed},
                              requested_by=annotator, max_attempts=2)
    store.log_event("arena_request", annotator, job_id=job_id, prompt_id=prompt_id,
                    reused=not added)
    return {"job_id": job_id, "prompt_id": prompt_id, "reused": not added}


def add_arena_item(store: Store, job_id: int, worker: str, responses: list[dict], *,
                   policy_version: int, settings: dict | None = None) -> int:
    """The worker's answer to arena job `job_id`: one item of kind "arena" (outside the pool,
    see above) assigned to the requester. Only the worker holding the running job may write
    it; the prompt and the requester come from the job, never from the caller. A job run again
    (its first worker died after writing) gets the item already written."""
    if not 2 <= len(responses) <= len(LABELS):
        raise ValueError(f"an arena item has 2 to {len(LABELS)} responses, not {len(responses)}")
    with store.write() as db:
        row = db.execute("SELECT kind, status, worker, params FROM jobs WHERE id = ?",
                         [job_id]).fetchone()
        if row is None or row[0] != KIND or row[1] != "running" or row[2] != worker:
            raise jobs.JobCancelled(f"job {job_id} is not an arena job this worker holds")
        written = db.execute("SELECT i.id FROM items i JOIN batches b ON b.id = i.batch_id "
                             "WHERE b.job_id = ? AND i.kind = 'arena'", [job_id]).fetchone()
        if written:
            return written[0]
        params = loads(row[3], {})
        batch_id = db["batches"].insert({
            "policy_version": policy_version, "job_id": job_id, "k": len(responses),
            "settings": dumps(settings or {}), "created_at": now_iso()}).last_pk
        add_items(store, batch_id, [{"prompt_id": params["prompt_id"], "kind": "arena",
                                     "selection": "arena", "responses": responses}],
                  policy_version=policy_version, settings=settings, overlap=0)
        item_id = db.execute("SELECT id FROM items WHERE batch_id = ?", [batch_id]).fetchone()[0]
        # No hold to renew: nobody else can be given this item, so its hold lapses at once
        # (a live hold would count against the newcomer cap of the Rank tab).
        now = time.time()
        db.execute("INSERT INTO assignments (item_id, annotator, token, status, created_at, "
                   "expires_at, held_until) VALUES (?, ?, ?, 'open', ?, ?, ?)",
                   [item_id, params["annotator"], secrets.token_urlsafe(12), now_iso(), now,
                    now])
    store.log_event("arena_item", worker, job_id=job_id, item_id=item_id)
    return item_id


def arena_state(store: Store, annotator: str) -> dict | None:
    """The annotator's latest arena request, or None: `{"job": {id, status, progress, message,
    error, created_at, started_at, finished_at}, "prompt": text, "item": {id, status,
    assignment, token} | None}` (`assignment`: open / done / expired)."""
    job = store.one("SELECT id, status, progress, message, error, params, created_at, "
                    "started_at, finished_at FROM jobs WHERE kind = ? AND requested_by = ? "
                    "ORDER BY id DESC LIMIT 1", [KIND, annotator])
    if job is None:
        return None
    params = loads(job.pop("params"), {})
    item = store.one("SELECT i.id, i.status, a.status AS assignment, a.token FROM items i "
                     "JOIN batches b ON b.id = i.batch_id LEFT JOIN assignments a "
                     "ON a.item_id = i.id AND a.annotator = ? "
                     "WHERE b.job_id = ? AND i.kind = 'arena'", [annotator, job["id"]])
    prompt = store.scalar("SELECT text FROM prompts WHERE id = ?", [params.get("prompt_id")])
    return {"job": job, "prompt": prompt, "item": item}
