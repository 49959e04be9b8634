"""Which preference pairs a reward-model version trains and is judged on (no torch).

- Held-out: pairs on prompts whose stable `split` is 'heldout'; never trained on.
- New: pairs with an id above the `max_pair_id` the current version was trained with;
  a new version trains on the new train-split pairs plus a seeded replay sample of
  older ones (whole rankings, `replay_ratio` old pairs per new pair).
- Fresh: every pair (both splits) added after the current version was trained: the
  early warning that the reward model no longer matches the annotators.
- Steps: all pairs of one ranking share a step (InstructGPT), `rankings_per_step` rankings each.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field


class RewardDataError(ValueError):
    """The pairs cannot train a reward model; the message says what is missing."""


@dataclass(frozen=True)
class PrefPair:
    id: int
    ranking_id: int
    prompt_id: int
    split: str  # 'train' | 'heldout'
    chosen_id: int
    rejected_id: int
    label: float  # 1.0 chosen beats rejected; 0.5 a tie
    tier_gap: int  # how many tiers apart (0 for a tie)
    prompt: str
    chosen: str
    rejected: str

    @property
    def is_tie(self) -> bool:
        return self.label != 1.0


@dataclass
class RewardData:
    train: list[PrefPair]
    heldout: list[PrefPair]
    fresh: list[PrefPair]
    counts: dict = field(default_factory=dict)


def load_pairs(rows: list[dict]) -> list[PrefPair]:
    """PrefPairs from the data layer's training pairs (rows with their ranking's tiers)."""
    out = []
    for row in rows:
        row = dict(row)
        tiers = json.loads(row.pop("tiers") or "[]")
        tier_of = {rid: i for i, tier in enumerate(tiers) for rid in tier}
        gap = abs(tier_of.get(row["rejected_id"], 0) - tier_of.get(row["chosen_id"], 0))
        out.append(PrefPair(tier_gap=gap if row["label"] == 1.0 else 0, **row))
    return out


def select_data(pairs: list[PrefPair], *, max_trained: int, replay_ratio: float,
                soft_ties: bool, min_pairs: int, seed: int, incremental: bool) -> RewardData:
    """Split pairs into train (new + replay), held-out and fresh; raise if training is pointless.

    max_trained: the `max_pair_id` of the current version (0 without one).
    incremental: warm-start from the current version (else all train pairs, from scratch).
    """
    usable = [p for p in pairs if soft_ties or not p.is_tie]
    train_all = [p for p in usable if p.split == "train"]
    heldout = [p for p in usable if p.split == "heldout"]
    fresh = [p for p in usable if p.id > max_trained] if max_trained else []  # none: no version
    new = [p for p in train_all if p.id > max_trained] if incremental else train_all
    replay = (replay_sample([p for p in train_all if p.id <= max_trained], len(new) * replay_ratio,
                            seed) if incremental else [])
    _check_enough(pairs, train_all, new, min_pairs, incremental, max_trained)
    train = sorted(new + replay, key=lambda p: p.id)
    counts = {
        "max_pair_id": max((p.id for p in pairs), default=0),
        "trained_on_after_pair_id": max_trained if incremental else 0,
        "train_pairs": len(train), "train_strict": sum(not p.is_tie for p in train),
        "train_ties": sum(p.is_tie for p in train), "new_pairs": len(new),
        "replay_pairs": len(replay), "train_rankings": len({p.ranking_id for p in train}),
        "heldout_pairs": len(heldout), "heldout_strict": sum(not p.is_tie for p in heldout),
        "fresh_pairs": len(fresh), "fresh_strict": sum(not p.is_tie for p in fresh),
        "all_pairs": len(pairs),
    }
    return RewardData(train=train, heldout=heldout, fresh=fresh, counts=counts)


def _check_enough(pairs, train_all, new, min_pairs: int, incremental: bool, max_trained: int):
    strict_all = [p for p in pairs if not p.is_tie]
    if pairs and not strict_all:
        raise RewardDataError(
            f"all {len(pairs)} preference pairs are ties: a reward model needs at least one "
            "ranking that puts one response above another")
    strict_train = sum(not p.is_tie for p in train_all)
    if strict_train < min_pairs:
        heldout = sum(1 for p in strict_all if p.split == "heldout")
        raise RewardDataError(
            f"too few preference pairs to train a reward model: {strict_train} strict pairs on "
            f"training prompts, at least {min_pairs} needed (RewardConfig.min_pairs); "
            f"{heldout} more are on held-out prompts and are only used for evaluation. "
            "Rank more items.")
    if incremental and not new:
        raise RewardDataError(
            f"no new training pairs since the current reward version (trained on pairs up to "
            f"id {max_trained}): rank more items, or retrain from scratch")


def replay_sample(old: list[PrefPair], n: float, seed: int) -> list[PrefPair]:
    """About `n` old pairs, drawn as whole rankings (seeded), so a ranking is never split."""
    by_ranking = group_by_ranking(old)
    order = sorted(by_ranking)
    random.Random(seed).shuffle(order)
    picked: list[PrefPair] = []
    for ranking_id in order:
        if len(picked) >= n:
            break
        picked.extend(by_ranking[ranking_id])
    return picked


def group_by_ranking(pairs: list[PrefPair]) -> dict[int, list[PrefPair]]:
    groups: dict[int, list[PrefPair]] = {}
    for p in pairs:
        groups.setdefault(p.ranking_id, []).append(p)
    return groups


def ranking_steps(pairs: list[PrefPair], rankings_per_step: int,
                  rng: random.Random) -> list[list[PrefPair]]:
    """One epoch: rankings shuffled, `rankings_per_step` whole rankings per optimizer step."""
    groups = list(group_by_ranking(pairs).values())
    rng.shuffle(groups)
    k = max(1, rankings_per_step)
    return [[p for g in groups[i:i + k] for p in g] for i in range(0, len(groups), k)]


def length_chunks(lengths: list[int], overhead: int) -> list[list[int]]:
    """Rows of one training step -> the forward passes to run them in: indexes sorted by
    length (shortest first), cut into consecutive runs that minimise the tokens computed,
    `rows x longest` per pass (right padding costs as much as real tokens) plus `overhead`
    token-equivalents per pass (its fixed cost: the shared prefix again, one more pass through
    every layer). One pass when padding is cheap; answers of very different lengths split.
    Exact dynamic programme over the cut points (a step holds tens of rows); among equal costs
    the fewest passes."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    sl = [lengths[i] for i in order]
    n = len(sl)
    # best[j]: (cost, passes) of the first j sorted rows; cut[j]: where its last pass starts
    best, cut = [(0, 0)] + [None] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # the last pass holds sorted rows i..j-1; its longest is sl[j-1]
            cost = (best[i][0] + sl[j - 1] * (j - i) + overhead, best[i][1] + 1)
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    chunks, j = [], n
    while j > 0:
        chunks.append(order[cut[j]:j])
        j = cut[j]
    return chunks[::-1]


