"""`eval_policy`: paired samples from a policy and a baseline on held-out prompts.

An oracle (or a person) then compares sample i of the policy with sample i of
the baseline for each prompt. Held-out prompts are the reward model's held-out
split, never used for reward training or PPO rollouts. Both versions sample
with the same settings and seeds, so the only difference is the weights.

With the samples comes the judged version's KL from the reference (`kl`): what a
comparison of algorithms "at bounded KL" needs of the version it judges (a policy
round's own `kl` metric is measured on its rollouts, before its update: the KL of
the version it started from).
"""
from __future__ import annotations

import time

import torch

from rlhf_core import models
from rlhf_core.advantages import kl_estimate
from rlhf_core.config import SamplingConfig
from rlhf_core.policy.rollout import build_rollout, policy_logprobs
from rlhf_core.sampling import Sample, chat_ids, generate

EVAL_CACHE_ENTRIES = 4  # (version, prompts, settings) sample sets a worker keeps


def eval_policy(runtime, cfg: SamplingConfig, *, reporter, policy_version: int | None = None,
                baseline: int = 0, samples_per_prompt: int = 2, seed: int = 1234,
                max_prompts: int | None = None) -> dict:
    data = runtime.data
    current = data.current_version("policy")["version"]
    version = int(current if policy_version is None else policy_version)
    n = samples_per_prompt
    prompts = data.prompts_of_split("heldout", max_prompts)
    if not prompts:
        raise ValueError("no held-out prompts: import more prompts (about 20% go to held-out)")
    texts = [p["text"] for p in prompts]
    out, t0 = {}, time.perf_counter()
    # A version's samples on these prompts with these settings and seeds are fixed (versions
    # never change once published): the reference, judged every round, is sampled once.
    cache = runtime.eval_samples_cache
    settings = (tuple(p["id"] for p in prompts), n, seed, cfg, runtime.config.system_prompt)
    with runtime.lock:
        for j, v in enumerate((version, baseline)):
            key = (v, *settings)
            if key in cache:
                out[v] = cache[key]
                continue

            def progress(f, j=j):
                reporter.progress(0.5 * (j + f), f"sampling v{v} on {len(texts)} held-out prompts")
            with runtime.policy(v) as model:
                out[v] = generate(model, runtime.tokenizer, texts, n=n, cfg=cfg, seed=seed,
                                  device=runtime.device.device, progress=progress)
            cache[key] = out[v]
            while len(cache) > EVAL_CACHE_ENTRIES:
                cache.pop(next(iter(cache)))
        kl_key = (version, *settings)
        if kl_key not in runtime.eval_kl_cache:
            reporter.progress(0.99, f"KL of v{version} from the reference")
            runtime.eval_kl_cache[kl_key] = kl_from_reference(runtime, version, texts,
                                                              out[version], cfg)
        kl = runtime.eval_kl_cache[kl_key]
    samples = [{"prompt_id": p["id"], "prompt": p["text"], "i": i,
                "policy": out[version][k][i].text, "policy_tokens": out[version][k][i].n_tokens,
                "policy_finish": out[version][k][i].finish_reason,
                "baseline": out[baseline][k][i].text, "baseline_tokens": out[baseline][k][i].n_tokens}
               for k, p in enumerate(prompts) for i in range(n)]
    return {"policy_version": version, "baseline": baseline, "samples": samples, "kl": kl,
            "seconds": round(time.perf_counter() - t0, 2)}


@torch.no_grad()
def kl_from_reference(runtime, version: int, prompts: list[str],
                      samples: list[list[Sample]], cfg: SamplingConfig) -> float:
    """Policy `version`'s KL from the reference per sequence, estimated on its own samples:
    the mean over samples of sum_t [log p_v(y_t) - log p_ref(y_t)] at the sampling
    temperature (k1: unbiased for samples drawn from p_v). 0.0 for v0.

    Forwards in the training precision (`models.autocast`: bf16 where native). On the
    `language:en` simulate's judged versions (110 samples of 64 tokens) bf16 read 7.552 and
    4.129 where float32 forwards read 7.546 and 4.113, in 24 s instead of 41 s: a tenth of a
    5-round run's time spent on a measurement, for a difference far inside its sampling noise."""
    if version == 0:
        return 0.0
    rows = [(p, s) for p, per in zip(prompts, samples) for s in per if s.ids]
    total = 0.0
    device = runtime.device.device
    with runtime.policy(version) as model, models.autocast(runtime.device):
        for start in range(0, len(rows), cfg.batch_size):
            chunk = rows[start:start + cfg.batch_size]
            batch = build_rollout(runtime.tokenizer, [p for p, _ in chunk],
                                  [chat_ids(runtime.tokenizer, p) for p, _ in chunk],
                                  [s.ids for _, s in chunk],
                                  [s.finish_reason == "stop" for _, s in chunk], device)
            logp, _ = policy_logprobs(model, batch, cfg.temperature)
            with runtime.reference():
                ref, _ = policy_logprobs(model, batch, cfg.temperature)
            total += (kl_estimate(logp.float(), ref.float(), "k1") * batch.mask).sum().item()
    return total / max(1, len(rows))
