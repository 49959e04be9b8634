"""The "My work" tab: an annotator's counts, speed, agreement and history; a history row opens
with its cards and earlier ranking, to be corrected (layout first, listeners at the bottom).

The logic is in app/me.py (plain functions, role checks there). Per-session state: the page of
history and the opened ranking (`gr.State`); who looks: the login, or the name the Rank tab's
session acts as (read from the browser's profile at page load; a BrowserState of this tab's
own would be read once and miss a name typed afterwards). No module globals.
"""
from __future__ import annotations

import html
from typing import Callable

import gradio as gr

from app import handlers, me
from app.context import AppContext

CSS = """
.me-tiles { display: grid; gap: 8px; grid-template-columns: repeat(auto-fill, minmax(130px, 1fr));
            margin-bottom: 8px; }
.me-tile { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 6px 10px;
           background: var(--background-fill-secondary); }
.me-num { font-size: 1.5em; font-weight: 700; }
.me-lbl { font-size: 0.9em; }
.me-sub { font-size: 0.8em; color: var(--body-text-color-subdued); }
.me-whose { margin-bottom: 6px; }
.me-agree { font-size: 0.95em; }
.me-strong { font-weight: 700; }
.me-scroll { overflow-x: auto; }
table.me-table { border-collapse: collapse; width: 100%; font-size: 0.9em; margin-top: 4px; }
table.me-table, table.me-table thead, table.me-table tbody, table.me-table tr { border: none; }
table.me-table td, table.me-table th { border: none; padding: 3px 6px; text-align: left;
    border-bottom: 1px solid var(--border-color-primary); vertical-align: top; }
td.me-prompt { word-break: break-word; min-width: 12em; }
td.me-ranking { white-space: nowrap; font-family: var(--font-mono); }
tr.me-old td { color: var(--body-text-color-subdued); }
tr.me-old td.me-ranking { text-decoration: line-through; }
.me-tag { border-radius: 4px; padding: 0 6px; background: var(--color-accent-soft);
          white-space: nowrap; }
.me-active { background: #c8efd4; color: #14532d; }
.me-old-tag { background: #e5e7eb; color: #374151; }
.me-flag { background: #f6d365; color: #222; }
.me-note { font-style: italic; white-space: pre-wrap; }
button.me-open { font-family: var(--font-mono); padding: 0 6px; border-radius: 4px;
                 border: 1px solid var(--border-color-primary); cursor: pointer;
                 background: var(--background-fill-primary); }
button.me-open:focus { outline: 2px solid var(--color-accent); }
@media (max-width: 700px) {
  table.me-hist thead { display: none; }
  table.me-hist tr { display: block; border-bottom: 1px solid var(--border-color-primary);
                     padding: 4px 0; }
  table.me-hist td { display: inline-block; border: none; padding: 1px 4px; }
  table.me-hist td.me-prompt { display: block; min-width: 0; }
}
"""
# One listener on the table (its rows re-render): a row's button, clicked or pressed with
# Enter, sends its ranking id; the server checks the id like any other input.
ROW_CLICK_JS = """
element.addEventListener('click', (e) => {
  const b = e.target.closest('button[data-rid]');
  if (b) trigger('click', {rid: b.dataset.rid});
});
"""
FOCUS_FIX_JS = """() => {
  setTimeout(() => {
    const box = document.querySelector("#me-detail");
    box?.scrollIntoView({block: "start"});
    document.querySelector("#me-fix textarea, #me-fix input")?.focus();
  }, 50);
}"""


def build_me_tab(ctx: AppContext) -> Callable[[gr.Blocks, dict], None]:
    """Add the "My work" tab (an `extra_tabs` callable of `app.ui.build_ui`). Returns the
    function `build_ui` calls with the Rank tab's components once they exist: every event here
    acts as that page session (`rank["annotator"]`) and refreshes when its name changes."""
    c: dict = {}
    with gr.Tab("My work", id="me") as c["tab"]:
        c["notice"] = gr.Markdown(visible=False, elem_id="me-notice")
        with gr.Column(visible=False) as c["body"]:
            with gr.Row():
                c["who"] = gr.Dropdown(label="Annotator (researchers may pick anyone)",
                                       choices=[], value=None, visible=False, scale=2,
                                       elem_id="me-who")
                c["refresh_btn"] = gr.Button("Refresh", size="sm", scale=0, min_width=100)
            c["stats_html"] = gr.HTML(css_template=CSS, elem_id="me-stats")
            c["message"] = gr.Markdown(elem_id="me-message")
            _detail_layout(c)
            gr.Markdown("#### History, newest first (open a row to correct it)")
            c["history_html"] = gr.HTML(css_template=CSS, elem_id="me-history",
                                        js_on_load=ROW_CLICK_JS)
            with gr.Row():
                c["newer_btn"] = gr.Button("← Newer", size="sm", scale=0, min_width=100,
                                           elem_id="me-newer")
                c["page_md"] = gr.Markdown(elem_id="me-page")
                c["older_btn"] = gr.Button("Older →", size="sm", scale=0, min_width=100,
                                           elem_id="me-older")
                c["open_id"] = gr.Textbox(label="Open ranking # (Enter)", max_lines=1,
                                          elem_id="me-open", scale=1, min_width=160)
        c["page"] = gr.State(0)
        c["open"] = gr.State(None)
    return lambda demo, rank: _wire(ctx, c, rank["annotator"])


