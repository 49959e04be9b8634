"""The ranking UI: Gradio Blocks over app.handlers (layout first, listeners wired at the bottom).

The UI process never loads a model; it reads items from the store and writes rankings.
Per-user state lives in the browser (`gr.State` for the form, `gr.BrowserState` for the name
and the drafts), never in module globals.

Public HTTP API (for scripts and `rlhf simulate`; `gradio_client.Client(url).predict(...,
api_name="/get_item")`). When auth is on, every endpoint uses the logged-in user
(`gr.Request.username`) and ignores the `annotator` argument.

- `/get_item(annotator: str) -> dict`: `{"ok", "annotator", "item": {"id", "prompt",
  "policy_version", "token", "k", "responses": [{"id", "label", "text", "n_tokens",
  "finish_reason"}]} | None, "message", "progress": {"done", "available", "held"}}`.
  The same item comes back until it is ranked or skipped. The item is held for
  `loop.assignment_hold_s` (3 min) and every call renews the hold: a client that needs longer
  calls again, else its later submission is still taken unless another annotator took the
  item meanwhile (`stale: true`). Without item, `message` says what the worker runs.
- `/submit(annotator: str, item_id: int, token: str, submission_key: str, ranking: str,
  skip: bool = False, all_bad: bool = False, flag: bool = False, note: str = "",
  time_spent: float | None = None) -> dict`: `ranking` is keyboard text ("bacd", "b a=c d")
  or JSON tiers of response ids or labels ('[[12], [10, 11], [13]]'). Returns `{"ok", "stale",
  "message", "ranking_id", "duplicate", "pairs"}`; a repeated `submission_key` is a no-op
  (`duplicate: true`); a withdrawn/reassigned item gives `ok: false, stale: true`.
- `/undo(annotator: str, submission_key: str) -> dict`: supersede the last ranking (its item is
  served again); `{"ok", "message", "ranking_id", "item_id", "tiers", "duplicate"}`.
- `/status() -> dict`: `{"policy_version", "reward_version", "counts", "jobs"}`.
- `/queue_job(annotator: str, kind: str) -> dict`: researchers only; kind is one of
  `sample_batch`, `train_reward`, `ppo_round` (an already queued one is reused).

Raw HTTP (`POST /gradio_api/call/<name>` then `GET /gradio_api/call/<name>/<event_id>`): send
one `"session_hash"` per client with every call, as gradio_client does. Without it Gradio builds
a new session (a copy of every component's config of this large page) for each call: measured
in bench B4, that was a third of the UI process's CPU under load.

The page's own events are also named (`/rank_start`, `/rank_submit`, `/rank_skip`, `/rank_undo`,
`/rank_next`), but they take browser state; scripts should use the endpoints above. With auth
they too act as the logged-in user (roles checked in each handler), never as the name in the
session state, and refuse a session_hash whose session another login opened.
"""
from __future__ import annotations

import dataclasses
import functools
import html
import os
from typing import Callable

import gradio as gr
from starlette.routing import Mount

from app import api, handlers, serving
from app.body_limit import with_body_limit
from app.context import AppContext, load_auth_file
from app.handlers import MAX_CARDS
from app.login_guard import is_loopback, with_client_address
from app.guidelines import build_rank_guidelines, wire_rank_guidelines
from app.ui_arena import build_arena_tab
from app.ui_assets import CSS, FOCUS_RANKING_JS, HEAD, SHORTCUTS_MD
from app.ui_dashboard import build_dashboard_tab
from app.ui_me import build_me_tab
from app.ui_data import build_data_tab
from app.ui_prompts import MAX_UPLOAD_BYTES
from app.ui_research import build_research_tab
from app.ui_status import build_status_tab, wire_status_tab
from app.worker_api import PREFIX as WORKER_API_PREFIX
from app.worker_api import build_app as build_worker_app
from app.worker_api import start_loop_ticker
from rlhf_core.data.annotation import LABELS


