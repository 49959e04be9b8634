"""The Data tab's plain functions (no Gradio state or events): what it shows, as escaped HTML,
and what its buttons do, each returning a plain dict.

Researchers only: every function checks the role itself (`ui_research.allowed`), whatever the
page shows, so an annotator's call (a crafted request included) reads and writes nothing.
Prompts, responses, notes and names are user or model text: always escaped (`handlers.esc`).
"""
from __future__ import annotations

from app.context import AppContext
from app.handlers import esc
from app.ui_research import allowed
from rlhf_core.data import review
from rlhf_core.data.annotation import Refused

NOTICE = "The data view is for researchers. Ask a researcher to grant you the role."
ANY = "any"
FLAGGED = {ANY: None, "flagged": True, "not flagged": False}
SORT_LABELS = {"newest first": "newest", "oldest first": "oldest", "slowest first": "slowest",
               "most disagreement first": "disagreement"}
ITEM_KINDS = {"ab": " · A/B", "arena": " · arena"}  # after the kind (labeling items: none)
PAGE_SIZE = 25
QUEUE_SIZE = 10
TEXT_CHARS = 400  # a response in a queue card is cut here (the Rank tab shows it whole)
CSS = """
.dt-wrap { overflow-x: auto; }
table.dt { border-collapse: collapse; width: 100%; font-size: 0.88em; }
table.dt td, table.dt th { border-bottom: 1px solid var(--border-color-primary); padding: 3px 6px;
                           text-align: left; vertical-align: top; }
table.dt td.dt-text { white-space: pre-wrap; word-break: break-word; min-width: 14em; }
table.dt td.dt-num { text-align: right; white-space: nowrap; }
table.dt td.dt-resp { white-space: pre-wrap; word-break: break-word; width: 75%; min-width: 14em; }
@media (max-width: 700px) { table.dt td.dt-resp, table.dt td.dt-text { min-width: 8em; } }
.dt-card { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px 10px;
           margin-bottom: 10px; background: var(--background-fill-secondary); }
.dt-meta { font-size: 0.85em; color: var(--body-text-color-subdued); display: flex;
           flex-wrap: wrap; gap: 4px 12px; margin-bottom: 4px; }
.dt-prompt { white-space: pre-wrap; word-break: break-word; font-weight: 600; margin: 4px 0; }
.dt-note { white-space: pre-wrap; font-style: italic; margin: 2px 0 4px; }
.dt-tag { border-radius: 4px; padding: 0 6px; background: var(--color-accent-soft); }
.dt-flag { background: #f6d365; color: #222; }
.dt-empty { color: var(--body-text-color-subdued); padding: 6px 0; }
"""


def reviewer(username: str | None, profile: dict | None) -> str:
    """Who acts: the login with auth, else the name this browser ranks under."""
    return username or (profile or {}).get("name") or "researcher"


