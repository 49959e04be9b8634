"""Labeling verbs over the store: batches in, items out to annotators, rankings back.

An item is one prompt with its K responses. Annotators get items through
*assignments*: an annotator holds at most one open assignment, never sees an
item twice, and an item is handed out until `overlap` annotators have ranked
it. A ranking is a self-contained append-only record; undo appends an 'undo'
record that supersedes it. Pairs are derived from rankings in the same
transaction, so a ranking and its pairs land together or not at all.
"""
from __future__ import annotations

import math
import random
import secrets
import time
from datetime import datetime, timezone

from rlhf_core.preferences import ranking_to_pairs, ranking_to_ties, validate_ranking
from rlhf_core.data.store import Store, dumps, loads, now_iso


class Refused(ValueError):
    """A submission the server will not record; the message is shown to the annotator."""


class StaleForm(Refused):
    """The item changed under the annotator (withdrawn, retired or reassigned)."""


LABELS = "ABCDEFGH"


# -- batches -------------------------------------------------------------------
def create_batch(store: Store, *, policy_version: int, k: int, items: list[dict],
                 settings: dict | None = None, job_id: int | None = None,
                 overlap: int = 1) -> int:
    """Insert a batch and its items/responses atomically.

    items: [{"prompt_id", "responses": [{"text", "n_tokens", "finish_reason",
    "policy_version"?, "settings"?}], "kind"?: "label"|"ab", "selection"?: str}]
    """
    with store.write() as db:
        batch_id = db["batches"].insert({
            "policy_version": policy_version, "job_id": job_id, "k": k,
            "settings": dumps(settings or {}), "created_at": now_iso()}).last_pk
        add_items(store, batch_id, items, policy_version=policy_version, settings=settings,
                  overlap=overlap)
    return batch_id


def add_items(store: Store, batch_id: int, items: list[dict], *, policy_version: int,
              settings: dict | None = None, overlap: int = 1) -> list[dict]:
    """Append items (the `create_batch` layout) to a batch atomically; returns the items
    written (an item whose samples all collapsed into one has nothing to rank: left out)."""
    at, added = now_iso(), []
    with store.write() as db:
        for item in items:
            if len(item["responses"]) < 2:
                continue  # nothing to rank: all samples collapsed into one
            item_id = db["items"].insert({
                "batch_id": batch_id, "prompt_id": item["prompt_id"], "status": "ready",
                "overlap": overlap, "kind": item.get("kind", "label"),
                "selection": item.get("selection"), "created_at": at}).last_pk
            db["responses"].insert_all([{
                "item_id": item_id, "prompt_id": item["prompt_id"], "position": pos,
                "policy_version": r.get("policy_version", policy_version), "text": r["text"],
                "n_tokens": r.get("n_tokens"), "finish_reason": r.get("finish_reason"),
                "settings": dumps(r.get("settings") or settings or {}), "created_at": at}
                for pos, r in enumerate(item["responses"])])
            added.append(item)
    return added


def retire_items(store: Store, *, older_than_policy: int, status: str = "retired") -> int:
    """Close unfinished items sampled from policies older than `older_than_policy`, once items
    of that policy or newer are open: retiring into an empty pool would leave annotators
    nothing to rank (a batch whose samples all collapsed), so then nothing is retired."""
    with store.write() as db:
        if db.execute("SELECT 1 FROM open_items WHERE policy_version >= ? LIMIT 1",
                      [older_than_policy]).fetchone() is None:
            return 0
        cur = db.execute(
            "UPDATE items SET status = ?, closed_at = ? WHERE id IN "
            "(SELECT item_id FROM open_items WHERE policy_version < ?)",
            [status, now_iso(), older_than_policy])
        return cur.rowcount


def withdraw_item(store: Store, item_id: int) -> None:
    with store.write() as db:
        db.execute("UPDATE items SET status = 'withdrawn', closed_at = ? WHERE id = ?",
                   [now_iso(), item_id])


# -- serving items ---------------------------------------------------------------
# A hold is short and renewed by the page's heartbeat (`renew_hold`), so an item held by a tab
# that closed or went to sleep goes back to the others within minutes; `ttl_s` caps how long
# heartbeats alone (a tab left open, nobody ranking) keep renewing it after the item was served.
HOLD_S = 180.0


class Busy(Refused):
    """No new item for this name now (too many names that never submitted hold items)."""