def build_ui(ctx: AppContext, *, extra_tabs: tuple[Callable[[AppContext], None], ...] = (),
             poll_s: float = 4.0) -> gr.Blocks:
    """`extra_tabs`: callables that add a `gr.Tab` (e.g. the dashboard) inside the tab bar. One
    may return a function `(demo, c)`, called once the Rank tab exists, that wires the tab's
    events to the page session (`c["annotator"]`: the login or name the page acts as)."""
    with gr.Blocks(title="rlhf-loop · rank responses") as demo:
        c: dict = {}  # component name -> component; handlers' dict keys index into it
        c["annotator"] = gr.State(None)
        c["item"] = gr.State(None)
        c["profile"] = gr.BrowserState({"name": ""}, storage_key="rlhf-loop-profile",
                                       secret=ctx.browser_secret)
        c["drafts"] = gr.BrowserState({}, storage_key="rlhf-loop-drafts",
                                      secret=ctx.browser_secret)
        with gr.Row(equal_height=True, elem_id="rl-header"):  # two lines on a phone (CSS)
            gr.Markdown("### rlhf-loop · rank the responses, best first", elem_id="rl-title")
            c["progress"] = gr.Markdown(elem_id="rl-progress")
            if ctx.auth_enabled:
                gr.Button("Log out", link="/logout", size="sm", scale=0, elem_id="rl-account")
            else:
                c["switch_btn"] = gr.Button("Not you? Change name", size="sm", scale=0,
                                            min_width=180, elem_id="rl-account")
        with gr.Column(visible=False) as c["login_box"]:
            c["name"] = gr.Textbox(label="Your name (remembered in this browser)", max_lines=1,
                                   placeholder="e.g. ada", autofocus=True, elem_id="rl-name")
            c["start_btn"] = gr.Button("Start ranking", variant="primary")
        with gr.Tabs():
            with gr.Tab("Rank", id="rank"):
                _rank_layout(c)
            with gr.Tab("Status", id="status"):
                build_status_tab(c, ctx.config.loop.algorithm)
            wire_later = [add_tab(ctx) for add_tab in extra_tabs]
        c["timer"] = gr.Timer(poll_s)
        _wire(ctx, demo, c)
        for wire in filter(callable, wire_later):
            wire(demo, c)
        wire_status_tab(ctx, demo, c)
        wire_rank_guidelines(ctx, demo, c)
        _register_api(ctx)
    return demo


def _rank_layout(c: dict) -> None:
    with gr.Column(visible=False) as c["rank_box"]:
        c["message"] = gr.Markdown(elem_id="rl-message")
        c["prompt_html"] = gr.HTML(elem_id="rl-prompt")
        build_rank_guidelines(c)  # collapsible guidelines; rubric question + raw-text toggle
        c["cards_html"] = gr.HTML(elem_id="rl-cards")
        with gr.Row(elem_id="rl-ranks"):
            c["radios"] = [gr.Radio([str(i + 1) for i in range(4)], label=f"Rank of {label}",
                                    visible=False, elem_id=f"rl-rank-{label}", min_width=120)
                           for label in LABELS[:MAX_CARDS]]
        with gr.Row(equal_height=True):
            c["ranking"] = gr.Textbox(label="Ranking, best first (Enter submits)", max_lines=1,
                                      placeholder="e.g. bacd  or  b a=c d", autofocus=True,
                                      elem_id="rl-ranking", scale=2)
            c["preview"] = gr.Markdown(elem_id="rl-preview")
        # The id of the item this form was rendered for, held in the browser: sent with every
        # edit and submission, so one from an old form is told apart from the item now in
        # `item` (server-side state, which moves on as soon as a submission is recorded).
        c["form_item"] = gr.Textbox(visible=False, elem_id="rl-form-item")
        with gr.Row(equal_height=True):
            c["all_bad"] = gr.Checkbox(label="All bad (Alt+X)", elem_id="rl-allbad", scale=0,
                                       min_width=160)
            c["flag"] = gr.Checkbox(label="Flag for review (Alt+F)", elem_id="rl-flag", scale=0,
                                    min_width=200)
            c["note"] = gr.Textbox(label="Note (optional, Alt+O)", max_lines=2,
                                   elem_id="rl-note", scale=2)
        with gr.Row():
            c["submit_btn"] = gr.Button("Submit (Enter)", variant="primary", elem_id="rl-submit")
            c["skip_btn"] = gr.Button("Skip (Alt+S)", elem_id="rl-skip")
            c["undo_btn"] = gr.Button("Undo last (Alt+U)", elem_id="rl-undo")
            c["next_btn"] = gr.Button("Next item / refresh (Alt+N)", elem_id="rl-next")
        gr.Markdown(SHORTCUTS_MD, elem_id="rl-shortcuts")


