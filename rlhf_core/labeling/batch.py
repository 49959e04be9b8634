"""`sample_batch`: the current policy writes the next labeling batch.

Steps: pick prompts (read only) -> generate one generate() call's worth of prompts at a
time (no transaction open), appending each part's items to the batch atomically, so the
first item is rankable long before the batch is complete -> retire older items if the
loop's rule says so. A share of items (`ab_fraction`) are blind A/B items: half
of their responses come from a baseline version (the reference by default),
shown unmarked in an order unrelated to the version.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import time

from rlhf_core.config import LoopConfig, SamplingConfig
from rlhf_core.labeling.selection import CANDIDATE, choose_prompts, keep_uncertain
from rlhf_core.sampling import Sample, sample_distinct, settings_record

log = logging.getLogger(__name__)


def baseline_version(data, rule: str, current: int) -> int | None:
    """Which version A/B items compare against: the reference, the previous one, or vN."""
    if current == 0:
        return None  # the reference cannot be compared with itself
    if rule == "reference":
        return 0
    if rule == "previous":
        return max(0, current - 1)
    if rule.startswith("v") and rule[1:].isdigit():
        v = int(rule[1:])
        return v if v < current and data.get_version("policy", v) else 0
    raise ValueError(f"unknown A/B baseline {rule!r}: use reference, previous or vN")


def batch_seed(base: int, job_id: int | None) -> int:
    """A batch's seed when its job names none: from the job's number, so two workspaces with
    the same history sample the same batches (`rlhf simulate --seed` runs compare algorithms
    on the same first batch); the clock only for a batch made outside the job queue."""
    return base * 1_000_003 + (int(job_id) if job_id is not None else int(time.time()))


def sample_batch(runtime, cfg: SamplingConfig, loop: LoopConfig, *, reporter,
                 policy_version: int | None = None, seed: int | None = None,
                 prompt_ids: list[int] | None = None) -> dict:
    data = runtime.data
    current = data.current_version("policy")["version"]
    version = int(current if policy_version is None else policy_version)
    seed = batch_seed(cfg.seed, getattr(reporter, "job_id", None)) if seed is None else int(seed)
    rows = choose_batch_prompts(runtime, loop, cfg.prompts_per_batch, seed, prompt_ids)
    if not rows:
        raise ValueError("no prompts in the workspace: import some with `rlhf import-prompts`")
    baseline = baseline_version(data, loop.ab_baseline, version)
    eligible = [r for r in rows if r.get("selection") != CANDIDATE]
    n_ab = min(len(eligible), round(loop.ab_fraction * len(rows))) if baseline is not None else 0
    rng = random.Random(seed)
    ab_ids = {r["id"] for r in rng.sample(eligible, n_ab)} if n_ab else set()
    reporter.progress(0.02, f"sampling {len(rows)} prompts x {cfg.k} from policy v{version}")
    settings = settings_record(cfg, version)
    out = BatchWriter(data, version, cfg.k, settings, reporter.job_id, loop.overlap)
    plain = [r for r in rows if r["id"] not in ab_ids and r.get("selection") != CANDIDATE]
    candidates = [r for r in rows if r["id"] not in ab_ids and r.get("selection") == CANDIDATE]
    per_call = max(1, cfg.batch_size // cfg.k)  # prompts per generate() call
    # nothing to rank anywhere: the first call samples one prompt alone, so somebody can rank
    # after K responses rather than after batch_size (a new workspace, a new policy's batch)
    first = 1 if per_call > 1 and len(plain) > 1 and data.open_item_count() == 0 else per_call
    t0 = time.perf_counter()
    with runtime.lock:
        # plain items stream in: the first is rankable after one generate() call, not after
        # the whole batch (the loop's ranking -> next item latency, bench B5)
        for start, end in chunk_bounds(len(plain), first, per_call):
            part = plain[start:end]
            out.add(sample_items(runtime, version, part, cfg, seed + start * cfg.k, None))
            reporter.progress(0.05 + 0.8 * end / len(rows), "sampling")
        if candidates:  # uncertainty selection needs every candidate's scores first
            sampled = sample_items(runtime, version, candidates, cfg,
                                   seed + len(plain) * cfg.k, None)
            out.add(keep_uncertain(runtime, sampled, {r["id"]: r["text"] for r in rows}))
        out.add(sample_ab_items(runtime, version, baseline, [r for r in rows if r["id"] in ab_ids],
                           cfg, seed + 1, reporter))
    elapsed = time.perf_counter() - t0
    batch_id = out.batch_id if out.batch_id is not None else out.start()  # an empty batch
    retired = 0
    if loop.retire_rule == "retire":
        retired = data.retire_items(older_than_policy=version)
    reporter.metrics("sampling", {"responses_per_s": out.responses / max(elapsed, 1e-9),
                                  "responses": out.responses, "seconds": elapsed},
                     version=version)
    return {"batch_id": batch_id, "items": out.items, "responses": out.responses,
            "ab_items": out.ab_items, "policy_version": version, "seconds": round(elapsed, 2),
            "responses_per_s": round(out.responses / max(elapsed, 1e-9), 3), "retired": retired}


def chunk_bounds(n: int, first: int, per_call: int) -> list[tuple[int, int]]:
    """[start, end) of each generate() call over n prompts: `first` prompts, then `per_call`."""
    bounds, start = [], 0
    while start < n:
        end = min(n, start + (first if start == 0 else per_call))
        bounds.append((start, end))
        start = end
    return bounds


class BatchWriter:
    """One batch row, created with the job's first items; later items are appended. Each
    append is atomic: a job that fails half way leaves whole, rankable items behind."""

    def __init__(self, data, version, k, settings, job_id, overlap):
        self.data, self.version, self.k, self.settings = data, version, k, settings
        self.job_id, self.overlap = job_id, overlap
        self.batch_id, self.items, self.responses, self.ab_items = None, 0, 0, 0

    def start(self) -> int:
        self.batch_id = self.data.create_batch(
            policy_version=self.version, k=self.k, items=[],
            settings=self.settings, job_id=self.job_id, overlap=self.overlap)
        return self.batch_id

    def add(self, items: list[dict]) -> None:
        if not items:
            return
        if self.batch_id is None:
            self.start()
        written = self.data.add_items(self.batch_id, items,
                                       policy_version=self.version, settings=self.settings,
                                       overlap=self.overlap)
        self.items += len(written)
        self.responses += sum(len(i["responses"]) for i in written)
        self.ab_items += sum(i.get("kind") == "ab" for i in written)


def choose_batch_prompts(runtime, loop: LoopConfig, n: int, seed: int,
                        prompt_ids: list[int] | None) -> list[dict]:
    if prompt_ids:
        rows = runtime.data.prompts_by_ids(prompt_ids)
        return [{**r, "selection": "by hand"} for r in rows]
    return choose_prompts(runtime, loop, n, seed=seed)


def sample_items(runtime, version, rows, cfg, seed, progress) -> list[dict]:
    if not rows:
        return []
    with runtime.policy(version) as model:
        results = sample_distinct(model, runtime.tokenizer, [r["text"] for r in rows], cfg=cfg,
                                  seed=seed, device=runtime.device.device, progress=progress)
    return [{"prompt_id": r["id"], "selection": r.get("selection", "random"), "kind": "label",
             "responses": [response_record(s, version) for s in samples]}
            for r, samples in zip(rows, results)]


def sample_ab_items(runtime, version, baseline, rows, cfg, seed, reporter) -> list[dict]:
    """Blind A/B items: ceil(K/2) responses from `version`, the rest from `baseline`."""
    if not rows:
        return []
    k_new = (cfg.k + 1) // 2
    k_old = cfg.k - k_new
    # SamplingConfig refuses k < 2: sample at least 2 per side (K=2, 3) and trim below.
    new = sample_items(runtime, version, rows, dataclasses.replace(cfg, k=max(2, k_new)), seed,
                       None)
    old = sample_items(runtime, baseline, rows, dataclasses.replace(cfg, k=max(2, k_old)),
                       seed + 17, None)
    reporter.progress(0.9, "A/B items sampled")
    items = []
    for a, b in zip(new, old):
        a["kind"], a["selection"] = "ab", f"ab:v{version}-vs-v{baseline}"
        a["responses"] = a["responses"][:k_new] + b["responses"][:k_old]
        items.append(a)
    return items


def response_record(s: Sample, version: int) -> dict:
    return {"text": s.text, "n_tokens": s.n_tokens, "finish_reason": s.finish_reason,
            "policy_version": version}
