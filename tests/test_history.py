"""One annotator's history, stats, agreement and corrections (rlhf_core.data.history), on a
real SQLite file. The expected numbers are worked out by hand in the comments."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from rlhf_core.data import annotation, history
from rlhf_core.data.annotation import Refused
from rlhf_core.data.store import Store
from rlhf_core.preferences import parse_ranking_text
from tests.test_handlers import seed_items


def tiers_of(item: dict, text: str) -> list[list[int]]:
    """Keyboard text ("b a=c d") -> tiers of this item's response ids, by its card letters."""
    ids = {r["label"]: r["id"] for r in item["responses"]}
    return [[ids[label] for label in tier] for tier in parse_ranking_text(text, list(ids))]


def rank(store: Store, who: str, text: str | None, key: str, *, skip=False, **kw) -> dict:
    """`who` ranks (or skips) the next item served to them; returns the item and ranking id."""
    item = annotation.next_item(store, who)
    out = annotation.submit_ranking(store, annotator=who, item_id=item["id"],
                                    token=item["token"], submission_key=key, skip=skip,
                                    tiers=None if skip else tiers_of(item, text), **kw)
    return {"item": item, "id": out["ranking_id"]}


def snapshot(store: Store) -> tuple:
    """Everything a correction may write."""
    return tuple(store.scalar(f"SELECT COUNT(*) FROM {t}") for t in ("rankings", "pairs",
                                                                     "events")) + (
        store.rows("SELECT item_id, annotator, status FROM assignments ORDER BY id"),)


def fix(store: Store, who: str, ranking_id: int, tiers, key: str, **kw) -> dict:
    return history.correct_ranking(store, annotator=who, ranking_id=ranking_id, tiers=tiers,
                                   submission_key=key, **kw)


def test_counts_today_and_median(store):
    seed_items(store, n=4)
    r1 = rank(store, "ada", "abcd", "k1", time_spent_s=10.0)
    rank(store, "ada", "a=b c d", "k2", time_spent_s=30.0, flagged=True)  # a tie, flagged
    rank(store, "ada", None, "k3", skip=True, time_spent_s=5.0)  # skips are not timed
    rank(store, "ada", "abcd", "k4", time_spent_s=20.0)
    annotation.undo_last(store, "ada", submission_key="u4")  # its time still counts
    rank(store, "ada", "bacd", "k5", time_spent_s=40.0)
    rank(store, "bob", "abcd", "b1", time_spent_s=99.0)  # another annotator: not counted
    stats = history.annotator_stats(store, "ada")
    # standing: items 1, 2 and 4 ranked, item 3 skipped; one flag, one ranking with a tie
    assert stats["total"] == {"rankings": 3, "skips": 1, "flags": 1, "ties": 1, "corrected": 0}
    assert stats["today"] == stats["total"]
    assert (stats["median_s"], stats["n_timed"]) == (25.0, 4)  # median of 10, 30, 20, 40
    fix(store, "ada", r1["id"], tiers_of(r1["item"], "dcba"), "fix1", time_spent_s=1.0)
    stats = history.annotator_stats(store, "ada")
    assert stats["total"] == {"rankings": 3, "skips": 1, "flags": 1, "ties": 1, "corrected": 1}
    assert (stats["median_s"], stats["n_timed"]) == (25.0, 4)  # a correction is no ranking
    tomorrow = datetime.now(timezone.utc) + timedelta(days=1)
    later = history.annotator_stats(store, "ada", now=tomorrow)
    assert set(later["today"].values()) == {0} and later["total"] == stats["total"]
    empty = history.annotator_stats(store, "nobody")
    assert empty["median_s"] is None and set(empty["total"].values()) == {0}


