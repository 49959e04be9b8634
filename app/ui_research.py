"""The Research tab: submitted items beside the reward model's scores, flagged items, version
pages (provenance) and the automatic-loop switch. Researchers only.

Access: with an auth file, the logged-in user's role decides (`ctx.is_researcher`). On loopback
without one, the name remembered in this browser (the Rank tab's profile) is checked the same
way, so everybody is a researcher unless `config.researchers` names who is.
Everything from the store (prompts, responses, notes, reasons) is shown as escaped text.
"""
from __future__ import annotations

import gradio as gr

from app import dashboard_data as dd
from app.context import AppContext
from app.handlers import esc
from rlhf_core.data import reports
from rlhf_core.data.guidelines import get_guidelines, set_guidelines
from rlhf_core.workspace import set_auto

NOTICE = "The research view is for researchers. Ask a researcher to grant you the role."
FILTERS = {"Recent rankings": False, "Flagged or with a note": True}
TEXT_CHARS = 600  # longer responses are cut in the table (the Rank tab shows them whole)
CSS = """
.rs-item { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px 10px;
           margin-bottom: 10px; background: var(--background-fill-secondary); }
.rs-meta { font-size: 0.85em; color: var(--body-text-color-subdued); display: flex;
           flex-wrap: wrap; gap: 4px 12px; margin-bottom: 4px; }
.rs-prompt { white-space: pre-wrap; font-weight: 600; margin: 4px 0; }
.rs-tag { border-radius: 4px; padding: 0 6px; background: var(--color-accent-soft); }
.rs-flag { background: #f6d365; color: #222; }
.rs-ok { background: #c8efd4; color: #14532d; } .rs-part { background: #fde7c2; color: #7c4a03; } .rs-bad { background: #f8c9c9; color: #7f1d1d; }
.rs-note { white-space: pre-wrap; font-style: italic; margin: 2px 0 4px; }
table.rs { border-collapse: collapse; width: 100%; font-size: 0.9em; }
table.rs td, table.rs th { border-bottom: 1px solid var(--border-color-primary); padding: 3px 6px;
                           text-align: left; vertical-align: top; }
table.rs td.rs-text { white-space: pre-wrap; word-break: break-word; width: 70%; }
.rs-kv td:first-child { color: var(--body-text-color-subdued); width: 14em; }
"""


# -- plain functions (no Gradio state) ----------------------------------------------------------
def allowed(ctx: AppContext, username: str | None, profile: dict | None) -> bool:
    if ctx.auth_enabled:
        return bool(username) and ctx.is_researcher(username)
    if not ctx.config.researchers:
        return True
    return ctx.is_researcher((profile or {}).get("name") or None)


def _table(headers: list[str], rows: list[list], cls: str = "rs") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    head = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""
    body = "".join("<tr>" + "".join(cell if isinstance(cell, _Raw) else f"<td>{esc(cell)}</td>"
                                    for cell in row) + "</tr>" for row in rows)
    return f'<table class="{cls}">{head}<tbody>{body}</tbody></table>'


class _Raw(str):
    """A cell already rendered (and escaped) by this module."""


def _agreement_tag(item: dict, reward_version) -> str:
    if reward_version is None:
        return '<span class="rs-tag">no reward model yet</span>'
    if not item["pairs"]:
        return f'<span class="rs-tag">not scored by reward v{reward_version} yet</span>'
    agree, pairs = item["agree"], item["pairs"]
    word, cls = (("agrees", "rs-ok") if agree == pairs else ("disagrees", "rs-bad") if not agree
                 else ("partly agrees", "rs-part"))
    return (f'<span class="rs-tag {cls}">reward v{reward_version} {word}'
            f': {item["agree"]}/{item["pairs"]} pairs in the annotator\'s order</span>')


