"""Active selection: which prompts go into the next labeling batch.

`random` (the baseline): the least-labeled prompts, random among equals.
`uncertainty`: a `random_share` of the batch is still picked at random; for the
rest, twice as many candidate prompts are sampled and the reward model keeps
those whose top two responses it can tell apart least (smallest score gap):
the labels it learns most from. Each item records the rule that chose it
(`items.selection`), shown to researchers. The extra candidates cost sampling
time: an uncertainty batch samples (1 + (1 - random_share)) times the responses.
"""
from __future__ import annotations

import logging

from rlhf_core.config import LoopConfig

log = logging.getLogger(__name__)
CANDIDATE = "uncertainty-candidate"


def choose_prompts(runtime, loop: LoopConfig, n: int, *, seed: int) -> list[dict]:
    """Rows of prompts for the next batch, each with its `selection` rule."""
    data = runtime.data
    if loop.selection != "uncertainty" or data.current_version("reward") is None:
        rows = data.least_labeled_prompts(n, seed=seed)
        for r in rows:
            r["selection"] = "random"
        return rows
    n_random = round(loop.random_share * n)
    n_uncertain = n - n_random
    rows = data.least_labeled_prompts(n_random + 2 * n_uncertain, seed=seed)
    for i, r in enumerate(rows):
        r["selection"] = "random" if i < n_random else CANDIDATE
    return rows


def score_gap(scores: list[float]) -> float:
    """Gap between the two best scores: small = the reward model is unsure which wins."""
    if len(scores) < 2:
        return float("inf")
    top = sorted(scores, reverse=True)
    return top[0] - top[1]


def keep_uncertain(runtime, items: list[dict], prompts: dict[int, str]) -> list[dict]:
    """Score candidate items' responses and keep the half with the smallest top-2 gap."""
    candidates = [it for it in items if it.get("selection") == CANDIDATE]
    if not candidates:
        return items
    from rlhf_core.reward.model import load_reward  # torch: loaded only when needed
    scorer = load_reward(runtime)
    texts = [(prompts[it["prompt_id"]], r["text"]) for it in candidates for r in it["responses"]]
    scores = scorer.score_texts([p for p, _ in texts], [r for _, r in texts])
    pos = 0
    for it in candidates:
        k = len(it["responses"])
        it["gap"] = score_gap(scores[pos:pos + k])
        pos += k
    keep = sorted(candidates, key=lambda it: it["gap"])[:max(1, len(candidates) // 2)]
    for it in keep:
        it["selection"] = f"uncertainty (reward v{scorer.version} gap {it['gap']:.3f})"
    kept = {id(it) for it in keep}
    return [it for it in items if it.get("selection") != CANDIDATE or id(it) in kept]
