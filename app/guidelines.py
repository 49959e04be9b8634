"""The Rank page's guidelines (a collapsible block) and rubric question above the cards.

Researchers write them on the Research tab (`ui_research.save_guidelines`, role-checked); they
are rendered here as markdown with raw HTML disabled (app/safe_markdown.py).
"""
from __future__ import annotations

import gradio as gr

from app import safe_markdown
from app.context import AppContext
from rlhf_core.data.guidelines import get_guidelines

NO_GUIDELINES = "*No guidelines yet: a researcher writes them on the Research tab.*"


def guidelines_view(ctx: AppContext) -> dict:
    """{"rubric_html", "guidelines_html"} for the Rank page."""
    g = get_guidelines(ctx.store)
    return {"rubric_html": f'<div class="rl-rubric">{safe_markdown.render(g["rubric"])}</div>',
            "guidelines_html": '<div class="rl-guidelines">'
                               f'{safe_markdown.render(g["guidelines"] or NO_GUIDELINES)}</div>'}


def build_rank_guidelines(c: dict) -> None:
    """Inside the Rank layout, between the prompt and the cards."""
    with gr.Accordion("Guidelines", open=False, elem_id="rl-guidelines-box"):
        c["guidelines_html"] = gr.HTML(elem_id="rl-guidelines")
    with gr.Row(equal_height=True):
        c["rubric_html"] = gr.HTML(elem_id="rl-rubric")
        c["raw_toggle"] = gr.Checkbox(label="Show raw text", elem_id="rl-raw", scale=0,
                                      min_width=160)


def wire_rank_guidelines(ctx: AppContext, demo: gr.Blocks, c: dict) -> None:
    """Read on page load and with *Next item* (a saved change shows from the next item on)."""
    outs = [c["rubric_html"], c["guidelines_html"]]

    def show():
        out = guidelines_view(ctx)
        return [out["rubric_html"], out["guidelines_html"]]

    demo.load(show, None, outs, api_visibility="private")
    c["next_btn"].click(show, None, outs, api_visibility="private", show_progress="hidden")
    # Raw-text toggle, in the browser alone: a <style> in <head> (kept when the cards
    # re-render) swaps which of each card's two renderings shows.
    c["raw_toggle"].input(None, [c["raw_toggle"]], None, js=RAW_TOGGLE_JS)


# Added at run time, so Gradio does not prefix it (it scopes launch(css=) rules under
# `.gradio-container .contain`, where a `body.x` rule never matches); !important beats those.
RAW_TOGGLE_JS = """(raw) => {
  let s = document.getElementById("rl-raw-style");
  if (!s) { s = document.createElement("style"); s.id = "rl-raw-style"; document.head.append(s); }
  s.textContent = raw ? ".rl-card .rl-raw { display: block !important; } "
                        + ".rl-card .rl-md { display: none !important; }" : "";
  return [];
}"""
