"""The Arena tab's logic as plain functions (no Gradio): ask the current policy a prompt of your
own, watch the worker answer it, rank the K answers like any item.

Every function returns a dict keyed by component name (app/ui_arena.py maps them). The UI
never samples: `ask` queues a `sample_arena` job (rlhf_core.data.arena), the worker writes one
item held for the asker alone, and the ranking goes through the same `submit_ranking` as the
Rank tab's, so its pairs train the reward model like any item's.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone

from app import status
from app.context import AppContext
from app.handlers import (esc, form_state, md_escape, preview, render_cards, tiers_from_text,
                          worker_command)
from rlhf_core.data import jobs, workers
from rlhf_core.data.annotation import Refused, load_item, submit_ranking
from rlhf_core.data.arena import KIND, arena_state, request_arena

INTRO = ("Type a prompt and press **Enter**: the current policy answers it several times, "
         "then rank the answers best first, as on the Rank tab. Your ranking trains the reward "
         "model like any item; your prompt joins the workspace's prompts.")
NO_FORM = {"item": None, "form": False, "cards_html": "", "ranking": "", "preview": ""}


def ago(iso: str | None) -> float:
    if not iso:
        return 0.0
    t = datetime.fromisoformat(iso)
    t = t if t.tzinfo else t.replace(tzinfo=timezone.utc)
    return max(0.0, (datetime.now(timezone.utc) - t).total_seconds())


def secs(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds} s" if seconds < 90 else f"{seconds // 60} min {seconds % 60:02d} s"


def prompt_html(prompt: str | None, job_id: int) -> str:
    if not prompt:
        return ""
    return (f'<div class="rl-prompt"><div class="rl-head">Your prompt · request #{job_id}</div>'
            f'<pre class="rl-text">{esc(prompt)}</pre></div>')


def waiting_text(ctx: AppContext, who: str, job: dict) -> str:
    """What the worker is doing about this request: queued behind what, or how far along."""
    usual = jobs.typical_duration_s(ctx.store, KIND)
    usual = f" Past arena requests took about {secs(usual)}." if usual else ""
    if job["status"] == "running":
        pct = round(100 * float(job.get("progress") or 0))
        return (f"**The worker is answering your prompt** (request #{job['id']}): {pct}% · "
                f"{secs(ago(job.get('started_at')))} so far.{usual}")
    if not workers.alive(ctx.store):
        return (f"**Your request #{job['id']} is queued, but no worker is running**: start one "
                f"with `{worker_command(ctx, who)}`.")
    ahead = []
    for j in jobs.current_jobs(ctx.store):  # in the order the worker takes them
        if j["id"] == job["id"]:
            break
        ahead.append(j)
    running = [f"the running job #{j['id']} {j['kind']} ("
               f"{status.job_timing(j, jobs.typical_duration_s(ctx.store, j['kind']))})"
               for j in ahead if j["status"] == "running"]
    queued = len(ahead) - len(running)
    if queued:
        running.append(f"{queued} request{'s' if queued > 1 else ''} queued before yours")
    where = ("behind " + " and ".join(running)) if running else \
        "next: the worker takes it before any other job"
    return (f"**Your request #{job['id']} is queued**, {where}. Asked "
            f"{secs(ago(job.get('created_at')))} ago.{usual}")


def view(ctx: AppContext, who: str) -> dict:
    """The tab for `who`: their latest request, from waiting to ranked. `timer`: keep polling."""
    st = arena_state(ctx.store, who)
    if st is None:
        return {**NO_FORM, "status": INTRO, "prompt_html": "", "timer": False}
    job, item = st["job"], st["item"]
    out = {**NO_FORM, "prompt_html": prompt_html(st["prompt"], job["id"]), "timer": False}
    if job["status"] in ("queued", "running"):
        return {**out, "status": waiting_text(ctx, who, job), "timer": True}
    if job["status"] == "failed":  # the error may quote a path: shortened as for annotators
        why = md_escape(status.hide_paths(job["error"] or "?", ctx.workspace))
        return {**out, "status": f"**The worker could not answer this prompt:** {why} "
                                 "Ask again below."}
    if job["status"] == "cancelled" or item is None:
        return {**out, "status": f"Request #{job['id']} was cancelled. Ask again below."}
    if item["status"] != "ready" or item["assignment"] != "open":
        ranked = item["assignment"] == "done"
        return {**out, "status": (f"You ranked the answers to request #{job['id']}. "
                                  if ranked else f"Request #{job['id']} is closed. ")
                + "Ask another prompt below."}
    loaded = load_item(ctx.store, item["id"], token=item["token"])
    state = form_state(loaded)
    k = len(loaded["responses"])
    return {**out, "item": state, "form": True, "cards_html": render_cards(loaded),
            "preview": preview("", state),
            "status": f"**{k} answers from policy v{loaded['policy_version']}** "
                      f"(request #{job['id']}). Rank them best first "
                      f"(e.g. `{''.join(state['labels']).lower()}`) and press Enter."}


def ask(ctx: AppContext, who: str, text: str) -> dict:
    """Queue the request; a refusal (bad prompt, one in flight, queue full) writes nothing."""
    try:
        request_arena(ctx.store, who, text)
    except Refused as exc:
        return {"status": f"**Not asked:** {md_escape(exc)}", "toast": f"Not asked: {exc}",
                "level": "warning"}
    return {**view(ctx, who), "asked": ""}  # the box empties; the prompt shows above


def submit(ctx: AppContext, who: str, state: dict | None, ranking: str) -> dict:
    """Record the ranking through the Rank tab's `submit_ranking`; a refusal keeps the form."""
    if not state:
        return {"status": "Nothing to rank yet: ask a prompt first.", "level": "warning"}
    try:
        result = submit_ranking(
            ctx.store, annotator=who, item_id=state["id"], token=state["token"],
            submission_key=state["submission_key"], tiers=tiers_from_text(ranking, state),
            time_spent_s=round(time.time() - state.get("loaded_at", time.time()), 2))
    except (Refused, ValueError) as exc:
        return {"status": f"**Not saved:** {md_escape(exc)}", "toast": f"Not saved: {exc}",
                "level": "warning"}
    out = view(ctx, who)
    done = "already saved" if result["duplicate"] else (
        f"saved: {result['pairs']} preference pair{'s' if result['pairs'] != 1 else ''} "
        "for the reward model")
    return {**out, "status": f"**Ranking {done}.** Ask another prompt below."}
