"""One annotator's own work: counts, speed, agreement with others, history, and corrections.

Read verbs for the "My work" tab, and `correct_ranking`, the one write: a correction is a NEW
ranking that supersedes the old one (rankings are append-only), so the old record stays for
the audit trail while `active_rankings` (and with it `active_pairs`, what the reward model
trains on) sees only the new one.

Which rankings count here: the annotator's *active* ones (not undone, not corrected), kind
'rank' or 'skip'. Agreement uses what `reports.agreement_report` uses: active, kind 'rank',
not flagged. "Today" is the UTC day.
"""
from __future__ import annotations

import math
import statistics
from datetime import datetime, timezone

from rlhf_core.data.annotation import (
    MAX_ID,
    MAX_KEY_CHARS,
    MAX_NOTE_CHARS,
    Refused,
    insert_pairs,
    load_item,
    validated_tiers,
)
from rlhf_core.data.review import letters_of
from rlhf_core.data.store import Store, dumps, loads, now_iso
from rlhf_core.evaluation import compare_rankings
from rlhf_core.preferences import format_ranking_text

PROMPT_CHARS = 80  # the history shows the prompt's start; opening a row shows it whole


# -- counts and speed ---------------------------------------------------------------------
def start_of_day(now: datetime | None = None) -> str:
    """ISO time of this UTC day's midnight, in the format `created_at` is stored in."""
    now = now or datetime.now(timezone.utc)
    day = datetime(now.year, now.month, now.day, tzinfo=timezone.utc)
    return day.isoformat(timespec="milliseconds")


def annotator_stats(store: Store, annotator: str, *, now: datetime | None = None) -> dict:
    """{"total": counts, "today": counts, "median_s", "n_timed"}. Counts: `rankings` and
    `skips` standing now, `flags` (of those), `ties` (rankings with a tie, "all bad" left
    out), `corrected` (items this annotator corrected). A correction counts on the day it was
    made. `median_s`: median seconds per ranking over every ranking submitted on the Rank page
    (undone ones too: that time was spent), corrections left out (re-reading is not ranking)."""
    since = start_of_day(now)
    rows = store.rows("SELECT kind, tiers, flagged, all_bad, created_at FROM active_rankings "
                      "WHERE annotator = ?", [annotator])
    fixes = store.rows("SELECT DISTINCT item_id, created_at FROM rankings WHERE annotator = ? "
                       "AND kind = 'rank' AND supersedes IS NOT NULL", [annotator])
    times = [r["time_spent_s"] for r in store.rows(
        "SELECT time_spent_s FROM rankings WHERE annotator = ? AND kind = 'rank' "
        "AND supersedes IS NULL AND time_spent_s IS NOT NULL", [annotator])]
    today = [r for r in rows if r["created_at"] >= since]
    return {"total": _counts(rows, {f["item_id"] for f in fixes}),
            "today": _counts(today, {f["item_id"] for f in fixes if f["created_at"] >= since}),
            "median_s": statistics.median(times) if times else None, "n_timed": len(times)}


def _counts(rows: list[dict], corrected_items: set) -> dict:
    ranks = [r for r in rows if r["kind"] == "rank"]
    return {"rankings": len(ranks), "skips": sum(r["kind"] == "skip" for r in rows),
            "flags": sum(bool(r["flagged"]) for r in rows),
            "ties": sum(not r["all_bad"] and any(len(t) > 1 for t in loads(r["tiers"], []))
                        for r in ranks),
            "corrected": len(corrected_items)}


# -- agreement with the others ------------------------------------------------------------
_COUNTED = ("SELECT item_id, annotator, tiers FROM active_rankings WHERE kind = 'rank' "
            "AND flagged = 0 AND tiers IS NOT NULL")