def _detail_layout(c: dict) -> None:
    with gr.Column(visible=False, elem_id="me-detail", variant="panel") as c["detail"]:
        c["detail_md"] = gr.Markdown(elem_id="me-detail-head")
        c["prompt_html"] = gr.HTML(elem_id="me-prompt")
        c["cards_html"] = gr.HTML(elem_id="me-cards")
        with gr.Row(equal_height=True):
            c["fix"] = gr.Textbox(label="Corrected ranking, best first (Enter saves)",
                                  max_lines=1, elem_id="me-fix", scale=2,
                                  placeholder="e.g. bacd  or  b a=c d")
            c["preview"] = gr.Markdown(elem_id="me-preview")
        c["note"] = gr.Textbox(label="Note (optional; replaces the earlier note)", max_lines=2,
                               elem_id="me-note")
        with gr.Row():
            c["save_btn"] = gr.Button("Save correction", variant="primary", elem_id="me-save")
            c["close_btn"] = gr.Button("Close", elem_id="me-close")


_PLAIN = ("stats_html", "history_html", "page_md", "page", "open", "message", "detail_md",
          "prompt_html", "cards_html", "fix", "note", "preview")


def _updates(c: dict, out: dict) -> dict:
    """A handler's dict -> component updates; keys it leaves out stay as they are."""
    if "allowed" in out and not out["allowed"]:
        return {c["notice"]: gr.update(value=out["notice"], visible=True),
                c["body"]: gr.update(visible=False), c["open"]: None,
                c["detail"]: gr.update(visible=False)}
    upd = {c[k]: out[k] for k in _PLAIN if k in out}
    if out.get("allowed"):
        upd[c["notice"]] = gr.update(visible=False)
        upd[c["body"]] = gr.update(visible=True)
        upd[c["who"]] = gr.update(choices=out["choices"], value=out["whose"],
                                  visible=out["researcher"])
    if "detail" in out:
        upd[c["detail"]] = gr.update(visible=out["detail"])
    if "can_save" in out:
        upd[c["save_btn"]] = gr.update(visible=out["can_save"])
        upd[c["fix"]] = gr.update(value=out["fix"], interactive=out["can_save"])
    if out.get("level") == "warning" and out.get("toast"):
        gr.Warning(html.escape(out["toast"]))  # a toast renders HTML; the text may quote input
    return upd or {c["message"]: gr.skip()}


def _wire(ctx: AppContext, c: dict, session: gr.State) -> None:
    outs = [c[k] for k in (*_PLAIN, "notice", "body", "who", "detail", "save_btn")]

    def user(request: gr.Request | None):
        return getattr(request, "username", None) if request is not None else None

    def refresh(annotator, who, page, request: gr.Request):
        return _updates(c, me.me_view(ctx, user(request), annotator, who, page))

    def restart(annotator, request: gr.Request):  # a new name (or none): its own first page
        out = me.me_view(ctx, user(request), annotator, None, 0)
        return _updates(c, {**out, "open": None, "detail": False, "message": ""})

    def pick(annotator, who, request: gr.Request):  # another annotator: their first page
        out = me.me_view(ctx, user(request), annotator, who, 0)
        return _updates(c, {**out, "open": None, "detail": False, "message": ""})

    def turn(step: int):
        def on_click(annotator, who, page, request: gr.Request):
            return _updates(c, me.me_view(ctx, user(request), annotator, who, (page or 0) + step))
        return on_click

    def open_row(annotator, who, value, request: gr.Request):
        return _updates(c, me.open_row(ctx, user(request), annotator, who, value))

    def on_row(annotator, who, evt: gr.EventData, request: gr.Request):
        try:  # the id the row's button sent (checked in me.open_row like typed input)
            rid = evt.rid
        except (AttributeError, TypeError):  # a click event that carried no data
            rid = None
        return open_row(annotator, who, rid, request)

    def save(annotator, state, text, note, request: gr.Request):
        return _updates(c, me.save_correction(ctx, user(request), annotator, state, text, note))

    def edit(state, text):
        return handlers.preview(text, state) if state else gr.skip()

    view_in = [session, c["who"], c["page"]]
    quiet = dict(api_visibility="private", show_progress="hidden", trigger_mode="always_last")
    session.change(restart, [session], outs, **quiet)  # the Rank tab started (or changed name)
    gr.on([c["tab"].select, c["refresh_btn"].click], refresh, view_in, outs, **quiet)
    c["who"].input(pick, [session, c["who"]], outs, **quiet)
    c["newer_btn"].click(turn(-1), view_in, outs, **quiet)
    c["older_btn"].click(turn(+1), view_in, outs, **quiet)
    focus = dict(fn=None, js=FOCUS_FIX_JS)
    c["open_id"].submit(open_row, [session, c["who"], c["open_id"]], outs,
                        api_visibility="private").then(**focus)
    c["history_html"].click(on_row, [session, c["who"]], outs,
                            api_visibility="private").then(**focus)
    gr.on([c["save_btn"].click, c["fix"].submit], save,
          [session, c["open"], c["fix"], c["note"]], outs, api_visibility="private")
    c["fix"].input(edit, [c["open"], c["fix"]], [c["preview"]], **quiet)
    c["close_btn"].click(lambda: _updates(c, {"open": None, "detail": False}), None, outs,
                         api_visibility="private")
