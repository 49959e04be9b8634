"""The ranking UI's logic as plain functions: inputs -> dict keyed by component name.

No Gradio here, so every path is unit-tested on a real store. `app/ui.py` maps the keys to
components (`item` and `drafts` are per-browser state; `ranks` is one value per card radio).
Every function catches `Refused`/`ValueError` and answers with a message: nothing a user
types can crash the server.
"""
from __future__ import annotations

import html
import json
import re
import time
import uuid

from app import safe_markdown, serving
from app.context import MAX_NAME_LEN, ROLES, AppContext
from rlhf_core.data import workers
from rlhf_core.data.annotation import (LABELS, Busy, Refused, StaleForm, assignment_status,
                                       submit_ranking, undo_last)
from rlhf_core.preferences import format_ranking_text, parse_ranking_text

MAX_CARDS = len(LABELS)
MAX_DRAFTS = 20
MAX_DRAFT_NOTE_CHARS = 1000  # 20 drafts stay far below the 64 KB request cap (app/body_limit.py)
MAX_RANKING_CHARS = 1000
MAX_DRAFT_RANKING_CHARS = 200  # "a=b=c=d=e=f=g=h" is 15: a longer one is not worth keeping
WAITING = ("**Nothing to rank right now: the worker is sampling the next batch.** "
           "This page checks again every few seconds (or press *Next item*).")
_NAME_RE = re.compile(r"^[\w .@+-]+$")


# -- identity ---------------------------------------------------------------------
def clean_name(name: str | None) -> str:
    name = " ".join(str(name or "").split())
    if not name:
        raise Refused("enter your name to start ranking")
    if len(name) > MAX_NAME_LEN or not _NAME_RE.match(name):
        raise Refused(f"a name is letters, digits, spaces and . @ + - _ (at most {MAX_NAME_LEN})")
    return name


def identify(ctx: AppContext, name: str | None, username: str | None) -> str:
    """The login username when auth is on (a typed name is ignored), else the cleaned name."""
    if ctx.auth_enabled:
        if not username:
            raise Refused("please log in")
        return username
    return clean_name(name)


def session_user(ctx: AppContext, session_annotator: str | None, username: str | None,
                 roles: tuple[str, ...] = ROLES) -> str | None:
    """Who acts in a page event, and may they. With auth on: the login of the request, always
    (the session state is only as good as its session_hash, which a client chooses); a session
    opened by another login is refused, so nobody acts in, or changes, another user's session.
    Without auth: the name the page started with (names are self-declared on loopback)."""
    if not ctx.auth_enabled:
        who = session_annotator
    elif not username or username not in ctx.users:
        raise Refused("please log in")
    elif session_annotator and session_annotator != username:
        raise Refused("this page session belongs to another login: reload the page")
    else:
        who = username
    if who and ctx.role(who) not in roles:
        raise Refused(f"only a {' or '.join(roles)} may do this")
    return who


# -- rendering (model output is data, never markup: escaped, or markdown without HTML) ----
def esc(text: str) -> str:
    """HTML-escape, and also neutralise template syntax (`${}`, `{{}}`) of gr.HTML."""
    out = html.escape(str(text), quote=True)
    for ch, ent in (("{", "&#123;"), ("}", "&#125;"), ("$", "&#36;"), ("`", "&#96;"),
                    ("\\", "&#92;")):
        out = out.replace(ch, ent)
    return out


def render_prompt(item: dict | None) -> str:
    if item is None:
        return ""
    return (f'<div class="rl-prompt"><div class="rl-head">Prompt · item {item["id"]}</div>'
            f'<pre class="rl-text">{esc(item["prompt"])}</pre></div>')


def render_cards(item: dict | None) -> str:
    if item is None:
        return ""
    cards = []
    for r in item["responses"]:
        cut = " · cut at length" if r.get("finish_reason") == "length" else ""
        cards.append(
            f'<div class="rl-card" data-label="{r["label"]}"><div class="rl-head">'
            f'<span class="rl-label">{r["label"]}</span>'
            f'<span class="rl-meta">{r.get("n_tokens") or "?"} tokens{cut}</span></div>'
            f'<div class="rl-md">{safe_markdown.render(r["text"])}</div>'
            f'<pre class="rl-text rl-raw">{esc(r["text"])}</pre></div>')
    return f'<div class="rl-cards rl-k{len(cards)}">{"".join(cards)}</div>'


