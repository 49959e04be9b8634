"""The Data tab's verbs (rlhf_core.data.review) and its role checks, on a real SQLite file.

Counts are worked out by hand from the seeded rankings; disagreement by hand from two or three
rankings of four responses (6 response pairs per two rankings)."""
from __future__ import annotations

import itertools

import pytest

from app import data_view as dv
from app.context import AppContext
from rlhf_core.config import AppConfig
from rlhf_core.data import review, store as store_module
from rlhf_core.data.annotation import (Refused, create_batch, next_item, submit_ranking,
                                       undo_last, withdraw_item)
from rlhf_core.data.store import Store
from rlhf_core.preferences import parse_ranking_text
from tests.test_handlers import XSS, seed_items

KEYS = itertools.count()  # submission keys: one per call, the same in every run


def rank(store, who: str, text: str = "abcd", *, expect: int | None = None, **kw) -> dict:
    """`who` ranks the item `next_item` serves them, by the letters on their cards
    ("b a=c d"; "" skips). Returns {"item", "ranking_id"}."""
    item = next_item(store, who)
    assert item is not None, f"nothing served to {who}"
    assert expect is None or item["id"] == expect
    ids = {r["label"]: r["id"] for r in item["responses"]}
    tiers = ([[ids[x] for x in tier] for tier in parse_ranking_text(text, list(ids))]
             if text else None)
    out = submit_ranking(store, annotator=who, item_id=item["id"], token=item["token"],
                         submission_key=f"{who}-{next(KEYS)}", tiers=tiers,
                         skip=not text, **kw)
    return {"item": item["id"], "ranking_id": out["ranking_id"]}


def total(store, **kw) -> int:
    return review.search_rankings(store, **kw)["total"]


def count(store, table: str) -> int:
    return store.scalar(f"SELECT COUNT(*) FROM {table}")


@pytest.fixture
def seeded(store):
    """4 items, overlap 2. ada: item 1 abcd (10 s), item 2 abcd flagged with a note (50 s),
    item 3 skipped, item 4 dcba. bob: items 1 abcd, 2 bacd, 3 a=b c d, 4 abcd. Then a policy-1
    item ranked by ada alone. Item 1: 0 of 6 pairs reversed; item 2: 1 of 6; item 3: one
    ranking (ada skipped); item 4: 6 of 6."""
    items = seed_items(store, n=4, overlap=2)
    r = {}
    r["ada1"] = rank(store, "ada", "abcd", expect=items[0], time_spent_s=10.0)
    r["ada2"] = rank(store, "ada", "abcd", expect=items[1], time_spent_s=50.0, flagged=True,
                     note="100% sure_not")
    r["ada3"] = rank(store, "ada", "", expect=items[2], time_spent_s=5.0)
    r["ada4"] = rank(store, "ada", "dcba", expect=items[3], time_spent_s=20.0)
    for i, text in enumerate(("abcd", "bacd", "a=b c d", "abcd")):
        r[f"bob{i + 1}"] = rank(store, "bob", text, expect=items[i], time_spent_s=30.0)
    prompt_id = store.scalar("SELECT prompt_id FROM items WHERE id = ?", [items[0]])
    create_batch(store, policy_version=1, k=2, items=[{"prompt_id": prompt_id, "responses": [
        {"text": "v1 one"}, {"text": "v1 two"}]}])
    r["ada5"] = rank(store, "ada", "ba", time_spent_s=1.0)
    return items, r


