"""Labeling verbs: batches, assignments, rankings, undo and export, on a real SQLite file."""
from __future__ import annotations

import time

import pytest

from rlhf_core.data import annotation
from rlhf_core.data.annotation import Refused, StaleForm


def make_batch(store, n_items=3, k=3, overlap=1, policy_version=0):
    store.add_prompts([{"text": f"prompt {i}"} for i in range(n_items)], source="t")
    ids = [r["id"] for r in store.rows("SELECT id FROM prompts ORDER BY id")][-n_items:]
    items = [{"prompt_id": pid, "responses": [
        {"text": f"answer {pid}.{j}", "n_tokens": 3 + j, "finish_reason": "stop"}
        for j in range(k)]} for pid in ids]
    return annotation.create_batch(store, policy_version=policy_version, k=k, items=items,
                                   settings={"temperature": 0.9}, overlap=overlap)


def rank(store, who, item, key, tiers=None, **kw):
    if tiers is None:
        tiers = [[r["id"]] for r in item["responses"]]
    return annotation.submit_ranking(store, annotator=who, item_id=item["id"],
                                     token=item["token"], submission_key=key, tiers=tiers, **kw)


def n(store, sql, params=()):
    return store.scalar(sql, params)


def test_create_batch_and_next_item(store):
    batch_id = make_batch(store, n_items=2, k=3)
    assert n(store, "SELECT COUNT(*) FROM items WHERE batch_id = ?", [batch_id]) == 2
    assert n(store, "SELECT COUNT(*) FROM responses") == 6
    item = annotation.next_item(store, "ann")
    assert item["prompt"].startswith("prompt") and item["token"]
    assert [r["label"] for r in item["responses"]] == ["A", "B", "C"]
    assert {r["finish_reason"] for r in item["responses"]} == {"stop"}
    assert store.counts()["items_ready"] == 2


def test_collapsed_item_is_not_created(store):
    store.add_prompts([{"text": "x"}], source="t")
    annotation.create_batch(store, policy_version=0, k=2, items=[
        {"prompt_id": 1, "responses": [{"text": "only one"}]}])
    assert n(store, "SELECT COUNT(*) FROM items") == 0


def test_two_annotators_get_different_items(store):
    make_batch(store, n_items=2)
    a, b = annotation.next_item(store, "alice"), annotation.next_item(store, "bob")
    assert a["id"] != b["id"]
    assert annotation.next_item(store, "carol") is None  # both items held (overlap 1)


def test_no_annotator_sees_an_item_twice(store):
    make_batch(store, n_items=3)
    seen = []
    for i in range(3):
        item = annotation.next_item(store, "alice")
        seen.append(item["id"])
        rank(store, "alice", item, f"k{i}")
    assert len(set(seen)) == 3
    assert annotation.next_item(store, "alice") is None
    assert annotation.annotator_progress(store, "alice") == {"done": 3, "available": 0, "held": 0}


def test_overlap_two_serves_item_to_two_annotators_then_stops(store):
    make_batch(store, n_items=1, overlap=2)
    a = annotation.next_item(store, "alice")
    b = annotation.next_item(store, "bob")
    assert a["id"] == b["id"]
    assert annotation.next_item(store, "carol") is None
    rank(store, "alice", a, "ka")
    rank(store, "bob", b, "kb")
    assert annotation.next_item(store, "carol") is None
    assert store.counts()["items_open"] == 0
    assert store.counts()["annotators"] == 2


def test_open_assignment_is_resumed(store):
    make_batch(store, n_items=3)
    first = annotation.next_item(store, "alice")
    again = annotation.next_item(store, "alice")  # a page refresh
    assert (again["id"], again["token"]) == (first["id"], first["token"])
    assert [r["id"] for r in again["responses"]] == [r["id"] for r in first["responses"]]
    assert n(store, "SELECT COUNT(*) FROM assignments WHERE annotator = 'alice'") == 1


def test_resubmitted_key_is_a_noop(store):
    make_batch(store, n_items=2)
    item = annotation.next_item(store, "alice")
    r1 = rank(store, "alice", item, "same-key")
    r2 = rank(store, "alice", item, "same-key")
    assert r1["duplicate"] is False and r1["pairs"] == 3
    assert r2 == {"ranking_id": r1["ranking_id"], "duplicate": True, "pairs": 0}
    assert n(store, "SELECT COUNT(*) FROM rankings") == 1
    assert n(store, "SELECT COUNT(*) FROM pairs") == 3
    other = annotation.next_item(store, "alice")
    with pytest.raises(Refused, match="another item"):
        rank(store, "alice", other, "same-key")


