"""The Dashboard tab: live plots of the loop (layout first, listeners wired at the bottom).

Data comes from `app.dashboard_data` (plain functions over `rlhf_core.data.reports`). A timer polls a
cheap fingerprint of the store; plots are recomputed only when it changes, and the job queue
(progress bars) is refreshed on every tick. The last computation is kept in a closure shared by
the sessions of this app (never a module global), so many open dashboards cost one query set.
"""
from __future__ import annotations

import json
import threading
from datetime import datetime

import gradio as gr
from gradio.components.plot import AltairPlotData

from app import charts
from app import dashboard_data as dd
from app.context import AppContext
from app.handlers import esc
from app.status import jobs_html
from rlhf_core.data import jobs

_PLOTS = ("rankings", "reward_acc", "ab_plot", "quality", "drift",
          *(f"ppo_{k}" for k in dd.PPO_PLOTS))
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


def _plot(elem_id: str):
    """A figure: a Vega-Lite spec from app.charts (native plots draw no error bars)."""
    return gr.Plot(visible=False, show_label=False, elem_id=f"rl-plot-{elem_id}",
                   elem_classes="rl-chart")


def _layout(c: dict) -> None:
    with gr.Row(equal_height=True):
        gr.Markdown("### Is it working?")
        c["updated"] = gr.Markdown(elem_id="rl-dash-updated")
        c["refresh_btn"] = gr.Button("Refresh", size="sm", scale=0, min_width=100)
    gr.Markdown("#### Rankings over time")
    c["note_rankings"] = gr.Markdown()
    c["rankings"] = _plot("rankings")
    gr.Markdown("#### Reward model: accuracy per version")
    c["note_reward_acc"] = gr.Markdown()
    with gr.Row():
        c["reward_acc"] = _plot("reward_acc")
        c["reward_table"] = gr.Dataframe(label="Accuracy history (newest first; calibration "
                                         "and pair counts on the Research tab's version pages)",
                                         visible=False, interactive=False, max_height=300,
                                         scale=2)
    gr.Markdown("#### Policy rounds (PPO, GRPO, RLOO or online DPO): per step, steps run "
                "on across rounds")
    c["note_ppo"] = gr.Markdown()
    for row in (list(dd.PPO_PLOTS)[:2], list(dd.PPO_PLOTS)[2:]):
        with gr.Row():
            for name in row:  # entropy is logged every minibatch; the rest once per rollout
                c[f"ppo_{name}"] = _plot(f"ppo_{name}")
    gr.Markdown("#### Blind A/B: human win rate vs the reference (v0)")
    c["note_ab"] = gr.Markdown()
    c["ab_summary"] = gr.Markdown()
    with gr.Row():
        c["ab_plot"] = _plot("ab_plot")
        with gr.Column(scale=1):
            c["ab_table"] = gr.Dataframe(label="Win rate per version", visible=False,
                                         interactive=False, max_height=240)
            c["leaderboard"] = gr.Dataframe(label="Bradley-Terry leaderboard (v0 = 1000)",
                                            visible=False, interactive=False, max_height=240)
    gr.Markdown("#### Per version: diversity and win rate next to drift "
                "(reward hacking = KL/length up while diversity falls)")
    c["note_health"] = gr.Markdown()
    with gr.Row():
        c["quality"] = _plot("quality")
        c["drift"] = _plot("drift")
    c["diversity_table"] = gr.Dataframe(label="Diversity per version (newest 200 responses)",
                                        visible=False, interactive=False, max_height=260)
    gr.Markdown("#### Annotator agreement")
    c["agreement_md"] = gr.Markdown()
    gr.Markdown("#### Job queue")
    c["jobs_html"] = gr.HTML(elem_id="rl-dash-jobs")


def dashboard_updates(data: dict) -> dict:
    """dashboard_data's dict -> {component name: gr.update}; an empty section shows its note."""
    out = {}
    for name in _PLOTS:
        frame = data[name]
        value = None if frame.empty else plot_value(chart_spec(name, frame))
        out[name] = gr.update(value=value, visible=not frame.empty)
    for name in _TABLES:
        out[name] = gr.update(value=data[name], visible=not data[name].empty)
    for section, note in data["notes"].items():
        out[f"note_{section}"] = gr.update(value=f"*{note}*" if note else "", visible=bool(note))
    out["agreement_md"] = data["agreement_md"]
    out["ab_summary"] = gr.update(value=data["ab_summary"], visible=not data["notes"]["ab"])
    return out


def plot_value(spec: dict) -> AltairPlotData:
    """What gr.Plot shows for a Vega-Lite spec. chart="line" makes Gradio size it to its
    container and apply the theme (fonts, text colours, its palette for colour scales); every
    layer then needs an `encoding`, and a colour encoding a scale range (app.charts has both)."""
    return AltairPlotData(type="altair", chart="line", plot=json.dumps(spec))


def chart_spec(name: str, frame) -> dict:
    """The Vega-Lite spec of one Dashboard figure (app.charts) from its frame."""
    if name == "rankings":
        return charts.time_chart(frame, title="Rankings", y_title="rankings")
    if name.startswith("ppo_"):
        return charts.step_chart(frame, title=dd.PPO_PLOTS[name[4:]], y_title="value")
    order = dd.version_order(frame)
    wilson = "bars: 95% Wilson intervals; dashed: chance (0.5)"
    if name == "reward_acc":
        return charts.interval_chart(frame, x="version", order=order, unit=True, chance=0.5,
                                     title="Pairwise accuracy per version", y_title="accuracy",
                                     subtitle=wilson)
    no_bar = (f"no bar: fewer than {dd.MIN_AB_RANKINGS} A/B rankings (not enough data yet)"
              if frame["lo"].isna().any() else "")
    if name == "ab_plot":
        return charts.interval_chart(frame, x="version", order=order, unit=True, chance=0.5,
                                     title="Win rate vs the reference", y_title="win rate",
                                     subtitle=[wilson, no_bar])
    if name == "quality":
        return charts.interval_chart(frame, x="version", order=order, unit=True,
                                     title="Win rate and diversity (0–1)", y_title="",
                                     subtitle=["bars: the win rate's 95% interval", no_bar])
    return charts.interval_chart(frame, x="version", order=order, y_title="",
                                 title="Drift: KL from reference, mean length",
                                 subtitle="bars: 95% interval of the mean length")


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