def agreement_with_others(store: Store, annotator: str) -> dict:
    """On items another annotator also ranked: the share of this annotator's response pairs
    that the other's active ranking orders the same way (or ties too, as
    `evaluation.compare_rankings` counts), pooled over every (item, other annotator), and per
    other annotator. `share` is None with no overlap yet."""
    mine = {r["item_id"]: loads(r["tiers"], []) for r in store.rows(
        _COUNTED + " AND annotator = ?", [annotator])}
    per_other: dict = {}
    if mine:
        others = store.rows(_COUNTED + " AND annotator != ? AND item_id IN "
                            "(SELECT item_id FROM active_rankings WHERE annotator = ?) "
                            "ORDER BY id", [annotator, annotator])
        for r in others:
            if r["item_id"] not in mine:  # this annotator's own ranking of it is flagged
                continue
            c = compare_rankings(mine[r["item_id"]], loads(r["tiers"], []))
            if not c["n_pairs"]:
                continue
            row = per_other.setdefault(r["annotator"], {"annotator": r["annotator"],
                                                        "items": set(), "pairs": 0, "agreed": 0})
            row["items"].add(r["item_id"])
            row["pairs"] += c["n_pairs"]
            row["agreed"] += round(c["agreement"] * c["n_pairs"])
    rows = sorted(per_other.values(), key=lambda o: (-len(o["items"]), o["annotator"]))
    shared = set().union(*(o["items"] for o in rows)) if rows else set()
    for o in rows:
        o["items"] = len(o["items"])
        o["share"] = o["agreed"] / o["pairs"]
    pairs, agreed = sum(o["pairs"] for o in rows), sum(o["agreed"] for o in rows)
    return {"items": len(shared), "pairs": pairs, "agreed": agreed,
            "share": agreed / pairs if pairs else None, "others": rows}


# -- history ---------------------------------------------------------------------------------
_HISTORY_SQL = """
    SELECT r.id, r.created_at, r.item_id, r.kind, r.tiers, r.flagged, r.all_bad, r.note,
           r.time_spent_s, r.supersedes, r.annotator, b.policy_version, p.text AS prompt,
           i.status AS item_status, u.id AS superseded_by, u.kind AS superseded_kind
    FROM rankings r JOIN items i ON i.id = r.item_id JOIN batches b ON b.id = i.batch_id
    JOIN prompts p ON p.id = i.prompt_id
    LEFT JOIN rankings u ON u.id = (SELECT MIN(x.id) FROM rankings x WHERE x.supersedes = r.id)
"""


def annotators(store: Store) -> list[str]:
    """Everyone who has submitted anything, by name."""
    return [r["annotator"] for r in store.rows(
        "SELECT DISTINCT annotator FROM rankings ORDER BY annotator")]


def history(store: Store, annotator: str, *, limit: int = 20, offset: int = 0) -> dict:
    """{"rows", "total"}: the annotator's rankings and skips, newest first, `limit` from
    `offset`. Each row: id, created_at, item_id, prompt (its start), policy_version, kind,
    ranking ("B > A = C > D", the letters the Rank page showed; "" for a skip), flagged,
    all_bad, note, status ('active', 'undone' or 'corrected'), superseded_by, supersedes."""
    limit, offset = max(0, min(int(limit), 500)), max(0, int(offset))
    total = store.scalar("SELECT COUNT(*) FROM rankings WHERE annotator = ? "
                         "AND kind IN ('rank', 'skip')", [annotator])
    rows = store.rows(_HISTORY_SQL + " WHERE r.annotator = ? AND r.kind IN ('rank', 'skip') "
                      "ORDER BY r.id DESC LIMIT ? OFFSET ?", [annotator, limit, offset])
    # the letters come from the Rank page's own card order, one query for the whole page
    labels = letters_of(store, [r["item_id"] for r in rows])
    return {"rows": [_history_row(r, labels.get(r["item_id"], {})) for r in rows],
            "total": total}


def _history_row(r: dict, labels: dict[int, str]) -> dict:
    prompt = " ".join(r.pop("prompt").split())
    tiers = loads(r.pop("tiers"))
    kind = r.pop("superseded_kind")
    return {**r, "prompt": prompt if len(prompt) <= PROMPT_CHARS
            else prompt[:PROMPT_CHARS - 1] + "…",
            "tiers": tiers, "ranking": tiers_as_letters(tiers, labels),
            "flagged": bool(r["flagged"]), "all_bad": bool(r["all_bad"]),
            "status": "active" if kind is None else "undone" if kind == "undo" else "corrected"}


def tiers_as_letters(tiers: list[list[int]] | None, labels: dict[int, str]) -> str:
    if not tiers:
        return ""
    return format_ranking_text([[labels.get(i, "?") for i in tier] for tier in tiers])


def ranking_detail(store: Store, ranking_id: int) -> dict | None:
    """One history row (any annotator's: the caller checks who may see it) with its item as
    the Rank page showed it (`item`: prompt, responses with their letters), or None."""
    if type(ranking_id) is not int or not 1 <= ranking_id <= MAX_ID:
        return None
    row = store.one(_HISTORY_SQL + " WHERE r.id = ? AND r.kind IN ('rank', 'skip')",
                    [ranking_id])
    if row is None:
        return None
    item = load_item(store, row["item_id"])
    full_prompt = item["prompt"]
    out = _history_row(row, {r["id"]: r["label"] for r in item["responses"]})
    return {**out, "prompt": full_prompt, "item": item}