def test_agreement_with_others_by_hand(store):
    seed_items(store, n=3, overlap=3)
    a1 = rank(store, "ada", "abcd", "a1")
    a2 = rank(store, "ada", "a=b c d", "a2")
    b1 = rank(store, "bob", "bacd", "b1")
    b2 = rank(store, "bob", "abcd", "b2")
    c1 = rank(store, "cy", "dcba", "c1")
    rank(store, "dee", "dcba", "d1", flagged=True)  # flagged rankings do not count
    assert [a1["item"]["id"], a2["item"]["id"]] == [b1["item"]["id"], b2["item"]["id"]]
    assert c1["item"]["id"] == a1["item"]["id"]
    # item 1: ada A>B>C>D, bob B>A>C>D: 5 of 6 pairs ordered alike (A,B differs);
    # item 2: ada A=B>C>D, bob A>B>C>D: 5 of 6 (bob does not tie A,B);
    # item 1: cy D>C>B>A reverses ada: 0 of 6. In all 10 of 18 pairs on 2 shared items.
    out = history.agreement_with_others(store, "ada")
    assert (out["items"], out["pairs"], out["agreed"]) == (2, 18, 10)
    assert out["share"] == pytest.approx(10 / 18)
    assert [(o["annotator"], o["items"], o["agreed"], o["pairs"]) for o in out["others"]] == [
        ("bob", 2, 10, 12), ("cy", 1, 0, 6)]
    fix(store, "cy", c1["id"], tiers_of(c1["item"], "abcd"), "c1-fix")  # only the active one
    out = history.agreement_with_others(store, "ada")
    assert (out["pairs"], out["agreed"]) == (18, 16)
    assert out["others"][1] == {"annotator": "cy", "items": 1, "pairs": 6, "agreed": 6,
                                "share": 1.0}
    assert history.agreement_with_others(store, "bob")["others"][0]["agreed"] == 10
    alone = history.agreement_with_others(store, "eve")
    assert alone == {"items": 0, "pairs": 0, "agreed": 0, "share": None, "others": []}


def test_correction_supersedes_and_pairs_change(store):
    seed_items(store, n=2)
    r1 = rank(store, "ada", "abcd", "k1", note="first try")
    item = r1["item"]
    before = {(p["chosen_id"], p["rejected_id"]) for p in annotation.training_pairs(store)}
    assert len(before) == 6
    out = fix(store, "ada", r1["id"], tiers_of(item, "dcba"), "fix-1", time_spent_s=4.5)
    assert out["supersedes"] == r1["id"] and out["pairs"] == 6 and not out["duplicate"]
    pairs = annotation.training_pairs(store)
    assert {p["ranking_id"] for p in pairs} == {out["ranking_id"]}
    assert {(p["chosen_id"], p["rejected_id"]) for p in pairs} == {(b, a) for a, b in before}
    assert annotation.annotator_progress(store, "ada")["done"] == 1  # still one item ranked
    assert store.counts()["rankings"] == 1
    rows = history.history(store, "ada")["rows"]
    assert [(r["id"], r["status"], r["superseded_by"], r["supersedes"]) for r in rows] == [
        (out["ranking_id"], "active", None, r1["id"]),
        (r1["id"], "corrected", out["ranking_id"], None)]
    assert [r["ranking"] for r in rows] == ["D > C > B > A", "A > B > C > D"]
    assert rows[0]["note"] == "first try"  # kept unless a new one is given
    again = fix(store, "ada", r1["id"], tiers_of(item, "dcba"), "fix-1")  # a resubmit
    assert again == {**out, "duplicate": True, "pairs": 0}
    assert len(annotation.training_pairs(store)) == 6
    third = fix(store, "ada", out["ranking_id"], tiers_of(item, "b a=c d"), "fix-2", note="tie")
    assert history.history(store, "ada")["rows"][0]["ranking"] == "B > A = C > D"
    assert history.ranking_detail(store, third["ranking_id"])["note"] == "tie"


