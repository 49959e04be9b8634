"""`sample_arena`: the current policy answers one annotator's own prompt K times.

The arena's worker side (its queue side is rlhf_core.data.arena): the same sampling as a
labeling batch (`sample_items`: distinct samples, one generate() call) for exactly one prompt,
written as one item held for the annotator who asked. No A/B mixing: the annotator asked what
the current policy says.
"""
from __future__ import annotations

import time

from rlhf_core.config import SamplingConfig
from rlhf_core.labeling.batch import sample_items
from rlhf_core.sampling import settings_record


def sample_arena(runtime, cfg: SamplingConfig, *, prompt_id: int, reporter,
                 seed: int | None = None) -> dict:
    data = runtime.data
    version = data.current_version("policy")["version"]
    rows = data.prompts_by_ids([int(prompt_id)])
    if not rows:
        raise ValueError(f"prompt {prompt_id} does not exist")
    rows[0]["selection"] = "arena"
    seed = cfg.seed + int(time.time()) if seed is None else int(seed)
    what = f"sampling {cfg.k} answers from policy v{version}"
    reporter.progress(0.02, what)

    def progress(fraction: float) -> None:  # also the heartbeat a waiting annotator watches
        reporter.progress(0.05 + 0.9 * fraction, what)

    t0 = time.perf_counter()
    with runtime.lock:
        (item,) = sample_items(runtime, version, rows, cfg, seed, progress)
    elapsed = time.perf_counter() - t0
    if len(item["responses"]) < 2:
        raise ValueError(f"all {cfg.k} samples came out the same: nothing to rank (ask again, "
                         "or rephrase the prompt)")
    item_id = data.add_arena_item(reporter.job_id, reporter.worker, item["responses"],
                                  policy_version=version, settings=settings_record(cfg, version))
    return {"item_id": item_id, "responses": len(item["responses"]), "policy_version": version,
            "seconds": round(elapsed, 2)}
