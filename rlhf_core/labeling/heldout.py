"""The `eval_policy` job: paired samples from a policy and a baseline on held-out prompts.

An oracle (or a person) then compares sample i of the policy with sample i of
the baseline for each prompt. Held-out prompts are the reward model's held-out
split, never used for reward training or PPO rollouts. Both versions sample
with the same settings and seeds, so the only difference is the weights.
"""
from __future__ import annotations

import time
from dataclasses import replace

from rlhf_core.data import jobs
from rlhf_core.sampling import generate


def heldout_prompts(store, limit: int | None = None) -> list[dict]:
    rows = store.rows("SELECT id, text FROM prompts WHERE split = 'heldout' ORDER BY id")
    return rows[:limit] if limit else rows


@jobs.handler("eval_policy")
def eval_policy(runtime, params: dict, reporter) -> dict:
    store = runtime.store
    current = store.current_version("policy")["version"]
    version = int(params.get("policy_version", current))
    baseline = int(params.get("baseline", 0))
    n = int(params.get("samples_per_prompt", 2))
    seed = int(params.get("seed", 1234))
    prompts = heldout_prompts(store, params.get("max_prompts"))
    if not prompts:
        raise ValueError("no held-out prompts: import more prompts (about 20% go to held-out)")
    cfg = replace(runtime.config.sampling, temperature=float(
        params.get("temperature", runtime.config.sampling.temperature)))
    texts = [p["text"] for p in prompts]
    out, t0 = {}, time.perf_counter()
    with runtime.lock:
        for j, v in enumerate((version, baseline)):
            def progress(f, j=j):
                reporter.progress(0.5 * (j + f), f"sampling v{v} on {len(texts)} held-out prompts")
            with runtime.policy(v) as model:
                out[v] = generate(model, runtime.tokenizer, texts, n=n, cfg=cfg, seed=seed,
                                  device=runtime.device.device, progress=progress)
    samples = [{"prompt_id": p["id"], "prompt": p["text"], "i": i,
                "policy": out[version][k][i].text, "policy_tokens": out[version][k][i].n_tokens,
                "policy_finish": out[version][k][i].finish_reason,
                "baseline": out[baseline][k][i].text, "baseline_tokens": out[baseline][k][i].n_tokens}
               for k, p in enumerate(prompts) for i in range(n)]
    return {"policy_version": version, "baseline": baseline, "samples": samples,
            "seconds": round(time.perf_counter() - t0, 2)}
