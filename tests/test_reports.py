"""Reports over a real SQLite store filled through the labeling verbs."""
import math

import pytest

from rlhf_core.data import annotation, reports
from rlhf_core.evaluation import wilson_interval


def _resp(text, version, n_tokens, finish="stop"):
    return {"text": text, "policy_version": version, "n_tokens": n_tokens,
            "finish_reason": finish}


def _rank(store, annotator, order, key, **flags):
    """Rank the annotator's next item; `order` maps response positions to tiers of positions."""
    item = annotation.next_item(store, annotator)
    by_pos = {r["position"]: r["id"] for r in item["responses"]}
    tiers = [[by_pos[p] for p in tier] for tier in order(len(by_pos))]
    annotation.submit_ranking(store, annotator=annotator, item_id=item["id"],
                              token=item["token"], submission_key=key, tiers=tiers, **flags)
    return item


def in_order(n):
    return [[p] for p in range(n)]


def reversed_order(n):
    return [[p] for p in reversed(range(n))]


@pytest.fixture
def filled(store):
    """Policy v1's batch: two blind A/B items (positions 0-1 from v1, 2-3 from the reference
    v0) and one label item (v1 only), each open to four annotators.

    alice ranks every item in position order; bob ties positions 1 and 2 on ab1, ranks ab2 in
    order and reverses the label item; carol reverses ab1 but flags it; dave reverses ab1 and
    undoes it. So the counted A/B outcomes of v1 vs v0 are alice 4 + 4 wins, bob 3 wins + 1 tie
    and 4 wins: 15 wins, 1 tie, 0 losses over 16 pairs from 4 rankings.
    """
    store.add_prompts([{"text": f"prompt {i}"} for i in range(3)], source="test",
                      heldout_fraction=0.0)
    p = [r["id"] for r in store.rows("SELECT id FROM prompts ORDER BY id")]
    items = [
        {"prompt_id": p[0], "kind": "ab", "selection": "ab:v1-vs-v0", "responses": [
            _resp("Sure here it is", 1, 6), _resp("I would say this", 1, 6),
            _resp("the answer is yes", 0, 4), _resp("the answer is no", 0, 4)]},
        {"prompt_id": p[1], "kind": "ab", "selection": "ab:v1-vs-v0", "responses": [
            _resp("Sure thing", 1, 3), _resp("Here you go", 1, 4, "length"),
            _resp("the answer is yes", 0, 4, "length"), _resp("the answer is maybe", 0, 4)]},
        {"prompt_id": p[2], "kind": "label", "selection": "random", "responses": [
            _resp("Sure here it is", 1, 6), _resp("no idea", 1, 3)]},
    ]
    store.add_version("reward", 1, status="promoted",
                      metrics={"heldout_accuracy": 0.6, "fresh_accuracy": 0.55,
                               "loss": {"train": 0.5}, "curve": [1, 2]},
                      counts={"pairs": 40})
    store.add_version("policy", 1, status="published", parent=0, reward_version=1,
                      counts={"pairs": 40}, metrics={"kl": 0.8})
    annotation.create_batch(store, policy_version=1, k=4, items=items, overlap=4)
    for key in ("ab1", "ab2", "lab"):
        _rank(store, "alice", in_order, f"alice-{key}")
    _rank(store, "bob", lambda n: [[0], [1, 2], [3]], "bob-ab1")
    _rank(store, "bob", in_order, "bob-ab2")
    _rank(store, "bob", reversed_order, "bob-lab")
    _rank(store, "carol", reversed_order, "carol-ab1", flagged=True)
    _rank(store, "dave", reversed_order, "dave-ab1")
    assert annotation.undo_last(store, "dave", submission_key="dave-undo")["duplicate"] is False
    return store


