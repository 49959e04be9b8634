"""Handing items out and saying honestly why there is none: plain functions, no Gradio.

An item is held for a short time (`loop.assignment_hold_s`) that the Rank tab's timer renews
while the item is on screen, so a closed or sleeping tab gives its item back within minutes.
Without login, names that never submitted hold at most `loop.max_newcomer_holds` items at once.
When nothing is available the page says what the worker is doing (the running job, how long
it has run, how long such jobs took before) and how many items other annotators hold.
"""
from __future__ import annotations

from datetime import datetime, timezone

from app.context import AppContext
from rlhf_core.data import jobs
from rlhf_core.data.annotation import Busy, annotator_progress, next_item, renew_hold

# what each job kind means to someone waiting for items
DOING = {"sample_batch": "sampling the next batch", "train_reward": "training the reward model",
         "ppo_round": "running a policy round", "eval_policy": "evaluating the policy",
         "score_items": "scoring ranked responses",
         "sample_arena": "answering an annotator's own prompt (Arena)"}


def serve_item(ctx: AppContext, annotator: str) -> dict | None:
    """The annotator's item (resumed or new) under the configured holds; `Busy` when the
    newcomer cap is full (without login only: with it every name is a real account)."""
    loop = ctx.config.loop
    cap = None if ctx.auth_enabled or not loop.max_newcomer_holds else loop.max_newcomer_holds
    return next_item(ctx.store, annotator, ttl_s=loop.assignment_ttl_s,
                     hold_s=loop.assignment_hold_s, newcomer_cap=cap)


def heartbeat(ctx: AppContext, annotator: str | None, state: dict | None) -> dict:
    """The Rank tab's timer while an item is on screen: renew its hold. Says so when the item
    was lost meanwhile; the form keeps what was typed either way."""
    if not annotator or not state:
        return {}
    status = renew_hold(ctx.store, state["id"], annotator, state.get("token"),
                        hold_s=ctx.config.loop.assignment_hold_s)
    away = _duration(ctx.config.loop.assignment_hold_s)
    if status == "lost":
        return {"message": f"**Item {state['id']} went to another annotator** while this page "
                           f"was away (no sign of it for {away}). Your choices stay on screen; "
                           "press *Next item* to continue."}
    if status == "closed":
        return {"message": f"**Item {state['id']} was withdrawn or retired.** Your choices stay "
                           "on screen; press *Next item* to continue."}
    return {}


def progress_line(ctx: AppContext, annotator: str) -> str:
    """The header: ranked so far, available now, and (apart) what others hold."""
    p = annotator_progress(ctx.store, annotator)
    held = f" · {p['held']} held by others" if p["held"] else ""
    return (f"**{annotator}** · ranked **{p['done']}** · **{p['available']}** more available"
            f"{held}")


def activity(ctx: AppContext, annotator: str | None = None, *, markdown: bool = True) -> str:
    """Why there is nothing to rank, from the jobs table: the running job, how long it has run
    and how long past jobs of its kind took; what is queued; items others hold."""
    b = (lambda s: f"**{s}**") if markdown else (lambda s: s)
    current = jobs.current_jobs(ctx.store)
    running = [j for j in current if j["status"] == "running"]
    queued = [j for j in current if j["status"] == "queued"]
    if running:
        j = running[0]
        text = f"Nothing to rank right now: the worker is {_doing(j['kind'])}."
        text = b(text) + " " + _job_detail(ctx, j)
    elif queued:
        text = b(f"Nothing to rank right now: {queued[0]['kind']} is queued for the worker.")
        queued = queued[1:]
    else:
        text = b("Nothing to rank right now, and no job is running or queued.")
    if queued:
        text += " Then: " + ", ".join(j["kind"] for j in queued[:3]) + "."
    return text + held_note(ctx, annotator) + " This page checks again every few seconds."


def held_note(ctx: AppContext, annotator: str | None) -> str:
    """' N items are held by ...' when others hold what this annotator could rank, else ''."""
    held = annotator_progress(ctx.store, annotator)["held"] if annotator else 0
    if not held:
        return ""
    return (f" {held} item{'s are' if held > 1 else ' is'} held by other annotators' pages; "
            "if one closes, its item comes back here within minutes.")


def busy_text(exc: Busy) -> str:
    return f"**Not now: {exc}.** This page checks again every few seconds."


def _doing(kind: str) -> str:
    return f"{DOING.get(kind, 'running')} ({kind})"


def _job_detail(ctx: AppContext, job: dict) -> str:
    parts = [f"Job #{job['id']}"]
    if job.get("progress"):
        parts[0] += f" is {round(100 * float(job['progress']))}% done"
    if job.get("started_at"):
        started = datetime.fromisoformat(job["started_at"])
        elapsed = (datetime.now(timezone.utc) - started).total_seconds()
        parts.append(f"has run {_duration(elapsed)}")
    typical = jobs.typical_duration_s(ctx.store, job["kind"])
    parts.append(f"past {job['kind']} jobs took about {_duration(typical)}" if typical
                 else f"no {job['kind']} job has finished here yet to estimate from")
    return ", ".join(parts) + "."


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60} min"
