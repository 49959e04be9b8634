"""The "Is it working?" numbers against values worked out by hand."""
import math

import pytest

from rlhf_core.evaluation import (
    ab_win_rates,
    agreement,
    bootstrap_ratings,
    bradley_terry_ratings,
    calibration_bins,
    compare_rankings,
    distinct_n,
    pairwise_outcomes,
    percentile,
    same_opening_share,
    wilson_interval,
    win_rate,
)


# -- Wilson and win rates ---------------------------------------------------------
def test_wilson_8_of_10_matches_closed_form():
    # p = 0.8, z = 1.96, z^2 = 3.8416, z^2/n = 0.38416, denom = 1.38416
    # center = (0.8 + 0.19208) / 1.38416 = 0.716738
    # half = 1.96 * sqrt(0.8*0.2/10 + 3.8416/400) / 1.38416
    #      = 1.96 * sqrt(0.016 + 0.009604) / 1.38416 = 1.96 * 0.160012 / 1.38416 = 0.226580
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.716738 - 0.226580, abs=1e-5)
    assert hi == pytest.approx(0.716738 + 0.226580, abs=1e-5)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)


def test_wilson_zero_wins_and_empty():
    # p = 0: center = half = (z^2/2n) / (1 + z^2/n), so lo = 0, hi = 0.38416 / 1.38416
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12)
    assert hi == pytest.approx(0.38416 / 1.38416, abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_win_rate_counts_ties_as_half():
    # 6 wins + 4 ties = 8 effective wins of 10: rate 0.8, the Wilson interval of 8/10
    r = win_rate(6, 4, 0)
    assert r["rate"] == pytest.approx(0.8)
    assert r["n"] == 10
    assert (round(r["lo"], 4), round(r["hi"], 4)) == (0.4902, 0.9433)
    assert (r["wins"], r["ties"], r["losses"]) == (6, 4, 0)
    # 1 win, 2 ties, 1 loss: (1 + 1) / 4 = 0.5, symmetric interval around 0.5
    r = win_rate(1, 2, 1)
    assert r["rate"] == 0.5
    assert r["lo"] == pytest.approx(1 - r["hi"])


def test_win_rate_empty_is_none():
    assert win_rate(0, 0, 0) == {"rate": None, "lo": None, "hi": None, "n": 0,
                                 "wins": 0, "ties": 0, "losses": 0}


# -- outcomes from rankings ---------------------------------------------------------
def test_pairwise_outcomes_ab_ranking_with_tie():
    # responses 1, 2 from v0 (the reference); 3, 4 from v1. Ranked 3 > 1 = 4 > 2.
    version_of = {1: 0, 2: 0, 3: 1, 4: 1}
    out = pairwise_outcomes([[3], [1, 4], [2]], version_of)
    # cross pairs: (3,1) v1 better, (3,2) v1 better, (1,4) tie, (4,2) v1 better;
    # (3,4) and (1,2) are same-version and ignored. Oriented (0, 1, score of v0).
    assert sorted(out) == [(0, 1, 0.0), (0, 1, 0.0), (0, 1, 0.0), (0, 1, 0.5)]
    assert ab_win_rates(out, baseline=0)[1]["rate"] == pytest.approx(3.5 / 4)


def test_pairwise_outcomes_orients_lower_version_first_and_skips_unknown():
    out = pairwise_outcomes([[10], [20], [99]], {10: 0, 20: 3})
    assert out == [(0, 3, 1.0)]
    assert pairwise_outcomes([[20], [10]], {10: 0, 20: 3}) == [(0, 3, 0.0)]
    assert pairwise_outcomes([[1, 2]], {1: 5, 2: 5}) == []


def test_ab_win_rates_against_baseline_only():
    outcomes = [(0, 1, 0.0), (0, 1, 0.0), (0, 1, 0.5), (0, 1, 1.0),  # v1: 2 W, 1 T, 1 L
                (0, 2, 0.0),                                           # v2: 1 W
                (1, 2, 1.0)]                                           # not vs v0: ignored
    rates = ab_win_rates(outcomes, baseline=0)
    assert list(rates) == [1, 2]
    assert (rates[1]["wins"], rates[1]["ties"], rates[1]["losses"]) == (2, 1, 1)
    assert rates[1]["rate"] == pytest.approx(2.5 / 4)
    assert rates[2]["rate"] == 1.0 and rates[2]["n"] == 1
    # the same data seen from v1 as baseline
    from_v1 = ab_win_rates(outcomes, baseline=1)
    assert from_v1[0]["rate"] == pytest.approx(1.5 / 4)
    assert from_v1[2]["losses"] == 1


# -- Bradley-Terry ---------------------------------------------------------------------
def test_bt_two_versions_closed_form():
    # v1 beats v0 3 times, loses once; the prior adds 0.5 win + 0.5 loss vs the anchor.
    # With two players the MM fixed point is p1/p0 = W1/W0 = 3.5/1.5 = 7/3,
    # so rating = 1000 + 400 log10(7/3) = 1147.19.
    outcomes = [(0, 1, 0.0)] * 3 + [(0, 1, 1.0)]
    ratings = bradley_terry_ratings(outcomes)
    assert ratings[0] == pytest.approx(1000.0)
    assert ratings[1] == pytest.approx(1000 + 400 * math.log10(7 / 3), abs=1e-6)
    assert ratings[1] == pytest.approx(1147.19, abs=0.01)


def test_bt_consistent_order_and_anchor():
    # v2 beats v1 beats v0, and v2 beats v0, every time.
    outcomes = [(0, 1, 0.0)] * 10 + [(1, 2, 0.0)] * 10 + [(0, 2, 0.0)] * 10
    r = bradley_terry_ratings(outcomes)
    assert r[0] == pytest.approx(1000.0)
    assert r[2] > r[1] > r[0]
    assert all(math.isfinite(x) for x in r.values())  # the prior keeps unbeaten v2 finite
    # 200 MM iterations reach the fixed point
    assert bradley_terry_ratings(outcomes, iters=5000) == pytest.approx(r, abs=1e-3)
    # another anchor sits at 1000 (the prior shrinks toward it, so gaps differ a little)
    r1 = bradley_terry_ratings(outcomes, anchor=1)
    assert r1[1] == pytest.approx(1000.0)
    assert r1[2] > r1[1] > r1[0]


def test_bt_symmetric_data_gives_equal_ratings():
    even = [(0, 1, 1.0)] * 5 + [(0, 1, 0.0)] * 5
    assert bradley_terry_ratings(even)[1] == pytest.approx(1000.0)
    ties = [(0, 1, 0.5)] * 4
    assert bradley_terry_ratings(ties)[1] == pytest.approx(1000.0)
    # a rock-paper-scissors cycle: W_i = 5 + prior terms, and p = 1 solves every MM equation
    cycle = [(0, 1, 1.0)] * 5 + [(1, 2, 1.0)] * 5 + [(0, 2, 0.0)] * 5
    r = bradley_terry_ratings(cycle)
    assert r[1] == pytest.approx(1000.0, abs=1e-6) and r[2] == pytest.approx(1000.0, abs=1e-6)


def test_bt_empty():
    assert bradley_terry_ratings([]) == {}
    assert bootstrap_ratings([]) == {}


def test_bootstrap_intervals_bracket_the_fit_and_are_seeded():
    outcomes = ([(0, 1, 0.0)] * 8 + [(0, 1, 1.0)] * 2 + [(1, 2, 0.0)] * 7 + [(1, 2, 1.0)] * 3)
    fit = bradley_terry_ratings(outcomes)
    ci = bootstrap_ratings(outcomes, rounds=50, seed=3)
    assert ci[0] == (pytest.approx(1000.0), pytest.approx(1000.0))
    for v in (1, 2):
        assert ci[v][0] <= fit[v] <= ci[v][1]
        assert ci[v][0] < ci[v][1]
    assert bootstrap_ratings(outcomes, rounds=50, seed=3) == ci


def test_bootstrap_by_ranking_is_wider_for_correlated_pairs():
    """10 rankings of 4 pairs each, the 4 always alike (v1 won 6 rankings, lost 4): resampling
    pairs one by one pretends there are 40 independent judgements, whole rankings do not."""
    outcomes = [(0, 1, 0.0)] * 24 + [(0, 1, 1.0)] * 16
    rankings = [i // 4 for i in range(40)]
    fit = bradley_terry_ratings(outcomes)[1]
    pairs = bootstrap_ratings(outcomes, rounds=200, seed=1)[1]
    whole = bootstrap_ratings(outcomes, rounds=200, seed=1, groups=rankings)[1]
    assert whole[0] <= fit <= whole[1] and pairs[0] <= fit <= pairs[1]
    assert whole[1] - whole[0] > 1.5 * (pairs[1] - pairs[0])
    # one ranking: every resample is that ranking, so the "interval" has no width (issue 11.8:
    # "618 - 618"); the dashboard says "not enough data yet" instead (app/dashboard_data.py)
    lo, hi = bootstrap_ratings(outcomes[:4], rounds=20, groups=rankings[:4])[1]
    assert lo == hi


def test_percentile_interpolates():
    assert percentile([3, 1, 2, 4], 0.5) == 2.5  # position 1.5 between 2 and 3
    assert percentile([5], 0.975) == 5
    assert percentile([], 0.5) is None


# -- diversity --------------------------------------------------------------------------
def test_distinct_n_by_hand():
    texts = ["The cat sat", "the CAT ran"]
    # unigrams: the cat sat the cat ran -> 4 unique of 6
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 3 unique of 4; none cross texts
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(texts, 4) == 0.0
    assert distinct_n([], 1) == 0.0


def test_same_opening_share_by_hand():
    texts = ["I think that X", "i think that Y", "Sure here is", "I think so"]
    # first 3 words: (i think that) x2, (sure here is), (i think so) -> 2 / 4
    assert same_opening_share(texts, 3) == 0.5
    # first 2 words: (i think) x3 -> 3 / 4
    assert same_opening_share(texts, 2) == 0.75
    assert same_opening_share([]) == 0.0


# -- agreement ----------------------------------------------------------------------------
def test_agreement_identical_and_reversed():
    a, rev = [[1], [2], [3]], [[3], [2], [1]]
    assert agreement({7: [a, a]}) == {"n_items": 1, "n_comparisons": 1,
                                      "pairwise_agreement": 1.0, "kendall_tau": 1.0}
    out = agreement({7: [a, rev]})
    assert out["pairwise_agreement"] == 0.0
    assert out["kendall_tau"] == pytest.approx(-1.0)


def test_agreement_averages_and_skips_single_rankings():
    a, rev = [[1], [2], [3]], [[3], [2], [1]]
    out = agreement({1: [a, a], 2: [a, rev], 3: [a]})
    assert out["n_items"] == 2
    assert out["pairwise_agreement"] == 0.5  # mean(1, 0)
    assert out["kendall_tau"] == pytest.approx(0.0)  # mean(1, -1)
    # three annotators on one item: 3 annotator pairs (a,a)=1, (a,rev)=0, (a,rev)=0
    three = agreement({1: [a, a, rev]})
    assert three["n_comparisons"] == 3
    assert three["pairwise_agreement"] == pytest.approx(1 / 3)
    assert agreement({}) == {"n_items": 0, "n_comparisons": 0,
                             "pairwise_agreement": None, "kendall_tau": None}


def test_compare_rankings_with_tie_tau_b():
    # x ties 1 and 2; y orders 1 > 2 > 3. Pairs: (1,2) disagree; (1,3), (2,3) concordant.
    # agreement 2/3; tau_b = (C - D) / sqrt((n0 - n1)(n0 - n2)) = 2 / sqrt(2 * 3) = 0.8165
    c = compare_rankings([[1, 2], [3]], [[1], [2], [3]])
    assert c["agreement"] == pytest.approx(2 / 3)
    assert c["tau_b"] == pytest.approx(2 / math.sqrt(6))
    assert compare_rankings([[1, 2]], [[1], [2]])["tau_b"] is None  # x ties everything


# -- calibration --------------------------------------------------------------------------
def test_calibration_bins_by_hand():
    out = calibration_bins([0.1, 0.3, 0.9, 0.95], [0, 1, 1, 1], bins=2)
    low, high = out["bins"]
    assert (low["n"], low["mean_prob"], low["frac_positive"]) == (2, pytest.approx(0.2), 0.5)
    assert (high["n"], high["mean_prob"], high["frac_positive"]) == (2, pytest.approx(0.925), 1.0)
    # ece = 0.5 * |0.2 - 0.5| + 0.5 * |0.925 - 1| = 0.15 + 0.0375
    assert out["ece"] == pytest.approx(0.1875)
    assert calibration_bins([], [], bins=3)["ece"] is None