def test_ab_report_v1_beats_reference(filled):
    rep = reports.ab_report(filled, baseline=0, rounds=30)
    assert (rep["n_rankings"], rep["n_items"], rep["n_comparisons"]) == (4, 2, 16)
    (v1,) = rep["win_rates"]
    assert (v1["version"], v1["wins"], v1["ties"], v1["losses"], v1["n"]) == (1, 15, 1, 0, 16)
    assert v1["rate"] == pytest.approx(15.5 / 16)
    assert (v1["lo"], v1["hi"]) == pytest.approx(wilson_interval(15.5, 16))
    assert v1["rankings"] == 4  # the 16 pairs come from 4 rankings
    assert v1["lo"] > 0.5
    # leaderboard: W1 = 15.5 + 0.5 prior, W0 = 0.5 + 0.5 prior, so p1/p0 = 16
    top, ref = rep["leaderboard"]
    assert (top["version"], ref["version"]) == (1, 0)
    assert top["rating"] == pytest.approx(1000 + 400 * math.log10(16), abs=1e-6)
    assert ref["rating"] == pytest.approx(1000.0)
    assert top["lo"] <= top["rating"] <= top["hi"]
    assert top["n"] == 16 and top["rankings"] == ref["rankings"] == 4


def test_diversity_report_by_hand(filled):
    v0, v1 = reports.diversity_report(filled)
    # v0: "the answer is yes/no/yes/maybe": 6 unique of 16 words; bigrams 5 unique of 12;
    # every response opens with "the answer is"; 3 of 4 stopped.
    assert (v0["version"], v0["count"]) == (0, 4)
    assert v0["distinct_1"] == pytest.approx(6 / 16)
    assert v0["distinct_2"] == pytest.approx(5 / 12)
    assert v0["same_opening_share"] == 1.0
    assert (v0["mean_tokens"], v0["stop_rate"]) == (4.0, 0.75)
    # v1: 19 words, 13 unique; 13 bigrams, 10 unique ("sure here it is" appears twice);
    # "sure here it" opens 2 of 6; tokens 6+6+3+4+6+3 = 28; 5 of 6 stopped.
    assert (v1["version"], v1["count"]) == (1, 6)
    assert v1["distinct_1"] == pytest.approx(13 / 19)
    assert v1["distinct_2"] == pytest.approx(10 / 13)
    assert v1["same_opening_share"] == pytest.approx(2 / 6)
    assert v1["mean_tokens"] == pytest.approx(28 / 6)
    assert v1["stop_rate"] == pytest.approx(5 / 6)
    newest = reports.diversity_report(filled, max_responses=2)
    assert [r["count"] for r in newest] == [2, 2]


def test_agreement_report_by_hand(filled):
    out = reports.agreement_report(filled)
    # carol's ranking is flagged and dave's undone: alice and bob share 3 items.
    # ab1: bob ties positions 1 and 2 -> 5 of 6 pairs agree, tau_b = 5 / sqrt(6 * 5);
    # ab2 identical -> 1 and 1; label item reversed -> 0 and -1.
    assert (out["n_items"], out["n_comparisons"], out["n_annotators"]) == (3, 3, 2)
    assert out["pairwise_agreement"] == pytest.approx((5 / 6 + 1 + 0) / 3)
    assert out["kendall_tau"] == pytest.approx((5 / math.sqrt(30) + 1 - 1) / 3)


def test_rankings_over_time_counts_kinds(filled):
    (bucket,) = reports.rankings_over_time(filled, bucket_s=10**9)  # one bucket for sure
    # 8 rank records (alice 3, bob 3, carol 1, dave 1), dave's undo removes one
    assert (bucket["rankings"], bucket["skips"], bucket["undos"]) == (8, 0, 1)
    assert (bucket["total"], bucket["annotators"]) == (7, 4)


