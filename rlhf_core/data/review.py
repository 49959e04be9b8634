"""The researcher's Data tab over the store: search the rankings, work the flagged queue and the
disagreement queue. SQL lives here; nothing loads a model.

What a researcher does is recorded append-only in `reviews` (migration 6): a flagged ranking is
*resolved* (kept, off the queue: a flag keeps a ranking's pairs out of training until then, so
from then on they count) or *relabelled* (an 'undo' ranking
supersedes it, as `undo_last` does, so its pairs stop counting, and the item is served to
another annotator); a disagreement is answered by *one more annotator* (the item's overlap
grows by one) or *marked reviewed* (off the queue until the item gets another ranking).

Disagreement of an item ranked by two or more annotators: over every two of its active
rankings by different annotators and every two of its responses, the share of response pairs
the two order oppositely (a tie against an order is not a disagreement). Kept per item by
triggers in `item_disagreement`.
"""
from __future__ import annotations

import secrets

from rlhf_core.data.annotation import MAX_NOTE_CHARS, Refused, shown_order
from rlhf_core.data.store import Store, loads, now_iso

SORTS = {  # search order -> ORDER BY (ties broken newest first)
    "newest": "r.id DESC",
    "oldest": "r.id",
    "slowest": "r.time_spent_s IS NULL, r.time_spent_s DESC, r.id DESC",
    "disagreement": "d.compared IS NULL OR d.compared = 0, "
                    "1.0 * d.discordant / d.compared DESC, r.id DESC",
}
KINDS = ("rank", "skip")
MAX_LIMIT = 200
MAX_TEXT = 200  # search text, characters
MAX_REVIEWER = 64
PROMPT_CHARS = 120  # a search row's prompt is cut here (the queues show it whole)
_DISAGREEMENT = "CASE WHEN d.compared > 0 THEN 1.0 * d.discordant / d.compared END"
_FLAG_DONE = ("SELECT 1 FROM reviews v WHERE v.ranking_id = r.id "
              "AND v.action IN ('resolve', 'relabel')")
_ACTIVE = ("r.kind IN ('rank', 'skip') "
           "AND NOT EXISTS (SELECT 1 FROM rankings u WHERE u.supersedes = r.id)")