def test_search_filters_and_sorts(store, seeded):
    items, r = seeded
    assert total(store) == 9  # 8 on policy 0 (a skip among them) + 1 on policy 1
    assert total(store, annotator="ada") == 5 and total(store, annotator="bob") == 4
    assert total(store, flagged=True) == 1 and total(store, flagged=False) == 8
    assert total(store, kind="skip") == 1 and total(store, kind="rank") == 8
    assert total(store, policy_version=1) == 1 and total(store, policy_version=0) == 8
    assert total(store, disagreement_only=True) == 4  # items 2 and 4, two rankings each
    assert total(store, annotator="ada", disagreement_only=True, flagged=True) == 1
    # Text: prompt, response or note; case-insensitive; LIKE's % and _ taken literally.
    assert total(store, text="%") == 1 and total(store, text="_") == 1  # only the note has them
    assert total(store, text="100% SURE_") == 1 and total(store, text="100%_") == 0
    assert total(store, text="v1 two") == 1  # a response of the policy-1 item
    assert total(store, text="TEST PROMPT 3 <B>") == 3  # item 1's prompt: 2 + the v1 item
    assert total(store, text="plain answer") == 8 and total(store, text="no such text") == 0
    # Sorts.
    rows = review.search_rankings(store, sort="newest")["rows"]
    assert [x["id"] for x in rows] == sorted((v["ranking_id"] for v in r.values()), reverse=True)
    assert review.search_rankings(store, sort="oldest")["rows"][0]["id"] == r["ada1"]["ranking_id"]
    assert review.search_rankings(store, sort="slowest")["rows"][0]["id"] == r["ada2"]["ranking_id"]
    by_disagreement = review.search_rankings(store, sort="disagreement")["rows"]
    assert [x["id"] for x in by_disagreement[:4]] == [
        r[k]["ranking_id"] for k in ("bob4", "ada4", "bob2", "ada2")]
    assert [x["disagreement"] for x in by_disagreement[:6]] == [1.0, 1.0, 1 / 6, 1 / 6, 0.0, 0.0]
    assert by_disagreement[-1]["disagreement"] is None  # ranked by one annotator
    # Paging, and the row as the tab shows it.
    page = review.search_rankings(store, sort="oldest", limit=4, offset=8)
    assert page["total"] == 9 and [x["id"] for x in page["rows"]] == [r["ada5"]["ranking_id"]]
    row = {x["id"]: x for x in rows}
    assert row[r["ada1"]["ranking_id"]]["tiers"] == "A > B > C > D"
    assert row[r["bob3"]["ranking_id"]]["tiers"] == "A = B > C > D"
    skipped = row[r["ada3"]["ranking_id"]]
    assert (skipped["tiers"], skipped["kind"]) == ("", "skip")
    flagged = row[r["ada2"]["ranking_id"]]
    assert (flagged["flagged"], flagged["note"], flagged["time_spent_s"]) == (
        1, "100% sure_not", 50.0)
    assert flagged["prompt"] == "test prompt 2 <b>x</b>" and flagged["rankings"] == 2
    with pytest.raises(ValueError, match="sort"):
        review.search_rankings(store, sort="best")


def test_disagreement_by_hand_and_after_undo(store):
    items = seed_items(store, n=2, overlap=3)
    rank(store, "ada", "abcd", expect=items[0])
    rank(store, "bob", "bacd", expect=items[0])  # ada-bob: only A/B reversed -> 1 of 6
    dq = review.disagreement_queue(store)
    assert dq["total"] == 1 and dq["items"][0]["disagreement"] == pytest.approx(1 / 6)
    rank(store, "cy", "dcba", expect=items[0])  # ada-cy 6, bob-cy 5: 12 of 18
    assert review.disagreement_queue(store)["items"][0]["disagreement"] == pytest.approx(2 / 3)
    assert undo_last(store, "bob", submission_key="bob-undo")["item_id"] == items[0]
    assert review.disagreement_queue(store)["items"][0]["disagreement"] == 1.0  # ada-cy alone
    # A tie against an order is not a disagreement: A=B vs B>A, the rest the same.
    rank(store, "dee", "a=b c d", expect=items[1])  # (bob holds item 1 again, to redo it)
    rank(store, "eve", "b a c d", expect=items[1])
    second = [it for it in review.disagreement_queue(store)["items"] if it["item_id"] == items[1]]
    assert second[0]["disagreement"] == 0.0 and second[0]["compared"] == 6


def test_migration_backfills_disagreement_of_existing_rankings(tmp_path, monkeypatch):
    """A workspace ranked before the Data tab existed gets the same numbers the triggers keep."""
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:5])
    old = Store(tmp_path / "old.db")
    items = seed_items(old, n=1, overlap=3)
    for who, text in (("ada", "abcd"), ("bob", "bacd"), ("cy", "dcba")):
        rank(old, who, text, expect=items[0])
    undo_last(old, "cy", submission_key="cy-undo")
    old.close()
    monkeypatch.undo()
    new = Store(tmp_path / "old.db")
    row = new.one("SELECT * FROM item_disagreement")
    assert (row["rankings"], row["compared"], row["discordant"]) == (2, 6, 1)
    rank(new, "cy", "dcba", expect=items[0])  # the triggers take over from the backfill
    row = new.one("SELECT * FROM item_disagreement")
    assert (row["rankings"], row["compared"], row["discordant"]) == (3, 18, 12)
    new.close()


