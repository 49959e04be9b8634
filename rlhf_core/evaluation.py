"""The "Is it working?" numbers: win rates, a Bradley-Terry leaderboard, diversity, agreement.

PURE: stdlib only (no torch, no DB), so the UI process, the simulator and the tests use the
same functions on plain lists. `rlhf_core.data.reports` feeds them from the store.

Vocabulary: a ranking is a list of tiers of response ids, best first (a tie = several ids in
one tier); an *outcome* is `(version_a, version_b, score)` with score 1.0 = a's response
was ranked better, 0.5 = tie, 0.0 = b's was better.
"""
from __future__ import annotations

import itertools
import math
import random
from collections import Counter, defaultdict


# -- win rates --------------------------------------------------------------------
def wilson_interval(wins: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion `wins / n` (Wilson 1927).

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0/n and n/n.
    `wins` may be fractional (ties counted as half a win). n = 0 gives the uninformative (0, 1).
    """
    if n <= 0:
        return (0.0, 1.0)
    p, z2 = wins / n, z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def win_rate(wins: int, ties: int, losses: int, z: float = 1.96) -> dict:
    """Win rate with ties as half a win, and its Wilson interval.

    rate = (wins + ties/2) / n with n = wins + ties + losses (the Chatbot Arena / AlpacaEval
    convention). The interval is Wilson on the *effective* wins `wins + ties/2` out of n. A tie
    (score 0.5) varies less than a coin flip, so with ties this interval is slightly
    conservative (too wide), never too narrow. n = 0 gives rate/lo/hi None.
    """
    n = wins + ties + losses
    out = {"rate": None, "lo": None, "hi": None, "n": n,
           "wins": wins, "ties": ties, "losses": losses}
    if n > 0:
        effective = wins + 0.5 * ties
        out["rate"] = effective / n
        out["lo"], out["hi"] = wilson_interval(effective, n, z)
    return out


def pairwise_outcomes(tiers: list[list], version_of: dict) -> list[tuple]:
    """Every cross-version pair of responses in one ranking -> (version_a, version_b, score).

    Oriented so that version_a < version_b (stable aggregation); score 1.0 = a's response ranked
    better, 0.5 = same tier, 0.0 = b's better. Same-version pairs and ids missing from
    `version_of` are ignored. Note that the pairs of one ranking are not independent.
    """
    placed = [(rid, rank) for rank, tier in enumerate(tiers) for rid in tier if rid in version_of]
    outcomes = []
    for (x, rank_x), (y, rank_y) in itertools.combinations(placed, 2):
        vx, vy = version_of[x], version_of[y]
        if vx == vy:
            continue
        score = 0.5 if rank_x == rank_y else (1.0 if rank_x < rank_y else 0.0)
        outcomes.append((vx, vy, score) if vx < vy else (vy, vx, 1.0 - score))
    return outcomes


def ab_win_rates(outcomes: list[tuple], baseline, z: float = 1.96) -> dict:
    """{version: win_rate(...)} of each version against `baseline` (other pairs ignored)."""
    tallies: dict = defaultdict(lambda: [0, 0, 0])  # wins, ties, losses of the version
    for a, b, score in outcomes:
        if (a == baseline) == (b == baseline):
            continue  # not a comparison with the baseline (or baseline vs itself)
        version, score = (b, 1.0 - score) if a == baseline else (a, score)
        tallies[version][0 if score > 0.5 else 1 if score == 0.5 else 2] += 1
    return {v: win_rate(*tallies[v], z=z) for v in sorted(tallies)}


# -- Bradley-Terry leaderboard -----------------------------------------------------
def _win_matrix(outcomes, anchor, prior: float) -> tuple[list, dict]:
    """versions (anchor included) and wins[(i, j)] = score of i over j, ties as halves.

    The prior adds `prior` pseudo-wins and `prior` pseudo-losses of every version against the
    anchor: it keeps an unbeaten (or never beaten) version finite and ties every version to
    the anchor's scale even if it was never compared with it directly.
    """
    versions = sorted({v for a, b, _ in outcomes for v in (a, b)} | {anchor})
    wins: dict = defaultdict(float)
    for a, b, score in outcomes:
        wins[(a, b)] += score
        wins[(b, a)] += 1.0 - score
    for v in versions:
        if v != anchor:
            wins[(v, anchor)] += prior
            wins[(anchor, v)] += prior
    return versions, wins


def bradley_terry_ratings(outcomes: list[tuple], iters: int = 200, anchor=0,
                          prior: float = 0.5, tol: float = 1e-10) -> dict:
    """Bradley-Terry strengths by Hunter's (2004) MM iteration, on an Elo-like scale.

    P(i beats j) = p_i / (p_i + p_j). MM update: p_i <- W_i / sum_j n_ij / (p_i + p_j), with W_i
    the (tie = half) wins of i and n_ij the games between i and j. Returned as
    1000 + 400 log10(p_i / p_anchor), like Chatbot Arena (400 points = 10:1 odds), so the anchor
    (the reference policy) is exactly 1000. `prior` must be > 0 when a version is unbeaten.
    No outcomes -> {}.
    """
    if not outcomes:
        return {}
    versions, wins = _win_matrix(outcomes, anchor, prior)
    total_wins = {i: sum(wins[(i, j)] for j in versions if j != i) for i in versions}
    games = {(i, j): wins[(i, j)] + wins[(j, i)] for i in versions for j in versions if i != j}
    strength = {v: 1.0 for v in versions}
    for _ in range(iters):
        new = {}
        for i in versions:
            denom = sum(games[(i, j)] / (strength[i] + strength[j])
                        for j in versions if j != i and games[(i, j)] > 0)
            new[i] = total_wins[i] / denom if denom > 0 else strength[i]
        scale = new[anchor]
        new = {v: s / scale for v, s in new.items()}
        converged = max(abs(math.log(new[v] / strength[v])) for v in versions) < tol
        strength = new
        if converged:
            break
    return {v: 1000.0 + 400.0 * math.log10(strength[v]) for v in versions}


def bootstrap_ratings(outcomes: list[tuple], rounds: int = 100, seed: int = 0, anchor=0,
                      prior: float = 0.5, iters: int = 200, level: float = 0.95,
                      groups: list | None = None) -> dict:
    """{version: (lo, hi)} percentile intervals of the ratings over resampled outcomes.

    Each round draws as many units as there are, with replacement, and refits; a unit is one
    outcome, or with `groups` (a key per outcome, e.g. its ranking id) all outcomes of one
    group: the pairs of one ranking are not independent, so resampling them one by one would
    make the interval too narrow. A version absent from a resample is not counted in that
    round. The anchor's interval is (1000, 1000).
    """
    if not outcomes:
        return {}
    units: dict = defaultdict(list)
    for i, outcome in enumerate(outcomes):
        units[groups[i] if groups is not None else i].append(outcome)
    units_list = list(units.values())
    rng = random.Random(seed)
    samples: dict = defaultdict(list)
    for _ in range(rounds):
        resample = [o for _ in units_list for o in units_list[rng.randrange(len(units_list))]]
        for v, r in bradley_terry_ratings(resample, iters, anchor, prior).items():
            samples[v].append(r)
    tail = (1.0 - level) / 2
    return {v: (percentile(samples[v], tail), percentile(samples[v], 1 - tail))
            for v in sorted(samples)}


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) with linear interpolation between order statistics."""
    if not values:
        return None
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, frac = int(math.floor(pos)), pos - math.floor(pos)
    return xs[lo] if lo + 1 >= len(xs) else xs[lo] + frac * (xs[lo + 1] - xs[lo])


# -- diversity ----------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return (text or "").lower().split()


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / total n-grams over the whole batch (Li et al. 2016).

    Whitespace tokens, lowercased; n-grams never cross response boundaries. 0.0 when the batch
    has no n-gram at all.
    """
    grams = [tuple(w[i:i + n]) for w in map(_words, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def same_opening_share(texts: list[str], k_words: int = 3) -> float:
    """Share of responses whose first `k_words` words (lowercased) are the most common opening.

    A policy that wins by saying one thing everywhere drives this toward 1.0. Empty -> 0.0.
    """
    if not texts:
        return 0.0
    openings = Counter(tuple(_words(t)[:k_words]) for t in texts)
    return openings.most_common(1)[0][1] / len(texts)


# -- annotator agreement ------------------------------------------------------------
def _rank_of(tiers: list[list]) -> dict:
    return {rid: rank for rank, tier in enumerate(tiers) for rid in tier}


def compare_rankings(tiers_x: list[list], tiers_y: list[list]) -> dict:
    """Agreement of two rankings of the same responses.

    agreement: share of response pairs ordered the same way (or tied by both).
    tau_b: Kendall's tau-b = (C - D) / sqrt((n0 - n1)(n0 - n2)), n1/n2 the pairs tied in x/y;
    None when either ranking ties everything. Only responses present in both count.
    """
    rx, ry = _rank_of(tiers_x), _rank_of(tiers_y)
    common = [rid for rid in rx if rid in ry]
    n0 = same = concordant = discordant = tied_x = tied_y = 0
    for a, b in itertools.combinations(common, 2):
        dx = (rx[a] > rx[b]) - (rx[a] < rx[b])
        dy = (ry[a] > ry[b]) - (ry[a] < ry[b])
        n0 += 1
        same += dx == dy
        tied_x += dx == 0
        tied_y += dy == 0
        concordant += dx * dy > 0
        discordant += dx * dy < 0
    denom = math.sqrt((n0 - tied_x) * (n0 - tied_y))
    return {"agreement": same / n0 if n0 else None, "n_pairs": n0,
            "tau_b": (concordant - discordant) / denom if denom > 0 else None}


def agreement(rankings_by_item: dict) -> dict:
    """Inter-annotator agreement over items ranked by two or more annotators.

    rankings_by_item: {item_id: [tiers, tiers, ...]} (one ranking per annotator). Every pair
    of annotators on an item is one comparison; `pairwise_agreement` and `kendall_tau` are
    means over those comparisons (tau over the comparisons where it is defined).
    """
    agreements, taus, n_items = [], [], 0
    for rankings in rankings_by_item.values():
        if len(rankings) < 2:
            continue
        n_items += 1
        for x, y in itertools.combinations(rankings, 2):
            c = compare_rankings(x, y)
            if c["agreement"] is not None:
                agreements.append(c["agreement"])
            if c["tau_b"] is not None:
                taus.append(c["tau_b"])
    return {"n_items": n_items, "n_comparisons": len(agreements),
            "pairwise_agreement": _mean(agreements), "kendall_tau": _mean(taus)}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# -- reward-model calibration ------------------------------------------------------
def calibration_bins(probs: list[float], outcomes: list[float], bins: int = 5) -> dict:
    """Reliability table of predicted P(chosen wins) vs what happened, and the ECE.

    Equal-width bins on [0, 1]; ece = sum over bins of (n_bin / n) |mean_prob - frac_positive|.
    """
    table = [{"lo": b / bins, "hi": (b + 1) / bins, "n": 0, "sum_p": 0.0, "sum_y": 0.0}
             for b in range(bins)]
    for p, y in zip(probs, outcomes):
        row = table[min(int(p * bins), bins - 1)]
        row["n"] += 1
        row["sum_p"] += p
        row["sum_y"] += y
    n, ece = sum(r["n"] for r in table), 0.0
    for row in table:
        sum_p, sum_y = row.pop("sum_p"), row.pop("sum_y")
        row["mean_prob"] = sum_p / row["n"] if row["n"] else None
        row["frac_positive"] = sum_y / row["n"] if row["n"] else None
        if row["n"]:
            ece += row["n"] / n * abs(row["mean_prob"] - row["frac_positive"])
    return {"bins": table, "n": n, "ece": ece if n else None}