def like_pattern(text: str) -> str:
    """`text` anywhere, with LIKE's wildcards (and the escape character) taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


# -- search ------------------------------------------------------------------------------------
def search_rankings(store: Store, *, text: str | None = None, annotator: str | None = None,
                    flagged: bool | None = None, kind: str | None = None,
                    policy_version: int | None = None, disagreement_only: bool = False,
                    sort: str = "newest", limit: int = 50, offset: int = 0) -> dict:
    """Active rankings and skips matching every filter given: {"total", "rows"}, a page of
    `limit` rows from `offset`. `text` matches the prompt, a response or the note (case-
    insensitive for ASCII); `disagreement_only`: items whose annotators order some pair
    oppositely. Each row: id, item_id, created_at, annotator, prompt (cut), policy_version,
    kind, item_kind, tiers (letters as the annotator saw them, "B > A = C > D"), flagged,
    all_bad, note, time_spent_s, rankings (of its item), disagreement (None under two), review
    ('resolve' once a flag was resolved)."""
    if sort not in SORTS:
        raise ValueError(f"sort must be one of {', '.join(SORTS)}, got {sort!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    limit, offset = max(1, min(int(limit), MAX_LIMIT)), max(0, int(offset))
    where, params = _search_where(text, annotator, flagged, kind, policy_version,
                                  disagreement_only)
    # Count and pick the page over the rankings alone (joined to item_disagreement only when
    # it filters or sorts); the page's few rows are then read in full.
    joined = "LEFT JOIN item_disagreement d ON d.item_id = r.item_id " if (
        disagreement_only or sort == "disagreement") else ""
    tables = f"FROM rankings r {joined}WHERE {where}"
    total = store.scalar(f"SELECT COUNT(*) {tables}", params)
    ids = [row[0] for row in store.db.conn.execute(
        f"SELECT r.id {tables} ORDER BY {SORTS[sort]} LIMIT ? OFFSET ?", [*params, limit, offset])]
    found = {r["id"]: r for r in store.rows(
        f"""SELECT r.id, r.item_id, r.created_at, r.annotator, substr(p.text, 1, ?) AS prompt,
                   r.policy_version, r.kind, i.kind AS item_kind, r.tiers, r.flagged, r.all_bad,
                   r.note, r.time_spent_s, d.rankings, {_DISAGREEMENT} AS disagreement,
                   (SELECT v.action FROM reviews v WHERE v.ranking_id = r.id
                    AND v.action IN ('resolve', 'relabel')) AS review
            FROM rankings r JOIN items i ON i.id = r.item_id JOIN prompts p ON p.id = i.prompt_id
            LEFT JOIN item_disagreement d ON d.item_id = r.item_id
            WHERE r.id IN ({', '.join('?' * len(ids))})""", [PROMPT_CHARS + 1, *ids])}
    rows = [found[i] for i in ids]
    letters = letters_of(store, [r["item_id"] for r in rows])
    for r in rows:
        if len(r["prompt"]) > PROMPT_CHARS:
            r["prompt"] = r["prompt"][:PROMPT_CHARS - 1] + "…"
        r["tiers"] = tiers_text(loads(r["tiers"]), letters.get(r["item_id"], {}))
    return {"total": total or 0, "rows": rows}


def _search_where(text, annotator, flagged, kind, policy_version, disagreement_only):
    where, params = [_ACTIVE], []
    if text:
        # Matching items found once each (IN materialises its list), not per ranking.
        where.append("(r.note LIKE ? ESCAPE '\\' OR r.item_id IN (SELECT s.item_id FROM "
                     "responses s WHERE s.text LIKE ? ESCAPE '\\') OR r.item_id IN (SELECT "
                     "i.id FROM items i JOIN prompts p ON p.id = i.prompt_id "
                     "WHERE p.text LIKE ? ESCAPE '\\'))")
        params += [like_pattern(str(text)[:MAX_TEXT])] * 3
    for sql, value in (("r.annotator = ?", annotator), ("r.kind = ?", kind),
                       ("r.policy_version = ?", policy_version),
                       ("r.flagged = ?", None if flagged is None else int(bool(flagged)))):
        if value is not None:
            where.append(sql)
            params.append(value)
    if disagreement_only:
        where.append("d.discordant > 0")
    return " AND ".join(where), params


def letters_of(store: Store, item_ids: list[int]) -> dict[int, dict[int, str]]:
    """{item_id: {response_id: letter}}, the letters each item's cards carried."""
    return {item: {r["id"]: r["label"] for r in rs}
            for item, rs in responses_of(store, item_ids, texts=False).items()}


def tiers_text(tiers: list | None, letters: dict[int, str]) -> str:
    """[[12], [10, 13], [11]] -> "B > A = C > D" (letters sorted inside a tie); '' for a skip."""
    if not tiers:
        return ""
    return " > ".join(" = ".join(sorted(letters.get(rid, f"#{rid}") for rid in tier))
                      for tier in tiers)


def annotator_names(store: Store) -> list[str]:
    """Everyone with a ranking ever (the search's annotator filter), by name."""
    return [r["annotator"] for r in store.rows(
        "SELECT annotator FROM annotator_counts ORDER BY annotator")]


