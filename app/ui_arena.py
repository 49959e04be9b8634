"""The Arena tab: type a prompt, the current policy answers it K times, rank the answers.

Layout first, listeners wired at the bottom; the logic is app/arena.py (plain functions).
Annotators and researchers alike may use it. Who acts: the Rank tab's page session
(`handlers.session_user`: with login, the request's user, never a name the page sends; without,
the name typed on the Rank tab). A gr.Timer polls only while a request waits for the worker.
"""
from __future__ import annotations

import html
from typing import Callable

import gradio as gr

from app import arena, handlers
from app.context import AppContext
from rlhf_core.prompt_io import MAX_PROMPT_CHARS

POLL_S = 2.0
_PLAIN = ("status", "prompt_html", "cards_html", "ranking", "preview", "item", "asked")
_FORM = ("item", "cards_html", "ranking", "preview", "form")
# Focus the ranking box once the cards are on screen, else the prompt box if nothing has focus.
FOCUS_JS = """() => { setTimeout(() => {
  const rank = document.querySelector('#ar-ranking input, #ar-ranking textarea');
  const ask = document.querySelector('#ar-prompt textarea, #ar-prompt input');
  const now = document.activeElement;
  if (rank && rank.offsetParent !== null) { if (now !== rank) rank.focus(); }
  else if (ask && ask.offsetParent !== null && (!now || now === document.body)) ask.focus();
}, 50); }"""


def build_arena_tab(ctx: AppContext) -> Callable[[gr.Blocks, dict], None]:
    """Add the Arena tab (an `extra_tabs` callable of `app.ui.build_ui`). Returns the function
    `build_ui` calls once the Rank tab exists: every event here acts as that page session."""
    c: dict = {}
    with gr.Tab("Arena", id="arena") as c["tab"]:
        with gr.Row(equal_height=True):
            c["asked"] = gr.Textbox(label="Your prompt (Enter asks)", lines=1, max_lines=6,
                                    max_length=MAX_PROMPT_CHARS, elem_id="ar-prompt", scale=4,
                                    min_width=240, placeholder="e.g. explain RLHF to a child")
            c["ask_btn"] = gr.Button("Ask", variant="primary", elem_id="ar-ask", scale=0,
                                     min_width=90)
        c["status"] = gr.Markdown(arena.INTRO, elem_id="ar-status")
        c["prompt_html"] = gr.HTML(elem_id="ar-shown-prompt")
        c["cards_html"] = gr.HTML(elem_id="ar-cards")
        with gr.Column(visible=False) as c["form"]:  # stacked: as narrow as a phone allows
            c["ranking"] = gr.Textbox(label="Ranking, best first (Enter submits)", max_lines=1,
                                      placeholder="e.g. bacd  or  b a=c d", elem_id="ar-ranking")
            c["preview"] = gr.Markdown(elem_id="ar-preview")
            with gr.Row():
                c["submit_btn"] = gr.Button("Submit (Enter)", variant="primary",
                                            scale=0, min_width=200, elem_id="ar-submit")
        c["item"] = gr.State(None)  # the form of the item on screen (handlers.form_state)
        c["timer"] = gr.Timer(POLL_S, active=False)
    return lambda demo, rank: _wire(ctx, c, rank["annotator"])


def _updates(c: dict, out: dict) -> dict:
    """A plain function's dict -> component updates; keys it leaves out stay as they are."""
    if out.get("level") == "warning":  # a toast renders HTML and may quote what was typed
        gr.Warning(html.escape(out.get("toast") or out.get("status", "")))
    upd = {c[k]: out[k] for k in _PLAIN if k in out}
    if "form" in out:
        upd[c["form"]] = gr.update(visible=out["form"])
    if "timer" in out:
        upd[c["timer"]] = gr.Timer(active=out["timer"])
    return upd or {c["preview"]: gr.skip()}


def _keep_form(out: dict, state: dict | None) -> dict:
    """A refresh of the item already on screen leaves its form alone (what is typed stays)."""
    if state and out.get("item") and out["item"]["id"] == state["id"]:
        return {k: v for k, v in out.items() if k not in _FORM}
    return out


def _wire(ctx: AppContext, c: dict, session: gr.State) -> None:
    outs = [c[k] for k in _PLAIN] + [c["form"], c["timer"]]

    def acting(fn):
        """`fn(user, ...)` as the page session's user (any role); else say who is missing."""
        def run(request: gr.Request, annotator, *args):
            try:
                user = handlers.session_user(ctx, annotator, getattr(request, "username", None))
            except handlers.Refused as exc:
                user, why = None, handlers.md_escape(exc)
            else:
                why = "type your name on the Rank tab first"
            if not user:
                return _updates(c, {"status": f"**{why}**, then ask the policy here.",
                                    **arena.NO_FORM, "timer": False})
            return _updates(c, fn(user, *args))
        return run

    @acting
    def on_show(user, state):
        return _keep_form(arena.view(ctx, user), state)

    @acting
    def on_ask(user, text):
        return arena.ask(ctx, user, text)

    @acting
    def on_submit(user, state, ranking):
        return arena.submit(ctx, user, state, ranking)

    def on_edit(ranking, state):
        return handlers.preview(ranking, state) if state else gr.skip()

    quiet = dict(api_visibility="private", show_progress="hidden", trigger_mode="always_last")
    focus = dict(fn=None, js=FOCUS_JS)
    # the Rank tab started (or changed name), the tab is opened, or a request is being answered
    gr.on([session.change, c["tab"].select, c["timer"].tick], on_show, [session, c["item"]],
          outs, **quiet).then(**focus)
    gr.on([c["asked"].submit, c["ask_btn"].click], on_ask, [session, c["asked"]], outs,
          api_visibility="private", concurrency_limit=4).then(**focus)
    gr.on([c["ranking"].submit, c["submit_btn"].click], on_submit,
          [session, c["item"], c["ranking"]], outs, api_visibility="private",
          concurrency_limit=8).then(**focus)
    c["ranking"].input(on_edit, [c["ranking"], c["item"]], [c["preview"]], **quiet)
