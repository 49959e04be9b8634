"""Hostile requests against a real Gradio server on loopback and a real SQLite file.

One oversized or malformed request must be refused quickly, with a one-line message, without
holding the write lock, and without slowing the other annotators down.
"""
from __future__ import annotations

import json
import re
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from app import api
from app.context import AppContext
from rlhf_core.config import AppConfig, LoopConfig
from rlhf_core.data import store as store_module
from rlhf_core.data.annotation import Refused, create_batch, next_item, submit_ranking
from tests.helpers import served
from tests.test_handlers import seed_items

REPEATS = 40_000


class TimedLock:
    """Wraps the store's write lock and records how long each acquisition was held."""

    def __init__(self, lock):
        self._lock, self.held, self._since = lock, [], threading.local()

    def acquire(self, *args, **kwargs):
        got = self._lock.acquire(*args, **kwargs)
        if got:
            self._since.t = time.perf_counter()
        return got

    def release(self):
        self.held.append(time.perf_counter() - self._since.t)
        self._lock.release()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ws = tmp_path_factory.mktemp("hostile-ws")
    # each test invents a name and never submits: no cap on such names here (see test_serving)
    ctx = AppContext.from_config(AppConfig(workspace=ws, loop=LoopConfig(max_newcomer_holds=0)))
    # Response ids above 1000, as in the report: JSON makes a new int object for each of the
    # 40,000 copies (only ints up to 256 are shared), so comparisons cannot short-cut on identity.
    ctx.store.add_prompts([{"text": "padding"}], source="test")
    pad = ctx.store.scalar("SELECT id FROM prompts")
    create_batch(ctx.store, policy_version=0, k=4, items=[
        {"prompt_id": pad, "responses": [{"text": t} for t in "abcd"]}] * 300)
    with ctx.store.write() as db:  # closed (retire_items keeps them: nothing newer is open)
        db.execute("UPDATE items SET status = 'withdrawn'")
    seed_items(ctx.store, n=120)
    with served(ctx) as url:
        yield ctx, url


def call(base: str, name: str, data: list, session: str, timeout: float = 60) -> tuple[int, object]:
    """Gradio's raw HTTP API: POST the call, then read its event stream.
    Returns (HTTP status of the POST, the endpoint's result or ("error", payload))."""
    with httpx.Client(timeout=timeout) as http:
        posted = http.post(f"{base}/gradio_api/call/{name}",
                           content=json.dumps({"data": data, "session_hash": session}),
                           headers={"content-type": "application/json"})
        if posted.status_code != 200:
            return posted.status_code, None
        stream = http.get(f"{base}/gradio_api/call/{name}/{posted.json()['event_id']}").text
    events = [line.split(":", 1)[1].strip() for line in stream.splitlines()
              if line.startswith("event:")]
    payload = json.loads([x for x in stream.splitlines() if x.startswith("data:")][-1][5:])
    return 200, (("error", payload) if events[-1] == "error" else payload[0])


def submit_args(who: str, item: dict, ranking, **fields) -> list:
    """/submit's ten arguments, in order (raw HTTP gets no defaults)."""
    values = {"skip": False, "all_bad": False, "flag": False, "note": "", "time_spent": None}
    values.update(fields)
    return [who, item["id"], item["token"], uuid.uuid4().hex, ranking, *values.values()]


def rankings(ctx) -> int:
    return ctx.store.scalar("SELECT COUNT(*) FROM rankings")


# ---------------------------------------------------------------- one request, everyone waits


def test_a_40000_id_ranking_is_refused_at_once_and_others_keep_ranking(server):
    ctx, base = server
    lock = TimedLock(ctx.store._write_lock)
    ctx.store._write_lock = lock
    try:
        _hostile_run(ctx, base, lock)
    finally:
        ctx.store._write_lock = lock._lock