def public_item(item: dict) -> dict:
    """The item as shown to an annotator: no per-response policy versions (A/B stays blind)."""
    return {"id": item["id"], "prompt": item["prompt"], "policy_version": item["policy_version"],
            "token": item["token"], "k": len(item["responses"]),
            "responses": [{"id": r["id"], "label": r["label"], "text": r["text"],
                           "n_tokens": r.get("n_tokens"), "finish_reason": r.get("finish_reason")}
                          for r in item["responses"]]}


def form_state(item: dict) -> dict:
    """What the browser keeps about the form: enough to submit, nothing to trust blindly."""
    return {"id": item["id"], "token": item["token"],
            "labels": {r["label"]: r["id"] for r in item["responses"]},
            "loaded_at": time.time(), "submission_key": uuid.uuid4().hex}


# -- ranking text <-> tiers <-> radios ----------------------------------------------------
def tiers_from_text(text: str, state: dict, *, all_bad: bool = False) -> list[list[int]]:
    """Keyboard text ("bacd", "b a=c d") or JSON tiers (ids or labels) -> tiers of response ids."""
    labels = state["labels"]
    text = (text or "").strip()
    if len(text) > MAX_RANKING_CHARS:  # a ranking names at most 8 cards; refuse before parsing
        raise Refused(f"a ranking is at most {MAX_RANKING_CHARS} characters")
    if not text:
        if all_bad:  # "all bad" without an order: one tie, kept out of training pairs
            return [list(labels.values())]
        raise Refused(f"type a ranking, best first (e.g. {''.join(labels).lower()}) or skip")
    if text.startswith("["):
        try:
            tiers = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise Refused(f"ranking JSON is invalid: {str(exc)[:120]}") from None
        if not isinstance(tiers, list) or not all(isinstance(t, list) for t in tiers):
            raise Refused("ranking JSON must be a list of tiers, e.g. [[12], [10, 11], [13]]")
        return [[labels.get(str(x).upper(), x) if isinstance(x, str) else x for x in t]
                for t in tiers]
    try:
        tiers = parse_ranking_text(text, list(labels))
    except ValueError as exc:
        raise Refused(str(exc)) from None
    return [[labels[label] for label in tier] for tier in tiers]


def ranks_from_text(text: str, state: dict | None) -> list | None:
    """The rank number of each card (1 = best, ties share one), or None if the text is not valid."""
    if not state or not (text or "").strip():
        return None
    try:
        tiers = parse_ranking_text(text, list(state["labels"]))
    except ValueError:
        return None
    rank = {label: str(i + 1) for i, tier in enumerate(tiers) for label in tier}
    return [rank.get(label) for label in state["labels"]]


def text_from_ranks(ranks: list, state: dict | None) -> str:
    """Card radios -> ranking text; equal numbers tie, unranked cards are left out."""
    if not state:
        return ""
    by_rank: dict[int, list[str]] = {}
    for label, r in zip(state["labels"], ranks):
        if r not in (None, ""):
            by_rank.setdefault(int(r), []).append(label)
    return format_ranking_text([by_rank[r] for r in sorted(by_rank)])


def preview(text: str, state: dict | None, all_bad: bool = False) -> str:
    if not state:
        return ""
    if not (text or "").strip():
        return "all tied (all bad)" if all_bad else "type the letters best first, then Enter"
    try:
        labels = list(state["labels"])
        return "✓ " + format_ranking_text(parse_ranking_text(text, labels))
    except ValueError as exc:
        return f"✗ {md_escape(exc)}"  # the error may quote what was typed


def md_escape(text) -> str:
    """Text shown inside gr.Markdown as typed: no HTML, no markdown emphasis or links."""
    out = html.escape(str(text), quote=False)
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~$])", r"\\\1", out)


