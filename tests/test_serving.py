"""Serving items at scale and under churn, on real SQLite files: the open set and counters
(issue 16.4), short holds renewed by a heartbeat (issue 11.3c), older policies' items when the
newest are taken and retiring that never empties the pool (11.3b), and what one name may hold
(16.6)."""
from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from rlhf_core.data import annotation
from rlhf_core.data.annotation import Busy, StaleForm
from rlhf_core.data.store import MIGRATIONS, Store, _statements, now_iso
from tests.test_annotation import make_batch, rank


def history(store, n_ranked: int, n_open: int, *, past=20, overlap=1) -> None:
    """`n_ranked` items each ranked by one past annotator and `n_open` unranked ones, written
    with bulk table inserts (what years of work leave behind)."""
    store.add_prompts([{"text": f"history {i}"} for i in range(50)], source="t")
    pids = [r["id"] for r in store.rows("SELECT id FROM prompts ORDER BY id")]
    n, at = n_ranked + n_open, now_iso()
    with store.write() as db:
        batch = db["batches"].insert({"policy_version": 0, "k": 2, "created_at": at}).last_pk
        first = (db.execute("SELECT COALESCE(MAX(id), 0) FROM items").fetchone()[0]) + 1
        ids = range(first, first + n)
        db["items"].insert_all({"id": i, "batch_id": batch, "prompt_id": pids[i % len(pids)],
                                "status": "ready", "overlap": overlap, "created_at": at}
                               for i in ids)
        db["responses"].insert_all({"item_id": i, "prompt_id": pids[i % len(pids)],
                                    "position": p, "policy_version": 0, "text": f"r{i}.{p}",
                                    "created_at": at} for i in ids for p in range(2))
        done = list(ids)[:n_ranked]
        db["assignments"].insert_all({"item_id": i, "annotator": f"past-{i % past}",
                                      "token": f"h{i}", "status": "done", "created_at": at,
                                      "expires_at": 0.0} for i in done)
        db["rankings"].insert_all({"submission_key": f"h{i}", "annotator": f"past-{i % past}",
                                   "item_id": i, "batch_id": batch, "policy_version": 0,
                                   "kind": "rank", "tiers": "[[1], [2]]", "created_at": at}
                                  for i in done)


def vm_steps(store, fn) -> int:
    """SQLite virtual-machine instructions `fn` ran on this thread's connection: the work of
    its queries, counted instead of timed (the same on any machine)."""
    steps = [0]

    def tick():
        steps[0] += 1
        return 0
    store.db.conn.set_progress_handler(tick, 100)
    try:
        fn()
    finally:
        store.db.conn.set_progress_handler(None, 100)
    return steps[0] * 100


def fetch_cycle(store, who: str, key: str) -> None:
    """What the Rank tab does per item: fetch, submit, then the header's progress."""
    item = annotation.next_item(store, who)
    rank(store, who, item, key)
    annotation.annotator_progress(store, who)


def waiting_tick(store, who: str) -> None:
    assert annotation.next_item(store, who) is None
    annotation.annotator_progress(store, who)


# -- issue 16.4: constant cost per fetch ------------------------------------------------------
def test_a_fetch_costs_the_same_whatever_the_history(tmp_path):
    costs = {}
    for n_ranked in (200, 6000):
        store = Store(tmp_path / f"h{n_ranked}" / "rlhf.db")
        history(store, n_ranked, 30)
        fetch_cycle(store, "past-1", "warm-up")  # first statements of a connection compile
        costs[n_ranked] = (vm_steps(store, lambda: fetch_cycle(store, "past-2", "k1")),
                           vm_steps(store, lambda: fetch_cycle(store, "newcomer", "k2")))
        for i in range(27):  # the rest of the open items, held by other names
            assert annotation.next_item(store, f"holder-{i}") is not None
        costs[n_ranked] += (vm_steps(store, lambda: waiting_tick(store, "waiting")),)
        store.close()
    small, big = costs[200], costs[6000]
    # 30x the history: the old full scans cost ~30x; the open set costs the same
    assert all(b < 1.3 * s + 2000 for s, b in zip(small, big)), costs


def _expected_open(store) -> dict:
    """The open set by its definition (DESIGN: ready, fewer done assignments than overlap)."""
    return {r["id"]: r["need"] for r in store.rows(
        "SELECT i.id, i.overlap - (SELECT COUNT(*) FROM assignments a WHERE a.item_id = i.id "
        "AND a.status = 'done') AS need FROM items i WHERE i.status = 'ready'") if r["need"] > 0}


def _check_counters(store) -> None:
    assert {r["item_id"]: r["need"] for r in store.rows("SELECT * FROM open_items")} == \
        _expected_open(store)
    active = {r["annotator"]: r["n"] for r in store.rows(
        "SELECT annotator, COUNT(*) AS n FROM active_rankings GROUP BY annotator")}
    counted = {r["annotator"]: r["active"] for r in store.rows(
        "SELECT * FROM annotator_counts WHERE active != 0")}
    assert counted == active
    assert store.open_item_count() == len(_expected_open(store))