def next_item(store: Store, annotator: str, *, ttl_s: float = 1800, hold_s: float = HOLD_S,
              newcomer_cap: int | None = None) -> dict | None:
    """The item this annotator should rank now (their open one, else a new one), or None.

    One open assignment per name: a name's open item is resumed, never a second one handed
    out. `newcomer_cap` (without logins): at most this many names that have no ranking yet
    hold items at once, so invented names never hold the pool; over it, `Busy` is raised."""
    now, hold = time.time(), min(hold_s, ttl_s)
    with store.write() as db:
        row = db.execute(
            "SELECT a.item_id, a.token FROM assignments a JOIN items i ON i.id = a.item_id "
            "WHERE a.annotator = ? AND a.status = 'open' AND i.status = 'ready' "
            "AND i.kind != 'arena' "  # their own prompt's item stays on the Arena tab
            "ORDER BY a.id DESC LIMIT 1", [annotator]).fetchone()
        if row is None:
            if newcomer_cap is not None and _newcomers_full(db, annotator, now, newcomer_cap):
                raise Busy(f"{newcomer_cap} new names are holding items right now: "
                           "try again in a few minutes")
            row = _assign_new(db, annotator, now, hold, ttl_s)
        else:  # a refresh resumes the item and renews the hold on it
            db.execute("UPDATE assignments SET expires_at = ?, held_until = ? WHERE token = ?",
                       [now + hold, now + ttl_s, row[1]])
        if row is None:
            return None
        item_id, token = row
    return load_item(store, item_id, token=token)


# Open items nobody may take now: every slot still needed is held by a live hold.
_LIVE_HOLDS = ("(SELECT COUNT(*) FROM assignments h WHERE h.item_id = o.item_id "
               "AND h.status = 'open' AND h.expires_at > ?)")


def _assign_new(db, annotator: str, now: float, hold_s: float, ttl_s: float):
    # Newest policy first (the improved policy is served next), then the order items were
    # made; older policies' items are served when the newest are all taken. Only the open
    # set is read (open_items), so the cost does not grow with the items ever ranked.
    candidates = db.execute(
        f"""SELECT o.item_id FROM open_items o
            WHERE o.need > {_LIVE_HOLDS}
              AND NOT EXISTS (SELECT 1 FROM assignments a
                              WHERE a.item_id = o.item_id AND a.annotator = ?)
            ORDER BY o.policy_version DESC, o.item_id LIMIT 1""", [now, annotator]).fetchone()
    if candidates is None:
        return None
    item_id = candidates[0]
    # Lapsed holders of this item lose it: their later submission is refused as stale.
    db.execute("UPDATE assignments SET status = 'expired' WHERE item_id = ? AND status = 'open' "
               "AND expires_at <= ?", [item_id, now])
    token = secrets.token_urlsafe(12)
    db.execute("INSERT INTO assignments (item_id, annotator, token, status, created_at, "
               "expires_at, held_until) VALUES (?, ?, ?, 'open', ?, ?, ?)",
               [item_id, annotator, token, now_iso(), now + hold_s, now + ttl_s])
    return item_id, token


def _newcomers_full(db, annotator: str, now: float, cap: int) -> bool:
    """Is `annotator` a name with no ranking yet, while `cap` such names hold items?"""
    if db.execute("SELECT active FROM annotator_counts WHERE annotator = ? AND active > 0",
                  [annotator]).fetchone():
        return False
    holding = db.execute(
        "SELECT COUNT(DISTINCT a.annotator) FROM assignments a LEFT JOIN annotator_counts c "
        "ON c.annotator = a.annotator WHERE a.status = 'open' AND a.expires_at > ? "
        "AND COALESCE(c.active, 0) = 0", [now]).fetchone()[0]
    return holding >= cap


def renew_hold(store: Store, item_id: int, annotator: str, token: str | None, *,
               hold_s: float = HOLD_S) -> str:
    """The page's heartbeat for the item on screen: 'held' (renewed, or still long enough to
    need no write), 'lost' (it lapsed and was given to someone else, or the token is an old
    tab's), 'done' (ranked) or 'closed' (withdrawn or retired). A hold that lapsed while nobody
    took the item is renewed: the annotator still has it."""
    now = time.time()
    row = store.db.conn.execute(
        "SELECT a.status, a.token, a.expires_at, a.held_until, i.status FROM assignments a "
        "JOIN items i ON i.id = a.item_id WHERE a.item_id = ? AND a.annotator = ?",
        [item_id, annotator]).fetchone()
    if row is None or (token is not None and row[1] != token) or row[0] == "expired":
        return "lost"
    status, _, expires_at, held_until, item_status = row
    if item_status != "ready":
        return "closed"
    if status == "done":
        return "done"
    until = min(now + hold_s, held_until if held_until is not None else math.inf)
    if expires_at - now > hold_s / 2 or until <= expires_at:
        return "held"  # renewed at most every hold_s / 2: a heartbeat is mostly a read
    with store.write() as db:
        cur = db.execute("UPDATE assignments SET expires_at = ? WHERE item_id = ? "
                         "AND annotator = ? AND status = 'open' AND token = ?",
                         [until, item_id, annotator, row[1]])
    return "held" if cur.rowcount else renew_hold(store, item_id, annotator, token, hold_s=hold_s)


