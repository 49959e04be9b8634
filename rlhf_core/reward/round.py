"""The reward model: Bradley-Terry on ranked pairs, retrained incrementally, gated, versioned.

The network (a `reward` LoRA adapter + scalar head on the policy's base, or a separate
sequence classifier) and serving a version live in reward_scoring.py; the candidate's steps
(prepare, fit, evaluate, gate, publish) in reward_train.py. This module runs them in order,
keeps the version history, and scores stored responses for the researcher view.

A round reads as a checklist (`train_reward`):
  1. select pairs: new train pairs + replay, held-out prompts, fresh pairs (reward_data)
  2. evaluate the current version on held-out and fresh pairs (before it is replaced)
  3. warm-start a candidate from the current adapter + head (first version: from scratch)
  4. fit: Bradley-Terry (+ soft ties, margin, centering), one step per few whole rankings
  5. evaluate the candidate; the promotion gate wants enough held-out pairs, then
     accuracy above chance (first version) or not worse than the current's
  6. publish atomically (adapter, head, manifest), then the DB row, LAST
Dropout stays off throughout (`eval()`): scores are deterministic and a warm start is exact.
"""
from __future__ import annotations

import logging
import time

from rlhf_core.config import RewardConfig, to_dict
from rlhf_core.data.store import now_iso
from rlhf_core.reward import data as reward_data
from rlhf_core.reward.model import CANDIDATE, backbone, load_reward
from rlhf_core.reward.train import (
    evaluate,
    fit,
    keep_cached_versions,
    prepare_candidate,
    promotion_gate,
    publish_candidate,
)

log = logging.getLogger(__name__)


# -- training ---------------------------------------------------------------------------------
class Progress:
    """reporter.progress when run as a job, a tqdm bar on a terminal otherwise."""

    def __init__(self, reporter):
        self.reporter, self.bar = reporter, None
        if reporter is None:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=100, desc="reward", disable=None, leave=False)

    def __call__(self, fraction: float, message: str) -> None:
        if self.reporter is not None:
            self.reporter.progress(fraction, message)
        elif self.bar is not None:
            self.bar.n = int(100 * fraction)
            self.bar.set_postfix_str(message, refresh=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def train_reward(runtime, *, reporter=None, config: RewardConfig | None = None,
                 from_scratch: bool = False) -> dict:
    """Train, evaluate, gate and publish the next reward version.

    Returns {"version", "status": "promoted"|"rejected", "reason", "metrics", "counts", "path"}.
    Raises RewardDataError (too few pairs, all ties, nothing new) before touching any model.
    """
    cfg = config or runtime.config.reward
    progress = Progress(reporter)
    try:
        with runtime.lock:
            return _train_round(runtime, runtime.data, cfg, reporter, progress, from_scratch)
    finally:
        progress.close()


def _train_round(runtime, data, cfg: RewardConfig, reporter, progress, from_scratch):
    progress(0.0, "selecting pairs")
    current = data.current_version("reward")
    version = data.next_version_number("reward")
    incremental = current is not None and not from_scratch
    max_trained = int(current["counts"].get("max_pair_id", 0)) if current else 0
    pairs = reward_data.select_data(
        reward_data.load_pairs(data.training_pairs()), max_trained=max_trained, replay_ratio=cfg.replay_ratio,
        soft_ties=cfg.soft_ties, min_pairs=cfg.min_pairs, seed=cfg.seed + version,
        incremental=incremental)
    bb = backbone(runtime)
    # scores of the serving version and the candidate, kept for the next round's evaluation
    cache = runtime.reward_score_cache
    keep_cached_versions(cache, {current["version"]} if current else set())
    before, clock = {}, Clock()
    if current is not None:
        progress(0.05, f"evaluating the current version v{current['version']}")
        serving = load_reward(runtime)
        before = evaluate(bb, serving.adapter_name, serving.head, pairs, cfg,
                          version=serving.version, cache=cache)
    clock.lap("eval_current_seconds")
    head = prepare_candidate(runtime, bb, current if incremental else None, cfg, version)
    try:
        fit_stats = fit(bb, head, pairs.train, cfg, seed=cfg.seed + version, progress=progress,
                        reporter=reporter, version=version)
        clock.lap("prepare_and_fit_seconds")
        progress(0.85, "evaluating the candidate")
        after = evaluate(bb, CANDIDATE, head, pairs, cfg, version=version, cache=cache)
        clock.lap("eval_candidate_seconds")
        status, reason = promotion_gate(after, before, current, cfg)
        settings = to_dict(cfg) | {"mixed_precision": runtime.device.mixed_precision}
        metrics = {**_flat(after, ""), **_flat(before, "current_"), **fit_stats, **clock.laps}
        progress(0.95, f"publishing v{version} ({status})")
        manifest = {"kind": "reward", "version": version, "status": status, "reason": reason,
                    "parent": current["version"] if incremental else None,
                    "base_model": bb.source, "shares_base": bb.shares_base,
                    "config": settings, "lora": to_dict(runtime.config.lora),
                    "counts": pairs.counts, "metrics": metrics, "created_at": now_iso()}
        path = publish_candidate(runtime, bb, head, version, manifest)
    finally:
        if CANDIDATE in bb.model.peft_config:
            bb.model.delete_adapter(CANDIDATE)
    data.add_version("reward", version, status=status, path=str(path), reason=reason,
                      parent=manifest["parent"], base_model=bb.source, config=settings,
                      metrics=metrics, counts=pairs.counts,
                      job_id=getattr(reporter, "job_id", None))
    if reporter is not None:
        reporter.metrics("reward", metrics, version=version)
    if status == "promoted":
        load_reward(runtime)  # serve it now (and prove the published copy loads)
    progress(1.0, f"reward v{version} {status}")
    return {"version": version, "status": status, "reason": reason, "metrics": metrics,
            "counts": pairs.counts, "path": str(path)}


class Clock:
    def __init__(self):
        self.laps, self._t = {}, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self._t = now - self._t, now


def _flat(groups: dict, prefix: str) -> dict:
    return {f"{prefix}{g}_{k}": v for g, vals in groups.items() for k, v in vals.items()}


# -- scores for the researcher view -----------------------------------------------------------
SCORE_LIMIT = 256  # responses per call: a few seconds on the embedded model
SCORE_CHUNK = 32  # responses per score_texts call, one progress report each


def score_items(runtime, *, reporter, version: int | None = None, limit: int | None = None) -> dict:
    """Score ranked responses not yet scored by reward `version` (default: the promoted one),
    newest items first, and store the scores (the researcher view reads them)."""
    data = runtime.data
    scorer = load_reward(runtime, version)
    version = scorer.version
    rows = data.unscored_responses(version, int(limit or SCORE_LIMIT))
    added = 0
    for start in range(0, len(rows), SCORE_CHUNK):
        chunk = rows[start:start + SCORE_CHUNK]
        scores = scorer.score_texts([r["prompt"] for r in chunk], [r["text"] for r in chunk])
        added += data.save_scores(version, {r["id"]: s for r, s in zip(chunk, scores)})
        reporter.progress((start + len(chunk)) / len(rows),
                          f"scored {start + len(chunk)}/{len(rows)} responses with reward "
                          f"v{version}")
    left = data.unscored_count(version)
    reporter.progress(1.0, f"reward v{version}: {added} responses scored, {left} left")
    return {"version": version, "scored": added, "remaining": left}