def items_html(rec: dict) -> str:
    if not rec["items"]:
        return '<div class="rs-empty">No rankings match yet.</div>'
    cards = []
    for it in rec["items"]:
        rows = []
        for r in it["responses"]:
            score = dd.fmt(r["score"]) if r["score"] is not None else "—"
            text = r["text"] if len(r["text"]) <= TEXT_CHARS else r["text"][:TEXT_CHARS] + " …"
            rows.append([r["tier"] + 1 if r["tier"] is not None else "—", r["label"],
                         f"v{r['policy_version']}", score,
                         _Raw(f'<td class="rs-text">{esc(text)}</td>')])
        meta = [f"ranking #{it['id']}", f"item #{it['item_id']}",
                "blind A/B" if it["kind"] == "ab" else it["kind"],
                f"chosen by: {it['selection'] or 'unknown'}", f"batch from policy v{it['policy_version']}",
                f"by {it['annotator']}", it["created_at"][:19].replace("T", " ")]
        flags = ('<span class="rs-tag rs-flag">flagged</span>' if it["flagged"] else "") + (
            '<span class="rs-tag">all bad</span>' if it["all_bad"] else "")
        note = f'<div class="rs-note">note: {esc(it["note"])}</div>' if it["note"] else ""
        cards.append(
            '<div class="rs-item"><div class="rs-meta">'
            + "".join(f"<span>{esc(m)}</span>" for m in meta) + flags
            + _agreement_tag(it, rec["reward_version"]) + "</div>"
            + f'<div class="rs-prompt">{esc(it["prompt"])}</div>{note}'
            + _table(["rank", "resp.", "policy", "reward score", "response"], rows) + "</div>")
    return "".join(cards)


def _kv(pairs: list[tuple[str, object]]) -> str:
    return _table(["", ""], [[k, v if isinstance(v, str) else dd.fmt(v)] for k, v in pairs],
                  "rs rs-kv")


def version_html(store, key: str | None) -> str:
    """The provenance page of 'policy:N' / 'reward:N' as escaped HTML."""
    if not key or ":" not in key:
        return '<div class="rs-empty">Pick a version.</div>'
    kind, _, num = key.partition(":")
    page = reports.version_page(store, kind, int(num)) if num.isdigit() else None
    if page is None:
        return f'<div class="rs-empty">{esc(key)} does not exist.</div>'
    head = [("status", page["status"]), ("reason", page["reason"] or ""),
            ("parent", f"{kind} v{page['parent']}" if page["parent"] is not None else "none"),
            ("created", page["created_at"]), ("job", page["job_id"]),
            ("base model", page["base_model"] or ""),
            ("children", ", ".join(f"v{c}" for c in page["children"]) or "none")]
    if kind == "policy":
        rate = page["win_rate_vs_reference"]
        head[3:3] = [("reward version used", f"reward v{page['reward_version']}"
                      if page["reward_version"] is not None else "none (reference)"),
                     ("KL from reference", page["kl_from_reference"]),
                     ("win rate vs reference", f"{dd.fmt(rate['rate'])} ({dd.fmt(rate['lo'])} – "
                      f"{dd.fmt(rate['hi'])}, n={rate['n']})" if rate and rate["n"] else "no A/B yet"),
                     ("rankings of its batches", len(page["rankings"]))]
    else:
        head.insert(3, ("policies trained with it",
                        ", ".join(f"v{p}" for p in page["policies_trained"]) or "none"))
    parts = [f"<h4>{esc(kind)} v{page['version']}</h4>", _kv(head)]
    parts += _dict_section("Labels / data it was trained on (counts)", page["counts"])
    parts += _dict_section("Metrics" + (" (policy round summary)" if kind == "policy" else
                                        " (held-out / fresh accuracy, calibration)"),
                           page["metrics"])
    if kind == "policy":
        parts += _batches_section(page["batches"])
        parts += _ppo_section(page["ppo"])
    return "".join(parts)


def _dict_section(title: str, d: dict) -> list[str]:
    flat = reports.flatten(d or {})
    if not flat:
        return [f"<h5>{esc(title)}</h5><div class='rs-empty'>none recorded</div>"]
    return [f"<h5>{esc(title)}</h5>", _kv(sorted(flat.items()))]


def _batches_section(batches: list[dict]) -> list[str]:
    if not batches:
        return ["<h5>Batches sampled</h5><div class='rs-empty'>none yet</div>"]
    rows = [[f"#{b['id']}", b["created_at"][:19].replace("T", " "), b["k"], b["items"],
             b["ab_items"], b["items_ready"], b["rankings"], b["skips"]] for b in batches]
    return ["<h5>Batches sampled from it</h5>",
            _table(["batch", "created", "k", "items", "A/B items", "still ready", "rankings",
                    "skips"], rows)]


