"""The Status tab: versions, counts, the workers (alive? doing what?), every job with a
progress bar, researcher job buttons."""
from __future__ import annotations

import html

import gradio as gr

from app import handlers, status
from app.context import AppContext


def build_status_tab(c: dict, algorithm: str) -> None:
    """`algorithm`: the policy round's preselected algorithm (the workspace's loop.algorithm)."""
    c["status_md"] = gr.Markdown("loading…", elem_id="rl-status")
    with gr.Row(equal_height=True):
        c["job_buttons"] = [gr.Button(label, size="sm", visible=False,
                                      elem_id="rl-job-" + kind.replace("_", "-"))
                            for label, kind in status.JOB_BUTTONS.items()]
        c["algorithm"] = gr.Dropdown(list(status.ALGORITHMS), value=algorithm,
                                     label="Policy round algorithm", visible=False,
                                     elem_id="rl-job-algorithm", scale=0, min_width=180)
    c["job_message"] = gr.Markdown()
    gr.Markdown("#### Workers")
    c["workers_html"] = gr.HTML(elem_id="rl-workers")
    gr.Markdown("#### Jobs")
    c["jobs_html"] = gr.HTML(elem_id="rl-jobs")
    with gr.Row(equal_height=True):
        c["cancel_job"] = gr.Dropdown(label="Queued or running job", choices=[], value=None,
                                      visible=False, elem_id="rl-cancel-job", scale=2)
        c["cancel_btn"] = gr.Button("Cancel job", size="sm", visible=False, variant="stop",
                                    elem_id="rl-cancel-btn", scale=0, min_width=140)
    # shown to researchers alone, as the job buttons are (app/ui._updates toggles this list;
    # the start buttons are the first len(JOB_BUTTONS) of it)
    c["job_buttons"] = c["job_buttons"] + [c["algorithm"], c["cancel_job"], c["cancel_btn"]]


def wire_status_tab(ctx: AppContext, demo: gr.Blocks, c: dict) -> None:
    outs = [c["status_md"], c["workers_html"], c["jobs_html"], c["job_message"], c["cancel_job"]]

    def shown(out: dict) -> dict:
        upd = {c[k]: out[k] for k in ("status_md", "workers_html", "jobs_html") if k in out}
        if "cancel_choices" in out:  # keeps the pick while that job is still cancellable
            upd[c["cancel_job"]] = gr.update(choices=out["cancel_choices"])
        return upd

    def refresh(annotator, request: gr.Request):
        try:  # who looks decides whether job messages show full paths (researchers only)
            viewer = handlers.session_user(ctx, annotator, getattr(request, "username", None))
        except handlers.Refused:
            viewer = None
        return shown(status.status_view(ctx, viewer))

    def as_researcher(annotator, request, act) -> dict:
        """`act(who)` for a researcher (with auth, the request's login acts, never the session
        state's name); a refusal or a failed action is also shown as a warning."""
        try:
            who = handlers.session_user(ctx, annotator, getattr(request, "username", None),
                                        roles=("researcher",))
        except handlers.Refused as exc:
            out = {"ok": False, "message": str(exc)}
        else:
            out = act(who)
        if not out["ok"]:
            gr.Warning(html.escape(out["message"]))
        return out

    def on_cancel(annotator, job_id, request: gr.Request):
        out = as_researcher(annotator, request, lambda who: status.cancel_job(ctx, who, job_id))
        return {**shown(out), c["job_message"]: handlers.md_escape(out["message"])}

    def make_start(kind: str):
        def on_click(annotator, algorithm, request: gr.Request):
            out = as_researcher(annotator, request,
                                lambda who: status.start_job(ctx, who, kind, algorithm))
            upd = {c["job_message"]: handlers.md_escape(out["message"])}
            upd.update({c[k]: v for k, v in out.items()
                        if k in ("status_md", "workers_html", "jobs_html")})
            return upd
        return on_click

    demo.load(refresh, [c["annotator"]], outs, api_visibility="private")
    c["timer"].tick(refresh, [c["annotator"]], outs, show_progress="hidden",
                    api_visibility="private")
    for button, kind in zip(c["job_buttons"], status.JOB_BUTTONS.values()):
        button.click(make_start(kind), [c["annotator"], c["algorithm"]], outs,
                     api_visibility="private")
    c["cancel_btn"].click(on_cancel, [c["annotator"], c["cancel_job"]], outs,
                          api_visibility="private")
