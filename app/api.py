"""Plain functions behind the public HTTP API (see the endpoint list in app/ui.py).

They take explicit arguments instead of browser state, so scripts and simulated annotators
(`gradio_client`) rank exactly as people do. `who` is the login username when auth is on
(the passed name is then ignored), else the passed annotator name.
"""
from __future__ import annotations

import logging
import sqlite3

from app import handlers, serving
from app.context import AppContext
from app.status import start_job
from rlhf_core.data.annotation import (MAX_ID, MAX_KEY_CHARS, MAX_NOTE_CHARS, Refused, StaleForm,
                                       annotator_progress, load_item, submit_ranking, undo_last)

log = logging.getLogger(__name__)

MAX_RANKING_CHARS = 1000  # 8 responses with 19-digit ids as JSON tiers need ~250
MAX_TIME_SPENT_S = 24 * 3600.0
MAX_FIELD_CHARS = 200  # annotator names, tokens, job kinds


def _who(ctx: AppContext, annotator: str, username: str | None) -> str:
    _text(annotator, "annotator", optional=True)
    return handlers.identify(ctx, annotator, username)


def _failure(exc: BaseException) -> str:
    """One line for any failure, never empty: Gradio shows an uncaught error as null."""
    if isinstance(exc, ValueError):  # Refused, StaleForm and other refusals: the user's to act on
        text = str(exc)
    elif isinstance(exc, sqlite3.OperationalError):
        text = f"the database is unavailable ({exc}); nothing was changed, try again"
    elif isinstance(exc, RecursionError):
        text = "the request is nested too deeply; nothing was changed"
    else:
        log.exception("API call failed")
        text = f"internal error ({type(exc).__name__}); nothing was changed"
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:299] + "…"


# -- strict argument types: values arrive as raw JSON (gr.api does no conversion) -------------
def _text(value, name: str, *, optional: bool = False, limit: int = MAX_FIELD_CHARS) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise Refused(f"{name} must be text, got {_type(value)}")
    if len(value) > limit:
        raise Refused(f"{name} is too long ({limit} characters at most)")


def _flag(value, name: str) -> None:
    if not isinstance(value, bool):
        raise Refused(f"{name} must be true or false, got {_type(value)}")


def _check_submit(item_id, token, submission_key, ranking, flags: dict, note,
                  time_spent) -> None:
    if type(item_id) is not int or not 1 <= item_id <= MAX_ID:
        raise Refused(f"item_id must be a positive integer, got {_type(item_id)}")
    _text(token, "token", optional=True)
    _text(submission_key, "submission_key", limit=MAX_KEY_CHARS)
    _text(ranking, "ranking", optional=True, limit=MAX_RANKING_CHARS)
    for name, value in flags.items():
        _flag(value, name)
    _text(note, "note", optional=True, limit=MAX_NOTE_CHARS)
    if time_spent is not None and (type(time_spent) not in (int, float)
                                   or not 0 <= time_spent <= MAX_TIME_SPENT_S):
        raise Refused(f"time_spent must be seconds between 0 and {MAX_TIME_SPENT_S:.0f}, "
                      f"got {_type(time_spent)}")


def _type(value) -> str:
    """A sent value for a message: short numbers as themselves, anything else by its type."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and len(repr(value)) < 30:
        return repr(value)
    return {bool: "a boolean", str: "text", list: "a list", dict: "an object",
            type(None): "null"}.get(type(value), type(value).__name__)


# -- the endpoints ----------------------------------------------------------------------
def get_item(ctx: AppContext, annotator: str, username: str | None = None) -> dict:
    try:
        who = _who(ctx, annotator, username)
        item = serving.serve_item(ctx, who)  # a call renews the short hold, as a heartbeat
        progress = annotator_progress(ctx.store, who)
        message = "" if item else serving.activity(ctx, who, markdown=False)
    except Exception as exc:  # the HTTP boundary: every failure is a message
        return {"ok": False, "message": _failure(exc), "item": None}
    return {"ok": True, "annotator": who, "item": handlers.public_item(item) if item else None,
            "message": message, "progress": progress}


def submit(ctx: AppContext, annotator: str, item_id: int, token: str, submission_key: str,
           ranking: str, skip: bool = False, all_bad: bool = False, flag: bool = False,
           note: str = "", time_spent: float | None = None, username: str | None = None) -> dict:
    """ranking: keyboard text ("bacd", "b a=c d") or JSON tiers of response ids or labels."""
    try:
        who = _who(ctx, annotator, username)
        _check_submit(item_id, token, submission_key, ranking,
                      {"skip": skip, "all_bad": all_bad, "flag": flag}, note, time_spent)
        item = load_item(ctx.store, item_id)
        if item is None:
            raise Refused(f"item {item_id} does not exist")
        state = {"id": item["id"], "labels": {r["label"]: r["id"] for r in item["responses"]}}
        tiers = None if skip else handlers.tiers_from_text(ranking, state, all_bad=all_bad)
        result = submit_ranking(
            ctx.store, annotator=who, item_id=item_id, token=token or None,
            submission_key=submission_key, tiers=tiers, skip=skip, all_bad=all_bad,
            flagged=flag, note=(note or "").strip() or None,
            time_spent_s=float(time_spent) if time_spent is not None else None)
    except Exception as exc:  # the HTTP boundary: every failure is a message
        return {"ok": False, "stale": isinstance(exc, StaleForm), "message": _failure(exc)}
    return {"ok": True, "stale": False, "message": "duplicate" if result["duplicate"] else "saved",
            **result}


def undo(ctx: AppContext, annotator: str, submission_key: str,
         username: str | None = None) -> dict:
    try:
        who = _who(ctx, annotator, username)
        _text(submission_key, "submission_key", limit=MAX_KEY_CHARS)
        undone = undo_last(ctx.store, who, submission_key=submission_key)
    except Exception as exc:  # the HTTP boundary: every failure is a message
        return {"ok": False, "message": _failure(exc)}
    if undone is None:
        return {"ok": False, "message": "nothing to undo"}
    return {"ok": True, "message": "undone", **undone}


def status(ctx: AppContext) -> dict:
    try:
        s = ctx.store.status()
    except Exception as exc:  # the HTTP boundary: every failure is a message
        return {"ok": False, "message": _failure(exc)}
    s.pop("versions", None)  # the version history lives in `rlhf status --json`
    s.pop("workspace", None)  # no server paths over HTTP
    return s


def queue_job(ctx: AppContext, annotator: str, kind: str, username: str | None = None) -> dict:
    try:
        who = _who(ctx, annotator, username)
        _text(kind, "kind")
        out = start_job(ctx, who, kind)
    except Exception as exc:  # the HTTP boundary: every failure is a message
        return {"ok": False, "message": _failure(exc)}
    return {k: out[k] for k in ("ok", "message", "job_id") if k in out}