def snapshot(store) -> list[dict]:
    return store.rows("SELECT * FROM rankings ORDER BY id")


def test_resolve_and_relabel_are_append_only_and_refuse_twice(store):
    items = seed_items(store, n=4)
    kept = rank(store, "ada", "abcd", flagged=True, note="unsure")
    relabelled = rank(store, "ada", "dcba", flagged=True)
    plain = rank(store, "ada", "abcd")
    undone = rank(store, "ada", "abcd", flagged=True)
    undo_last(store, "ada", submission_key="ada-undo")  # the annotator took this one back
    queue = review.flag_queue(store)
    assert queue["total"] == 2 and [x["id"] for x in queue["rows"]] == [kept["ranking_id"],
                                                                        relabelled["ranking_id"]]
    assert queue["rows"][0]["tiers"] == "A > B > C > D" and len(queue["rows"][0]["responses"]) == 4
    pairs = "SELECT COUNT(*) FROM active_pairs WHERE ranking_id = ?"
    assert store.scalar(pairs, [kept["ranking_id"]]) == 0  # a flag keeps it out of training
    before = snapshot(store)

    review.resolve_flag(store, kept["ranking_id"], "res", "looks fine")
    assert store.scalar(pairs, [kept["ranking_id"]]) == 6  # kept: it counts now
    out = review.relabel_flag(store, relabelled["ranking_id"], "res", None)
    assert out["reopened"] and snapshot(store)[:len(before)] == before  # nothing rewritten
    undo = snapshot(store)[-1]
    assert (undo["kind"], undo["supersedes"], undo["annotator"]) == (
        "undo", relabelled["ranking_id"], "res")
    assert store.scalar(pairs, [relabelled["ranking_id"]]) == 0
    assert [(v["action"], v["ranking_id"], v["reviewer"], v["note"], v["undo_id"]) for v in
            store.rows("SELECT * FROM reviews ORDER BY id")] == [
        ("resolve", kept["ranking_id"], "res", "looks fine", None),
        ("relabel", relabelled["ranking_id"], "res", None, undo["id"])]
    assert review.flag_queue(store)["total"] == 0

    n_rankings, n_reviews = count(store, "rankings"), count(store, "reviews")
    for verb in (review.resolve_flag, review.relabel_flag):
        for rid, why in ((kept["ranking_id"], "already reviewed .resolve by res"),
                         (relabelled["ranking_id"], "already reviewed .relabel by res"),
                         (plain["ranking_id"], "not flagged"),
                         (undone["ranking_id"], "superseded"),
                         (undo["id"], "does not exist"), (999, "does not exist")):
            with pytest.raises(Refused, match=why):
                verb(store, rid, "res", None)
        with pytest.raises(Refused, match="pick a ranking"):
            verb(store, True, "res", None)
    assert (count(store, "rankings"), count(store, "reviews")) == (n_rankings, n_reviews)

    # The relabelled item is served again, to someone who has not ranked it (never to ada).
    assert next_item(store, "ada")["id"] == items[3]  # ada's undone item is hers to redo
    assert next_item(store, "bob")["id"] == relabelled["item"]
    rank(store, "bob", "abcd", expect=relabelled["item"])
    assert next_item(store, "cy") is None


def test_relabel_reopens_a_retired_item_not_a_withdrawn_one(store):
    items = seed_items(store, n=2)
    first = rank(store, "ada", "abcd", flagged=True, expect=items[0])
    second = rank(store, "ada", "abcd", flagged=True, expect=items[1])
    with store.write() as db:  # the policy moved on: its items were retired
        db.execute("UPDATE items SET status = 'retired' WHERE id = ?", [items[0]])
    withdraw_item(store, items[1])
    assert review.relabel_flag(store, first["ranking_id"], "res")["reopened"]
    out = review.relabel_flag(store, second["ranking_id"], "res")
    assert not out["reopened"] and "withdrawn" in out["message"]
    assert next_item(store, "bob")["id"] == items[0] and next_item(store, "cy") is None


