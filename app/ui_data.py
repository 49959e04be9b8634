"""The Data tab (researchers only): search, filter and sort the rankings; the flagged queue
(resolve or relabel) and the disagreement queue (one more annotator, mark reviewed).

Layout first, listeners at the bottom; what is shown and done lives in app.data_view (plain
functions returning dicts, each checking the role itself). Access as on the Research tab:
the login's role with auth, else the name remembered in this browser.
"""
from __future__ import annotations

import html

import gradio as gr

from app import data_view as dv
from app.context import AppContext

SEARCH_KEYS = ("text", "f_annotator", "f_flagged", "f_kind", "f_version", "f_disagree", "f_sort")


def build_data_tab(ctx: AppContext) -> None:
    """Add the Data tab (an `extra_tabs` callable of `app.ui.build_ui`)."""
    c: dict = {}
    with gr.Tab("Data", id="data") as c["tab"]:
        c["notice"] = gr.Markdown(dv.NOTICE, visible=False, elem_id="dt-notice")
        with gr.Column(visible=False, elem_id="dt-body") as c["body"]:
            _search_layout(c)
            _queues_layout(c)
        # Inside the tab: a bare component in the tab bar would render as a tab of its own.
        c["profile"] = gr.BrowserState({"name": ""}, storage_key="rlhf-loop-profile",
                                       secret=ctx.browser_secret)  # the Rank tab's name
        c["page"] = gr.State(0)
    _wire(ctx, c)


def _search_layout(c: dict) -> None:
    gr.Markdown("#### Search the rankings")
    # Buttons stacked in a column beside the fields: a stretched row makes them boxes.
    with gr.Row():
        c["text"] = gr.Textbox(label="Text in the prompt, a response or the note (Enter searches)",
                               max_lines=1, elem_id="dt-text", scale=3)
        with gr.Column(scale=0, min_width=130):
            c["search_btn"] = gr.Button("Search", size="sm", variant="primary",
                                        elem_id="dt-search")
            c["refresh_btn"] = gr.Button("Refresh all", size="sm", elem_id="dt-refresh")
    with gr.Row(equal_height=True):
        c["f_annotator"] = gr.Dropdown([dv.ANY], value=dv.ANY, label="Annotator",
                                       elem_id="dt-annotator", min_width=140)
        c["f_flagged"] = gr.Dropdown(list(dv.FLAGGED), value=dv.ANY, label="Flagged",
                                     elem_id="dt-flagged", min_width=140)
        c["f_kind"] = gr.Dropdown([dv.ANY, "rank", "skip"], value=dv.ANY, label="Kind",
                                  elem_id="dt-kind", min_width=110)
        c["f_version"] = gr.Dropdown([dv.ANY], value=dv.ANY, label="Policy version",
                                     elem_id="dt-version", min_width=120)
        c["f_sort"] = gr.Dropdown(list(dv.SORT_LABELS), value="newest first", label="Sort",
                                  elem_id="dt-sort", min_width=180)
        c["f_disagree"] = gr.Checkbox(label="Disagreement only", elem_id="dt-disagree",
                                      min_width=160)
    c["page_md"] = gr.Markdown(elem_id="dt-page")
    c["results"] = gr.HTML(css_template=dv.CSS, elem_id="dt-results", max_height=800)
    with gr.Row():
        c["prev_btn"] = gr.Button("← Previous page", size="sm", elem_id="dt-prev", min_width=140)
        c["next_btn"] = gr.Button("Next page →", size="sm", elem_id="dt-next", min_width=140)


def _queues_layout(c: dict) -> None:
    gr.Markdown("#### Flagged queue: keep the ranking, or relabel (it stops counting and "
                "another annotator ranks the item)")
    c["flags_md"] = gr.Markdown(elem_id="dt-flags-count")
    c["flags_html"] = gr.HTML(css_template=dv.CSS, elem_id="dt-flags", max_height=900)
    _review_row(c, "flag", "Ranking", 170, {"resolve_btn": ("Keep (resolve)", "dt-resolve"),
                                             "relabel_btn": ("Relabel", "dt-relabel", "stop")})
    gr.Markdown("#### Disagreement queue: items ranked by two or more annotators, most "
                "disputed first")
    c["disagree_md"] = gr.Markdown(elem_id="dt-disagree-count")
    c["disagree_html"] = gr.HTML(css_template=dv.CSS, elem_id="dt-disagreements",
                                 max_height=900)
    _review_row(c, "item", "Item", 200, {"more_btn": ("Ask one more annotator", "dt-more"),
                                          "reviewed_btn": ("Mark reviewed", "dt-reviewed")})


