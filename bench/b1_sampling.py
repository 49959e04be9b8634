"""B1 sampling: our labeling-batch sampler vs a plain `model.generate` loop, same prompts/settings.

Ours = `rlhf_core.sampling.sample_distinct` on the worker's PeftModel, exactly as the
`sample_batch` job calls it: policy v0 (the base, adapters disabled) and a LoRA policy adapter
(un-merged, what every batch after the first PPO round uses). Peer = a plain transformers
`AutoModelForCausalLM.generate(num_return_sequences=K)` loop over the same prompts, same
temperature / top-p / max_new_tokens / sequences per call. Sides are interleaved round by round
in one process; the ratio is the median of per-round ratios.

Also: decoding tokens/s at batch sizes 1, 4, 16, 32 (64 forced new tokens), and the
memory-bandwidth bound of batch-1 decoding: every generated token reads all weights once, so
tokens/s <= copy bandwidth / weight bytes.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from bench import common

PROMPTS = common.PROMPTS


def load(dev):
    """Our PeftModel (one `policy` adapter, as Runtime builds it) and a plain peer model."""
    from rlhf_core import models
    from rlhf_core.config import LoraSettings
    src = common.embedded_model_dir()
    tok = models.load_tokenizer(src)
    ours = models.with_adapters(models.load_causal_lm(src, tok, dtype=dev.dtype, device=dev.device),
                                LoraSettings(), ["policy"])
    ours.eval()
    # a trained-looking adapter: B != 0, so the LoRA path really computes (not skipped)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 1e-3)
    from transformers import AutoModelForCausalLM
    peer = AutoModelForCausalLM.from_pretrained(src, dtype=dev.dtype).to(dev.device).eval()
    if len(tok) > peer.get_input_embeddings().num_embeddings:
        peer.resize_token_embeddings(len(tok))
    return tok, ours, peer


def ours_batch(model, tok, prompts, cfg, seed, *, adapter: bool, dev):
    from rlhf_core.sampling import sample_distinct
    if adapter:
        model.set_adapter("policy")
        return sample_distinct(model, tok, prompts, cfg=cfg, seed=seed, device=dev.device)
    with model.disable_adapter():  # Runtime.policy(0) -> reference()
        return sample_distinct(model, tok, prompts, cfg=cfg, seed=seed, device=dev.device)


@torch.no_grad()
def peer_batch(model, tok, prompts, cfg, seed, dev):
    """The plain loop a user would write: chat template, generate K per prompt, decode.
    Same rows per call and the same seed per call as our sampler, so with the same weights
    both draw the same responses (checked in `responses_per_s`): the ratio is pure overhead."""
    per_call = max(1, cfg.batch_size // cfg.k)  # same sequences per generate() call
    out = []
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start:start + per_call]
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True) for p in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev.device)
        torch.manual_seed(seed + start * cfg.k)  # our sampler's seed for the same rows
        gen = model.generate(**enc, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                             top_k=cfg.top_k,  # 0 = off; left out, transformers would use 50
                             max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.k,
                             pad_token_id=tok.pad_token_id)
        dec = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out += [dec[i * cfg.k:(i + 1) * cfg.k] for i in range(len(chunk))]
    return out


def sync(dev):
    if dev.device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev):
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t0


def responses_per_s(model_ours, peer, tok, cfg, prompts, rounds, dev) -> dict:
    rows = {"ours_v0": [], "ours_lora": [], "peer": []}
    counts = {k: 0 for k in rows}
    same, compared = 0, 0
    for r in range(rounds):
        seed = 1000 + r
        order = ["peer", "ours_v0", "ours_lora"] if r % 2 == 0 else ["ours_lora", "ours_v0", "peer"]
        texts = {}
        for side in order:
            if side == "peer":
                out, s = timed(lambda: peer_batch(peer, tok, prompts, cfg, seed, dev), dev)
                texts[side] = [[t.strip() for t in x] for x in out]
            else:
                out, s = timed(lambda: ours_batch(model_ours, tok, prompts, cfg, seed,
                                                  adapter=side == "ours_lora", dev=dev), dev)
                texts[side] = [[x.text for x in xs] for xs in out]
            n = sum(len(x) for x in out)
            counts[side] += n
            rows[side].append(n / s)
        # same weights, rows and seeds: the base model's draws should be the same responses
        same += sum(a == b for a, b in zip(texts["ours_v0"], texts["peer"]))
        compared += len(prompts)
    res = {k: round(common.median(v), 3) for k, v in rows.items()}
    res["ratio_v0"] = round(common.median([a / b for a, b in zip(rows["ours_v0"], rows["peer"])]), 3)
    res["ratio_lora"] = round(common.median([a / b for a, b in zip(rows["ours_lora"],
                                                                     rows["peer"])]), 3)
    res["rounds"], res["responses"] = rounds, counts
    res["v0_identical_draws"] = round(same / compared, 3)  # share of prompts, all K equal
    return res


@torch.no_grad()
def tokens_per_s(model, tok, batch_sizes, new_tokens, reps, dev) -> dict:
    """Forced-length decoding (min_new_tokens = max_new_tokens), best of `reps` per batch size.
    Our PeftModel decodes with its `policy` adapter active; a plain model as it is."""
    out = {}
    if getattr(model, "peft_config", None):  # a PeftModel (a plain model has no adapters)
        model.set_adapter("policy")
    for b in batch_sizes:
        texts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                         tokenize=False, add_generation_prompt=True)
                 for i in range(b)]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev.device)
        rates = []
        for _ in range(reps):
            _, s = timed(lambda: model.generate(**enc, do_sample=True, max_new_tokens=new_tokens,
                                                min_new_tokens=new_tokens,
                                                pad_token_id=tok.pad_token_id), dev)
            rates.append(b * new_tokens / s)
        out[str(b)] = round(max(rates), 1)  # best of reps: least disturbed by neighbours
    return out


def copy_bandwidth(dev, mb: int = 512, reps: int = 5) -> float:
    """GB/s of a large tensor copy, counting read + write bytes (what a weight stream can get)."""
    n = mb * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=dev.device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        _, s = timed(lambda: dst.copy_(src), dev)
        best = min(best, s)
    return 2 * src.numel() * 4 / best / 1e9


def weight_bytes(model) -> int:
    """Bytes read per decoded token at batch 1: every parameter once (tied tensors once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def run(quick: bool = False) -> dict:
    from rlhf_core.config import SamplingConfig
    threads = common.set_threads()
    dev = common.device_settings()
    tok, ours, peer = load(dev)
    cfg = SamplingConfig(k=4, max_new_tokens=64)
    prompts = PROMPTS[:4 if quick else 8]
    ours_batch(ours, tok, prompts[:1], dataclasses.replace(cfg, max_new_tokens=4), 0,
               adapter=False, dev=dev)  # warm-up
    peer_batch(peer, tok, prompts[:1], dataclasses.replace(cfg, max_new_tokens=4), 0, dev)
    rps = responses_per_s(ours, peer, tok, cfg, prompts, 2 if quick else 4, dev)
    batch_sizes = [1, 4, 16, 32]
    tps = tokens_per_s(ours, tok, batch_sizes, 64 if not quick else 32, 1 if quick else 2, dev)
    tps_base = tokens_per_s(peer, tok, [1], 64 if not quick else 32, 1 if quick else 2, dev)
    bw = copy_bandwidth(dev)
    wbytes = weight_bytes(peer)
    bound = bw * 1e9 / wbytes
    del ours, peer
    return {
        "bench": "B1 sampling", "device": str(dev.device), "dtype": str(dev.dtype),
        "threads": threads, "settings": {"k": cfg.k, "max_new_tokens": cfg.max_new_tokens,
                                         "temperature": cfg.temperature, "top_p": cfg.top_p,
                                         "sequences_per_call": cfg.batch_size,
                                         "prompts": len(prompts)},
        "responses_per_s": rps,
        "ratio": rps["ratio_v0"], "ratio_lora": rps["ratio_lora"],
        "tokens_per_s": tps, "tokens_per_s_plain_batch1": tps_base["1"],
        "copy_bandwidth_gb_s": round(bw, 2), "weight_bytes": wbytes,
        "batch1_bound_tokens_per_s": round(bound, 1),
        "batch1_fraction_of_bound": round(tps["1"] / bound, 3),
        "batch1_plain_fraction_of_bound": round(tps_base["1"] / bound, 3),
        "goal": "ours >= 0.95x peer responses/s",
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    res = run(args.quick)
    common.write_result("b1_sampling", res)
    print({k: res[k] for k in ("ratio", "ratio_lora", "tokens_per_s", "batch1_bound_tokens_per_s",
                               "batch1_fraction_of_bound")})
    return res


if __name__ == "__main__":
    main()