# -- the flagged queue ---------------------------------------------------------------------------
def flag_queue(store: Store, *, limit: int = 20, offset: int = 0) -> dict:
    """Flagged active rankings nobody has resolved or relabelled yet, oldest first:
    {"total", "rows"}, each row a search row plus the item's `responses` (shown order, letters)
    and the whole prompt."""
    where = f"r.flagged = 1 AND {_ACTIVE} AND NOT EXISTS ({_FLAG_DONE})"
    total = store.scalar(f"SELECT COUNT(*) FROM rankings r WHERE {where}")
    rows = store.rows(
        f"""SELECT r.id, r.item_id, r.created_at, r.annotator, p.text AS prompt,
                   r.policy_version, r.kind, i.kind AS item_kind, i.status AS item_status,
                   r.tiers, r.all_bad, r.note, r.time_spent_s
            FROM rankings r JOIN items i ON i.id = r.item_id JOIN prompts p ON p.id = i.prompt_id
            WHERE {where} ORDER BY r.id LIMIT ? OFFSET ?""",
        [max(1, min(int(limit), MAX_LIMIT)), max(0, int(offset))])
    responses = responses_of(store, [r["item_id"] for r in rows])
    for r in rows:
        r["responses"] = responses.get(r["item_id"], [])
        letters = {s["id"]: s["label"] for s in r["responses"]}
        r["rank_of"] = {rid: t for t, tier in enumerate(loads(r["tiers"], [])) for rid in tier}
        r["tiers"] = tiers_text(loads(r["tiers"]), letters)
    return {"total": total or 0, "rows": rows}


def responses_of(store: Store, item_ids: list[int], *,
                 texts: bool = True) -> dict[int, list[dict]]:
    """{item_id: its responses in shown order, each with id, label (and text, policy_version)}."""
    ids = sorted(set(item_ids))
    if not ids:
        return {}
    by_item: dict = {}
    cols = "id, item_id, position" + (", text, policy_version" if texts else "")
    for r in store.rows(f"SELECT {cols} FROM responses "
                        f"WHERE item_id IN ({', '.join('?' * len(ids))}) "
                        "ORDER BY item_id, position", ids):
        by_item.setdefault(r["item_id"], []).append(r)
    return {item: shown_order(item, rs) for item, rs in by_item.items()}


def _checked(what: str, an_id, reviewer, note) -> None:
    """Strict types before anything is read: an id is a positive int (not a bool or "3")."""
    if type(an_id) is not int or not 1 <= an_id < 2**63:
        raise Refused(f"pick {what} first (an id, got {str(an_id)[:40]!r})")
    if not isinstance(reviewer, str) or not 0 < len(reviewer) <= MAX_REVIEWER:
        raise Refused("missing reviewer name")
    if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE_CHARS):
        raise Refused(f"the note must be text of at most {MAX_NOTE_CHARS} characters")


def _open_flag(db, ranking_id: int) -> dict:
    """The flagged ranking, still active and unreviewed, or Refused saying why not."""
    row = db.execute(
        "SELECT r.id, r.item_id, r.batch_id, r.policy_version, r.kind, r.flagged, r.annotator, "
        "(SELECT u.kind || ' by ' || u.annotator FROM rankings u WHERE u.supersedes = r.id), "
        "(SELECT v.action || ' by ' || v.reviewer || ' at ' || substr(v.created_at, 1, 19) "
        " FROM reviews v WHERE v.ranking_id = r.id AND v.action IN ('resolve', 'relabel')) "
        "FROM rankings r WHERE r.id = ?", [ranking_id]).fetchone()
    if row is None or row[4] == "undo":
        raise Refused(f"ranking #{ranking_id} does not exist")
    if row[8]:
        raise Refused(f"ranking #{ranking_id} was already reviewed ({row[8]})")
    if row[7]:
        raise Refused(f"ranking #{ranking_id} was superseded ({row[7]}): nothing to review")
    if not row[5]:
        raise Refused(f"ranking #{ranking_id} is not flagged")
    keys = ("id", "item_id", "batch_id", "policy_version", "kind", "flagged", "annotator")
    return dict(zip(keys, row))


def resolve_flag(store: Store, ranking_id: int, reviewer: str, note: str | None = None) -> dict:
    """Keep the flagged ranking and take it off the queue: its pairs count in training from now
    on (`active_pairs` leaves out flagged rankings nobody has resolved)."""
    _checked("a ranking", ranking_id, reviewer, note)
    with store.write() as db:
        r = _open_flag(db, ranking_id)
        db["reviews"].insert({"action": "resolve", "item_id": r["item_id"],
                              "ranking_id": ranking_id, "reviewer": reviewer,
                              "note": note or None, "created_at": now_iso()})
    store.log_event("flag_resolved", reviewer, ranking_id=ranking_id, item_id=r["item_id"])
    return {"ranking_id": ranking_id, "item_id": r["item_id"],
            "message": f"ranking #{ranking_id} kept: its pairs count in training"}