def load_item(store: Store, item_id: int, *, token: str | None = None) -> dict | None:
    item = store.one(
        "SELECT i.*, p.text AS prompt, p.category, b.policy_version FROM items i "
        "JOIN prompts p ON p.id = i.prompt_id JOIN batches b ON b.id = i.batch_id "
        "WHERE i.id = ?", [item_id])
    if item is None:
        return None
    responses = store.rows(
        "SELECT id, position, text, n_tokens, finish_reason, policy_version FROM responses "
        "WHERE item_id = ? ORDER BY position", [item_id])
    item["responses"] = shown_order(item_id, responses)
    item["token"] = token
    return item


def shown_order(item_id: int, responses: list[dict]) -> list[dict]:
    """An item's responses (by position) in the order the Rank page shows them, each given its
    letter `label`. A/B items mix versions: the order is fixed per item but unrelated to the
    version. The researcher views letter rankings with it, as the annotator saw them."""
    shown = list(responses)
    random.Random(f"order-{item_id}").shuffle(shown)
    for label, r in zip(LABELS, shown):
        r["label"] = label
    return shown


# -- recording rankings ------------------------------------------------------------
def submit_ranking(store: Store, *, annotator: str, item_id: int, token: str | None,
                   submission_key: str, tiers: list[list[int]] | None = None,
                   skip: bool = False, all_bad: bool = False, flagged: bool = False,
                   note: str | None = None, time_spent_s: float | None = None) -> dict:
    """Record one ranking (or skip) and derive its pairs, atomically.

    tiers: response ids, best tier first. Returns {"ranking_id", "duplicate", "pairs"}.
    A resubmission of the same `submission_key` returns the first record, unchanged.
    """
    _check_submission(annotator, item_id, submission_key, (skip, all_bad, flagged), note,
                      time_spent_s)
    # Validated before the write lock: nothing a client sends is examined while others wait.
    tiers = None if skip else validated_tiers(store, item_id, tiers)
    with store.write() as db:
        dup = db.execute("SELECT id, annotator, item_id FROM rankings WHERE submission_key = ?",
                         [submission_key]).fetchone()
        if dup is not None:
            if dup[1] != annotator or dup[2] != item_id:
                raise Refused("this submission key was already used for another item")
            return {"ranking_id": dup[0], "duplicate": True, "pairs": 0}
        item = _check_item(db, item_id, annotator, token)
        kind = "skip" if skip else "rank"
        ranking_id = db["rankings"].insert({
            "submission_key": submission_key, "annotator": annotator, "item_id": item_id,
            "batch_id": item["batch_id"], "policy_version": item["policy_version"], "kind": kind,
            "tiers": dumps(tiers) if tiers else None, "all_bad": int(all_bad),
            "flagged": int(flagged), "note": note or None, "time_spent_s": time_spent_s,
            "created_at": now_iso()}).last_pk
        n_pairs = insert_pairs(db, ranking_id, item["prompt_id"], tiers) if tiers else 0
        # A skip hands the item back to the pool for others (never to this annotator again).
        db.execute("UPDATE assignments SET status = ? WHERE item_id = ? AND annotator = ?",
                   ["expired" if skip else "done", item_id, annotator])
    store.log_event("ranking", annotator, ranking_id=ranking_id, item_id=item_id, ranking_kind=kind,
                    flagged=flagged, all_bad=all_bad)
    return {"ranking_id": ranking_id, "duplicate": False, "pairs": n_pairs}


MAX_NOTE_CHARS = 5000
MAX_KEY_CHARS = 200
MAX_ID = 2**63 - 1  # SQLite INTEGER