# -- metrics (plain floats: the scores were computed elsewhere) -----------------------------
def pair_metrics(pairs: list[PrefPair], scores: dict[int, float], *, bins: int = 10) -> dict:
    """Pairwise accuracy, Bradley-Terry loss and calibration of scores on pairs.

    accuracy/loss/ece use strict pairs (a tie has no right answer); `mean_p_chosen` vs
    `observed_p_chosen` uses every pair, a tie observed as 0.5. `ece`: expected calibration
    error of the confidence in the predicted winner, over `bins` equal-width bins.
    """
    strict = [p for p in pairs if not p.is_tie]
    out: dict = {"pairs": len(pairs), "strict_pairs": len(strict)}
    if not pairs:
        return out
    p_chosen = [_sigmoid(scores[p.chosen_id] - scores[p.rejected_id]) for p in pairs]
    out["mean_p_chosen"] = sum(p_chosen) / len(pairs)
    out["observed_p_chosen"] = sum(p.label for p in pairs) / len(pairs)
    if not strict:
        return out
    diffs = [scores[p.chosen_id] - scores[p.rejected_id] for p in strict]
    correct = [d > 0 for d in diffs]
    out["accuracy"] = sum(correct) / len(strict)
    out["loss"] = sum(_softplus(-d) for d in diffs) / len(strict)  # -log sigmoid(d)
    confidence = [max(_sigmoid(d), 1 - _sigmoid(d)) for d in diffs]
    out["mean_confidence"] = sum(confidence) / len(strict)
    ece = 0.0
    for b in range(bins):
        lo, hi = 0.5 + 0.5 * b / bins, 0.5 + 0.5 * (b + 1) / bins
        idx = [i for i, c in enumerate(confidence) if lo <= c < hi or (b == bins - 1 and c == hi)]
        if idx:
            gap = sum(confidence[i] - correct[i] for i in idx) / len(idx)
            ece += len(idx) / len(strict) * abs(gap)
    out["ece"] = ece
    return out


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))
