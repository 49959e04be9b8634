"""The workspace DB: durability pragmas, migrations, atomic writes, concurrent writers."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from rlhf_core.data.store import BUSY_TIMEOUT_MS, MIGRATIONS, Store


def pragma(store, name):
    return store.db.conn.execute(f"PRAGMA {name}").fetchone()[0]


def test_pragmas_in_force(store):
    assert pragma(store, "journal_mode").lower() == "wal"
    assert pragma(store, "synchronous") == 2  # FULL
    assert pragma(store, "foreign_keys") == 1
    assert pragma(store, "busy_timeout") == BUSY_TIMEOUT_MS > 0


def test_pragmas_hold_on_every_thread_connection(store):
    seen = {}

    def probe():
        seen["fk"] = pragma(store, "foreign_keys")
        seen["sync"] = pragma(store, "synchronous")
        seen["conn"] = id(store.db.conn)
        store.close()

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    assert seen["fk"] == 1 and seen["sync"] == 2
    assert seen["conn"] != id(store.db.conn)  # sqlite3 connections never cross threads


def test_migrations_idempotent_and_policy_v0(tmp_path):
    path = tmp_path / "rlhf.db"
    s1 = Store(path)
    assert pragma(s1, "user_version") == len(MIGRATIONS)
    s1.add_prompts([{"text": "keep me"}], source="t")
    s1.close()
    s2 = Store(path)  # reopening runs no migration twice and keeps the data
    assert pragma(s2, "user_version") == len(MIGRATIONS)
    assert s2.scalar("SELECT COUNT(*) FROM prompts") == 1
    policies = s2.list_versions("policy")
    assert [(v["version"], v["status"]) for v in policies] == [(0, "published")]
    assert s2.current_version("policy")["version"] == 0
    assert s2.current_version("reward") is None
    s2.close()


def test_failed_write_transaction_leaves_nothing(store):
    with pytest.raises(RuntimeError):
        with store.write() as db:
            db["events"].insert({"at": "now", "kind": "half", "payload": "{}"})
            db.execute("INSERT INTO settings (key, value) VALUES ('x', '1')")
            raise RuntimeError("crash mid-transaction")
    assert store.scalar("SELECT COUNT(*) FROM events WHERE kind = 'half'") == 0
    assert store.get_setting("x") is None
    assert not store.db.conn.in_transaction
    # A bad record halfway through an import: the good ones before it do not land either.
    with pytest.raises(KeyError):
        store.add_prompts([{"text": "good one"}, {"no_text": 1}], source="t")
    assert store.scalar("SELECT COUNT(*) FROM prompts") == 0


def test_foreign_key_violation_rolls_back_whole_batch(store):
    import sqlite3

    from rlhf_core.data import annotation
    with pytest.raises(sqlite3.IntegrityError):
        annotation.create_batch(store, policy_version=0, k=2, items=[
            {"prompt_id": 999, "responses": [{"text": "a"}, {"text": "b"}]}])
    assert store.scalar("SELECT COUNT(*) FROM batches") == 0
    assert store.scalar("SELECT COUNT(*) FROM items") == 0


def test_nested_write_is_a_savepoint(store):
    with store.write() as db:
        db.execute("INSERT INTO settings (key, value) VALUES ('outer', '1')")
        with pytest.raises(ValueError):
            with store.write() as inner:
                inner.execute("INSERT INTO settings (key, value) VALUES ('inner', '1')")
                raise ValueError
    assert store.get_setting("outer") == 1
    assert store.get_setting("inner") is None


def test_write_begins_immediate(store):
    """A second connection cannot start a write while a write() is open (lock taken at BEGIN)."""
    import sqlite3
    other = sqlite3.connect(str(store.path), timeout=0, isolation_level=None)
    try:
        with store.write():
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    finally:
        other.close()


def test_two_threads_write_concurrently(store):
    errors, started = [], threading.Event()

    def holder():
        try:
            with store.write() as db:
                started.set()
                db.execute("INSERT INTO settings (key, value) VALUES ('a', '1')")
                time.sleep(0.4)  # hold the write lock: the other thread must wait, not fail
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def writer():
        started.wait(5)
        try:
            for i in range(20):
                store.log_event("t", "writer", i=i)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=holder), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == []
    assert store.get_setting("a") == 1
    assert store.scalar("SELECT COUNT(*) FROM events WHERE kind = 't'") == 20


def test_writers_in_one_process_queue_on_a_shared_lock(store, monkeypatch):
    """Two Store objects on one file share one write lock (threads queue on it, not in
    SQLite's sleeping busy handler); a writer that cannot get it in time gets a clear error
    and writes nothing, and the holder's transaction still commits."""
    import rlhf_core.data.store as store_mod
    other = Store(store.path)
    assert other._write_lock is store._write_lock
    monkeypatch.setattr(store_mod, "BUSY_TIMEOUT_MS", 200)
    inside, release, errors = threading.Event(), threading.Event(), []

    def holder():
        with store.write() as db:
            db.execute("INSERT INTO settings (key, value) VALUES ('held', '1')")
            inside.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    assert inside.wait(10)
    assert not store._write_lock.acquire(timeout=0)  # held while the transaction is open
    try:
        with other.write() as db:
            db.execute("INSERT INTO settings (key, value) VALUES ('late', '1')")
    except Exception as exc:
        errors.append(exc)
    release.set()
    t.join(10)
    assert len(errors) == 1 and "database is locked" in str(errors[0])
    assert store.get_setting("held") == 1 and store.get_setting("late") is None
    with other.write() as db:  # free again: the next writer goes straight in
        db.execute("INSERT INTO settings (key, value) VALUES ('late', '2')")
    assert store.get_setting("late") == 2
    other.close()


def test_two_processes_write_concurrently(store):
    code = ("import sys; from rlhf_core.data.store import Store\n"
            "s = Store(sys.argv[1])\n"
            "for i in range(40): s.log_event('proc', 'child', i=i)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(store.path)])
    for i in range(40):
        store.log_event("proc", "parent", i=i)
    assert child.wait(60) == 0
    rows = store.rows("SELECT actor, COUNT(*) AS n FROM events WHERE kind = 'proc' GROUP BY actor")
    assert {r["actor"]: r["n"] for r in rows} == {"child": 40, "parent": 40}


def test_settings_round_trip(store):
    assert store.get_setting("missing", "dflt") == "dflt"
    value = {"a": [1, 2.5, None], "b": "ü"}
    store.set_setting("cfg", value)
    assert store.get_setting("cfg") == value
    store.set_setting("cfg", 3)  # upsert, not a second row
    assert store.get_setting("cfg") == 3
    assert store.scalar("SELECT COUNT(*) FROM settings WHERE key = 'cfg'") == 1


def test_add_prompts_dedupes_with_stable_split(store, tmp_path):
    texts = [f"prompt number {i}" for i in range(30)]
    r1 = store.add_prompts([{"text": t} for t in texts], source="a", heldout_fraction=0.3)
    assert r1 == {"added": 30, "duplicates": 0}
    # Whitespace variants are the same prompt.
    r2 = store.add_prompts([{"text": "prompt  number 0 "}, {"text": "new one"}], source="b",
                           heldout_fraction=0.3)
    assert r2 == {"added": 1, "duplicates": 1}
    splits = {r["text"]: r["split"] for r in store.rows("SELECT text, split FROM prompts")}
    assert set(splits.values()) == {"train", "heldout"}  # 31 prompts at 30 %: both sides occur
    other = Store(tmp_path / "other" / "rlhf.db")  # another workspace assigns the same sides
    other.add_prompts([{"text": t} for t in reversed(texts)], source="c", heldout_fraction=0.3)
    assert {r["text"]: r["split"] for r in other.rows("SELECT text, split FROM prompts")} == \
        {t: splits[t] for t in texts}
    other.close()
    ev = store.rows("SELECT payload FROM events WHERE kind = 'prompts_imported'")
    assert len(ev) == 2


def test_counts_and_status_shape(store):
    store.add_prompts([{"text": "p1"}, {"text": "p2"}], source="t")
    c = store.counts()
    assert set(c) >= {"prompts", "items_ready", "items_open", "rankings", "skips", "flagged",
                      "pairs", "tie_pairs", "annotators"}
    assert c["prompts"] == 2 and c["items_ready"] == 0 and c["rankings"] == 0
    st = store.status()
    assert st["policy_version"] == 0 and st["reward_version"] is None
    assert st["counts"] == c and st["jobs"] == []
    assert [v["version"] for v in st["versions"]["policy"]] == [0]
    import json
    json.dumps(st, default=str)  # status --json must serialize


def test_metrics_and_versions(store):
    store.log_metrics("reward", {"loss": 0.5, "acc": 1, "skip": None}, step=3, version=1)
    rows = store.metric_series("reward")
    assert {(r["name"], r["value"], r["step"]) for r in rows} == {("loss", 0.5, 3), ("acc", 1.0, 3)}
    assert store.next_version_number("policy") == 1
    v = store.add_version("reward", 1, status="promoted", config={"lr": 1}, metrics={"acc": 0.7})
    assert v["config"] == {"lr": 1} and v["metrics"] == {"acc": 0.7}
    assert store.current_version("reward")["version"] == 1
    import sqlite3
    with pytest.raises(sqlite3.IntegrityError):  # a version number is never reused
        store.add_version("reward", 1, status="promoted")


def test_old_database_is_migrated_forward(tmp_path):
    """A DB made by an older release (only the first migration) gains the later ones, data kept."""
    import sqlite3

    from rlhf_core.data.store import _statements
    path = tmp_path / "old.db"
    conn = sqlite3.connect(str(path), isolation_level=None)
    for stmt in _statements(MIGRATIONS[0]):
        conn.execute(stmt)
    conn.execute("PRAGMA user_version=1")
    conn.execute("INSERT INTO prompts (key, text, split, created_at) VALUES ('k', 'old', 'train', 'x')")
    conn.close()
    s = Store(path)
    assert pragma(s, "user_version") == len(MIGRATIONS)
    assert s.scalar("SELECT text FROM prompts") == "old"
    assert [v["version"] for v in s.list_versions("policy")] == [0]
    s.close()