# -- handler dict -> component updates -------------------------------------------------
_PLAIN = ("annotator", "item", "drafts", "profile", "progress", "message", "prompt_html",
          "cards_html", "ranking", "note", "flag", "all_bad", "preview", "form_item")


def _updates(c: dict, out: dict) -> dict:
    """Map a handler's dict onto components; keys it leaves out stay unchanged on screen."""
    level, message = out.get("level"), out.get("message")
    if message and level == "warning":
        # A toast renders HTML; its text may quote what the user typed: escape it.
        gr.Warning(html.escape(out.get("toast") or message.replace("**", "")))
    upd = {c[k]: out[k] for k in _PLAIN if k in out}
    if "ranks" in out:
        k = out.get("k")
        for i, radio in enumerate(c["radios"]):
            value = out["ranks"][i] if i < len(out["ranks"]) else None
            if k is None:
                upd[radio] = gr.update(value=value)
            else:
                upd[radio] = gr.update(value=value, visible=i < k,
                                       choices=[str(j + 1) for j in range(max(k, 1))])
    if out.get("annotator"):
        upd[c["login_box"]] = gr.update(visible=False)
        upd[c["rank_box"]] = gr.update(visible=True)
    elif "annotator" in out:
        upd[c["login_box"]] = gr.update(visible=True)
        upd[c["rank_box"]] = gr.update(visible=False)
    if "researcher" in out:
        upd.update({b: gr.update(visible=out["researcher"]) for b in c["job_buttons"]})
    # An empty dict would read as one output value; skip one component instead.
    return upd or {c["preview"]: gr.skip()}


def _form_outputs(c: dict) -> list:
    return [c[k] for k in _PLAIN] + c["radios"] + [c["login_box"], c["rank_box"]] + c["job_buttons"]


def _username(request: gr.Request | None) -> str | None:
    return getattr(request, "username", None) if request is not None else None