def test_one_more_annotator_and_mark_reviewed(store):
    items = seed_items(store, n=1, overlap=2)
    rank(store, "ada", "abcd")
    rank(store, "bob", "dcba")
    queue = review.disagreement_queue(store)
    it = queue["items"][0]
    assert queue["total"] == 1 and it["need"] == 0 and it["disagreement"] == 1.0
    assert [(x["annotator"], x["tiers"]) for x in it["rankings"]] == [
        ("ada", "A > B > C > D"), ("bob", "D > C > B > A")]
    assert [it["rankings"][1]["rank_of"][s["id"]] for s in it["responses"]] == [3, 2, 1, 0]
    assert next_item(store, "cy") is None  # both slots filled

    assert review.ask_one_more(store, items[0], "res", "third opinion")["need"] == 1
    assert next_item(store, "ada") is None and next_item(store, "bob") is None
    rank(store, "cy", "abcd", expect=items[0])
    assert next_item(store, "dee") is None  # exactly one more
    it = review.disagreement_queue(store)["items"][0]
    assert it["n_rankings"] == 3 and it["disagreement"] == pytest.approx(12 / 18)

    review.mark_reviewed(store, items[0], "res")
    assert review.disagreement_queue(store)["total"] == 0
    with pytest.raises(Refused, match="already reviewed"):
        review.mark_reviewed(store, items[0], "res")
    undo_last(store, "cy", submission_key="cy-undo")  # the item changed: back on the queue
    assert review.disagreement_queue(store)["total"] == 1
    assert [v["action"] for v in store.rows("SELECT action FROM reviews ORDER BY id")] == [
        "ask_more", "reviewed"]
    with pytest.raises(Refused, match="does not exist"):
        review.ask_one_more(store, 999, "res")
    withdraw_item(store, items[0])
    with pytest.raises(Refused, match="withdrawn"):
        review.ask_one_more(store, items[0], "res")
    create_batch(store, policy_version=0, k=2, overlap=0, items=[{  # answered for one person
        "kind": "arena", "prompt_id": 1, "responses": [{"text": "x"}, {"text": "y"}]}])
    arena = store.scalar("SELECT MAX(id) FROM items")
    with pytest.raises(Refused, match="arena"):
        review.ask_one_more(store, arena, "res")
    assert count(store, "reviews") == 2 and next_item(store, "dee") is None


def test_only_researchers_act_or_see(tmp_path, store):
    ctx = AppContext.from_config(AppConfig(workspace=tmp_path), store=store)
    ctx.users = {"ann": {"password": "x", "role": "annotator"},
                 "res": {"password": "y", "role": "researcher"}}
    items = seed_items(store, n=1, overlap=2)
    flagged = rank(store, "ann", "abcd", flagged=True, note=XSS)
    rank(store, "res", "dcba")
    before = (count(store, "rankings"), count(store, "reviews"), count(store, "open_items"),
              store.scalar("SELECT overlap FROM items"))
    for action, target in (("resolve", flagged["ranking_id"]), ("relabel", flagged["ranking_id"]),
                           ("ask_more", items[0]), ("reviewed", items[0])):
        out = dv.act(ctx, action, target, "note", "ann", {"name": "res"})
        assert not out["ok"] and "only researchers" in out["message"]
    after = (count(store, "rankings"), count(store, "reviews"), count(store, "open_items"),
             store.scalar("SELECT overlap FROM items"))
    assert after == before
    query = dv.query_of("", "any", "any", "any", "any", False, "newest first")
    assert dv.search_view(ctx, "ann", {}, query, 0) == {"allowed": False}
    assert dv.queues_view(ctx, "ann", {}) == {"allowed": False}
    # A researcher sees the queues, every user text escaped, and acts.
    view = dv.queues_view(ctx, "res", {})
    assert view["flag_choices"] == [(f"#{flagged['ranking_id']} by ann", flagged["ranking_id"])]
    for html in (view["flags_html"], view["disagree_html"],
                 dv.search_view(ctx, "res", {}, query, 0)["results_html"]):
        assert "<script>" not in html and "<b>" not in html and "${" not in html
    assert "&lt;script&gt;" in view["flags_html"]
    out = dv.act(ctx, "resolve", str(flagged["ranking_id"]), " ok ", "res", {})
    assert out["ok"] and store.one("SELECT reviewer, note FROM reviews") == {
        "reviewer": "res", "note": "ok"}
    # Without logins, `config.researchers` names who may.
    ctx = AppContext.from_config(AppConfig(workspace=tmp_path, researchers=("res",)),
                                 store=store)
    assert not dv.act(ctx, "ask_more", items[0], "", None, {"name": "ann"})["ok"]
    assert dv.act(ctx, "ask_more", items[0], "", None, {"name": "res"})["ok"]