def _cell(value, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<td{attr}>{esc('' if value is None else value)}</td>"


def _table(headers: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    return (f'<div class="dt-wrap"><table class="dt"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _when(iso: str) -> str:
    return (iso or "")[:19].replace("T", " ")


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


# -- search -------------------------------------------------------------------------------------
def query_of(text, annotator, flagged, kind, version, disagreement_only, sort) -> dict:
    """The filters as the page sends them -> `review.search_rankings` keywords."""
    return {"text": (text or "").strip() or None,
            "annotator": None if annotator in (None, "", ANY) else annotator,
            "flagged": FLAGGED.get(flagged), "kind": kind if kind in review.KINDS else None,
            "policy_version": int(version[1:]) if str(version or "").startswith("v")
            and version[1:].isdigit() else None,
            "disagreement_only": bool(disagreement_only),
            "sort": SORT_LABELS.get(sort, "newest")}


def results_html(res: dict) -> str:
    if not res["rows"]:
        return '<div class="dt-empty">No rankings match.</div>'
    rows = []
    for r in res["rows"]:
        flag = "flagged" + (" (kept)" if r["review"] == "resolve" else "") if r["flagged"] else ""
        tiers = r["tiers"] or ("skipped" if r["kind"] == "skip" else "")
        rows.append("<tr>" + "".join([
            _cell(f"#{r['id']}"), _cell(_when(r["created_at"])), _cell(r["annotator"]),
            _cell(r["prompt"], "dt-text"), _cell(f"v{r['policy_version']}"),
            _cell(r["kind"] + ITEM_KINDS.get(r["item_kind"], "")),
            _cell(tiers + (" · all bad" if r["all_bad"] else "")),
            _cell(" · ".join(x for x in (flag, r["note"] or "") if x), "dt-text"),
            _cell("" if r["time_spent_s"] is None else f"{r['time_spent_s']:.0f} s", "dt-num"),
            _cell(_pct(r["disagreement"]) + (f" ({r['rankings']} rankings)"
                                             if r["disagreement"] is not None else ""),
                  "dt-num")]) + "</tr>")
    return _table(["ranking", "time", "annotator", "prompt", "policy", "kind", "order (best "
                   "first)", "flag / note", "time", "disagreement"], rows)


def search_view(ctx: AppContext, username, profile, query: dict, page: int) -> dict:
    if not allowed(ctx, username, profile):
        return {"allowed": False}
    page = max(0, int(page or 0))
    res = review.search_rankings(ctx.store, **query, limit=PAGE_SIZE, offset=page * PAGE_SIZE)
    pages = max(1, -(-res["total"] // PAGE_SIZE))
    if page >= pages:  # the results shrank under this page: show the last one
        page = pages - 1
        res = review.search_rankings(ctx.store, **query, limit=PAGE_SIZE,
                                     offset=page * PAGE_SIZE)
    return {"allowed": True, "results_html": results_html(res), "page": page,
            "page_md": f"**{res['total']}** ranking(s) · page {page + 1} of {pages}"}


def filter_choices(ctx: AppContext) -> dict:
    versions = [f"v{v['version']}" for v in ctx.store.list_versions("policy")]
    return {"annotators": [ANY, *review.annotator_names(ctx.store)], "versions": [ANY, *versions]}


# -- the queues -----------------------------------------------------------------------------------
def _responses_table(responses: list[dict], columns: list[tuple[str, dict]]) -> str:
    """One row per response (its letter, text cut), one column per ranking: its rank there."""
    rows = []
    for s in responses:
        text = s["text"] if len(s["text"]) <= TEXT_CHARS else s["text"][:TEXT_CHARS] + " …"
        ranks = "".join(_cell(rank_of[s["id"]] + 1 if s["id"] in rank_of else "—", "dt-num")
                        for _, rank_of in columns)
        rows.append(f"<tr>{_cell(s['label'])}{_cell(text, 'dt-resp')}{ranks}</tr>")
    return _table(["resp.", "response", *(name for name, _ in columns)], rows)


def _card(meta: list[str], prompt: str, body: str, extra: str = "") -> str:
    spans = "".join(f"<span>{esc(m)}</span>" for m in meta)
    return (f'<div class="dt-card"><div class="dt-meta">{spans}{extra}</div>'
            f'<div class="dt-prompt">{esc(prompt)}</div>{body}</div>')


def flags_html(queue: dict) -> str:
    if not queue["rows"]:
        return '<div class="dt-empty">No flagged ranking waits for review.</div>'
    cards = []
    for r in queue["rows"]:
        meta = [f"ranking #{r['id']}", f"item #{r['item_id']}", f"by {r['annotator']}",
                _when(r["created_at"]), f"policy v{r['policy_version']}",
                f"order: {r['tiers'] or 'skipped'}"]
        note = f'<div class="dt-note">note: {esc(r["note"])}</div>' if r["note"] else ""
        cards.append(_card(meta, r["prompt"], note + _responses_table(
            r["responses"], [(f"rank by {r['annotator']}", r["rank_of"])]),
            '<span class="dt-tag dt-flag">flagged</span>'))
    return "".join(cards)


def disagreements_html(queue: dict) -> str:
    if not queue["items"]:
        return '<div class="dt-empty">No item ranked by two annotators waits for review.</div>'
    cards = []
    for it in queue["items"]:
        meta = [f"item #{it['item_id']}", f"policy v{it['policy_version']}",
                f"disagreement {_pct(it['disagreement'])} ({it['discordant']} of "
                f"{it['compared']} pairs reversed)", f"{it['n_rankings']} rankings"]
        if it["need"]:
            meta.append(f"waiting for {it['need']} more")
        lines = "".join(
            f'<div class="dt-note">{esc(r["annotator"])}: {esc(r["tiers"])}'
            + (" · flagged" if r["flagged"] else "")
            + (f" · note: {esc(r['note'])}" if r["note"] else "") + "</div>"
            for r in it["rankings"])
        columns = [(r["annotator"], r["rank_of"]) for r in it["rankings"]]
        cards.append(_card(meta, it["prompt"], lines + _responses_table(it["responses"],
                                                                          columns)))
    return "".join(cards)


def queues_view(ctx: AppContext, username, profile) -> dict:
    """Both queues and the ids their action pickers offer."""
    if not allowed(ctx, username, profile):
        return {"allowed": False}
    flags = review.flag_queue(ctx.store, limit=QUEUE_SIZE)
    disagree = review.disagreement_queue(ctx.store, limit=QUEUE_SIZE)
    return {"allowed": True,
            "flags_html": flags_html(flags),
            "flags_md": f"**{flags['total']}** flagged ranking(s) to review"
                        + (f" (the oldest {QUEUE_SIZE} shown)" if flags["total"] > QUEUE_SIZE
                           else ""),
            "flag_choices": [(f"#{r['id']} by {r['annotator']}", r["id"])
                             for r in flags["rows"]],
            "disagree_html": disagreements_html(disagree),
            "disagree_md": f"**{disagree['total']}** item(s) ranked by two or more annotators"
                           + (f" (the {QUEUE_SIZE} most disputed shown)"
                              if disagree["total"] > QUEUE_SIZE else ""),
            "item_choices": [(f"item #{it['item_id']} ({_pct(it['disagreement'])})",
                              it["item_id"]) for it in disagree["items"]]}


# -- actions (researchers only, checked here) ------------------------------------------------------
ACTIONS = {"resolve": review.resolve_flag, "relabel": review.relabel_flag,
           "ask_more": review.ask_one_more, "reviewed": review.mark_reviewed}


def act(ctx: AppContext, action: str, target, note, username, profile) -> dict:
    """Run one review action on a ranking id (resolve, relabel) or an item id (ask_more,
    reviewed): {"ok", "message"}. A non-researcher is refused before anything is read."""
    if not allowed(ctx, username, profile):
        return {"ok": False, "message": "only researchers may review the data"}
    try:
        out = ACTIONS[action](ctx.store, _as_id(target), reviewer(username, profile),
                              (note or "").strip() or None)
    except Refused as exc:
        return {"ok": False, "message": str(exc)}
    return {"ok": True, "message": out["message"]}


def _as_id(value):
    """A dropdown's value (an int, or its text from a raw request) as an id; anything else is
    passed on for the verb to refuse."""
    if isinstance(value, str) and value.strip().lstrip("#").isdigit():
        return int(value.strip().lstrip("#"))
    return value