@pytest.mark.parametrize("bad", ["missing", "foreign", "duplicate", "empty_tier", "not_list"])
def test_bad_ranking_refused_with_nothing_written(store, bad):
    make_batch(store, n_items=2)
    item = annotation.next_item(store, "alice")
    ids = [r["id"] for r in item["responses"]]
    foreign = n(store, "SELECT MIN(id) FROM responses WHERE item_id != ?", [item["id"]])
    tiers = {"missing": [[ids[0]], [ids[1]]],
             "foreign": [[ids[0]], [ids[1]], [ids[2], foreign]],
             "duplicate": [[ids[0], ids[1]], [ids[1]], [ids[2]]],
             "empty_tier": [[ids[0]], [], [ids[1], ids[2]]],
             "not_list": "A>B>C"}[bad]
    with pytest.raises(Refused):
        rank(store, "alice", item, "k1", tiers=tiers)
    assert n(store, "SELECT COUNT(*) FROM rankings") == 0
    assert n(store, "SELECT COUNT(*) FROM pairs") == 0
    # The annotator can still submit a correct ranking for the same item.
    assert rank(store, "alice", item, "k2")["pairs"] == 3


def test_withdrawn_item_is_stale(store):
    make_batch(store, n_items=2)
    item = annotation.next_item(store, "alice")
    annotation.withdraw_item(store, item["id"])
    with pytest.raises(StaleForm, match="withdrawn"):
        rank(store, "alice", item, "k1")
    assert n(store, "SELECT COUNT(*) FROM rankings") == 0
    assert annotation.next_item(store, "alice")["id"] != item["id"]


def test_expired_assignment_reassigned_is_stale(store):
    make_batch(store, n_items=1)
    a = annotation.next_item(store, "alice", ttl_s=0.05)
    time.sleep(0.1)
    b = annotation.next_item(store, "bob")
    assert b["id"] == a["id"]
    with pytest.raises(StaleForm, match="reassigned"):
        rank(store, "alice", a, "ka")
    assert rank(store, "bob", b, "kb")["duplicate"] is False
    assert n(store, "SELECT COUNT(*) FROM rankings") == 1


def test_wrong_token_is_stale_and_unassigned_is_refused(store):
    make_batch(store, n_items=2)
    item = annotation.next_item(store, "alice")
    with pytest.raises(StaleForm):
        annotation.submit_ranking(store, annotator="alice", item_id=item["id"], token="old-tab",
                                  submission_key="k", tiers=[[r["id"]] for r in item["responses"]])
    with pytest.raises(StaleForm, match="not assigned"):
        rank(store, "mallory", item, "km")
    with pytest.raises(Refused, match="does not exist"):
        annotation.submit_ranking(store, annotator="alice", item_id=999, token=None,
                                  submission_key="k9", tiers=[[1]])
    assert n(store, "SELECT COUNT(*) FROM rankings") == 0


def test_skip_all_bad_and_flag_are_recorded_without_training_pairs(store):
    make_batch(store, n_items=3)
    i1 = annotation.next_item(store, "alice")
    annotation.submit_ranking(store, annotator="alice", item_id=i1["id"], token=i1["token"],
                              submission_key="s", skip=True)
    i2 = annotation.next_item(store, "alice")
    rank(store, "alice", i2, "b", all_bad=True)
    i3 = annotation.next_item(store, "alice")
    rank(store, "alice", i3, "f", flagged=True, note="contains a phone number")
    assert len({i1["id"], i2["id"], i3["id"]}) == 3
    kinds = store.rows("SELECT kind, all_bad, flagged, note FROM rankings ORDER BY id")
    assert [(r["kind"], r["all_bad"], r["flagged"]) for r in kinds] == \
        [("skip", 0, 0), ("rank", 1, 0), ("rank", 0, 1)]
    assert kinds[2]["note"] == "contains a phone number"
    assert n(store, "SELECT COUNT(*) FROM active_pairs") == 0
    assert annotation.export_pairs(store, include_ties=True) == []
    c = store.counts()
    assert (c["skips"], c["flagged"], c["pairs"]) == (1, 1, 0)


def test_ties_give_half_label_pairs(store):
    make_batch(store, n_items=1, k=3)
    item = annotation.next_item(store, "alice")
    a, b, c = [r["id"] for r in item["responses"]]
    out = rank(store, "alice", item, "k", tiers=[[a, b], [c]])
    assert out["pairs"] == 3
    pairs = store.rows("SELECT chosen_id, rejected_id, label FROM active_pairs ORDER BY id")
    assert {(p["chosen_id"], p["rejected_id"], p["label"]) for p in pairs} == \
        {(a, c, 1.0), (b, c, 1.0), (a, b, 0.5)}
    assert store.counts()["pairs"] == 2 and store.counts()["tie_pairs"] == 1
    assert len(annotation.export_pairs(store)) == 2
    ties = [p for p in annotation.export_pairs(store, include_ties=True) if p["label"] == 0.5]
    assert len(ties) == 1


