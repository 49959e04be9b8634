"""A real Gradio server on loopback driven by gradio_client, as scripts and simulated annotators do."""
from __future__ import annotations

import threading
import uuid

import pytest

from app.context import AppContext
from app.launcher import free_port
from app.ui import launch
from rlhf_core.data.annotation import withdraw_item
from rlhf_core.config import AppConfig
from tests.test_handlers import XSS, seed_items

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ui-ws")
    ctx = AppContext.from_config(AppConfig(workspace=ws))
    seed_items(ctx.store, n=12)
    port = free_port()
    demo = launch(ctx, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield ctx, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def client(url, **kw):
    return gradio_client.Client(url, verbose=False, **kw)


def test_binds_loopback_and_lists_the_api(server):
    ctx, url = server
    assert url.startswith("http://127.0.0.1:")
    names = set(client(url).view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/get_item", "/submit", "/undo", "/status", "/queue_job"} <= names


def test_two_annotators_concurrently(server):
    ctx, url = server
    acks: dict[str, list] = {"ann-1": [], "ann-2": []}
    errors: list = []

    def annotate(name: str, rounds: int = 4):
        try:
            c = client(url)
            for _ in range(rounds):
                item = c.predict(name, api_name="/get_item")["item"]
                if item is None:
                    break
                key = uuid.uuid4().hex
                args = (name, item["id"], item["token"], key, "bacd")
                first = c.predict(*args, api_name="/submit")
                again = c.predict(*args, api_name="/submit")  # a double click
                assert first["ok"] and again["duplicate"], (first, again)
                assert again["ranking_id"] == first["ranking_id"]
                acks[name].append((item["id"], first["ranking_id"]))
        except Exception as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=annotate, args=(n,)) for n in acks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    items = {n: {i for i, _ in a} for n, a in acks.items()}
    assert len(acks["ann-1"]) == len(acks["ann-2"]) == 4
    assert not items["ann-1"] & items["ann-2"]  # different items (overlap 1)
    rows = ctx.store.rows("SELECT id, annotator, item_id FROM rankings "
                          "WHERE annotator LIKE 'ann-%'")
    assert {(r["annotator"], r["item_id"], r["id"]) for r in rows} == {
        (n, i, r) for n, a in acks.items() for i, r in a}  # every ack in the DB, nothing more
    assert ctx.store.counts()["pairs"] >= 8 * 6


def test_stale_submission_refused(server):
    ctx, url = server
    c = client(url)
    item = c.predict("stale-sam", api_name="/get_item")["item"]
    withdraw_item(ctx.store, item["id"])
    out = c.predict("stale-sam", item["id"], item["token"], uuid.uuid4().hex, "abcd",
                    api_name="/submit")
    assert not out["ok"] and out["stale"] and "withdrawn" in out["message"]
    bad = c.predict("stale-sam", 10**6, "t", uuid.uuid4().hex, "abcd", api_name="/submit")
    assert not bad["ok"]  # a foreign item id is a message, not a crash
    assert c.predict(api_name="/status")["counts"]["prompts"] == 12


def test_script_text_comes_back_as_text(server):
    ctx, url = server
    item = client(url).predict("xss-xavier", api_name="/get_item")["item"]
    assert XSS in [r["text"] for r in item["responses"]]
    assert "${1+1} {{x}}" in [r["text"] for r in item["responses"]]


def test_auth_uses_the_logged_in_user(tmp_path):
    auth = tmp_path / "users.json"
    auth.write_text('[{"user": "ann", "password": "pw-a", "role": "annotator"}]')
    ctx = AppContext.from_config(AppConfig(workspace=tmp_path / "ws"))
    seed_items(ctx.store, n=2)
    port = free_port()
    demo = launch(ctx, port=port, auth_file=str(auth), prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        with pytest.raises(Exception):
            client(url, auth=("ann", "wrong"))
        c = client(url, auth=("ann", "pw-a"))
        got = c.predict("mallory", api_name="/get_item")
        assert got["annotator"] == "ann"
        item = got["item"]
        out = c.predict("mallory", item["id"], item["token"], "k", "abc", api_name="/submit")
        assert out["ok"]
        assert ctx.store.scalar("SELECT annotator FROM rankings") == "ann"
        assert not c.predict("ann", "ppo_round", api_name="/queue_job")["ok"]  # not a researcher
    finally:
        demo.close()


def test_raw_http_calls_with_a_session_hash_share_one_session(tmp_path, monkeypatch):
    """The documented raw-HTTP use: one session_hash per client keeps one Gradio session
    (without it every call builds a new one); the analytics summary is batched."""
    import json

    import httpx
    monkeypatch.delenv("GRADIO_ANALYTICS_CACHE_FREQUENCY", raising=False)
    ctx = AppContext.from_config(AppConfig(workspace=tmp_path / "ws"))
    seed_items(ctx.store, n=2)
    port = free_port()
    demo = launch(ctx, port=port, prevent_thread_lock=True, quiet=True)
    try:
        assert demo._queue.ANAYLTICS_CACHE_FREQUENCY == 1000
        base = f"http://127.0.0.1:{port}/gradio_api/call/get_item"

        def get_item(session: str | None) -> dict:
            body = {"data": ["raw"]} | ({"session_hash": session} if session else {})
            event = httpx.post(base, json=body, timeout=30).json()["event_id"]
            lines = httpx.get(f"{base}/{event}", timeout=30).text.splitlines()
            return json.loads([x for x in lines if x.startswith("data:")][-1][5:])[0]

        before = len(demo.state_holder.session_data)
        items = {get_item("raw-client")["item"]["id"] for _ in range(4)}
        assert len(items) == 1  # the same open item each time
        assert len(demo.state_holder.session_data) == before + 1
        get_item(None), get_item(None)
        assert len(demo.state_holder.session_data) == before + 3  # one per hashless call
    finally:
        demo.close()
