"""The reward model: Bradley-Terry on ranked pairs, retrained incrementally, gated, versioned.

The network (a `reward` LoRA adapter + scalar head on the policy's base, or a separate
sequence classifier) and serving a version live in reward_scoring.py; the candidate's steps
(prepare, fit, evaluate, gate, publish) in reward_train.py. This module runs them in order,
keeps the version history and registers the `train_reward` and `score` jobs.

A round reads as a checklist (`train_reward`):
  1. select pairs: new train pairs + replay, held-out prompts, fresh pairs (reward_data)
  2. evaluate the current version on held-out and fresh pairs (before it is replaced)
  3. warm-start a candidate from the current adapter + head (first version: from scratch)
  4. fit: Bradley-Terry (+ soft ties, margin, centering), one step per few whole rankings
  5. evaluate the candidate; the promotion gate compares held-out accuracy
  6. publish atomically (adapter, head, manifest), then the DB row, LAST
Dropout stays off throughout (`eval()`): scores are deterministic and a warm start is exact.
"""
from __future__ import annotations

import logging
import time

from rlhf_core.reward import data as reward_data
from rlhf_core.config import RewardConfig, from_dict, to_dict
from rlhf_core.data.jobs import handler
from rlhf_core.reward.model import CANDIDATE, backbone, load_reward  # noqa: F401 (load_reward: the API)
from rlhf_core.reward.train import (_prepare_candidate, evaluate, fit, promotion_gate,
                                    publish_candidate)
from rlhf_core.data.store import Store, now_iso

log = logging.getLogger(__name__)


# -- training ---------------------------------------------------------------------------------
class _Progress:
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
    cfg, store = config or runtime.config.reward, runtime.store
    progress = _Progress(reporter)
    try:
        with runtime.lock:
            return _train_round(runtime, store, cfg, reporter, progress, from_scratch)
    finally:
        progress.close()


def _train_round(runtime, store: Store, cfg: RewardConfig, reporter, progress, from_scratch):
    progress(0.0, "selecting pairs")
    current = store.current_version("reward")
    version = store.next_version_number("reward")
    incremental = current is not None and not from_scratch
    max_trained = int(current["counts"].get("max_pair_id", 0)) if current else 0
    data = reward_data.select_data(
        reward_data.load_pairs(store), max_trained=max_trained, replay_ratio=cfg.replay_ratio,
        soft_ties=cfg.soft_ties, min_pairs=cfg.min_pairs, seed=cfg.seed + version,
        incremental=incremental)
    bb = backbone(runtime)
    before, clock = {}, _Clock()
    if current is not None:
        progress(0.05, f"evaluating the current version v{current['version']}")
        serving = load_reward(runtime)
        before = evaluate(bb, serving.adapter_name, serving.head, data, cfg)
    clock.lap("eval_current_seconds")
    head = _prepare_candidate(runtime, bb, current if incremental else None, cfg, version)
    try:
        fit_stats = fit(bb, head, data.train, cfg, seed=cfg.seed + version, progress=progress,
                        reporter=reporter, version=version)
        clock.lap("prepare_and_fit_seconds")
        progress(0.85, "evaluating the candidate")
        after = evaluate(bb, CANDIDATE, head, data, cfg)
        clock.lap("eval_candidate_seconds")
        status, reason = promotion_gate(after, before, current, cfg.promote_tolerance)
        metrics = {**_flat(after, ""), **_flat(before, "current_"), **fit_stats, **clock.laps}
        progress(0.95, f"publishing v{version} ({status})")
        manifest = {"kind": "reward", "version": version, "status": status, "reason": reason,
                    "parent": current["version"] if incremental else None,
                    "base_model": bb.source, "shares_base": bb.shares_base,
                    "config": to_dict(cfg), "lora": to_dict(runtime.config.lora),
                    "counts": data.counts, "metrics": metrics, "created_at": now_iso()}
        path = publish_candidate(runtime, bb, head, version, manifest)
    finally:
        if CANDIDATE in bb.model.peft_config:
            bb.model.delete_adapter(CANDIDATE)
    store.add_version("reward", version, status=status, path=str(path), reason=reason,
                      parent=manifest["parent"], base_model=bb.source, config=to_dict(cfg),
                      metrics=metrics, counts=data.counts,
                      job_id=getattr(reporter, "job_id", None))
    if reporter is not None:
        reporter.metrics("reward", metrics, version=version)
    if status == "promoted":
        load_reward(runtime)  # serve it now (and prove the published copy loads)
    progress(1.0, f"reward v{version} {status}")
    return {"version": version, "status": status, "reason": reason, "metrics": metrics,
            "counts": data.counts, "path": str(path)}