def relabel_flag(store: Store, ranking_id: int, reviewer: str, note: str | None = None) -> dict:
    """Supersede the flagged ranking (its pairs stop counting) and serve its item again to an
    annotator who has not ranked it (a withdrawn item is not served again)."""
    _checked("a ranking", ranking_id, reviewer, note)
    with store.write() as db:
        r = _open_flag(db, ranking_id)
        undo_id = db["rankings"].insert({
            "submission_key": f"review-relabel-{ranking_id}-{secrets.token_hex(8)}",
            "annotator": reviewer, "item_id": r["item_id"], "batch_id": r["batch_id"],
            "policy_version": r["policy_version"], "kind": "undo", "supersedes": ranking_id,
            "created_at": now_iso()}).last_pk
        db["reviews"].insert({"action": "relabel", "item_id": r["item_id"],
                              "ranking_id": ranking_id, "undo_id": undo_id,
                              "reviewer": reviewer, "note": note or None, "created_at": now_iso()})
        reopened = _reopen(db, r["item_id"])
        # The slot its annotator filled is free again; they never get the item back.
        db.execute("UPDATE assignments SET status = 'expired' WHERE item_id = ? "
                   "AND annotator = ? AND status = 'done'", [r["item_id"], r["annotator"]])
    store.log_event("flag_relabelled", reviewer, ranking_id=ranking_id, item_id=r["item_id"])
    where = ("it goes to another annotator" if reopened
             else "the item is withdrawn or an arena item, so nobody ranks it again")
    return {"ranking_id": ranking_id, "item_id": r["item_id"], "undo_id": undo_id,
            "reopened": reopened, "message": f"ranking #{ranking_id} superseded; {where}"}


def _reopen(db, item_id: int) -> bool:
    """A retired item (its policy moved on) is made ready again; a withdrawn one stays out, and
    so does an arena item (answered for the one who asked, never served to anyone else)."""
    status, kind = db.execute("SELECT status, kind FROM items WHERE id = ?", [item_id]).fetchone()
    if status == "withdrawn" or kind == "arena":
        return False
    if status == "retired":
        db.execute("UPDATE items SET status = 'ready', closed_at = NULL WHERE id = ?", [item_id])
    return True


# -- the disagreement queue ----------------------------------------------------------------------
_UNREVIEWED = ("d.compared > 0 AND NOT EXISTS (SELECT 1 FROM reviews v WHERE v.item_id = d.item_id "
               "AND v.action = 'reviewed' AND v.ranking_id >= d.last_ranking_id)")


