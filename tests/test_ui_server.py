"""A real Gradio server on loopback driven by gradio_client, as scripts and simulated annotators do."""
from __future__ import annotations

import json
import threading
import uuid

import pytest

from app.context import AppContext
from app.launcher import free_port
from app.ui import launch
from rlhf_core.config import AppConfig
from rlhf_core.data.annotation import withdraw_item
from tests.helpers import served
from tests.test_handlers import XSS, seed_items

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ui-ws")
    ctx = AppContext.from_config(AppConfig(workspace=ws))
    seed_items(ctx.store, n=12)
    with served(ctx) as url:
        yield ctx, url + "/"


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


# -- issue 16.3: page events act as the login, not as whoever owns the session_hash ------
class PageClient:
    """One login (its cookie) driving the page's own events over raw HTTP, as the browser does
    (`/gradio_api/queue/join` + the session's SSE stream), with any session_hash it likes."""

    def __init__(self, demo, base: str, user: str, password: str):
        import httpx
        self.demo, self.http = demo, httpx.Client(base_url=base, timeout=30)
        assert self.http.post("/login", data={"username": user,
                                              "password": password}).status_code == 200

    def _block(self, elem_id: str):
        return next(b for b in self.demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)

    def fn(self, *, api_name: str | None = None, button: str | None = None):
        for fn in self.demo.fns.values():
            if api_name and fn.api_name == api_name:
                return fn
            if button and (self._block(button)._id, "click") in [tuple(t) for t in fn.targets]:
                return fn
        raise KeyError(api_name or button)

    def call(self, session: str, values: dict | None = None, **which) -> list:
        """Run one event in `session`; `values` by elem_id (state inputs are server-side)."""
        import gradio as gr
        values = values or {}
        fn = self.fn(**which)
        blank = {gr.State: None, gr.BrowserState: {}, gr.Checkbox: False}
        data = [None if isinstance(b, gr.State) else values.get(
            getattr(b, "elem_id", None), b.value if isinstance(b, gr.Dropdown)
            else blank.get(type(b), "")) for b in fn.inputs]  # a dropdown: its preset
        event = self.http.post("/gradio_api/queue/join", json={
            "data": data, "fn_index": fn._id, "session_hash": session, "event_data": None,
            "trigger_id": None}).json()["event_id"]
        with self.http.stream("GET", "/gradio_api/queue/data",
                              params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                msg = json.loads(line[5:]) if line.startswith("data:") else {}
                if msg.get("msg") == "process_completed" and msg.get("event_id") == event:
                    assert msg["success"], msg
                    return msg["output"]["data"]
        raise AssertionError("no result")


def test_page_events_act_as_the_login_not_the_session_owner(tmp_path):
    auth = tmp_path / "users.json"
    auth.write_text('[{"user": "ann", "password": "pw-a", "role": "annotator"},'
                    ' {"user": "res", "password": "pw-r", "role": "researcher"}]')
    ctx = AppContext.from_config(AppConfig(workspace=tmp_path / "ws"))
    seed_items(ctx.store, n=8)
    port = free_port()
    demo = launch(ctx, port=port, auth_file=str(auth), prevent_thread_lock=True, quiet=True)
    store = ctx.store
    try:
        base = f"http://127.0.0.1:{port}"
        ann, res = PageClient(demo, base, "ann", "pw-a"), PageClient(demo, base, "res", "pw-r")
        res.call("res-page", api_name="rank_start")
        ann.call("ann-page", api_name="rank_start")

        def item(owner: str) -> int:  # the session owner's current item
            return store.scalar("SELECT item_id FROM assignments WHERE annotator = ? AND "
                                "status = 'open'", [owner])

        def form(owner: str, ranking: str = "abcd") -> dict:  # a form for that item
            return {"rl-ranking": ranking, "rl-form-item": str(item(owner))}

        def counts() -> tuple:
            return (store.rows("SELECT annotator, kind FROM rankings ORDER BY id"),
                    store.rows("SELECT kind, requested_by FROM jobs ORDER BY id"))

        acted = []  # events that did something in another user's session

        def forged(who: PageClient, session: str, owner: str, name: str, **call) -> None:
            before, shown = counts(), item(owner)
            out = who.call(session, **call)
            if counts() != before or f"item {shown}<" in json.dumps(out):
                acted.append((name, session, counts()))

        job = {"button": "rl-job-train-reward"}
        # An annotator with a researcher's session_hash, then a researcher with an annotator's.
        for who, session, owner in ((ann, "res-page", "res"), (res, "ann-page", "ann")):
            forged(who, session, owner, "rank_next", api_name="rank_next")
            forged(who, session, owner, "job", **job)
            forged(who, session, owner, "rank_skip", api_name="rank_skip", values=form(owner))
            forged(who, session, owner, "rank_submit", api_name="rank_submit",
                   values=form(owner))
            forged(who, session, owner, "rank_start", api_name="rank_start")  # no takeover
        # Each in their own session: both rank (as themselves); only the researcher queues.
        res.call("res-page", api_name="rank_submit", values=form("res", "bacd"))
        ann.call("ann-page", api_name="rank_submit", values=form("ann", "bacd"))
        ann.call("ann-page", **job)
        res.call("res-page", **job)
        forged(ann, "res-page", "res", "rank_undo", api_name="rank_undo")
        forged(res, "ann-page", "ann", "rank_undo", api_name="rank_undo")
        assert acted == []
        rankings, jobs_ = counts()
        assert sorted(r["annotator"] for r in rankings) == ["ann", "res"]
        assert {r["kind"] for r in rankings} == {"rank"}
        assert jobs_ == [{"kind": "train_reward", "requested_by": "res"}]
        # The owners' sessions were left as they were: undo works for each, as themselves.
        res.call("res-page", api_name="rank_undo")
        ann.call("ann-page", api_name="rank_undo")
        undone = store.rows("SELECT annotator FROM rankings WHERE kind = 'undo' ORDER BY 1")
        assert undone == [{"annotator": "ann"}, {"annotator": "res"}]
        # A new session is the login's own: a page opened by ann shows ann's open item.
        out = ann.call("ann-fresh", api_name="rank_start")
        assert f"item {item('ann')}<" in json.dumps(out)
        assert f"item {item('res')}<" not in json.dumps(out)
    finally:
        demo.close()