def _review_row(c: dict, key: str, label: str, width: int, buttons: dict) -> None:
    """A queue's actions: pick one (`{key}_pick`), an optional note, the buttons stacked
    (name -> (text, elem_id[, variant])); the message (`{key}_msg`) below."""
    with gr.Row():
        c[f"{key}_pick"] = gr.Dropdown([], label=label, elem_id=f"dt-{key}-pick", min_width=160)
        c[f"{key}_note"] = gr.Textbox(label="Review note (optional)", max_lines=2,
                                      elem_id=f"dt-{key}-note", scale=2)
        with gr.Column(scale=0, min_width=width):
            for name, (text, elem_id, *variant) in buttons.items():
                c[name] = gr.Button(text, size="sm", elem_id=elem_id,
                                    variant=variant[0] if variant else "secondary")
    c[f"{key}_msg"] = gr.Markdown(elem_id=f"dt-{key}-msg")


# -- listeners ---------------------------------------------------------------------------------
def _user(request: gr.Request | None):
    return getattr(request, "username", None) if request is not None else None


def _wire(ctx: AppContext, c: dict) -> None:
    search_in = [c[k] for k in SEARCH_KEYS]
    search_out = [c["notice"], c["body"], c["results"], c["page_md"], c["page"]]
    queue_out = [c["notice"], c["body"], c["flags_html"], c["flags_md"], c["flag_pick"],
                 c["disagree_html"], c["disagree_md"], c["item_pick"]]
    filters_out = [c["f_annotator"], c["f_version"]]

    def hidden() -> dict:
        return {c["notice"]: gr.update(visible=True), c["body"]: gr.update(visible=False)}

    def searched(profile, page, request, *values) -> dict:
        out = dv.search_view(ctx, _user(request), profile, dv.query_of(*values), page)
        if not out["allowed"]:
            return hidden()
        return {c["notice"]: gr.update(visible=False), c["body"]: gr.update(visible=True),
                c["results"]: out["results_html"], c["page_md"]: out["page_md"],
                c["page"]: out["page"]}

    def queues(profile, request) -> dict:
        out = dv.queues_view(ctx, _user(request), profile)
        if not out["allowed"]:
            return hidden()
        upd = {c[k]: out[k] for k in ("flags_html", "flags_md", "disagree_html", "disagree_md")}
        for pick, key in (("flag_pick", "flag_choices"), ("item_pick", "item_choices")):
            ids = [v for _, v in out[key]]
            upd[c[pick]] = gr.update(choices=out[key], value=ids[0] if ids else None)
        return upd

    # gr.Request first: Gradio finds it only among the parameters before *values.
    def on_search(request: gr.Request, profile, *values):
        return searched(profile, 0, request, *values)

    def on_page(step: int):
        def move(request: gr.Request, profile, page, *values):
            return searched(profile, (page or 0) + step, request, *values)
        return move

    def on_refresh(request: gr.Request, profile, page, *values):
        upd = searched(profile, page, request, *values)
        if c["results"] not in upd:  # not a researcher: nothing else is read
            return upd
        choices = dv.filter_choices(ctx)
        upd[c["f_annotator"]] = gr.update(choices=choices["annotators"])
        upd[c["f_version"]] = gr.update(choices=choices["versions"])
        return {**upd, **queues(profile, request)}

    def make_action(action: str, msg: str):
        def on_click(profile, target, note, request: gr.Request):
            out = dv.act(ctx, action, target, note, _user(request), profile)
            if not out["ok"]:
                gr.Warning(html.escape(out["message"]))
            return {**queues(profile, request), c[msg]: _md(out)}
        return on_click

    refresh_in = [c["profile"], c["page"], *search_in]
    everything = search_out + queue_out + filters_out
    # Read when the tab is opened, not on page load: annotators' pages never pay for it.
    gr.on([c["tab"].select, c["refresh_btn"].click], on_refresh, refresh_in, everything,
          api_visibility="private", trigger_mode="always_last")
    gr.on([c["text"].submit, c["search_btn"].click, *(c[k].input for k in SEARCH_KEYS[1:])],
          on_search, [c["profile"], *search_in], search_out, api_visibility="private",
          trigger_mode="always_last")
    c["prev_btn"].click(on_page(-1), refresh_in, search_out, api_visibility="private")
    c["next_btn"].click(on_page(1), refresh_in, search_out, api_visibility="private")
    for btn, action, pick, note, msg in (
            ("resolve_btn", "resolve", "flag_pick", "flag_note", "flag_msg"),
            ("relabel_btn", "relabel", "flag_pick", "flag_note", "flag_msg"),
            ("more_btn", "ask_more", "item_pick", "item_note", "item_msg"),
            ("reviewed_btn", "reviewed", "item_pick", "item_note", "item_msg")):
        c[btn].click(make_action(action, msg), [c["profile"], c[pick], c[note]],
                     queue_out + [c[msg]], api_visibility="private").then(
            on_page(0), refresh_in, search_out, api_visibility="private")  # flags changed


def _md(out: dict) -> str:
    """An action's outcome as markdown text (its message may quote user text: escaped)."""
    text = html.escape(out["message"], quote=False)
    return text if out["ok"] else f"**Not done:** {text}"