def test_bucket_rankings_fills_gaps():
    rows = [{"kind": "rank", "created_at": "2024-01-01T00:00:10.000+00:00", "annotator": "a"},
            {"kind": "skip", "created_at": "2024-01-01T00:00:50.000+00:00", "annotator": "b"},
            {"kind": "rank", "created_at": "2024-01-01T00:02:05.000+00:00", "annotator": "a"},
            {"kind": "undo", "created_at": "2024-01-01T00:02:30.000+00:00", "annotator": "a",
             "undone_kind": "rank"}]
    out = reports.bucket_rankings(rows, 60)
    assert [(b["rankings"], b["skips"], b["undos"], b["total"], b["annotators"]) for b in out] \
        == [(1, 1, 0, 1, 2), (0, 0, 0, 1, 0), (1, 0, 1, 1, 1)]
    assert out[0]["time"] == "2024-01-01T00:00:00+00:00"
    assert out[1]["t"] - out[0]["t"] == 60


def test_ppo_and_reward_series(filled):
    filled.log_metrics("ppo", {"reward_mean": 0.1, "kl": 0.0, "entropy": 2.0}, step=0, version=2)
    filled.log_metrics("ppo", {"reward_mean": 0.3, "kl": 0.2}, step=1, version=2)
    filled.log_metrics("reward_eval", {"fresh_accuracy": 0.7}, version=1)
    assert reports.ppo_series(filled) == [
        {"version": 2, "step": 0, "reward_mean": 0.1, "kl": 0.0, "entropy": 2.0},
        {"version": 2, "step": 1, "reward_mean": 0.3, "kl": 0.2}]
    (rv,) = reports.reward_series(filled)
    assert rv["version"] == 1 and rv["status"] == "promoted"
    assert rv["heldout_accuracy"] == 0.6
    assert rv["fresh_accuracy"] == 0.7  # measured later on newer labels
    assert rv["loss.train"] == 0.5 and rv["counts.pairs"] == 40
    assert "curve" not in rv


def test_version_page_provenance(filled):
    page = reports.version_page(filled, "policy", 1)
    assert (page["parent"], page["reward_version"], page["counts"]) == (0, 1, {"pairs": 40})
    assert page["kl_from_reference"] == 0.8
    (batch,) = page["batches"]
    assert (batch["items"], batch["ab_items"], batch["rankings"], batch["skips"]) == (3, 2, 7, 0)
    assert len(page["rankings"]) == 8
    assert [r["annotator"] for r in page["rankings"] if not r["active"]] == ["dave"]
    assert page["win_rate_vs_reference"]["rate"] == pytest.approx(15.5 / 16)
    ref = reports.version_page(filled, "policy", 0)
    assert ref["children"] == [1] and ref["batches"] == [] and ref["win_rate_vs_reference"] is None
    reward = reports.version_page(filled, "reward", 1)
    assert reward["policies_trained"] == [1] and reward["metrics"]["heldout_accuracy"] == 0.6
    assert reports.version_page(filled, "policy", 9) is None


def test_version_page_kl_from_last_ppo_step(filled):
    filled.add_version("policy", 2, status="published", parent=1, reward_version=1)
    filled.log_metrics("ppo", {"kl": 0.1}, step=0, version=2)
    filled.log_metrics("ppo", {"kl": 0.25, "approx_kl": 0.01}, step=1, version=2)
    page = reports.version_page(filled, "policy", 2)
    assert page["kl_from_reference"] == 0.25
    assert [r["step"] for r in page["ppo"]] == [0, 1]
    assert reports.version_page(filled, "policy", 1)["children"] == [2]


def test_empty_store_reports(store):
    rep = reports.ab_report(store)
    assert (rep["win_rates"], rep["leaderboard"], rep["n_comparisons"]) == ([], [], 0)
    assert reports.diversity_report(store) == []
    assert reports.agreement_report(store)["pairwise_agreement"] is None
    assert reports.rankings_over_time(store) == []
    assert reports.ppo_series(store) == [] and reports.reward_series(store) == []
    page = reports.version_page(store, "policy", 0)
    assert page["kl_from_reference"] is None and page["rankings"] == []
