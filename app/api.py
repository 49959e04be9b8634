"""Plain functions behind the public HTTP API (see the endpoint list in app/ui.py).

They take explicit arguments instead of browser state, so scripts and simulated annotators
(`gradio_client`) rank exactly as people do. `who` is the login username when auth is on
(the passed name is then ignored), else the passed annotator name.
"""
from __future__ import annotations

from app import handlers
from app.context import AppContext
from app.status import start_job
from rlhf_core.data.annotation import (Refused, StaleForm, annotator_progress, load_item, next_item,
                                  submit_ranking, undo_last)


def _who(ctx: AppContext, annotator: str, username: str | None) -> str:
    return handlers.identify(ctx, annotator, username)


def get_item(ctx: AppContext, annotator: str, username: str | None = None) -> dict:
    try:
        who = _who(ctx, annotator, username)
        item = next_item(ctx.store, who, ttl_s=ctx.config.loop.assignment_ttl_s)
    except (Refused, ValueError) as exc:
        return {"ok": False, "message": str(exc), "item": None}
    return {"ok": True, "annotator": who, "item": handlers.public_item(item) if item else None,
            "message": "" if item else "nothing ready: the worker is sampling the next batch",
            "progress": annotator_progress(ctx.store, who)}


def submit(ctx: AppContext, annotator: str, item_id: int, token: str, submission_key: str,
           ranking: str, skip: bool = False, all_bad: bool = False, flag: bool = False,
           note: str = "", time_spent: float | None = None, username: str | None = None) -> dict:
    """ranking: keyboard text ("bacd", "b a=c d") or JSON tiers of response ids or labels."""
    try:
        who = _who(ctx, annotator, username)
        item = load_item(ctx.store, int(item_id))
        if item is None:
            raise Refused(f"item {item_id} does not exist")
        state = {"id": item["id"], "labels": {r["label"]: r["id"] for r in item["responses"]}}
        tiers = None if skip else handlers.tiers_from_text(ranking, state, all_bad=all_bad)
        result = submit_ranking(
            ctx.store, annotator=who, item_id=int(item_id), token=token or None,
            submission_key=submission_key, tiers=tiers, skip=bool(skip), all_bad=bool(all_bad),
            flagged=bool(flag), note=(note or "").strip() or None,
            time_spent_s=float(time_spent) if time_spent is not None else None)
    except (Refused, ValueError, TypeError) as exc:
        return {"ok": False, "stale": isinstance(exc, StaleForm), "message": str(exc)}
    return {"ok": True, "stale": False, "message": "duplicate" if result["duplicate"] else "saved",
            **result}


def undo(ctx: AppContext, annotator: str, submission_key: str,
         username: str | None = None) -> dict:
    try:
        who = _who(ctx, annotator, username)
        undone = undo_last(ctx.store, who, submission_key=submission_key)
    except (Refused, ValueError) as exc:
        return {"ok": False, "message": str(exc)}
    if undone is None:
        return {"ok": False, "message": "nothing to undo"}
    return {"ok": True, "message": "undone", **undone}


def status(ctx: AppContext) -> dict:
    s = ctx.store.status()
    s.pop("versions", None)  # the version history lives in `rlhf status --json`
    s.pop("workspace", None)  # no server paths over HTTP
    return s


def queue_job(ctx: AppContext, annotator: str, kind: str, username: str | None = None) -> dict:
    try:
        who = _who(ctx, annotator, username)
    except Refused as exc:
        return {"ok": False, "message": str(exc)}
    out = start_job(ctx, who, kind)
    return {k: out[k] for k in ("ok", "message", "job_id") if k in out}
