"""The `sample_batch` job: the current policy writes the next labeling batch.

Steps: pick prompts (read only) -> generate (no transaction open) -> insert the
batch, its items and responses in one transaction -> retire older items if the
loop's rule says so. A share of items (`ab_fraction`) are blind A/B items: half
of their responses come from a baseline version (the reference by default),
shown unmarked in an order unrelated to the version.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import time

from rlhf_core import annotation, jobs
from rlhf_core.config import SamplingConfig
from rlhf_core.sampling import Sample, sample_distinct, settings_record
from rlhf_core.store import Store

log = logging.getLogger(__name__)


def _sampling_config(runtime, params: dict) -> SamplingConfig:
    base = runtime.config.sampling
    overrides = {k: params[k] for k in ("k", "max_new_tokens", "temperature", "top_p", "top_k",
                                        "prompts_per_batch", "seed") if k in params}
    return dataclasses.replace(base, **overrides)  # validates like any SamplingConfig


def baseline_version(store: Store, rule: str, current: int) -> int | None:
    """Which version A/B items compare against: the reference, the previous one, or vN."""
    if current == 0:
        return None  # the reference cannot be compared with itself
    if rule == "reference":
        return 0
    if rule == "previous":
        return max(0, current - 1)
    if rule.startswith("v") and rule[1:].isdigit():
        v = int(rule[1:])
        return v if v < current and store.get_version("policy", v) else 0
    raise ValueError(f"unknown A/B baseline {rule!r}: use reference, previous or vN")


@jobs.handler("sample_batch")
def sample_batch(runtime, params: dict, reporter) -> dict:
    store, cfg = runtime.store, _sampling_config(runtime, params)
    loop = runtime.config.loop
    current = store.current_version("policy")["version"]
    version = int(params.get("policy_version", current))
    seed = cfg.seed + int(time.time()) if params.get("seed") is None else int(params["seed"])
    rows = _choose_prompts(runtime, params, cfg, seed)
    if not rows:
        raise ValueError("no prompts in the workspace: import some with `rlhf import-prompts`")
    ab_fraction = float(params.get("ab_fraction", loop.ab_fraction))
    baseline = baseline_version(store, params.get("ab_baseline", loop.ab_baseline), version)
    eligible = [r for r in rows if r.get("selection") != "uncertainty-candidate"]
    n_ab = min(len(eligible), round(ab_fraction * len(rows))) if baseline is not None else 0
    rng = random.Random(seed)
    ab_ids = {r["id"] for r in rng.sample(eligible, n_ab)} if n_ab else set()
    reporter.progress(0.02, f"sampling {len(rows)} prompts x {cfg.k} from policy v{version}")
    t0 = time.perf_counter()
    with runtime.lock:
        main = _sample(runtime, version, [r for r in rows if r["id"] not in ab_ids], cfg, seed,
                       lambda f: reporter.progress(0.05 + 0.8 * f, "sampling"))
        ab = _sample_ab(runtime, version, baseline, [r for r in rows if r["id"] in ab_ids],
                        cfg, seed + 1, reporter)
        main = _keep_uncertain(runtime, main, rows)
    elapsed = time.perf_counter() - t0
    items = main + ab
    n_responses = sum(len(i["responses"]) for i in items)
    batch_id = annotation.create_batch(
        store, policy_version=version, k=cfg.k, items=items,
        settings=settings_record(cfg, version), job_id=reporter.job_id, overlap=loop.overlap)
    retired = 0
    if loop.retire_rule == "retire":
        retired = annotation.retire_items(store, older_than_policy=version)
    reporter.metrics("sampling", {"responses_per_s": n_responses / max(elapsed, 1e-9),
                                  "responses": n_responses, "seconds": elapsed},
                     version=version)
    return {"batch_id": batch_id, "items": len(items), "responses": n_responses,
            "ab_items": len(ab), "policy_version": version, "seconds": round(elapsed, 2),
            "responses_per_s": round(n_responses / max(elapsed, 1e-9), 3), "retired": retired}


def _choose_prompts(runtime, params, cfg, seed) -> list[dict]:
    if params.get("prompt_ids"):
        ids = [int(i) for i in params["prompt_ids"]]
        marks = ",".join("?" * len(ids))
        rows = runtime.store.rows(f"SELECT id, text, split FROM prompts WHERE id IN ({marks})", ids)
        return [{**r, "selection": "by hand"} for r in rows]
    from rlhf_core.selection import choose_prompts
    return choose_prompts(runtime, cfg.prompts_per_batch, seed=seed)


def _keep_uncertain(runtime, items: list[dict], rows: list[dict]) -> list[dict]:
    from rlhf_core.selection import keep_uncertain
    return keep_uncertain(runtime, items, {r["id"]: r["text"] for r in rows})


def _sample(runtime, version, rows, cfg, seed, progress) -> list[dict]:
    if not rows:
        return []
    with runtime.policy(version) as model:
        results = sample_distinct(model, runtime.tokenizer, [r["text"] for r in rows], cfg=cfg,
                                  seed=seed, device=runtime.device.device, progress=progress)
    return [{"prompt_id": r["id"], "selection": r.get("selection", "random"), "kind": "label",
             "responses": [_resp(s, version) for s in samples]}
            for r, samples in zip(rows, results)]


def _sample_ab(runtime, version, baseline, rows, cfg, seed, reporter) -> list[dict]:
    """Blind A/B items: ceil(K/2) responses from `version`, the rest from `baseline`."""
    if not rows:
        return []
    k_new = (cfg.k + 1) // 2
    k_old = cfg.k - k_new
    # SamplingConfig refuses k < 2: sample at least 2 per side (K=2, 3) and trim below.
    new = _sample(runtime, version, rows, dataclasses.replace(cfg, k=max(2, k_new)), seed, None)
    old = _sample(runtime, baseline, rows, dataclasses.replace(cfg, k=max(2, k_old)), seed + 17, None)
    reporter.progress(0.9, "A/B items sampled")
    items = []
    for a, b in zip(new, old):
        a["kind"], a["selection"] = "ab", f"ab:v{version}-vs-v{baseline}"
        a["responses"] = a["responses"][:k_new] + b["responses"][:k_old]
        items.append(a)
    return items


def _resp(s: Sample, version: int) -> dict:
    return {"text": s.text, "n_tokens": s.n_tokens, "finish_reason": s.finish_reason,
            "policy_version": version}
