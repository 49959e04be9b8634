"""The Dashboard tab: live plots of the loop (layout first, listeners wired at the bottom).

Data comes from `app.dashboard_data` (plain functions over `rlhf_core.data.reports`). A timer polls a
cheap fingerprint of the store; plots are recomputed only when it changes, and the job queue
(progress bars) is refreshed on every tick. The last computation is kept in a closure shared by
the sessions of this app (never a module global), so many open dashboards cost one query set.
"""
from __future__ import annotations

import threading
from datetime import datetime

import gradio as gr

from app import dashboard_data as dd
from app.context import AppContext
from app.handlers import esc
from app.status import jobs_html
from rlhf_core.data import jobs

_PLOTS = ("rankings", "reward_acc", "ab_plot", "quality", "drift",
          *(f"ppo_{k}" for k in dd.PPO_PLOTS))
_BY_VERSION = ("reward_acc", "ab_plot", "quality", "drift")  # categorical x: v0, v1, ...
_AB_COLOURS = {"win rate": "#e4572e", "95% upper": "#9aa5b1", "95% lower": "#9aa5b1"}
_TABLES = ("reward_table", "ab_table", "leaderboard", "diversity_table")
_NOTE_OF = {"rankings": "rankings", "reward_acc": "reward_acc", "reward_table": "reward_acc",
            "ab_plot": "ab", "ab_table": "ab", "leaderboard": "ab", "quality": "health",
            "drift": "health", "diversity_table": "health",
            **{f"ppo_{k}": "ppo" for k in dd.PPO_PLOTS}}


def build_dashboard_tab(ctx: AppContext, *, refresh_s: float = 5.0) -> None:
    """Add the Dashboard tab (an `extra_tabs` callable of `app.ui.build_ui`)."""
    c: dict = {}
    with gr.Tab("Dashboard", id="dashboard") as c["tab"]:
        _layout(c)
        c["timer"] = gr.Timer(refresh_s)  # inside the tab, not loose in the tab bar
        c["seen"] = gr.State(None)  # this session's last fingerprint
    _wire(ctx, c)


def _plot(kind, x: str, title: str, *, color: str | None = "series", y_lim=None, **kw):
    return kind(x=x, y="value", color=color, title=title, y_title=kw.pop("y_title", ""),
                y_lim=y_lim, height=kw.pop("height", 260), visible=False, **kw)


def _layout(c: dict) -> None:
    with gr.Row(equal_height=True):
        gr.Markdown("### Is it working?")
        c["updated"] = gr.Markdown(elem_id="rl-dash-updated")
        c["refresh_btn"] = gr.Button("Refresh", size="sm", scale=0, min_width=100)
    gr.Markdown("#### Rankings over time")
    c["note_rankings"] = gr.Markdown()
    c["rankings"] = _plot(gr.LinePlot, "time", "Rankings", y_title="rankings")
    gr.Markdown("#### Reward model: accuracy per version")
    c["note_reward_acc"] = gr.Markdown()
    with gr.Row():
        c["reward_acc"] = _plot(gr.ScatterPlot, "version", "Pairwise accuracy", y_lim=[0, 1],
                                y_title="accuracy")
        c["reward_table"] = gr.Dataframe(label="Accuracy history (newest first; calibration "
                                         "and pair counts on the Research tab's version pages)",
                                         visible=False, interactive=False, max_height=300,
                                         scale=2)
    gr.Markdown("#### PPO: per step (steps run on across rounds)")
    c["note_ppo"] = gr.Markdown()
    for row in (list(dd.PPO_PLOTS)[:2], list(dd.PPO_PLOTS)[2:]):
        with gr.Row():
            for name in row:  # entropy is logged every minibatch; the rest once per rollout
                kind = gr.LinePlot if name == "entropy" else gr.ScatterPlot
                c[f"ppo_{name}"] = _plot(kind, "step", dd.PPO_PLOTS[name], color="version")
    gr.Markdown("#### Blind A/B: human win rate vs the reference (v0)")
    c["note_ab"] = gr.Markdown()
    c["ab_summary"] = gr.Markdown()
    with gr.Row():
        c["ab_plot"] = _plot(gr.ScatterPlot, "version", "Win rate with 95% interval",
                             y_lim=[0, 1], y_title="win rate", color_map=_AB_COLOURS)
        with gr.Column(scale=1):
            c["ab_table"] = gr.Dataframe(label="Win rate per version", visible=False,
                                         interactive=False, max_height=240)
            c["leaderboard"] = gr.Dataframe(label="Bradley-Terry leaderboard (v0 = 1000)",
                                            visible=False, interactive=False, max_height=240)
    gr.Markdown("#### Per version: diversity and win rate next to drift "
                "(reward hacking = KL/length up while diversity falls)")
    c["note_health"] = gr.Markdown()
    with gr.Row():
        c["quality"] = _plot(gr.ScatterPlot, "version", "Win rate and diversity (0–1)",
                             y_lim=[0, 1])
        c["drift"] = _plot(gr.ScatterPlot, "version", "Drift: KL from reference, mean length")
    c["diversity_table"] = gr.Dataframe(label="Diversity per version (newest 200 responses)",
                                        visible=False, interactive=False, max_height=260)
    gr.Markdown("#### Annotator agreement")
    c["agreement_md"] = gr.Markdown()
    gr.Markdown("#### Job queue")
    c["jobs_html"] = gr.HTML(elem_id="rl-dash-jobs")