def test_each_refusal_writes_nothing(store):
    seed_items(store, n=3, overlap=2)
    mine = rank(store, "ada", "abcd", "k1")
    other = rank(store, "ada", "abcd", "k2")
    bobs = rank(store, "bob", "abcd", "b1")
    done = fix(store, "ada", mine["id"], tiers_of(mine["item"], "dcba"), "fix-1")
    undo = annotation.undo_last(store, "ada", submission_key="undo-k2")  # undoes the fix
    assert undo["ranking_id"] == done["ranking_id"]
    ids = [r["id"] for r in mine["item"]["responses"]]
    foreign = other["item"]["responses"][0]["id"]
    cases = [
        ("bob", mine["id"], [[i] for i in ids], "x1", "another annotator's"),
        ("ada", bobs["id"], tiers_of(bobs["item"], "abcd"), "x2", "another annotator's"),
        ("ada", mine["id"], [[i] for i in ids], "x3", "already corrected"),  # a stale tab
        ("ada", done["ranking_id"], [[i] for i in ids], "x4", "already undone"),
        ("ada", other["id"], [[i] for i in ids[:3]] + [[foreign]], "x5", "Unknown response"),
        ("ada", other["id"], [[i] for i in ids[:3]], "x6", "Unknown response"),
        ("ada", other["id"], tiers_of(other["item"], "abc"), "fix-1", "already used"),
        ("ada", 9999, [[1]], "x7", "does not exist"),
        ("ada", store.scalar("SELECT MAX(id) FROM rankings"), [[1]], "x8", "does not exist"),
    ]
    o_ids = [r["id"] for r in other["item"]["responses"]]
    cases += [("ada", other["id"], [[o_ids[0]], [o_ids[0]], [o_ids[1], o_ids[2]]], "x9",
               "ranked once"), ("ada", other["id"], [[o_ids[0]]], "x10", "missing"),
              ("ada", True, [[o_ids[0]]], "x11", "positive integer"),
              ("", other["id"], [[o_ids[0]]], "x12", "missing annotator")]
    before = snapshot(store)
    for who, rid, tiers, key, reason in cases:
        with pytest.raises(Refused, match=reason):
            fix(store, who, rid, tiers, key)
        assert snapshot(store) == before, (who, rid, key)


def test_retired_item_and_a_skip_can_be_corrected(store):
    seed_items(store, n=2)
    ranked = rank(store, "ada", "abcd", "k1")
    skipped = rank(store, "ada", None, "k2", skip=True)
    annotation.withdraw_item(store, ranked["item"]["id"])
    out = fix(store, "ada", ranked["id"], tiers_of(ranked["item"], "bacd"), "fix-1")
    assert out["pairs"] == 6
    assert annotation.assignment_status(store, skipped["item"]["id"], "ada") == "expired"
    out = fix(store, "ada", skipped["id"], tiers_of(skipped["item"], "a b=c d"), "fix-2")
    assert out["pairs"] == 6  # 5 strict pairs and one tie
    # ranked after all: the item counts as done by ada (never served to her again)
    assert annotation.assignment_status(store, skipped["item"]["id"], "ada") == "done"
    assert annotation.next_item(store, "ada") is None
    stats = history.annotator_stats(store, "ada")["total"]
    assert (stats["rankings"], stats["skips"], stats["corrected"]) == (2, 0, 2)
    rows = history.history(store, "ada")["rows"]
    assert [(r["kind"], r["status"]) for r in rows] == [
        ("rank", "active"), ("rank", "active"), ("skip", "corrected"), ("rank", "corrected")]


def test_history_pages_newest_first_with_letters_and_short_prompts(store):
    seed_items(store, n=5)
    ids = [rank(store, "ada", "b a=c d", f"k{i}")["id"] for i in range(5)]
    page = history.history(store, "ada", limit=2, offset=0)
    assert page["total"] == 5 and [r["id"] for r in page["rows"]] == ids[::-1][:2]
    assert [r["id"] for r in history.history(store, "ada", limit=2, offset=4)["rows"]] == [ids[0]]
    row = page["rows"][0]
    assert row["ranking"] == "B > A = C > D" and row["kind"] == "rank"
    assert row["prompt"].startswith("test prompt") and row["policy_version"] == 0
    assert history.history(store, "bob")["rows"] == []
    assert history.annotators(store) == ["ada"]
    detail = history.ranking_detail(store, ids[0])
    assert detail["annotator"] == "ada" and len(detail["item"]["responses"]) == 4
    assert history.ranking_detail(store, 999) is None
    assert history.ranking_detail(store, "1") is None


def test_a_long_prompt_is_cut_in_the_history_and_whole_when_opened(store):
    store.add_prompts([{"text": "word " * 40}], source="test")
    pid = store.scalar("SELECT MAX(id) FROM prompts")
    annotation.create_batch(store, policy_version=0, k=2, items=[
        {"prompt_id": pid, "responses": [{"text": "x"}, {"text": "y"}]}])
    rid = rank(store, "ada", "ba", "k1")["id"]
    row = history.history(store, "ada")["rows"][0]
    assert len(row["prompt"]) == history.PROMPT_CHARS and row["prompt"].endswith("…")
    assert row["ranking"] == "B > A"
    assert history.ranking_detail(store, rid)["prompt"] == "word " * 40