# -- correcting a ranking --------------------------------------------------------------------
def correct_ranking(store: Store, *, annotator: str, ranking_id: int, tiers: list[list[int]],
                    submission_key: str, note: str = "",
                    time_spent_s: float | None = None) -> dict:
    """Record `tiers` as a new 'rank' ranking that supersedes `ranking_id` (a ranking or a
    skip of `annotator`), with its pairs, in one write transaction. Flag and "all bad" carry
    over; `note` replaces the old note when given. Refused (nothing written): another's
    ranking, one already undone or corrected, tiers that are not the item's responses each
    once. A repeated `submission_key` returns the first result ("duplicate": True).
    Returns {"ranking_id", "supersedes", "duplicate", "pairs"}."""
    _check_correction(annotator, ranking_id, submission_key, note, time_spent_s)
    old = store.one("SELECT r.annotator, r.item_id, r.kind, i.prompt_id FROM rankings r "
                    "JOIN items i ON i.id = r.item_id WHERE r.id = ?", [ranking_id])
    if old is None or old["kind"] not in ("rank", "skip"):
        raise Refused(f"ranking {ranking_id} does not exist")
    if old["annotator"] != annotator:
        raise Refused(f"ranking {ranking_id} is another annotator's: you can correct only "
                      "your own")
    tiers = validated_tiers(store, old["item_id"], tiers)  # a read, before the write lock
    with store.write() as db:
        dup = db.execute("SELECT id, annotator, supersedes FROM rankings "
                         "WHERE submission_key = ?", [submission_key]).fetchone()
        if dup is not None:
            if dup[1] != annotator or dup[2] != ranking_id:
                raise Refused("this submission key was already used for another ranking")
            return {"ranking_id": dup[0], "supersedes": ranking_id, "duplicate": True,
                    "pairs": 0}
        new_id = _supersede(db, ranking_id, annotator, tiers, submission_key, note,
                            time_spent_s)
        n_pairs = insert_pairs(db, new_id, old["prompt_id"], tiers)
        if old["kind"] == "skip":  # the skip gave the item back; now it is ranked after all
            db.execute("UPDATE assignments SET status = 'done' WHERE item_id = ? "
                       "AND annotator = ? AND status != 'done'", [old["item_id"], annotator])
    store.log_event("correction", annotator, ranking_id=new_id, supersedes=ranking_id,
                    item_id=old["item_id"])
    return {"ranking_id": new_id, "supersedes": ranking_id, "duplicate": False,
            "pairs": n_pairs}


def _supersede(db, ranking_id: int, annotator: str, tiers, submission_key: str, note: str,
               time_spent_s) -> int:
    """Inside the write transaction: refuse a ranking superseded meanwhile (another tab
    corrected or undid it), else insert the correction; returns its id."""
    later = db.execute("SELECT id, kind FROM rankings WHERE supersedes = ? ORDER BY id LIMIT 1",
                       [ranking_id]).fetchone()
    if later is not None:
        how = "undone" if later[1] == "undo" else f"corrected (by ranking {later[0]})"
        raise Refused(f"ranking {ranking_id} was already {how}; reload your history")
    old = db.execute("SELECT item_id, batch_id, policy_version, flagged, all_bad, note "
                     "FROM rankings WHERE id = ?", [ranking_id]).fetchone()
    return db["rankings"].insert({
        "submission_key": submission_key, "annotator": annotator, "item_id": old[0],
        "batch_id": old[1], "policy_version": old[2], "kind": "rank", "tiers": dumps(tiers),
        "all_bad": old[4], "flagged": old[3], "note": (note or "").strip() or old[5],
        "time_spent_s": time_spent_s, "supersedes": ranking_id,
        "created_at": now_iso()}).last_pk


def _check_correction(annotator, ranking_id, submission_key, note, time_spent_s) -> None:
    """Strict types before anything is read (as `submit_ranking` checks its own)."""
    if not isinstance(annotator, str) or not annotator:
        raise Refused("missing annotator name")
    if type(ranking_id) is not int or not 1 <= ranking_id <= MAX_ID:
        raise Refused("the ranking id must be a positive integer")
    if not isinstance(submission_key, str) or not 0 < len(submission_key) <= MAX_KEY_CHARS:
        raise Refused("missing or invalid submission key")
    if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE_CHARS):
        raise Refused(f"the note must be text of at most {MAX_NOTE_CHARS} characters")
    if time_spent_s is not None and (
            type(time_spent_s) not in (int, float) or not 0 <= time_spent_s < math.inf):
        raise Refused("time spent must be a number of seconds >= 0")