def _wire(ctx: AppContext, demo: gr.Blocks, c: dict) -> None:
    outs = _form_outputs(c)
    form = [c["ranking"], c["note"], c["flag"], c["all_bad"], c["form_item"]]

    def acting(fn=None, *, quiet: bool = False):
        """Every page event goes through here: it acts as `handlers.session_user` (with auth,
        the login of the request, never the name in the session state: a client picks its
        session_hash). A refusal leaves the session state untouched; `quiet` events (edits,
        timer) show nothing. `fn(request, who, ...)` keeps its signature for Gradio."""
        def wrap(fn):
            @functools.wraps(fn)
            def run(request, annotator, *args):
                try:
                    who = handlers.session_user(ctx, annotator, _username(request))
                except handlers.Refused as exc:
                    return _updates(c, {} if quiet else {
                        "message": f"**Not allowed:** {handlers.md_escape(exc)}",
                        "toast": f"Not allowed: {exc}", "level": "warning"})
                return fn(request, who, *args)
            return run
        return wrap(fn) if fn else wrap

    @acting
    def on_start(request: gr.Request, annotator, name, profile, drafts):
        name = name or (profile or {}).get("name")
        return _updates(c, handlers.start(ctx, name, _username(request), drafts))

    @acting
    def on_load(request: gr.Request, annotator, profile, drafts):
        out = handlers.start(ctx, (profile or {}).get("name"), _username(request), drafts)
        out.pop("level", None)  # no toast for a first visit
        return _updates(c, out)

    def record(annotator, item, drafts, ranking, note, flag, all_bad, form_item, skip=False):
        return _updates(c, handlers.submit_form(ctx, annotator, item, drafts, ranking=ranking,
                                                note=note, flag=flag, all_bad=all_bad,
                                                skip=skip, form_item=form_item or ""))

    @acting
    def on_submit(request: gr.Request, annotator, item, drafts, ranking, note, flag, all_bad,
                  form_item):
        return record(annotator, item, drafts, ranking, note, flag, all_bad, form_item)

    @acting
    def on_skip(request: gr.Request, annotator, item, drafts, ranking, note, flag, all_bad,
                form_item):
        return record(annotator, item, drafts, ranking, note, flag, all_bad, form_item, True)

    @acting
    def on_undo(request: gr.Request, annotator, item, drafts):
        return _updates(c, handlers.undo_form(ctx, annotator, item, drafts))

    @acting
    def on_next(request: gr.Request, annotator, drafts):
        if not annotator:
            return _updates(c, {"message": "enter your name first", "level": "warning"})
        return _updates(c, handlers.load_form(ctx, annotator, drafts))

    @acting(quiet=True)
    def on_edit(request: gr.Request, annotator, item, drafts, ranking, note, flag, all_bad,
                form_item):
        return _updates(c, handlers.draft_changed(ctx, annotator, item, drafts, ranking, note,
                                                  flag, all_bad, form_item or ""))

    @acting(quiet=True)
    def on_radio(request: gr.Request, annotator, item, drafts, note, flag, all_bad, form_item,
                 *ranks):
        ranking = handlers.text_from_ranks(list(ranks), item)
        out = handlers.draft_changed(ctx, annotator, item, drafts, ranking, note, flag, all_bad,
                                     form_item or "")
        out.pop("ranks", None)  # the radios are the source here; do not echo them back
        return _updates(c, {**out, "ranking": ranking} if out else {})

    @acting(quiet=True)
    def on_tick(request: gr.Request, annotator, item, drafts):
        if not annotator:
            return _updates(c, {})
        if item is not None:  # the heartbeat: renews the short hold on the item on screen
            return _updates(c, serving.heartbeat(ctx, annotator, item))
        out = handlers.load_form(ctx, annotator, drafts)  # a waiting page polls for an item
        return _updates(c, out if not out["waiting"] else
                        {"progress": out["progress"], "message": out["message"]})

    def on_switch():
        return _updates(c, {"annotator": None, "item": None, "progress": "",
                            "profile": {"name": ""}})

    state_in = [c["annotator"], c["item"], c["drafts"]]
    focus = dict(fn=None, js=FOCUS_RANKING_JS)
    demo.load(on_load, [c["annotator"], c["profile"], c["drafts"]], outs,
              api_visibility="private").then(**focus)
    gr.on([c["start_btn"].click, c["name"].submit], on_start,
          [c["annotator"], c["name"], c["profile"], c["drafts"]], outs,
          api_name="rank_start").then(**focus)
    gr.on([c["submit_btn"].click, c["ranking"].submit], on_submit, state_in + form, outs,
          api_name="rank_submit", concurrency_limit=8).then(**focus)
    c["skip_btn"].click(on_skip, state_in + form, outs, api_name="rank_skip",
                        concurrency_limit=8).then(**focus)
    c["undo_btn"].click(on_undo, state_in, outs, api_name="rank_undo").then(**focus)
    c["next_btn"].click(on_next, [c["annotator"], c["drafts"]], outs,
                        api_name="rank_next").then(**focus)
    gr.on([c["ranking"].input, c["note"].input, c["flag"].input, c["all_bad"].input], on_edit,
          state_in + form, outs, trigger_mode="always_last", show_progress="hidden",
          concurrency_limit=None, api_visibility="private")
    if "switch_btn" in c:
        c["switch_btn"].click(on_switch, None, outs, api_visibility="private")
    gr.on([r.input for r in c["radios"]], on_radio,
          state_in + [c["note"], c["flag"], c["all_bad"], c["form_item"]] + c["radios"], outs,
          show_progress="hidden", concurrency_limit=None, api_visibility="private")
    c["timer"].tick(on_tick, state_in, outs, show_progress="hidden", api_visibility="private")


# -- the public HTTP API ---------------------------------------------------------------
def _register_api(ctx: AppContext) -> None:
    def get_item(annotator: str, request: gr.Request) -> dict:
        """The annotator's current item (the same until ranked or skipped), or item=None."""
        return api.get_item(ctx, annotator, _username(request))

    def submit(annotator: str, item_id: int, token: str, submission_key: str, ranking: str,
               skip: bool = False, all_bad: bool = False, flag: bool = False, note: str = "",
               time_spent: float | None = None, request: gr.Request = None) -> dict:
        """Record a ranking: keyboard text ("bacd") or JSON tiers of response ids or labels."""
        return api.submit(ctx, annotator, item_id, token, submission_key, ranking, skip,
                          all_bad, flag, note, time_spent, username=_username(request))

    def undo(annotator: str, submission_key: str, request: gr.Request) -> dict:
        """Supersede the annotator's last ranking; its item is served again."""
        return api.undo(ctx, annotator, submission_key, _username(request))

    def status() -> dict:
        """Policy/reward versions, counts and jobs."""
        return api.status(ctx)

    def queue_job(annotator: str, kind: str, request: gr.Request) -> dict:
        """Queue sample_batch / train_reward / ppo_round (researchers only)."""
        return api.queue_job(ctx, annotator, kind, _username(request))

    for fn in (get_item, submit, undo, status, queue_job):
        gr.api(fn, api_name=fn.__name__, concurrency_limit=8)