def disagreement_queue(store: Store, *, limit: int = 10, offset: int = 0) -> dict:
    """Items ranked by two or more annotators and not reviewed since their newest ranking, most
    disagreement first: {"total", "items"}; each item with its prompt, `need` (rankings still
    asked for), `responses` (shown order) and every active ranking of it (`rankings`: id,
    annotator, tiers text, `rank_of` {response_id: tier}, flagged, note)."""
    total = store.scalar(f"SELECT COUNT(*) FROM item_disagreement d WHERE {_UNREVIEWED}")
    items = store.rows(
        f"""SELECT d.item_id, d.rankings AS n_rankings, d.discordant, d.compared,
                   1.0 * d.discordant / d.compared AS disagreement, p.text AS prompt,
                   b.policy_version, i.status, COALESCE(o.need, 0) AS need
            FROM item_disagreement d JOIN items i ON i.id = d.item_id
            JOIN batches b ON b.id = i.batch_id JOIN prompts p ON p.id = i.prompt_id
            LEFT JOIN open_items o ON o.item_id = d.item_id
            WHERE {_UNREVIEWED}
            ORDER BY disagreement DESC, d.item_id LIMIT ? OFFSET ?""",
        [max(1, min(int(limit), MAX_LIMIT)), max(0, int(offset))])
    ids = [it["item_id"] for it in items]
    responses = responses_of(store, ids)
    by_item: dict = {}
    if ids:
        for r in store.rows(f"SELECT r.id, r.item_id, r.annotator, r.tiers, r.flagged, r.note, "
                            f"r.created_at FROM rankings r WHERE r.item_id IN "
                            f"({', '.join('?' * len(ids))}) AND r.kind = 'rank' AND NOT EXISTS "
                            "(SELECT 1 FROM rankings u WHERE u.supersedes = r.id) ORDER BY r.id",
                            ids):
            by_item.setdefault(r["item_id"], []).append(r)
    for it in items:
        it["responses"] = responses.get(it["item_id"], [])
        letters = {s["id"]: s["label"] for s in it["responses"]}
        it["rankings"] = by_item.get(it["item_id"], [])
        for r in it["rankings"]:
            tiers = loads(r["tiers"], [])
            r["rank_of"] = {rid: t for t, tier in enumerate(tiers) for rid in tier}
            r["tiers"] = tiers_text(tiers, letters)
    return {"total": total or 0, "items": items}


def _item_for_review(db, item_id: int) -> tuple:
    row = db.execute("SELECT i.status, i.kind, d.compared, d.last_ranking_id FROM items i "
                     "LEFT JOIN item_disagreement d ON d.item_id = i.id WHERE i.id = ?",
                     [item_id]).fetchone()
    if row is None:
        raise Refused(f"item #{item_id} does not exist")
    return row


def ask_one_more(store: Store, item_id: int, reviewer: str, note: str | None = None) -> dict:
    """One more annotator for the item: its overlap (and so its remaining need) grows by one,
    and `next_item` serves it to someone who has not ranked it. Returns the new `need`."""
    _checked("an item", item_id, reviewer, note)
    with store.write() as db:
        status, kind, _, last = _item_for_review(db, item_id)
        if status == "withdrawn":
            raise Refused(f"item #{item_id} was withdrawn: it is not served any more")
        if kind == "arena":
            raise Refused(f"item #{item_id} is an arena item: it is never served to others")
        db.execute("UPDATE items SET overlap = overlap + 1 WHERE id = ?", [item_id])
        _reopen(db, item_id)
        db["reviews"].insert({"action": "ask_more", "item_id": item_id, "ranking_id": last,
                              "reviewer": reviewer, "note": note or None,
                              "created_at": now_iso()})
        need = db.execute("SELECT need FROM open_items WHERE item_id = ?", [item_id]).fetchone()
    store.log_event("review_ask_more", reviewer, item_id=item_id)
    need = need[0] if need else 0
    return {"item_id": item_id, "need": need,
            "message": f"item #{item_id} asks for one more annotator ({need} ranking(s) to come)"}


def mark_reviewed(store: Store, item_id: int, reviewer: str, note: str | None = None) -> dict:
    """Take the item off the disagreement queue, as of its newest ranking (a later ranking of
    it, or an undo, brings it back)."""
    _checked("an item", item_id, reviewer, note)
    with store.write() as db:
        _, _, compared, last = _item_for_review(db, item_id)
        if not compared:
            raise Refused(f"item #{item_id} is not ranked by two annotators: nothing to review")
        if db.execute("SELECT 1 FROM reviews WHERE item_id = ? AND action = 'reviewed' "
                      "AND ranking_id >= ?", [item_id, last]).fetchone():
            raise Refused(f"item #{item_id} was already reviewed since its last ranking")
        db["reviews"].insert({"action": "reviewed", "item_id": item_id, "ranking_id": last,
                              "reviewer": reviewer, "note": note or None,
                              "created_at": now_iso()})
    store.log_event("review_reviewed", reviewer, item_id=item_id)
    return {"item_id": item_id, "message": f"item #{item_id} marked reviewed"}
