"""The "My work" tab's handlers (app.me) on a real store: who may see and correct whose work.

With login, an annotator sees and corrects only their own rankings; a researcher may read
anyone's but corrects only their own. Checked in the handlers, whatever the page sends.
"""
from __future__ import annotations

from dataclasses import replace

import pytest

from app import me
from app.context import AppContext
from rlhf_core.config import AppConfig
from rlhf_core.data import history
from tests.test_handlers import XSS
from tests.test_history import rank, seed_items, snapshot, tiers_of

USERS = {"ann": {"password": "p", "role": "annotator"},
         "bob": {"password": "p", "role": "annotator"},
         "res": {"password": "p", "role": "researcher"}}


@pytest.fixture
def ctx(store, tmp_path):
    plain = AppContext.from_config(AppConfig(workspace=tmp_path / "ws"), store=store)
    return replace(plain, users=USERS)


@pytest.fixture
def ranked(ctx):
    seed_items(ctx.store, n=3, overlap=2)
    return {"ann": rank(ctx.store, "ann", "abcd", "a1", note=XSS),
            "bob": rank(ctx.store, "bob", "bacd", "b1")}


def state_for(ranked_one: dict) -> dict:
    """What the page keeps after opening a row (as if the client had forged it)."""
    item = ranked_one["item"]
    return {"ranking_id": ranked_one["id"], "item_id": item["id"], "opened_at": 0.0,
            "labels": {r["label"]: r["id"] for r in item["responses"]},
            "submission_key": "forged-1"}


def test_an_annotator_sees_only_their_own_work(ctx, ranked):
    out = me.me_view(ctx, "ann", None)
    assert out["allowed"] and out["whose"] == "ann" and out["choices"] == ["ann"]
    assert not out["researcher"] and f'data-rid="{ranked["ann"]["id"]}"' in out["history_html"]
    assert f'data-rid="{ranked["bob"]["id"]}"' not in out["history_html"]
    assert XSS not in out["history_html"] and "&lt;script&gt;" in out["history_html"]
    assert "<b>x</b>" not in out["history_html"]  # the seeded prompts carry markup: escaped
    assert "83%" in out["stats_html"]  # 5 of 6 pairs ordered as bob did
    refused = me.me_view(ctx, "ann", None, "bob")
    assert refused == {"allowed": False,
                       "notice": "**Not allowed:** only researchers may see another "
                                 "annotator's work"}
    opened = me.open_row(ctx, "ann", None, None, ranked["bob"]["id"])
    assert "Not opened" in opened["message"] and "cards_html" not in opened
    assert "Not opened" in me.open_row(ctx, "ann", None, "bob", ranked["bob"]["id"])["message"]


def test_an_annotator_cannot_correct_another_s_ranking(ctx, ranked):
    before = snapshot(ctx.store)
    out = me.save_correction(ctx, "ann", None, state_for(ranked["bob"]), "dcba")
    assert out["level"] == "warning" and "another annotator" in out["toast"]
    assert snapshot(ctx.store) == before
    # a session opened by another login is refused before anything is read
    assert "another login" in me.save_correction(ctx, "ann", "bob", state_for(ranked["ann"]),
                                                 "dcba")["toast"]
    assert me.me_view(ctx, None, None)["allowed"] is False  # not logged in
    assert me.me_view(ctx, "mallory", None)["allowed"] is False  # not a user of the file
    assert snapshot(ctx.store) == before


def test_a_researcher_reads_anyone_and_corrects_only_their_own(ctx, ranked):
    out = me.me_view(ctx, "res", None, "bob")
    assert out["allowed"] and out["whose"] == "bob" and out["researcher"]
    assert out["choices"] == ["ann", "bob", "res"]
    assert f'data-rid="{ranked["bob"]["id"]}"' in out["history_html"]
    opened = me.open_row(ctx, "res", None, "bob", f'#{ranked["bob"]["id"]}')
    assert opened["can_save"] is False and "Read-only" in opened["detail_md"]
    assert opened["fix"] == "B > A > C > D" and 'data-label="A"' in opened["cards_html"]
    before = snapshot(ctx.store)
    saved = me.save_correction(ctx, "res", None, opened["open"], "dcba")
    assert "another annotator" in saved["toast"] and snapshot(ctx.store) == before


def test_the_owner_corrects_and_sees_the_old_row_superseded(ctx, ranked):
    opened = me.open_row(ctx, "ann", None, None, str(ranked["ann"]["id"]))
    assert opened["can_save"] and opened["fix"] == "A > B > C > D" and opened["detail"]
    assert "&lt;b&gt;x&lt;/b&gt;" in opened["prompt_html"]
    bad = me.save_correction(ctx, "ann", None, opened["open"], "abzz")
    assert bad["level"] == "warning" and "Not saved" in bad["message"]
    out = me.save_correction(ctx, "ann", None, opened["open"], "d c b a", note="second look")
    new_id = ranked["ann"]["id"] + 2  # after bob's
    assert f"ranking #{new_id} replaces #{ranked['ann']['id']}" in out["message"]
    assert out["detail"] is False and out["open"] is None
    assert f"superseded: corrected by #{new_id}" in out["history_html"]
    assert f"corrects #{ranked['ann']['id']}" in out["history_html"]
    again = me.save_correction(ctx, "ann", None, opened["open"], "d c b a")  # a double click
    assert "already saved" in again["message"]
    rows = history.history(ctx.store, "ann")["rows"]
    assert [(r["id"], r["status"]) for r in rows] == [(new_id, "active"),
                                                      (ranked["ann"]["id"], "corrected")]
    stale = me.save_correction(ctx, "ann", None, {**opened["open"], "submission_key": "tab2"},
                               "abcd")  # the same row, corrected meanwhile in another tab
    assert "already corrected" in stale["toast"]


def test_without_login_the_page_session_name_decides(ctx, ranked):
    loopback = replace(ctx, users={})  # every visitor is a researcher on loopback
    assert me.me_view(loopback, None, None) == {"allowed": False, "notice": me.NO_NAME}
    out = me.me_view(loopback, None, "ann")
    assert out["allowed"] and out["whose"] == "ann" and out["researcher"]
    limited = replace(loopback, config=replace(loopback.config, researchers=("res",)))
    assert me.me_view(limited, None, "ann", "bob")["allowed"] is False
    assert me.me_view(limited, None, "res", "bob")["allowed"] is True


def test_paging_and_bad_ids(ctx):
    seed_items(ctx.store, n=25)
    ids = [rank(ctx.store, "ann", "abcd", f"k{i}")["id"] for i in range(25)]
    first = me.me_view(ctx, "ann", None)
    assert first["page"] == 0 and "Page 1 of 2 · 25 rankings" in first["page_md"]
    assert f'data-rid="{ids[-1]}"' in first["history_html"]
    second = me.me_view(ctx, "ann", None, None, 1)
    assert f'data-rid="{ids[0]}"' in second["history_html"]
    assert f'data-rid="{ids[-1]}"' not in second["history_html"]
    assert me.me_view(ctx, "ann", None, None, 7)["page"] == 1  # past the end: the last page
    assert me.me_view(ctx, "ann", None, None, -1)["page"] == 0
    for bad in ("", "abc", "1e3", "9" * 30, None):
        assert "Not opened" in me.open_row(ctx, "ann", None, None, bad)["message"]
    tiers = tiers_of(history.ranking_detail(ctx.store, ids[0])["item"], "abcd")
    assert tiers and me.ranking_id_of(" #12 ") == 12
