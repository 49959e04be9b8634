"""The "My work" tab's logic as plain functions: inputs -> dict keyed by component name.

Whose work is shown: with auth, the login's (`gr.Request.username`); without, the name the Rank
tab's session acts as (`session`: read from this browser's profile, `gr.BrowserState`
"rlhf-loop-profile", when the page loads, and changed with the name). Researchers may pick any annotator; everyone else
sees only their own, checked here on every call whatever the page sends. Only a ranking's own
annotator may correct it (`history.correct_ranking` checks that too). Everything from the store
is shown escaped, responses as markdown without raw HTML (app.handlers' renderers).
"""
from __future__ import annotations

import math
import time
import uuid

from app import handlers
from app.context import AppContext
from app.handlers import esc, md_escape
from rlhf_core.data import history
from rlhf_core.data.annotation import Refused

PAGE_SIZE = 20
NO_NAME = "Type your name on the **Rank** tab first: this page shows the work of that name."


# -- who looks, at whose work -----------------------------------------------------------------
def viewer(ctx: AppContext, username: str | None, session: str | None) -> str:
    """Who looks: `handlers.session_user` (with auth the request's login, never the session's
    name; without, the name the Rank tab acts as)."""
    who = handlers.session_user(ctx, session, username)
    if not who:
        raise Refused(NO_NAME)
    return who


def whose(ctx: AppContext, who: str, requested: str | None) -> str:
    """The annotator whose work `who` asked for: their own, or anyone's for a researcher."""
    requested = (requested or "").strip() or who
    if requested != who and not ctx.is_researcher(who):
        raise Refused("only researchers may see another annotator's work")
    return requested


def _access(ctx: AppContext, username, session, requested) -> tuple[str, str]:
    who = viewer(ctx, username, session)
    return who, whose(ctx, who, requested)


# -- the page -------------------------------------------------------------------------------------
def me_view(ctx: AppContext, username, session, requested=None, page=0) -> dict:
    """Stats, agreement and one page of history, or {"allowed": False, "notice"}."""
    try:
        who, name = _access(ctx, username, session, requested)
    except Refused as exc:
        return {"allowed": False, "notice": str(exc) if str(exc) == NO_NAME else
                f"**Not allowed:** {md_escape(exc)}"}
    page = max(0, int(page or 0)) if str(page or 0).isdigit() else 0
    hist = history.history(ctx.store, name, limit=PAGE_SIZE, offset=page * PAGE_SIZE)
    pages = max(1, math.ceil(hist["total"] / PAGE_SIZE))
    if page >= pages:  # the history shrank (another name picked): back to its last page
        page = pages - 1
        hist = history.history(ctx.store, name, limit=PAGE_SIZE, offset=page * PAGE_SIZE)
    researcher = ctx.is_researcher(who)
    names = sorted(set(history.annotators(ctx.store)) | {who, name}) if researcher else [who]
    return {"allowed": True, "viewer": who, "whose": name, "researcher": researcher,
            "choices": names, "page": page,
            "stats_html": stats_html(history.annotator_stats(ctx.store, name),
                                     history.agreement_with_others(ctx.store, name),
                                     name if name != who else None),
            "history_html": history_html(hist["rows"]),
            "page_md": f"Page {page + 1} of {pages} · {hist['total']} rankings and skips"}


def stats_html(stats: dict, agree: dict, other: str | None = None) -> str:
    tiles = [("rankings", "Rankings"), ("skips", "Skips"), ("flags", "Flagged"),
             ("ties", "With a tie"), ("corrected", "Items corrected")]
    cells = [f'<div class="me-tile"><div class="me-num">{stats["total"][k]}</div>'
             f'<div class="me-lbl">{label}</div>'
             f'<div class="me-sub">{stats["today"][k]} today</div></div>' for k, label in tiles]
    median = f"{stats['median_s']:.1f} s" if stats["median_s"] is not None else "—"
    cells.append(f'<div class="me-tile"><div class="me-num">{median}</div>'
                 f'<div class="me-lbl">Median per ranking</div>'
                 f'<div class="me-sub">over {stats["n_timed"]} timed</div></div>')
    head = f'<div class="me-whose">Work of <b>{esc(other)}</b></div>' if other else ""
    return f'{head}<div class="me-tiles">{"".join(cells)}</div>{agreement_html(agree)}'


def agreement_html(agree: dict) -> str:
    if agree["share"] is None:
        return ('<div class="me-agree"><span class="me-strong">Agreement with others:</span> '
                'no overlap yet (nobody else has ranked an item this annotator ranked)</div>')
    rows = "".join(f"<tr><td>{esc(o['annotator'])}</td><td>{o['items']}</td>"
                   f"<td>{o['agreed']} / {o['pairs']}</td><td>{o['share']:.0%}</td></tr>"
                   for o in agree["others"])
    return (f'<div class="me-agree"><span class="me-strong">Agreement with others: '
            f'{agree["share"]:.0%}</span> of '
            f'{agree["pairs"]} response pairs on {agree["items"]} shared items are ordered the '
            'same way by the other annotator'
            '<table class="me-table me-agree-table"><thead><tr><th>annotator</th>'
            '<th>shared items</th><th>pairs agreed</th><th>share</th></tr></thead>'
            f'<tbody>{rows}</tbody></table></div>')