def _check_submission(annotator, item_id, submission_key, flags, note, time_spent_s) -> None:
    """Strict types before anything is read or written: a bool is not an id, "false" is not
    False, and a time is a finite number of seconds."""
    if not isinstance(annotator, str) or not annotator:
        raise Refused("missing annotator name")
    if type(item_id) is not int or not 1 <= item_id <= MAX_ID:
        raise Refused(f"item id must be a positive integer, got {_shown(item_id)}")
    if not isinstance(submission_key, str) or not 0 < len(submission_key) <= MAX_KEY_CHARS:
        raise Refused("missing or invalid submission key")
    if not all(isinstance(flag, bool) for flag in flags):
        raise Refused("skip, all_bad and flag must be true or false")
    if note is not None and not isinstance(note, str):
        raise Refused("the note must be text")
    if note is not None and len(note) > MAX_NOTE_CHARS:
        raise Refused(f"the note is too long ({MAX_NOTE_CHARS} characters at most)")
    if time_spent_s is not None and (
            type(time_spent_s) not in (int, float) or not 0 <= time_spent_s < math.inf):
        raise Refused(f"time spent must be a number of seconds >= 0, got {_shown(time_spent_s)}")


def _shown(value) -> str:
    text = repr(value) if isinstance(value, (str, int, float)) else type(value).__name__
    return text if len(text) <= 40 else text[:39] + "…"


def validated_tiers(store: Store, item_id: int, tiers) -> list[list[int]]:
    """The ranking checked against the item's responses (a read: responses never change once
    written), so no validation runs inside the write transaction."""
    response_ids = [r["id"] for r in store.rows(
        "SELECT id FROM responses WHERE item_id = ? ORDER BY position", [item_id])]
    if not response_ids:
        raise Refused(f"item {item_id} does not exist")
    try:
        return validate_ranking(tiers, response_ids)
    except ValueError as exc:
        raise Refused(f"ranking refused: {exc}") from None


def _check_item(db, item_id: int, annotator: str, token: str | None) -> dict:
    row = db.execute("SELECT i.status, i.batch_id, i.prompt_id, b.policy_version FROM items i "
                     "JOIN batches b ON b.id = i.batch_id WHERE i.id = ?", [item_id]).fetchone()
    if row is None:
        raise Refused(f"item {item_id} does not exist")
    status, batch_id, prompt_id, policy_version = row
    if status != "ready":
        raise StaleForm(f"this item was {status} while you were ranking it; your choices are "
                        "kept on screen, load the next item to continue")
    a = db.execute("SELECT token, status FROM assignments WHERE item_id = ? AND annotator = ?",
                   [item_id, annotator]).fetchone()
    if a is None:
        raise StaleForm("this item is not assigned to you; load the next item")
    if a[1] == "done":
        raise Refused("you already ranked this item (use undo to change it)")
    if a[1] == "expired" or (token is not None and a[0] != token):
        raise StaleForm("this item was reassigned after your session lapsed; your choices are "
                        "kept on screen, load the next item to continue")
    return {"batch_id": batch_id, "prompt_id": prompt_id, "policy_version": policy_version}


def insert_pairs(db, ranking_id: int, prompt_id: int, tiers: list[list[int]]) -> int:
    at = now_iso()
    rows = [{"ranking_id": ranking_id, "prompt_id": prompt_id, "chosen_id": w,
             "rejected_id": l, "label": 1.0, "created_at": at} for w, l in ranking_to_pairs(tiers)]
    rows += [{"ranking_id": ranking_id, "prompt_id": prompt_id, "chosen_id": a,
              "rejected_id": b, "label": 0.5, "created_at": at} for a, b in ranking_to_ties(tiers)]
    if rows:
        db["pairs"].insert_all(rows)
    return len(rows)


def undo_last(store: Store, annotator: str, *, submission_key: str) -> dict | None:
    """Supersede the annotator's latest active ranking and hand its item back to them."""
    with store.write() as db:
        dup = db.execute("SELECT supersedes FROM rankings WHERE submission_key = ?",
                         [submission_key]).fetchone()
        if dup is not None:
            return {"ranking_id": dup[0], "duplicate": True}
        last = db.execute(
            "SELECT r.id, r.item_id, r.batch_id, r.policy_version, r.tiers FROM active_rankings r "
            "JOIN items i ON i.id = r.item_id WHERE r.annotator = ? AND i.status = 'ready' "
            "AND i.kind != 'arena' ORDER BY r.id DESC LIMIT 1", [annotator]).fetchone()
        if last is None:
            return None
        ranking_id, item_id, batch_id, policy_version, tiers = last
        db["rankings"].insert({
            "submission_key": submission_key, "annotator": annotator, "item_id": item_id,
            "batch_id": batch_id, "policy_version": policy_version, "kind": "undo",
            "supersedes": ranking_id, "created_at": now_iso()})
        # Close any other open item, so the undone one is served next.
        db.execute("DELETE FROM assignments WHERE annotator = ? AND status = 'open' "
                   "AND item_id != ? AND item_id NOT IN (SELECT id FROM items "
                   "WHERE kind = 'arena')", [annotator, item_id])
        db.execute("UPDATE assignments SET status = 'open', expires_at = ? "
                   "WHERE item_id = ? AND annotator = ?", [time.time() + 1800, item_id, annotator])
    store.log_event("undo", annotator, ranking_id=ranking_id, item_id=item_id)
    return {"ranking_id": ranking_id, "item_id": item_id, "tiers": loads(tiers),
            "duplicate": False}


