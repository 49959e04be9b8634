"""Scripted annotators under a flaky connection (issue 11.10 / 16.5): a real server on
loopback, real gradio_client sessions; failures are injected around the real calls."""
from __future__ import annotations

import concurrent.futures
import random

import pytest

from app import simulate
from app.context import AppContext
from rlhf_core.config import AppConfig
from tests.helpers import served
from tests.test_handlers import seed_items

pytest.importorskip("gradio_client")


@pytest.fixture
def server(tmp_path):
    ctx = AppContext.from_config(AppConfig(workspace=tmp_path / "ws"))
    seed_items(ctx.store, n=6)
    with served(ctx) as url:
        yield ctx, url + "/"


class LosesReplies:
    """A real gradio_client session whose first `n` calls to `api_name` reach the server and
    run, but whose replies are lost on the way back (as Gradio's event stream can do)."""

    def __init__(self, url: str, api_name: str, n: int, counter: dict):
        self.real = simulate.connect_client(url)
        self.api_name, self.counter = api_name, counter
        self.counter.setdefault("lost", 0)
        self.left = n

    def predict(self, *args, api_name):
        out = self.real.predict(*args, api_name=api_name)
        if api_name == self.api_name and self.counter["lost"] < self.left:
            self.counter["lost"] += 1
            raise concurrent.futures.CancelledError()
        return out


def oracle_sim(ctx, url, connect, annotators=1):
    sim = simulate.Simulation(ctx.store, ctx.config, url, oracle_spec="shorter",
                              annotators=annotators, noise=0.0, seed=0, eval_samples=1,
                              connect=connect)
    for c in (sim.client_for(n) for n in sim.annotators):
        c.backoff_s = 0.01
    return sim


def test_a_submit_whose_reply_was_lost_is_retried_and_counted_once(server):
    ctx, url = server
    counter: dict = {}
    sim = oracle_sim(ctx, url, lambda u: LosesReplies(u, "/submit", 2, counter))
    assert sim._rank_one("sim-1", random.Random(0)) is True
    assert counter["lost"] == 2 and sim.clients["sim-1"].retried == 2
    rows = ctx.store.rows("SELECT submission_key FROM rankings WHERE annotator = 'sim-1'")
    assert len(rows) == 1  # the retries landed as duplicates of the first, saved one


def test_a_transient_get_item_failure_is_retried(server):
    ctx, url = server
    counter: dict = {}
    sim = oracle_sim(ctx, url, lambda u: LosesReplies(u, "/get_item", 1, counter))
    assert sim.label(2) == 2
    assert ctx.store.scalar("SELECT COUNT(*) FROM rankings WHERE annotator = 'sim-1'") == 2


def test_an_annotator_that_gives_up_fails_the_run_loudly(server):
    ctx, url = server

    class Down:
        def predict(self, *args, api_name):
            raise ConnectionError("connection refused")

    sim = oracle_sim(ctx, url, lambda u: Down(), annotators=2)
    for c in sim.clients.values():
        c.retries = 2
    with pytest.raises(simulate.AnnotatorGaveUp, match="2 scripted annotator"):
        sim.label(3, timeout_s=30)
