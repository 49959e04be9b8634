"""Sampling labeling batches: K responses per prompt from a policy version.

Runs in the worker only. Every response records the policy version, the
sampling settings, its token count and why it ended ("stop": the model emitted
a stop token; "length": it hit max_new_tokens). Duplicate responses to one
prompt are re-sampled a few times, then collapsed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch

from rlhf_core import decoding
from rlhf_core.config import SamplingConfig

log = logging.getLogger(__name__)


@dataclass
class Sample:
    text: str
    n_tokens: int  # generated tokens, including the stop token
    finish_reason: str  # "stop" | "length"
    ids: list[int] = field(default_factory=list, repr=False)  # those tokens (stop token kept)


def chat_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """Apply the chat template: each prompt becomes one user turn awaiting the assistant, after
    the tokenizer's system prompt (models.load_tokenizer) when it has one."""
    system = getattr(tokenizer, "rlhf_system_prompt", "")
    return [chat_text(tokenizer, p, system) for p in prompts]


def chat_text(tokenizer, prompt: str, system: str = "") -> str:
    """One prompt in the chat format. A template that refuses a system turn (some do) gets the
    system text as the first paragraph of the user turn instead."""
    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    if not system:
        return render([{"role": "user", "content": prompt}])
    try:
        return render([{"role": "system", "content": system}, {"role": "user", "content": prompt}])
    except Exception:  # jinja's TemplateError ("System role not supported") and the like
        return render([{"role": "user", "content": f"{system}\n\n{prompt}"}])


def chat_ids(tokenizer, prompt: str, max_tokens: int | None = None) -> list[int]:
    """Prompt -> chat-templated ids ending with the assistant header; the one encoding of a
    prompt for sampling, rollouts and reward scoring (last `max_tokens` kept)."""
    (text,) = chat_prompts(tokenizer, [prompt])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_tokens:] if max_tokens else ids


def stop_token_ids(tokenizer, model=None) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(gen_eos)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, n: int, cfg: SamplingConfig,
             seed: int, device=None, progress=None) -> list[list[Sample]]:
    """n samples for each prompt, decoded in chunks of `cfg.batch_size` sequences
    (rlhf_core/decoding.py; one noise stream per sequence, seeded from `seed`)."""
    device = device or next(model.parameters()).device
    stops = stop_token_ids(tokenizer, model)
    dtype = decoding.decode_dtype(cfg.decode_dtype, device)
    encoded = [chat_ids(tokenizer, p) for p in prompts]
    flat = [(i, ids) for i, ids in enumerate(encoded) for _ in range(n)]
    out: list[list[Sample]] = [[] for _ in prompts]
    for start in range(0, len(flat), cfg.batch_size):
        chunk = flat[start:start + cfg.batch_size]
        seeds = [seed * 1_000_003 + start + j for j in range(len(chunk))]
        sampler = decoding.Sampler(seeds, cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                   device=device)
        step_progress = None
        if progress:  # within a chunk too (a first item is one chunk), at most twice a second
            last, size = [time.monotonic()], len(chunk)

            def step_progress(f, start=start, size=size, last=last):
                if time.monotonic() - last[0] >= 0.5:
                    last[0] = time.monotonic()
                    progress(min(1.0, (start + f * size) / len(flat)))
        rows = decoding.decode(model, [q for _, q in chunk], sampler,
                               max_new_tokens=cfg.max_new_tokens, stop_ids=stops,
                               pad_id=tokenizer.pad_token_id, device=device, dtype=dtype,
                               step_progress=step_progress)
        for (i, _), (ids, stopped) in zip(chunk, rows):
            out[i].append(_to_sample(tokenizer, ids, stops))
        if progress:
            progress(min(1.0, (start + len(chunk)) / len(flat)))
    return out


def _to_sample(tokenizer, ids: list[int], stops: list[int]) -> Sample:
    cut, stopped = decoding.cut_after_stop(ids, set(stops))
    text = tokenizer.decode(cut[:-1] if stopped else cut, skip_special_tokens=True).strip()
    return Sample(text, len(cut), "stop" if stopped else "length", list(cut))


def dedupe(samples: list[Sample]) -> tuple[list[Sample], int]:
    """Keep the first of each distinct text (whitespace- and case-insensitive)."""
    seen, kept = set(), []
    for s in samples:
        key = " ".join(s.text.lower().split())
        if key not in seen:
            seen.add(key)
            kept.append(s)
    return kept, len(samples) - len(kept)


def sample_distinct(model, tokenizer, prompts: list[str], *, cfg: SamplingConfig, seed: int,
                    device=None, progress=None) -> list[list[Sample]]:
    """K distinct samples per prompt where possible: duplicates are re-sampled, then collapsed."""
    results = generate(model, tokenizer, prompts, n=cfg.k, cfg=cfg, seed=seed, device=device,
                       progress=progress)
    results = [dedupe(r)[0] for r in results]
    for attempt in range(1, cfg.dedupe_retries + 1):
        short = [i for i, r in enumerate(results) if len(r) < cfg.k]
        if not short:
            break
        more = generate(model, tokenizer, [prompts[i] for i in short], n=cfg.k, cfg=cfg,
                        seed=seed + 7919 * attempt, device=device)
        for i, extra in zip(short, more):
            results[i] = dedupe(results[i] + extra)[0][:cfg.k]
    return results


def settings_record(cfg: SamplingConfig, policy_version: int) -> dict:
    d = asdict(cfg)
    d["policy_version"] = policy_version
    return d