def open_item_count(store: Store) -> int:
    """Items that still need a ranking from somebody (0: whoever opens the page waits)."""
    return store.scalar("SELECT COUNT(*) FROM open_items") or 0


def annotator_progress(store: Store, annotator: str) -> dict:
    """`done`: the annotator's active rankings; `available`: open items they could be given
    now; `held`: open items they have not seen whose every remaining slot another annotator
    holds (they come back if those holds lapse). Reads the open set and counters only."""
    done = store.scalar("SELECT active FROM annotator_counts WHERE annotator = ?", [annotator])
    row = store.db.conn.execute(
        f"""SELECT COUNT(*), COALESCE(SUM(o.need > {_LIVE_HOLDS}), 0) FROM open_items o
            WHERE NOT EXISTS (SELECT 1 FROM assignments a
                              WHERE a.item_id = o.item_id AND a.annotator = ?)""",
        [time.time(), annotator]).fetchone()
    return {"done": done or 0, "available": row[1], "held": row[0] - row[1]}


def recent_rankings(store: Store, since_s: float) -> list[dict]:
    """Rankings and skips of the last `since_s` seconds (annotator, time_spent_s, created_at),
    oldest first: who is ranking now, and how fast (the loop sizes its buffer on it)."""
    since = datetime.fromtimestamp(time.time() - since_s, timezone.utc)
    return store.rows("SELECT annotator, time_spent_s, created_at FROM rankings "
                      "WHERE created_at >= ? AND kind IN ('rank', 'skip') ORDER BY id",
                      [since.isoformat(timespec="milliseconds")])


# -- export ------------------------------------------------------------------------
def export_pairs(store: Store, *, include_ties: bool = False) -> list[dict]:
    """Preference pairs in TRL's prompt/chosen/rejected layout, with provenance."""
    sql = """
        SELECT p.id AS pair_id, pr.text AS prompt, c.text AS chosen, rj.text AS rejected,
               p.label, r.id AS ranking_id, r.annotator, r.policy_version AS item_policy_version,
               c.policy_version AS chosen_policy_version,
               rj.policy_version AS rejected_policy_version, r.item_id, r.batch_id,
               pr.split, r.created_at
        FROM active_pairs p JOIN rankings r ON r.id = p.ranking_id
        JOIN prompts pr ON pr.id = p.prompt_id
        JOIN responses c ON c.id = p.chosen_id JOIN responses rj ON rj.id = p.rejected_id
    """
    if not include_ties:
        sql += " WHERE p.label = 1.0"
    return store.rows(sql + " ORDER BY p.id")


def export_rankings(store: Store) -> list[dict]:
    rows = store.rows("""
        SELECT r.*, p.text AS prompt FROM rankings r JOIN items i ON i.id = r.item_id
        JOIN prompts p ON p.id = i.prompt_id ORDER BY r.id""")
    for r in rows:
        r["tiers"] = loads(r["tiers"])
        r["responses"] = store.rows("SELECT id, text, policy_version, n_tokens, finish_reason "
                                    "FROM responses WHERE item_id = ? ORDER BY position",
                                    [r["item_id"]])
    return rows


def training_pairs(store: Store) -> list[dict]:
    """Every active pair with its texts and its ranking's tiers (flagged, undone and all-bad
    rankings are already out), oldest first: what the reward model trains and is tested on."""
    return store.rows("""
        SELECT p.id, p.ranking_id, p.prompt_id, pr.split, p.chosen_id, p.rejected_id, p.label,
               pr.text AS prompt, c.text AS chosen, rj.text AS rejected, r.tiers
        FROM active_pairs p JOIN rankings r ON r.id = p.ranking_id
        JOIN prompts pr ON pr.id = p.prompt_id
        JOIN responses c ON c.id = p.chosen_id JOIN responses rj ON rj.id = p.rejected_id
        ORDER BY p.id""")


def assignment_status(store: Store, item_id: int, annotator: str) -> str | None:
    """'open', 'done' or 'expired' for the annotator's assignment of the item; None if none."""
    return store.scalar("SELECT status FROM assignments WHERE item_id = ? AND annotator = ?",
                        [item_id, annotator])