def _ppo_section(rows: list[dict], keys=("reward_mean", "kl", "entropy", "response_length",
                                            "approx_kl", "clipfrac", "pg_loss", "vf_loss")) -> list:
    if not rows:
        return ["<h5>Policy round steps</h5><div class='rs-empty'>none recorded</div>"]
    shown = [k for k in keys if any(r.get(k) is not None for r in rows)]
    return [f"<h5>Policy round steps ({len(rows)})</h5>",
            _table(["step", *shown], [[r["step"], *(dd.fmt(r.get(k)) for k in shown)]
                                      for r in rows[-40:]])]


def loop_markdown(s: dict) -> str:
    reward = f"v{s['reward_version']}" if s["reward_version"] is not None else "none"
    return (
        f"**Automatic loop is {'ON' if s['auto'] else 'OFF'}.** Every "
        f"**{s['retrain_every']}** new rankings train the reward model "
        f"(**{s['rankings_since_training']}** since the last training); a promoted reward "
        f"version starts a policy round (last used: v{s['reward_used_by_ppo']}); a published "
        f"policy gets a new batch. Serving: policy **v{s['policy_version']}**, reward "
        f"**{reward}**. Jobs active: {', '.join(s['active_jobs']) or 'none'}.\n\n"
        f"Thresholds: keep **{s['min_ready_items']}** items ready ({s['open_items']} open now) · "
        f"A/B share **{s['ab_fraction']}** vs {s['ab_baseline']} · selection "
        f"**{s['selection']}** (random share {s['random_share']}) · older items: "
        f"{s['retire_rule']} · overlap {s['overlap']} · promotion tolerance "
        f"{s['promote_tolerance']} · kl_coef {s['kl_coef']}")


def research_view(ctx: AppContext, username, profile, filter_label: str, version_key) -> dict:
    """Everything the tab shows, or only the notice for a non-researcher."""
    if not allowed(ctx, username, profile):
        return {"allowed": False}
    rec = dd.recent_items(ctx.store, flagged_only=FILTERS.get(filter_label, False))
    settings = dd.loop_settings(ctx.store)
    return {"allowed": True, "items_html": items_html(rec), "auto": settings["auto"],
            "loop_md": loop_markdown(settings), "choices": dd.version_choices(ctx.store),
            "version_html": version_html(ctx.store, version_key)}


def toggle_auto(ctx: AppContext, on: bool, username, profile) -> dict:
    if not allowed(ctx, username, profile):
        return {"loop_msg": "only researchers may switch the automatic loop"}
    set_auto(ctx.store, bool(on))
    return {"loop_msg": f"automatic loop switched {'on' if on else 'off'}",
            "loop_md": loop_markdown(dd.loop_settings(ctx.store))}


def load_guidelines(ctx: AppContext, username, profile) -> dict:
    """The editor's values (researchers only; others get nothing)."""
    if not allowed(ctx, username, profile):
        return {}
    g = get_guidelines(ctx.store)
    return {"guidelines": g["guidelines"], "rubric": g["rubric"]}


def save_guidelines(ctx: AppContext, guidelines: str, rubric: str, username, profile) -> dict:
    """Researchers only (checked here, whatever the page shows)."""
    if not allowed(ctx, username, profile):
        return {"guidelines_msg": "only researchers may edit the guidelines"}
    who = username or (profile or {}).get("name") or None
    try:
        g = set_guidelines(ctx.store, guidelines, rubric, actor=who)
    except ValueError as exc:
        return {"guidelines_msg": f"not saved: {exc}"}
    return {"guidelines_msg": "saved: annotators see it from their next item",
            "guidelines": g["guidelines"], "rubric": g["rubric"]}