def dashboard_updates(data: dict) -> dict:
    """dashboard_data's dict -> {component name: gr.update}; an empty section shows its note."""
    out = {}
    for name in _PLOTS + _TABLES:
        frame = data[name]
        out[name] = gr.update(value=frame, visible=not frame.empty, **_axes(name, frame))
    for section, note in data["notes"].items():
        out[f"note_{section}"] = gr.update(value=f"*{note}*" if note else "", visible=bool(note))
    out["agreement_md"] = data["agreement_md"]
    out["ab_summary"] = gr.update(value=data["ab_summary"], visible=not data["notes"]["ab"])
    return out


def _axes(name: str, frame) -> dict:
    """Categorical version order; padded limits so scatter points at the edges are not cut."""
    if frame.empty or "value" not in frame:  # tables have no axes
        return {}
    hi, lo = float(frame["value"].max()), float(frame["value"].min())
    pad = 0.08 * (hi - lo) or 0.05 * abs(hi) or 0.05
    if name in _BY_VERSION:
        unit = name != "drift"  # win rates, accuracies and diversity live in [0, 1]
        return {"sort": dd.version_order(frame),
                "y_lim": [0, max(1.0, hi) + 0.05] if unit else [min(0.0, lo), hi + pad]}
    if name.startswith("ppo_"):
        steps = frame["step"]
        return {"x_lim": [float(steps.min()) - 1, float(steps.max()) + 1],
                "y_lim": [lo - pad, hi + pad]}
    return {}


def _wire(ctx: AppContext, c: dict) -> None:
    lock, cache = threading.Lock(), {"fp": None, "data": None}
    data_names = list(_PLOTS + _TABLES) + [f"note_{s}" for s in dd.EMPTY] + [
        "agreement_md", "ab_summary"]
    outs = [c[k] for k in data_names] + [c["jobs_html"], c["updated"], c["seen"]]

    def current(fp):
        with lock:  # one computation per change, whatever the number of open dashboards
            if cache["fp"] != fp:
                cache["data"], cache["fp"] = dd.dashboard_data(ctx.store), fp
            return cache["data"]

    def refresh(seen, force: bool):
        upd = {c["jobs_html"]: jobs_html(jobs.list_jobs(ctx.store, limit=12)),
               c["updated"]: f"updated {datetime.now():%H:%M:%S}"}
        try:
            fp = dd.fingerprint(ctx.store)
            # Plots are sent only once this session opened the tab: a plot drawn while its
            # tab is hidden can come out mis-sized.
            if force or (seen is not None and fp != seen):
                upd.update({c[k]: v for k, v in dashboard_updates(current(fp)).items()})
                upd[c["seen"]] = fp
        except Exception as exc:  # a locked or migrating DB must not break the page
            upd[c["updated"]] = f"dashboard unavailable: {esc(exc)}"
        return upd

    def on_open():
        return refresh(None, True)

    def on_tick(seen):
        return refresh(seen, False)

    gr.on([c["tab"].select, c["refresh_btn"].click], on_open, None, outs,
          api_visibility="private")
    c["timer"].tick(on_tick, [c["seen"]], outs, show_progress="hidden",
                    api_visibility="private")