def test_open_set_and_counters_follow_every_write(store):
    make_batch(store, n_items=4, overlap=2)
    _check_counters(store)
    a = annotation.next_item(store, "ann")
    rank(store, "ann", a, "k1")
    _check_counters(store)
    b = annotation.next_item(store, "bob")
    assert b["id"] == a["id"]  # overlap 2: a second annotator gets it
    rank(store, "bob", b, "k2")
    assert a["id"] not in {r["item_id"] for r in store.rows("SELECT * FROM open_items")}
    _check_counters(store)
    annotation.undo_last(store, "bob", submission_key="u1")  # the item is open again
    _check_counters(store)
    c = annotation.next_item(store, "cy")
    annotation.submit_ranking(store, annotator="cy", item_id=c["id"], token=c["token"],
                              submission_key="s1", skip=True)
    _check_counters(store)
    annotation.withdraw_item(store, c["id"])
    _check_counters(store)
    store.add_version("policy", 1, status="published")
    make_batch(store, n_items=2, policy_version=1)
    assert annotation.retire_items(store, older_than_policy=1) > 0
    _check_counters(store)


def test_migration_backfills_the_open_set_and_counters(tmp_path):
    """A workspace made before the open set existed: its rows are indexed on first open."""
    path = tmp_path / "old.db"
    mine = next(i for i, m in enumerate(MIGRATIONS) if "CREATE TABLE open_items" in m)
    conn = sqlite3.connect(path, isolation_level=None)  # every migration before this one
    for i, script in enumerate(MIGRATIONS[:mine], start=1):
        for stmt in _statements(script):
            conn.execute(stmt)
        conn.execute(f"PRAGMA user_version={i}")
    conn.execute("INSERT INTO versions (kind, version, status, created_at) "
                 "VALUES ('policy', 0, 'published', 'x')")
    conn.executescript("""
        INSERT INTO prompts (id, key, text, split, created_at) VALUES (1, 'k', 'p', 'train', 'x');
        INSERT INTO batches (id, policy_version, k, created_at) VALUES (1, 0, 2, 'x'), (2, 3, 2, 'x');
        INSERT INTO items (id, batch_id, prompt_id, status, overlap, created_at) VALUES
            (1, 1, 1, 'ready', 1, 'x'), (2, 1, 1, 'ready', 2, 'x'), (3, 2, 1, 'ready', 1, 'x'),
            (4, 2, 1, 'withdrawn', 1, 'x'), (5, 2, 1, 'ready', 2, 'x');
        INSERT INTO assignments (item_id, annotator, token, status, created_at, expires_at) VALUES
            (1, 'ann', 't1', 'done', 'x', 0), (2, 'ann', 't2', 'done', 'x', 0),
            (5, 'bob', 't5', 'open', 'x', 9e9);
        INSERT INTO rankings (id, submission_key, annotator, item_id, batch_id, kind, created_at)
            VALUES (1, 'a', 'ann', 1, 1, 'rank', 'x'), (2, 'b', 'ann', 2, 1, 'rank', 'x'),
                   (3, 'c', 'bob', 3, 2, 'skip', 'x');
        INSERT INTO rankings (id, submission_key, annotator, item_id, batch_id, kind, supersedes,
                              created_at) VALUES (4, 'd', 'bob', 3, 2, 'undo', 3, 'x');
    """)
    conn.close()
    store = Store(path)
    assert {r["item_id"]: (r["policy_version"], r["need"])
            for r in store.rows("SELECT * FROM open_items")} == {2: (0, 1), 3: (3, 1), 5: (3, 2)}
    assert annotation.annotator_progress(store, "ann")["done"] == 2
    assert annotation.annotator_progress(store, "bob")["done"] == 0
    assert store.scalar("SELECT held_until FROM assignments WHERE token = 't5'") == 9e9
    assert annotation.next_item(store, "bob")["id"] == 5  # the open assignment, resumed
    _check_counters(store)
    store.close()


def _set_expiry(store, who: str, in_s: float) -> None:
    """Time passes for `who`'s hold: it now ends `in_s` from now (negative: it lapsed)."""
    with store.write() as db:
        db.execute("UPDATE assignments SET expires_at = ? WHERE annotator = ? AND status = 'open'",
                   [time.time() + in_s, who])


# -- issue 11.3c: a short hold, renewed by the page's heartbeat --------------------------------
def test_a_hold_without_heartbeat_lapses_within_the_hold_not_the_ttl(store):
    make_batch(store, n_items=1)
    a = annotation.next_item(store, "ann", ttl_s=1800, hold_s=60)
    assert annotation.next_item(store, "bob") is None  # held
    _set_expiry(store, "ann", -1)  # the tab closed: no heartbeat for the hold's 60 s
    b = annotation.next_item(store, "bob")
    assert b is not None and b["id"] == a["id"]
    assert annotation.renew_hold(store, a["id"], "ann", a["token"]) == "lost"
    rank(store, "bob", b, "kb")
    with pytest.raises(StaleForm, match="reassigned"):  # the other finished it: stale
        rank(store, "ann", a, "ka")