def form_matches(state: dict | None, form_item) -> bool:
    """Was the form (its values captured in the browser) rendered for the item in `state`?

    `item` is server-side session state and changes the moment a submission is recorded; an
    edit or a second Enter sent from the old form just before can be processed after that. Its
    text belongs to the old item, so it is never saved or submitted for the new one. `None`
    means the caller did not say (plain-function callers, scripts): not checked.
    """
    if form_item is None:
        return True
    return state is not None and str(form_item) == str(state["id"])


# -- drafts (per browser, keyed by item id, so a refresh keeps what was typed) ------------
def save_draft(drafts: dict | None, state: dict | None, *, ranking: str = "", note: str = "",
               flag: bool = False, all_bad: bool = False) -> dict:
    drafts = dict(drafts or {})
    if state:
        drafts.pop(str(state["id"]), None)
        if ranking or note or flag or all_bad:
            drafts[str(state["id"])] = {"ranking": (ranking or "")[:MAX_DRAFT_RANKING_CHARS],
                                        "note": (note or "")[:MAX_DRAFT_NOTE_CHARS],
                                        "flag": bool(flag), "all_bad": bool(all_bad)}
    return dict(list(drafts.items())[-MAX_DRAFTS:])


def draft_changed(ctx: AppContext, annotator: str | None, state: dict | None, drafts: dict | None,
                  ranking: str, note: str, flag: bool, all_bad: bool, form_item=None) -> dict:
    """On every edit: live preview, card radios in sync, draft saved. Stale forms update nothing:
    an edit sent from the form of an item that has since been submitted (`form_item` is not
    the session's item) or closed is dropped, so its text is never saved as another's draft."""
    if not state or not annotator or not form_matches(state, form_item):
        return {}
    out = {"drafts": save_draft(drafts, state, ranking=ranking, note=note, flag=flag,
                                all_bad=all_bad),
           "preview": preview(ranking, state, all_bad)}
    ranks = ranks_from_text(ranking, state)
    if ranks is not None:
        out["ranks"] = ranks
    # Checked last, so a submission recorded while this edit ran is seen.
    return out if _still_open(ctx, annotator, state["id"]) else {}


def _still_open(ctx: AppContext, annotator: str, item_id: int) -> bool:
    return assignment_status(ctx.store, item_id, annotator) == "open"


# -- the form ------------------------------------------------------------------------
def progress_text(ctx: AppContext, annotator: str) -> str:
    return serving.progress_line(ctx, annotator)


def waiting_message(ctx: AppContext, viewer: str | None) -> str:
    """Nothing to rank: say "sampling" only while a worker beats (the workers registry), else
    how to start one (the workspace path for researchers only)."""
    if workers.alive(ctx.store):
        return serving.activity(ctx, viewer)  # what it runs, for how long, what is next
    return ("**Nothing to rank right now: no worker is running; start one with "
            f"`{worker_command(ctx, viewer)}`.**{serving.held_note(ctx, viewer)} "
            "This page checks again every few seconds.")


def worker_command(ctx: AppContext, viewer: str | None) -> str:
    where = str(ctx.workspace).replace("`", "") if ctx.is_researcher(viewer) else "…"
    return f"rlhf worker --workspace {where}"


def load_form(ctx: AppContext, annotator: str, drafts: dict | None, *, message: str = "",
              undone_tiers: list | None = None) -> dict:
    """The annotator's current item (drafts restored), or the waiting message."""
    try:
        item, busy = serving.serve_item(ctx, annotator), None
    except Busy as exc:
        item, busy = None, serving.busy_text(exc)
    out = {"progress": progress_text(ctx, annotator), "drafts": dict(drafts or {})}
    if item is None:
        return {**out, "item": None, "form_item": "", "k": 0, "prompt_html": "", "cards_html": "",
                "ranking": "", "note": "", "flag": False, "all_bad": False, "preview": "",
                "ranks": [None] * MAX_CARDS,
                "message": message or busy or waiting_message(ctx, annotator), "waiting": True}
    state = form_state(item)
    draft = (drafts or {}).get(str(item["id"]), {})
    ranking = draft.get("ranking", "")
    if undone_tiers:
        by_id = {v: k for k, v in state["labels"].items()}
        ranking = format_ranking_text([[by_id[i] for i in tier] for tier in undone_tiers])
    ranks = ranks_from_text(ranking, state) or [None] * len(item["responses"])
    return {**out, "item": state, "form_item": str(item["id"]), "k": len(item["responses"]),
            "prompt_html": render_prompt(item),
            "cards_html": render_cards(item), "ranking": ranking,
            "note": draft.get("note", ""), "flag": draft.get("flag", False),
            "all_bad": draft.get("all_bad", False), "preview": preview(ranking, state),
            "ranks": ranks + [None] * (MAX_CARDS - len(ranks)), "message": message,
            "waiting": False}