UPLOAD_ROUTE = "/gradio_api/upload"  # Gradio's file uploads (multipart)
SESSION_CAPACITY = 500  # page sessions kept in memory (x 231 KB: 113 MB at most)


def launch(ctx: AppContext, host: str = "127.0.0.1", port: int = 7860,
           auth_file: str | None = None, prevent_thread_lock: bool = False,
           extra_tabs: tuple[Callable[[AppContext], None], ...] | None = None,
           allow_no_auth: bool = False, **kwargs):
    """Serve the UI (loopback by default, never shared). Returns the launched Blocks.
    `extra_tabs` defaults to the My work, Arena, Dashboard, Research and Data tabs. Beyond
    loopback without login only with `allow_no_auth` (DESIGN.md, Security defaults)."""
    if kwargs.pop("share", False):
        raise ValueError("share=True is not supported: expose the app behind your own proxy")
    if auth_file:
        ctx = dataclasses.replace(ctx, users=load_auth_file(auth_file))
    if not ctx.auth_enabled and not is_loopback(host) and not allow_no_auth:
        raise ValueError(f"refusing to serve on {host} without login: give an auth file, or "
                         "allow_no_auth=True (--insecure-no-auth) to let everybody in")
    kwargs["app_kwargs"] = with_client_address(kwargs.get("app_kwargs"))  # login throttle
    demo = build_ui(ctx, extra_tabs=(build_me_tab, build_arena_tab, build_dashboard_tab,
                                     build_research_tab, build_data_tab)
                    if extra_tabs is None else tuple(extra_tabs))
    # Gradio summarises its per-event analytics (for its /monitoring page, which we do not use)
    # with pandas over the last 10,000 events after EVERY event; under 32 annotators that grew
    # into the UI process's largest CPU cost and its latency tail (bench B4). Summarise every
    # 1,000 events over at most 1,000. Read when the queue is created; a user's value wins.
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "1000")
    demo.queue(default_concurrency_limit=4)
    # Gradio keeps a copy of this page's component config per session (231 KB here, bench B7)
    # for its 10,000 most recent sessions: 2.3 GB, grown by any script that sends a fresh
    # session_hash per call. Keep the SESSION_CAPACITY most recent: a live page's timer touches
    # its session every few seconds, so only sessions idle the longest are dropped.
    kwargs.setdefault("state_session_capacity", SESSION_CAPACITY)
    # remote workers' door (app/worker_api.py): its own token auth and upload caps
    app_kwargs = dict(kwargs.get("app_kwargs") or {})
    worker_app = build_worker_app(ctx.store, ctx.workspace)
    app_kwargs["routes"] = [*app_kwargs.get("routes", ()),
                            Mount(WORKER_API_PREFIX, app=worker_app)]
    # Prompt files (the Research tab) upload through Gradio's route: up to their cap, and
    # Gradio refuses a bigger file too (max_file_size; its page says so before sending).
    kwargs.setdefault("max_file_size", MAX_UPLOAD_BYTES)
    kwargs["app_kwargs"] = with_body_limit(  # 413 over 64 KB; upload chunks up to their cap
        app_kwargs, prefixes={WORKER_API_PREFIX: worker_app.state.api.chunk_bytes + 4096,
                              UPLOAD_ROUTE: MAX_UPLOAD_BYTES + 64 * 1024})  # + multipart
    start_loop_ticker(ctx.store)  # the loop policy for remote workers (only with a token)
    demo.launch(server_name=host, server_port=port, share=False,
                auth=ctx.check_password if ctx.auth_enabled else None,
                auth_message="rlhf-loop: log in to rank" if ctx.auth_enabled else None,
                prevent_thread_lock=prevent_thread_lock, css=CSS, head=HEAD,
                show_error=False, **kwargs)
    return demo