def test_undo_supersedes_and_serves_item_again(store):
    make_batch(store, n_items=2)
    first = annotation.next_item(store, "alice")
    r = rank(store, "alice", first, "k1", time_spent_s=12.5)
    second = annotation.next_item(store, "alice")  # opens another item before undoing
    assert second["id"] != first["id"]
    assert store.counts()["rankings"] == 1 and store.counts()["pairs"] == 3
    undo = annotation.undo_last(store, "alice", submission_key="u1")
    assert undo["ranking_id"] == r["ranking_id"] and undo["item_id"] == first["id"]
    assert undo["tiers"] == [[x["id"]] for x in first["responses"]]
    assert annotation.undo_last(store, "alice", submission_key="u1")["duplicate"] is True
    c = store.counts()
    assert (c["rankings"], c["pairs"]) == (0, 0)
    # The record is kept: append-only, an 'undo' row supersedes it.
    rows = store.rows("SELECT id, kind, supersedes FROM rankings ORDER BY id")
    assert [(x["kind"], x["supersedes"]) for x in rows] == [("rank", None), ("undo", r["ranking_id"])]
    assert n(store, "SELECT COUNT(*) FROM pairs") == 3
    again = annotation.next_item(store, "alice")
    assert again["id"] == first["id"]
    out = rank(store, "alice", again, "k2", tiers=[[x["id"] for x in again["responses"]]])
    assert out["duplicate"] is False
    assert store.counts()["rankings"] == 1 and store.counts()["tie_pairs"] == 3
    assert annotation.undo_last(store, "bob", submission_key="u2") is None


def test_undone_item_not_served_to_others(store):
    make_batch(store, n_items=1)
    item = annotation.next_item(store, "alice")
    rank(store, "alice", item, "k1")
    annotation.undo_last(store, "alice", submission_key="u")
    assert annotation.next_item(store, "bob") is None  # alice holds it again
    assert annotation.next_item(store, "alice")["id"] == item["id"]


def test_export_pairs_and_rankings(store):
    make_batch(store, n_items=1, k=3, policy_version=0)
    item = annotation.next_item(store, "alice")
    by_pos = {x["id"]: x for x in item["responses"]}
    a, b, c = sorted(by_pos)
    r = rank(store, "alice", item, "k", tiers=[[c], [a, b]], time_spent_s=3.0)
    pairs = annotation.export_pairs(store)
    assert len(pairs) == 2
    for p in pairs:
        assert p["prompt"] == item["prompt"]
        assert p["chosen"] == by_pos[c]["text"]
        assert p["rejected"] in {by_pos[a]["text"], by_pos[b]["text"]}
        assert p["annotator"] == "alice" and p["ranking_id"] == r["ranking_id"]
        assert p["item_policy_version"] == 0 and p["chosen_policy_version"] == 0
        assert p["split"] in {"train", "heldout"}
    (rk,) = annotation.export_rankings(store)
    assert rk["tiers"] == [[c], [a, b]]
    assert rk["annotator"] == "alice" and rk["kind"] == "rank" and rk["time_spent_s"] == 3.0
    assert rk["submission_key"] == "k" and rk["policy_version"] == 0
    assert rk["prompt"] == item["prompt"]
    assert [x["id"] for x in rk["responses"]] == [a, b, c]


def test_retire_items_of_older_policy(store):
    make_batch(store, n_items=2, policy_version=0)
    item = annotation.next_item(store, "alice")
    store.add_version("policy", 1, status="published")
    make_batch(store, n_items=1, policy_version=1)
    assert annotation.retire_items(store, older_than_policy=1) == 2
    with pytest.raises(StaleForm, match="retired"):
        rank(store, "alice", item, "k")
    assert annotation.next_item(store, "alice")["policy_version"] == 1


def test_newer_policy_items_served_first(store):
    make_batch(store, n_items=1, policy_version=0)
    store.add_version("policy", 1, status="published")
    store.add_prompts([{"text": "new prompt"}], source="t")
    pid = n(store, "SELECT id FROM prompts WHERE text = 'new prompt'")
    annotation.create_batch(store, policy_version=1, k=2, items=[
        {"prompt_id": pid, "responses": [{"text": "x"}, {"text": "y"}]}])
    item = annotation.next_item(store, "alice")
    assert item["policy_version"] == 1


def test_concurrent_annotators_never_share_an_item(store):
    import threading
    make_batch(store, n_items=6)
    got, errors = {}, []

    def work(name):
        try:
            item = annotation.next_item(store, name)
            got[name] = item["id"]
            rank(store, name, item, f"key-{name}")
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"a{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(set(got.values())) == 6
    assert store.counts()["rankings"] == 6


def test_skipped_item_goes_back_to_the_pool_for_others(store):
    make_batch(store, n_items=1)
    item = annotation.next_item(store, "ann")
    annotation.submit_ranking(store, annotator="ann", item_id=item["id"], token=item["token"],
                   submission_key="skip-1", skip=True)
    assert annotation.next_item(store, "ann") is None  # never the same annotator again
    other = annotation.next_item(store, "bob")
    assert other is not None and other["id"] == item["id"]


def test_resumed_assignment_renews_its_lease(store):
    make_batch(store, n_items=1)
    item = annotation.next_item(store, "ann", ttl_s=1)
    with store.write() as db:
        db.execute("UPDATE assignments SET expires_at = 0")
    again = annotation.next_item(store, "ann", ttl_s=600)
    assert again["token"] == item["token"]
    assert annotation.next_item(store, "bob") is None  # the renewed lease keeps it with ann
