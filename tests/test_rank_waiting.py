"""What the Rank tab and the API say and do while annotators wait or step away (issue 11.3c/d,
16.6), on a real store: the worker's job told truthfully, honest counts, the heartbeat, and the
cap on names that never submit."""
from __future__ import annotations

import time
from dataclasses import replace

import pytest

from app import api, handlers, serving
from app.context import AppContext
from rlhf_core.config import AppConfig, LoopConfig
from rlhf_core.data import jobs
from tests.test_handlers import seed_items


@pytest.fixture
def ctx(store, tmp_path):
    return AppContext.from_config(AppConfig(workspace=tmp_path / "ws"), store=store)


def _with_loop(ctx, **loop) -> AppContext:
    return replace(ctx, config=replace(ctx.config, loop=LoopConfig(**loop)))


def _job(store, kind: str, *, minutes_ago: float, took_min: float | None = None) -> int:
    """A job of `kind` that started `minutes_ago` and, with `took_min`, finished after that."""
    job_id = jobs.enqueue(store, kind)
    jobs.claim(store, "w", kinds=[kind])
    if took_min is not None:
        jobs.finish(store, job_id, result={})
    t0 = time.time() - 60 * minutes_ago
    iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime(t))  # noqa: E731
    with store.write() as db:
        db.execute("UPDATE jobs SET started_at = ?, finished_at = ? WHERE id = ?",
                   [iso(t0), iso(t0 + 60 * took_min) if took_min is not None else None, job_id])
    return job_id


def test_waiting_names_the_running_job_its_time_and_an_estimate(ctx):
    for ago in (60, 40):  # two past rounds of 6 min
        _job(ctx.store, "ppo_round", minutes_ago=ago, took_min=6)
    running = _job(ctx.store, "ppo_round", minutes_ago=3)
    jobs.enqueue(ctx.store, "sample_batch")
    text = serving.activity(ctx, "ada")
    assert "running a policy round (ppo_round)" in text and f"#{running}" in text
    assert "has run 3 min" in text and "past ppo_round jobs took about 6 min" in text
    assert "Then: sample_batch" in text and "sampling the next batch" not in text
    out = api.get_item(ctx, "ada")
    assert out["ok"] and out["item"] is None and "ppo_round" in out["message"]
    assert "**" not in out["message"]  # plain text over the API


def test_waiting_with_a_kind_never_finished_and_with_nothing_queued(ctx):
    _job(ctx.store, "train_reward", minutes_ago=0.5)
    text = serving.activity(ctx)
    assert "training the reward model" in text and "no train_reward job has finished" in text
    with ctx.store.write() as db:
        db.execute("UPDATE jobs SET status = 'done'")
    assert "no job is running or queued" in serving.activity(ctx)


def test_items_held_by_others_are_not_counted_as_available(ctx):
    seed_items(ctx.store, n=3)
    handlers.load_form(ctx, "bob", {})
    handlers.load_form(ctx, "cy", {})
    form = handlers.load_form(ctx, "ada", {})
    assert form["item"] is not None
    assert "**0** more available · 2 held by others" in form["progress"]
    form = handlers.load_form(ctx, "dee", {})
    assert form["waiting"] and "3 items are held by other annotators' pages" in form["message"]


def test_the_heartbeat_keeps_an_item_and_tells_a_page_that_lost_it(ctx):
    seed_items(ctx.store, n=1)
    ctx = _with_loop(ctx, assignment_hold_s=10)
    ada = handlers.load_form(ctx, "ada", {})["item"]
    with ctx.store.write() as db:  # ten seconds pass: the hold is nearly up
        db.execute("UPDATE assignments SET expires_at = ? WHERE annotator = 'ada'",
                   [time.time() + 1])
    assert serving.heartbeat(ctx, "ada", ada) == {}  # the page is there: renewed
    assert handlers.load_form(ctx, "bob", {})["waiting"]
    with ctx.store.write() as db:  # the page went away: no heartbeat, the hold lapsed
        db.execute("UPDATE assignments SET expires_at = ? WHERE annotator = 'ada'",
                   [time.time() - 1])
    assert handlers.load_form(ctx, "bob", {})["item"]["id"] == ada["id"]
    lost = serving.heartbeat(ctx, "ada", ada)["message"]
    assert "went to another annotator" in lost and "Next item" in lost
    out = handlers.submit_form(ctx, "ada", ada, {}, ranking="abcd", form_item=ada["id"])
    assert out["stale"] and "reassigned" in out["message"]
    assert out["drafts"][str(ada["id"])]["ranking"] == "abcd"  # kept on screen


def test_without_login_names_that_never_submit_are_capped(ctx):
    seed_items(ctx.store, n=6)
    capped = _with_loop(ctx, max_newcomer_holds=2)
    assert handlers.load_form(capped, "n1", {})["item"]
    assert handlers.load_form(capped, "n2", {})["item"]
    form = handlers.load_form(capped, "n3", {})
    assert form["waiting"] and "2 new names are holding items" in form["message"]
    out = api.get_item(capped, "n4")
    assert not out["ok"] and "new names" in out["message"]
    n1 = handlers.load_form(capped, "n1", {})["item"]
    handlers.submit_form(capped, "n1", n1, {}, ranking="abcd")  # n1 is known now
    assert handlers.load_form(capped, "n3", {})["item"]
    # with logins every name is an account: no cap
    authed = replace(capped, users={f"u{i}": {"password": "p", "role": "annotator"}
                                    for i in range(4)})
    assert handlers.load_form(authed, "u1", {})["item"]