def history_html(rows: list[dict]) -> str:
    if not rows:
        return '<div class="me-empty">No rankings yet.</div>'
    body = "".join(_history_tr(r) for r in rows)
    return ('<div class="me-scroll"><table class="me-table me-hist"><thead><tr><th>open</th>'
            '<th>when (UTC)</th><th>item</th><th>prompt</th><th>policy</th><th>ranking</th>'
            f'<th>flag / note</th><th>status</th></tr></thead><tbody>{body}</tbody></table></div>')


def _history_tr(r: dict) -> str:
    ranking = esc(r["ranking"]) if r["kind"] == "rank" else "<i>skipped</i>"
    if r["all_bad"]:
        ranking += ' <span class="me-tag">all bad</span>'
    flag = ('<span class="me-tag me-flag">flagged</span> ' if r["flagged"] else "") + (
        f'<span class="me-note">{esc(r["note"])}</span>' if r["note"] else "")
    status = {"active": '<span class="me-tag me-active">active</span>',
              "undone": '<span class="me-tag me-old-tag">superseded: undone</span>',
              "corrected": '<span class="me-tag me-old-tag">superseded: corrected by '
                           f'#{r["superseded_by"]}</span>'}[r["status"]]
    if r["supersedes"]:
        status += f' <span class="me-sub">corrects #{r["supersedes"]}</span>'
    cls = "me-row" if r["status"] == "active" else "me-row me-old"
    return (f'<tr class="{cls}" data-status="{r["status"]}"><td><button class="me-open" '
            f'data-rid="{r["id"]}" title="Open ranking {r["id"]}">#{r["id"]}</button></td>'
            f'<td>{esc(r["created_at"][:16].replace("T", " "))}</td><td>{r["item_id"]}</td>'
            f'<td class="me-prompt">{esc(r["prompt"])}</td><td>v{r["policy_version"]}</td>'
            f'<td class="me-ranking">{ranking}</td><td>{flag}</td><td>{status}</td></tr>')


# -- opening a row, correcting it -----------------------------------------------------------
def ranking_id_of(value) -> int:
    text = str(value or "").strip().lstrip("#")
    if not text.isdigit() or len(text) > 18:
        raise Refused("type a ranking number from the history (e.g. 12)")
    return int(text)


def open_row(ctx: AppContext, username, session, requested, value) -> dict:
    """The ranking's item as the Rank page showed it, its ranking typed in the box."""
    try:
        who, name = _access(ctx, username, session, requested)
        rid = ranking_id_of(value)
        detail = history.ranking_detail(ctx.store, rid)
        if detail is None or detail["annotator"] != name:
            raise Refused(f"ranking {rid} is not in the history of {name}")
    except Refused as exc:
        return {"message": f"**Not opened:** {md_escape(exc)}", "toast": f"Not opened: {exc}",
                "level": "warning"}
    item = detail["item"]
    state = {"ranking_id": rid, "annotator": name, "item_id": item["id"],
             "labels": {r["label"]: r["id"] for r in item["responses"]},
             "opened_at": time.time(), "submission_key": "fix-" + uuid.uuid4().hex}
    can_save = name == who and detail["status"] == "active"
    text = detail["ranking"] if detail["kind"] == "rank" else ""
    return {"open": state, "detail": True, "can_save": can_save,
            "detail_md": _detail_head(detail, who), "prompt_html": handlers.render_prompt(item),
            "cards_html": handlers.render_cards(item), "fix": text, "note": "",
            "preview": handlers.preview(text, state), "message": ""}


def _detail_head(d: dict, who: str) -> str:
    was = ("skipped" if d["kind"] == "skip" else f"ranked **{md_escape(d['ranking'])}**")
    head = (f"**Ranking #{d['id']}** · item {d['item_id']} · policy v{d['policy_version']} · "
            f"{d['created_at'][:16].replace('T', ' ')} UTC · {was}")
    if d["annotator"] != who:
        return head + f"\n\nRead-only: only {md_escape(d['annotator'])} may correct it."
    if d["status"] != "active":
        by = "undone" if d["status"] == "undone" else f"corrected by #{d['superseded_by']}"
        return head + f"\n\nRead-only: already superseded ({by})."
    return head + "\n\nType the corrected ranking, best first, and press **Enter** to save."


def save_correction(ctx: AppContext, username, session, state: dict | None, text: str,
                    note: str = "") -> dict:
    """Record the correction as the logged-in (or named) annotator; the page then shows the
    history again, the old row superseded by the new one."""
    try:
        who = viewer(ctx, username, session)
        if not state:
            raise Refused("open a ranking from the history first")
        tiers = handlers.tiers_from_text(text, state)
        result = history.correct_ranking(
            ctx.store, annotator=who, ranking_id=state["ranking_id"], tiers=tiers,
            submission_key=state["submission_key"], note=(note or "").strip(),
            time_spent_s=round(max(0.0, time.time() - state.get("opened_at", time.time())), 2))
    except (Refused, ValueError) as exc:
        return {"message": f"**Not saved:** {md_escape(exc)}", "toast": f"Not saved: {exc}",
                "level": "warning"}
    done = "was already saved" if result["duplicate"] else "saved"
    view = me_view(ctx, username, session, who, 0)
    return {**view, "open": None, "detail": False,
            "message": f"Correction {done}: ranking #{result['ranking_id']} replaces "
                       f"#{result['supersedes']}."}