class _Clock:
    def __init__(self):
        self.laps, self._t = {}, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self._t = now - self._t, now


def _flat(groups: dict, prefix: str) -> dict:
    return {f"{prefix}{g}_{k}": v for g, vals in groups.items() for k, v in vals.items()}


# -- history, jobs --------------------------------------------------------------------------------
def reward_history(store: Store) -> list[dict]:
    """Per version, oldest first: what the UI's accuracy-history table shows."""
    out = []
    for v in store.list_versions("reward"):
        m, c = v["metrics"], v["counts"]
        out.append({
            "version": v["version"], "status": v["status"], "reason": v["reason"],
            "created_at": v["created_at"], "parent": v["parent"],
            "heldout_accuracy": m.get("heldout_accuracy"), "heldout_loss": m.get("heldout_loss"),
            "fresh_accuracy": m.get("fresh_accuracy"),
            "fresh_accuracy_before": m.get("current_fresh_accuracy"),  # the serving version's
            "mean_p_chosen": m.get("heldout_mean_p_chosen"),
            "observed_p_chosen": m.get("heldout_observed_p_chosen"),
            "ece": m.get("heldout_ece"),
            "train_pairs": c.get("train_pairs"), "new_pairs": c.get("new_pairs"),
            "heldout_pairs": c.get("heldout_pairs"), "fresh_pairs": c.get("fresh_pairs"),
        })
    return out


def reward_config(base: RewardConfig, params: dict) -> RewardConfig:
    """`base` with a job's overrides (top-level keys or a "config" dict) applied."""
    overrides = {**{k: v for k, v in params.items() if k in RewardConfig.__dataclass_fields__},
                 **(params.get("config") or {})}
    return from_dict(RewardConfig, {**to_dict(base), **overrides})


@handler("train_reward")
def train_reward_job(runtime, params: dict, reporter) -> dict:
    cfg = reward_config(runtime.config.reward, params or {})
    return train_reward(runtime, reporter=reporter, config=cfg,
                        from_scratch=bool((params or {}).get("from_scratch")))


@handler("score")
def score_job(runtime, params: dict, reporter) -> dict:
    """Score texts ({"prompts", "responses"}) or stored responses ({"response_ids"} or
    {"item_ids"}: then also each item's agreement with its latest active ranking)."""
    scorer = load_reward(runtime, params.get("version"))
    store, out = runtime.store, {"version": scorer.version}
    if params.get("item_ids") or params.get("response_ids"):
        rows = _stored_responses(store, params)
        scores = scorer.score_texts([r["prompt"] for r in rows], [r["text"] for r in rows])
        by_id = {r["id"]: s for r, s in zip(rows, scores)}
        out.update(response_ids=[r["id"] for r in rows], scores=scores)
        if params.get("item_ids"):
            out["items"] = [_agreement(store, int(i), by_id) for i in params["item_ids"]]
    else:
        out["scores"] = scorer.score_texts(list(params.get("prompts", [])),
                                           list(params.get("responses", [])))
    reporter.progress(1.0, f"scored {len(out['scores'])} responses with reward v{scorer.version}")
    return out


def _stored_responses(store: Store, params: dict) -> list[dict]:
    sql = ("SELECT r.id, r.item_id, r.text, p.text AS prompt FROM responses r "
           "JOIN prompts p ON p.id = r.prompt_id WHERE ")
    if params.get("item_ids"):
        ids = [int(i) for i in params["item_ids"]]
        sql += f"r.item_id IN ({','.join('?' * len(ids))}) ORDER BY r.item_id, r.position"
    else:
        ids = [int(i) for i in params["response_ids"]]
        sql += f"r.id IN ({','.join('?' * len(ids))}) ORDER BY r.id"
    return store.rows(sql, ids)


def _agreement(store: Store, item_id: int, scores: dict[int, float]) -> dict:
    pairs = store.rows("SELECT chosen_id, rejected_id FROM active_pairs p JOIN rankings r "
                       "ON r.id = p.ranking_id WHERE r.item_id = ? AND p.label = 1.0", [item_id])
    agree = sum(scores.get(p["chosen_id"], 0) > scores.get(p["rejected_id"], 0) for p in pairs)
    return {"item_id": item_id, "pairs": len(pairs),
            "agreement": agree / len(pairs) if pairs else None}