def test_a_heartbeat_keeps_the_hold_and_a_silent_lapse_still_accepts(store):
    make_batch(store, n_items=1)
    a = annotation.next_item(store, "ann", hold_s=60)
    _set_expiry(store, "ann", 50)  # most of the hold left: the heartbeat is a read
    assert annotation.renew_hold(store, a["id"], "ann", a["token"], hold_s=60) == "held"
    _set_expiry(store, "ann", 5)  # nearly up: the live page's heartbeat renews it
    assert annotation.renew_hold(store, a["id"], "ann", a["token"], hold_s=60) == "held"
    left = store.scalar("SELECT expires_at FROM assignments WHERE annotator = 'ann'") - time.time()
    assert 55 < left <= 60
    assert annotation.next_item(store, "bob") is None
    _set_expiry(store, "ann", -1)  # the page slept past its hold; nobody took the item
    assert annotation.renew_hold(store, a["id"], "ann", a["token"], hold_s=60) == "held"
    assert rank(store, "ann", a, "ka")["duplicate"] is False  # accepted
    assert annotation.renew_hold(store, a["id"], "ann", a["token"]) == "done"


def test_heartbeats_alone_renew_a_hold_only_up_to_the_ttl(store):
    make_batch(store, n_items=1)
    a = annotation.next_item(store, "ann", ttl_s=0.5, hold_s=0.2)
    deadline = time.time() + 0.9
    while time.time() < deadline:  # a tab left open with nobody there
        annotation.renew_hold(store, a["id"], "ann", a["token"], hold_s=0.2)
        time.sleep(0.05)
    assert annotation.next_item(store, "bob")["id"] == a["id"]


def test_a_heartbeat_from_an_old_tab_or_a_closed_item(store):
    make_batch(store, n_items=2)
    a = annotation.next_item(store, "ann")
    assert annotation.renew_hold(store, a["id"], "ann", "old-tab-token") == "lost"
    assert annotation.renew_hold(store, a["id"], "bob", None) == "lost"
    annotation.withdraw_item(store, a["id"])
    assert annotation.renew_hold(store, a["id"], "ann", a["token"]) == "closed"


# -- issue 11.3b: older policies' items when the newest are taken; retiring never starves -------
def test_older_policy_items_are_served_when_the_newest_are_taken(store):
    make_batch(store, n_items=2, policy_version=0)
    store.add_version("policy", 1, status="published")
    make_batch(store, n_items=1, policy_version=1)
    got = [annotation.next_item(store, who) for who in ("ann", "bob", "cy")]
    assert [g["policy_version"] for g in got] == [1, 0, 0]
    assert annotation.next_item(store, "dee") is None


def test_retiring_into_an_empty_pool_retires_nothing(store):
    make_batch(store, n_items=2, policy_version=0)
    store.add_version("policy", 1, status="published")
    # policy 1's batch wrote no item (every item's samples collapsed): keep serving v0
    assert annotation.retire_items(store, older_than_policy=1) == 0
    assert annotation.next_item(store, "ann")["policy_version"] == 0


# -- issue 16.6: what one name, and names that never submit, may hold ---------------------------
def test_one_name_holds_one_item_even_from_many_tabs_at_once(store):
    make_batch(store, n_items=10)
    got, errors = [], []

    def tab():
        try:
            got.append(annotation.next_item(store, "ann")["id"])
        except Exception as exc:  # pragma: no cover - surfaced below
            errors.append(exc)
    threads = [threading.Thread(target=tab) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(set(got)) == 1
    assert store.scalar("SELECT COUNT(*) FROM assignments WHERE annotator = 'ann' "
                        "AND status = 'open'") == 1
    assert annotation.annotator_progress(store, "bob")["available"] == 9


def test_names_that_never_submit_hold_at_most_the_cap(store):
    make_batch(store, n_items=8)
    rank(store, "known", annotation.next_item(store, "known"), "k0")
    for i in range(3):
        assert annotation.next_item(store, f"new-{i}", newcomer_cap=3) is not None
    with pytest.raises(Busy, match="new names"):
        annotation.next_item(store, "new-3", newcomer_cap=3)
    assert annotation.next_item(store, "new-0", newcomer_cap=3)  # resuming is not a new hold
    assert annotation.next_item(store, "known", newcomer_cap=3) is not None  # has ranked before
    for i in (1, 2):  # their short holds lapse (no heartbeat): the cap frees up
        _set_expiry(store, f"new-{i}", -1)
    assert annotation.next_item(store, "new-3", newcomer_cap=3) is not None
    assert annotation.annotator_progress(store, "x")["available"] >= 3


def test_available_counts_only_what_others_do_not_hold(store):
    make_batch(store, n_items=3)
    annotation.next_item(store, "ann")
    annotation.next_item(store, "bob")
    assert annotation.annotator_progress(store, "cy") == {"done": 0, "available": 1, "held": 2}