def start(ctx: AppContext, name: str | None, username: str | None, drafts: dict | None) -> dict:
    """First visit or page load: who is this, and their form."""
    try:
        annotator = identify(ctx, name, username)
    except Refused as exc:
        return {"annotator": None, "message": str(exc), "level": "info"}
    form = load_form(ctx, annotator, drafts)
    return {**form, "annotator": annotator, "profile": {"name": annotator},
            "researcher": ctx.is_researcher(annotator)}


def submit_form(ctx: AppContext, annotator: str | None, state: dict | None, drafts: dict | None, *,
                ranking: str = "", note: str = "", flag: bool = False, all_bad: bool = False,
                skip: bool = False, form_item=None) -> dict:
    """Record the form. Success loads the next item; a refusal keeps every choice on screen.
    `form_item`: the item id the browser's form was rendered for (see `form_matches`)."""
    if not annotator:
        return {"message": "enter your name first", "level": "warning"}
    if not state:
        return load_form(ctx, annotator, drafts, message="nothing to submit: loading an item")
    if not form_matches(state, form_item):
        shown = f"item {form_item}" if form_item else "no item"
        text = (f"Not saved: this form was filled in for {shown}, but item {state['id']} is "
                "loaded now. Check the ranking on screen and submit again.")
        return {"message": f"**{text}**", "toast": text, "level": "warning", "stale": True}
    try:
        tiers = None if skip else tiers_from_text(ranking, state, all_bad=all_bad)
        result = submit_ranking(
            ctx.store, annotator=annotator, item_id=state["id"], token=state["token"],
            submission_key=state["submission_key"], tiers=tiers, skip=skip, all_bad=bool(all_bad),
            flagged=bool(flag), note=(note or "").strip() or None,
            time_spent_s=round(time.time() - state.get("loaded_at", time.time()), 2))
    except (Refused, ValueError) as exc:
        kept = save_draft(drafts, state, ranking=ranking, note=note, flag=flag, all_bad=all_bad)
        stale = isinstance(exc, StaleForm)
        more = " Press Next item to continue." if stale else ""
        # The reason may quote what was typed: shown as text, never as markup.
        return {"message": f"**Not saved:** {md_escape(exc)}{more}",
                "toast": f"Not saved: {exc}{more}", "level": "warning", "stale": stale,
                "drafts": kept}
    done = "skipped" if skip else "saved"
    if result["duplicate"]:
        done = "already saved (duplicate submission ignored)"
    drafts = {k: v for k, v in (drafts or {}).items() if k != str(state["id"])}
    form = load_form(ctx, annotator, drafts,
                     message=f"Item {state['id']} {done}. Next one below.")
    return {**form, "level": "info", "result": result}


def undo_form(ctx: AppContext, annotator: str | None, state: dict | None,
              drafts: dict | None) -> dict:
    """Supersede the last ranking and bring its item back with its ranking typed in."""
    if not annotator:
        return {"message": "enter your name first", "level": "warning"}
    key = "undo-" + (state["submission_key"] if state else uuid.uuid4().hex)
    try:
        undone = undo_last(ctx.store, annotator, submission_key=key)
    except (Refused, ValueError) as exc:
        return {"message": f"**Undo failed:** {exc}", "level": "warning"}
    if undone is None:
        return {"message": "nothing to undo (no ranking on an item that is still open)",
                "level": "warning"}
    if undone.get("duplicate"):
        return {"message": "already undone", "level": "info"}
    form = load_form(ctx, annotator, drafts, undone_tiers=undone.get("tiers"),
                     message=f"Undid your ranking of item {undone['item_id']}: edit and resubmit.")
    return {**form, "level": "info"}