OTHER_PROCESS = """
import os, sys, time
from rlhf_core.data.store import Store
store, worst, n = Store(sys.argv[1]), 0.0, 0
while not os.path.exists(sys.argv[2]):
    t0 = time.perf_counter()
    store.log_event("other_process")
    worst, n = max(worst, time.perf_counter() - t0), n + 1
    time.sleep(0.05)
print(n, worst)
"""


def _hostile_run(ctx, base, lock):
    session = uuid.uuid4().hex
    _, got = call(base, "get_item", ["mallory"], session)
    item = got["item"]
    ranking = json.dumps([[item["responses"][0]["id"]] * REPEATS])
    assert len(ranking) > 200_000  # the report: 40,000 ids, 234 KB
    before = rankings(ctx)
    latencies: list[float] = []
    errors: list = []
    done = threading.Event()

    def other_annotator():
        who, s = "honest-hana", uuid.uuid4().hex
        while not done.is_set():
            t0 = time.perf_counter()
            _, got = call(base, "get_item", [who], s)
            if not isinstance(got, dict) or got.get("item") is None:
                errors.append(got)
                break
            _, out = call(base, "submit", submit_args(who, got["item"], "bacd"), s)
            latencies.append(time.perf_counter() - t0)
            if not (isinstance(out, dict) and out.get("ok")):
                errors.append(out)
                break

    stop = ctx.store.path.parent / "stop-other-process"
    writer = subprocess.Popen([sys.executable, "-c", OTHER_PROCESS, str(ctx.store.path), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    helper = threading.Thread(target=other_annotator, daemon=True)
    helper.start()
    hostile, answers = [], []
    try:
        time.sleep(1.0)
        for _ in range(3):
            t0 = time.perf_counter()
            answers.append(call(base, "submit", submit_args("mallory", item, ranking), session))
            hostile.append(time.perf_counter() - t0)
        time.sleep(0.5)
    finally:
        done.set()
        stop.touch()
        helper.join(120)
        out, err = writer.communicate(timeout=120)
    writes, worst_write = out.split() if writer.returncode == 0 else (0, "inf")
    p95 = statistics.quantiles(latencies, n=20, method="inclusive")[-1]
    print(f"\nhostile request: {max(hostile):.3f} s (worst of {len(hostile)}); "
          f"write lock held at most {max(lock.held):.4f} s over {len(lock.held)} transactions; "
          f"other annotator: {len(latencies)} get+submit cycles, p95 {p95 * 1000:.0f} ms, "
          f"max {max(latencies) * 1000:.0f} ms, {len(errors)} errors; other process: "
          f"{writes} writes, worst {float(worst_write) * 1000:.0f} ms "
          f"{err.strip().splitlines()[-1] if writer.returncode else ''}")
    assert writer.returncode == 0, err  # e.g. "database is locked"
    assert all(status == 413 for status, _ in answers), answers
    assert not errors, errors
    assert max(hostile) < 1.0
    assert max(lock.held) < 0.5
    assert len(latencies) >= 3 and p95 < 1.0
    assert float(worst_write) < 1.0
    assert rankings(ctx) - before == len(latencies)  # only the honest annotator's rankings


# ---------------------------------------------------------------- below the HTTP cap


def test_the_library_refuses_40000_ids_without_taking_the_write_lock(server):
    """Even past the HTTP cap (a script calling the library), the ranking is refused before
    the transaction, in linear time."""
    ctx, _ = server
    item = next_item(ctx.store, "lib-lena")
    ids = [r["id"] for r in item["responses"]]
    lock = TimedLock(ctx.store._write_lock)
    ctx.store._write_lock = lock
    try:
        for tiers in ([[ids[0]] * REPEATS], [[i] for i in ids[:1]] * REPEATS,
                      [ids[:1], ids[1:2], ids[2:3], ids[3:] + [ids[0]] * REPEATS]):
            t0 = time.perf_counter()
            with pytest.raises(Refused, match="names more than 4 ids"):
                submit_ranking(ctx.store, annotator="lib-lena", item_id=item["id"],
                               token=item["token"], submission_key=uuid.uuid4().hex, tiers=tiers)
            assert time.perf_counter() - t0 < 0.1
        t0 = time.perf_counter()
        out = api.submit(ctx, "lib-lena", item["id"], item["token"], uuid.uuid4().hex,
                         json.dumps([[ids[0]] * REPEATS]))
        assert not out["ok"] and "ranking is too long" in out["message"]
        assert time.perf_counter() - t0 < 0.1
    finally:
        ctx.store._write_lock = lock._lock
    assert lock.held == []  # no transaction was even opened


def test_oversized_and_chunked_bodies_get_413(server):
    _, base = server
    url = f"{base}/gradio_api/call/submit"
    big = json.dumps({"data": ["x" * 70_000], "session_hash": "s"}).encode()
    with httpx.Client(timeout=30) as http:
        declared = http.post(url, content=big, headers={"content-type": "application/json"})
        assert declared.status_code == 413 and "too large" in declared.text

        def chunks():
            for i in range(0, len(big), 8192):
                yield big[i:i + 8192]
        chunked = http.post(url, content=chunks(), headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        small = http.post(url, content=b'{"data": []}', headers={"content-type": "application/json"})
        assert small.status_code == 200  # the cap does not get in the way of ordinary calls


# ---------------------------------------------------------------- empty errors, loose types


def _one_line(out: object) -> str:
    assert isinstance(out, dict) and out["ok"] is False, out
    message = out["message"]
    assert isinstance(message, str) and message.strip() and "\n" not in message, out
    return message


def _written(ctx) -> tuple:
    return (rankings(ctx), ctx.store.scalar("SELECT COUNT(*) FROM pairs"),
            ctx.store.scalar("SELECT COUNT(*) FROM jobs"))


@pytest.mark.parametrize("fields,expected", [
    ({"ranking": "[" * 60_000}, "ranking is too long"),       # was RecursionError -> null
    ({"ranking": "[" * 990 + "]" * 990}, "ranking|nested"),   # deep but short
    ({"item_id": 1e30}, "item_id must be a positive integer"),  # was OverflowError -> null
    ({"item_id": 10**30}, "item_id must be a positive integer"),
    ({"item_id": 1.5}, "item_id"), ({"item_id": True}, "item_id"), ({"item_id": "12"}, "item_id"),
    ({"ranking": 123}, "ranking must be text"),                 # was AttributeError -> null
    ({"ranking": ["b", "a"]}, "ranking must be text"),
    ({"skip": "false"}, "skip must be true or false"),          # was counted as a skip
    ({"all_bad": 1}, "all_bad must be true or false"), ({"flag": "yes"}, "flag"),
    ({"time_spent": -1e9}, "time_spent"),                        # was stored
    ({"time_spent": 1e9}, "time_spent"), ({"time_spent": float("nan")}, "time_spent"),
    ({"time_spent": float("inf")}, "time_spent"), ({"time_spent": "5"}, "time_spent"),
    ({"time_spent": True}, "time_spent"),
    ({"note": 5}, "note must be text"), ({"note": "n" * 6000}, "note is too long"),
    ({"float_ids": True}, "Unknown response ids"),               # were stored as floats
    ({"bool_ids": True}, "Unknown response ids"),
    ({"token": ["t"]}, "token must be text"), ({"key": 7}, "submission_key must be text"),
    ({"key": "k" * 500}, "submission_key is too long"), ({"who": 42}, "annotator must be text"),
])
def test_loose_or_hostile_submit_fields_get_one_line_and_write_nothing(server, fields, expected):
    ctx, base = server
    session = uuid.uuid4().hex
    who = fields.pop("who", f"typed-{session[:8]}")
    item = call(base, "get_item", [who if isinstance(who, str) else "typed-x"], session)[1]["item"]
    ids = [r["id"] for r in item["responses"]]
    if fields.pop("float_ids", False):
        fields["ranking"] = json.dumps([[float(i)] for i in ids])
    if fields.pop("bool_ids", False):
        fields["ranking"] = json.dumps([[True]] + [[i] for i in ids[1:]])
    args = submit_args(who, item, fields.pop("ranking", "bacd"), **{
        k: v for k, v in fields.items() if k not in ("item_id", "token", "key")})
    for name, position in (("item_id", 1), ("token", 2), ("key", 3)):
        if name in fields:
            args[position] = fields[name]
    before = _written(ctx)
    status, out = call(base, "submit", args, session)
    assert status == 200
    assert re.search(expected, _one_line(out)), out
    assert _written(ctx) == before


def test_other_endpoints_answer_loose_types_with_a_message(server):
    ctx, base = server
    before = _written(ctx)
    for name, data, expected in [
        ("get_item", [42], "annotator must be text"),
        ("get_item", [{"name": "x"}], "annotator must be text"),
        ("undo", ["undo-ursula", 7], "submission_key must be text"),
        ("undo", [["u"], "k"], "annotator must be text"),
        ("queue_job", ["researcher-rita", ["ppo_round"]], "kind must be text"),
        ("queue_job", ["researcher-rita", "rm -rf"], "unknown job kind"),
    ]:
        status, out = call(base, name, data, uuid.uuid4().hex)
        assert status == 200 and re.search(expected, _one_line(out)), (name, data, out)
    assert _written(ctx) == before
    assert call(base, "status", [], uuid.uuid4().hex)[1]["counts"]["prompts"] > 0


def test_a_locked_or_full_database_is_a_message_not_null(server, monkeypatch):
    ctx, base = server
    session = uuid.uuid4().hex
    item = call(base, "get_item", ["locked-lou"], session)[1]["item"]
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 200)
    before = _written(ctx)
    with ctx.store._write_lock:  # another writer holds the database
        out = call(base, "submit", submit_args("locked-lou", item, "bacd"), session)[1]
        assert "database is unavailable" in _one_line(out) and "locked" in out["message"]
        out = call(base, "get_item", ["locked-lena"], uuid.uuid4().hex)[1]
        assert "locked" in _one_line(out) and out["item"] is None
    assert _written(ctx) == before

    def disk_full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")
    monkeypatch.setattr(api, "submit_ranking", disk_full)
    out = call(base, "submit", submit_args("locked-lou", item, "bacd"), session)[1]
    assert "disk is full" in _one_line(out)
    monkeypatch.setattr(store_module.Store, "status", disk_full)
    assert "disk is full" in _one_line(call(base, "status", [], session)[1])
    monkeypatch.undo()
    out = call(base, "submit", submit_args("locked-lou", item, "bacd"), session)[1]
    assert out["ok"], out  # the same form goes through once the database is back


@pytest.mark.parametrize("field,value,expected", [
    ("item_id", True, "item id must be a positive integer"),
    ("item_id", 1.0, "item id"), ("item_id", 10**30, "item id"), ("item_id", 0, "item id"),
    ("skip", "false", "true or false"), ("all_bad", 1, "true or false"),
    ("flagged", None, "true or false"),
    ("time_spent_s", -1e9, "time spent"), ("time_spent_s", float("nan"), "time spent"),
    ("time_spent_s", float("inf"), "time spent"), ("time_spent_s", "3", "time spent"),
    ("note", 5, "note must be text"), ("submission_key", 7, "submission key"),
    ("annotator", None, "annotator"),
])
def test_submit_ranking_has_strict_types(store, field, value, expected):
    seed_items(store, n=1)
    item = next_item(store, "lib-lou")
    kwargs = {"annotator": "lib-lou", "item_id": item["id"], "token": item["token"],
              "submission_key": "k", "tiers": [[r["id"]] for r in item["responses"]]}
    with pytest.raises(Refused, match=expected):
        submit_ranking(store, **{**kwargs, field: value})
    assert store.scalar("SELECT COUNT(*) FROM rankings") == 0
    assert submit_ranking(store, **kwargs, time_spent_s=3)["pairs"] == 6  # ints are seconds too