# -- the tab -------------------------------------------------------------------------------------
def build_research_tab(ctx: AppContext, *, refresh_s: float = 10.0) -> None:
    """Add the Research tab (an `extra_tabs` callable of `app.ui.build_ui`)."""
    from app import ui_prompts as prompts  # here: it imports this module's role check
    c: dict = {}
    with gr.Tab("Research", id="research") as c["tab"]:
        c["notice"] = gr.Markdown(NOTICE, visible=False)
        with gr.Column(visible=False) as c["body"]:
            gr.Markdown("#### Automatic loop")
            with gr.Row(equal_height=True):
                c["auto"] = gr.Checkbox(label="Automatic loop on", scale=0, min_width=200,
                                        elem_id="rs-auto")
                c["loop_msg"] = gr.Markdown()
            c["loop_md"] = gr.Markdown()
            gr.Markdown("#### Guidelines for annotators (markdown; raw HTML is shown as text)")
            c["rubric"] = gr.Textbox(label="Rubric question (shown above the cards)",
                                     max_lines=1, elem_id="rs-rubric")
            c["guidelines"] = gr.Textbox(label="Guidelines (collapsible on the Rank page)",
                                         lines=6, max_lines=20, elem_id="rs-guidelines")
            with gr.Row(equal_height=True):
                c["guidelines_btn"] = gr.Button("Save guidelines", size="sm", scale=0,
                                                min_width=160, elem_id="rs-guidelines-save")
                c["guidelines_msg"] = gr.Markdown(elem_id="rs-guidelines-msg")
            prompts.build_prompt_upload(c)
            gr.Markdown("#### Submitted items, the reward model's scores and its agreement")
            with gr.Row(equal_height=True):
                c["filter"] = gr.Radio(list(FILTERS), value="Recent rankings", show_label=False,
                                       scale=2)
                c["refresh_btn"] = gr.Button("Refresh", size="sm", scale=0, min_width=100)
            c["items_html"] = gr.HTML(css_template=CSS, elem_id="rs-items", max_height=900)
            gr.Markdown("#### Version pages (provenance)")
            c["version"] = gr.Dropdown(label="Version", choices=[], value=None,
                                       allow_custom_value=False)
            c["version_html"] = gr.HTML(css_template=CSS, elem_id="rs-version")
        # Inside the tab: a bare component in the tab bar would render as a tab of its own.
        c["profile"] = gr.BrowserState({"name": ""}, storage_key="rlhf-loop-profile",
                                       secret=ctx.browser_secret)  # the Rank tab's name
        c["timer"] = gr.Timer(refresh_s)
    _wire(ctx, c)
    prompts.wire_prompt_upload(ctx, c)


def _wire(ctx: AppContext, c: dict) -> None:
    outs = [c[k] for k in ("notice", "body", "items_html", "auto", "loop_md", "version",
                           "version_html")]

    def _user(request: gr.Request | None):
        return getattr(request, "username", None) if request is not None else None

    def refresh(profile, filter_label, version_key, request: gr.Request):
        out = research_view(ctx, _user(request), profile, filter_label, version_key)
        if not out["allowed"]:
            return {c["notice"]: gr.update(visible=True), c["body"]: gr.update(visible=False)}
        choices = out["choices"]
        key = version_key if version_key in {v for _, v in choices} else (
            choices[0][1] if choices else None)
        return {c["notice"]: gr.update(visible=False), c["body"]: gr.update(visible=True),
                c["items_html"]: out["items_html"], c["auto"]: out["auto"],
                c["loop_md"]: out["loop_md"],
                c["version"]: gr.update(choices=choices, value=key),
                c["version_html"]: version_html(ctx.store, key) if key != version_key
                else out["version_html"]}

    def on_auto(on, profile, request: gr.Request):
        out = toggle_auto(ctx, on, _user(request), profile)
        return {c[k]: v for k, v in out.items()}

    inputs = [c["profile"], c["filter"], c["version"]]
    # triggers=None: on page load and whenever an input changes (the profile read from the
    # browser, the filter, the picked version)
    gr.on(None, refresh, inputs, outs, api_visibility="private", trigger_mode="always_last")
    gr.on([c["tab"].select, c["refresh_btn"].click, c["timer"].tick], refresh, inputs, outs,
          api_visibility="private", show_progress="hidden", trigger_mode="always_last")
    c["auto"].input(on_auto, [c["auto"], c["profile"]], [c["loop_msg"], c["loop_md"]],
                    api_visibility="private")
    _wire_guidelines(ctx, c, _user)


def _wire_guidelines(ctx: AppContext, c: dict, user) -> None:
    """Filled on page load only (the timer's refresh would overwrite an edit in progress)."""
    fields = [c["guidelines"], c["rubric"]]

    def on_load(profile, request: gr.Request):
        out = load_guidelines(ctx, user(request), profile)
        return {c[k]: v for k, v in out.items()} or {c["guidelines_msg"]: gr.skip()}

    def on_save(guidelines, rubric, profile, request: gr.Request):
        out = save_guidelines(ctx, guidelines, rubric, user(request), profile)
        return {c[k]: v for k, v in out.items()}

    gr.on(None, on_load, [c["profile"]], fields + [c["guidelines_msg"]],  # load; profile read
          api_visibility="private")
    c["guidelines_btn"].click(on_save, fields + [c["profile"]], fields + [c["guidelines_msg"]],
                              api_visibility="private")
