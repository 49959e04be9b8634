"""B1 sampling: our decode loop (rlhf_core/decoding.py) vs `model.generate`, same model and prompts.

- Labeling batches (`responses_per_s`): `rlhf_core.sampling.sample_distinct` on the worker's
  PeftModel, as the `sample_batch` job calls it, for policy v0 (adapters disabled) and a LoRA
  policy, vs a plain transformers `generate(num_return_sequences=K)` loop over the same prompts
  and settings (what our sampler was, 0.999x of it, before the loop). Sides interleaved round
  by round in one process; ratios are medians of per-round ratios; generated tokens counted per
  side (the sides draw different samples of the same distribution).
- Decoding tokens/s at batch sizes 1, 4, 16 (forced length: no stop token), the LoRA policy:
  our loop at the decode dtype "auto" picks here, our loop in float32, and `model.generate` on
  the same PeftModel with the same sampler (the path before the loop). Best of `reps`.
- Bounds: batch-1 decoding reads every weight once per token, so tokens/s <= read bandwidth /
  weight bytes. Read bandwidth = a sum over buffers that rotate through 3x the largest weight
  matrix (no cache reuse), on the worker's threads, best of 5. A VM's bandwidth moves within
  seconds (this one's probe read 48-82 GB/s in consecutive runs), so the batch-1 figure
  (`batch1_vs_bound`) alternates probes and batch-1 decodes round by round: the fraction is
  the best decode's tokens/s over the bound of the *best* probe of those rounds (a slow probe
  cannot flatter it), and each round's decode against its neighbouring probes is kept beside
  it. Also the matmul kernel's own throughput on the LM head (the largest matrix) in the
  decode dtype (the practical ceiling of the Python step), and the native step's product on
  a 170 MB bf16 matrix (`native_read`: the probe must not read slower than the kernel).
- The model is built as the worker's `Runtime` builds it: under bf16 mixed precision on a CPU
  the frozen base's decoder matrices are stored in bf16 (`models.store_frozen_linears`), once
  the fidelity check (which needs the float32 forward as its reference) is done; the bf16
  loop's matrices are the same values either way.
- Fidelity of bfloat16 decoding: the log-prob of each drawn token as the bf16 loop saw it vs a
  float32 forward pass over the same tokens (mean and max |difference|, entropies).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
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
    """The plain loop a user would write: chat template, generate K per prompt, decode; the
    same sequences per generate() call as our sampler."""
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
    tokens = {k: 0 for k in rows}
    for r in range(rounds):
        seed = 1000 + r
        order = ["peer", "ours_v0", "ours_lora"] if r % 2 == 0 else ["ours_lora", "ours_v0", "peer"]
        for side in order:
            if side == "peer":
                out, s = timed(lambda: peer_batch(peer, tok, prompts, cfg, seed, dev), dev)
                n_tok = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for x in out
                            for t in x)
            else:
                out, s = timed(lambda: ours_batch(model_ours, tok, prompts, cfg, seed,
                                                  adapter=side == "ours_lora", dev=dev), dev)
                n_tok = sum(x.n_tokens for xs in out for x in xs)
            n = sum(len(x) for x in out)
            counts[side] += n
            tokens[side] += n_tok
            rows[side].append(n / s)
    res = {k: round(common.median(v), 3) for k, v in rows.items()}
    res["ratio_v0"] = round(common.median([a / b for a, b in zip(rows["ours_v0"], rows["peer"])]), 3)
    res["ratio_lora"] = round(common.median([a / b for a, b in zip(rows["ours_lora"],
                                                                     rows["peer"])]), 3)
    res["rounds"], res["responses"], res["tokens_generated"] = rounds, counts, tokens
    res["per_round"] = {k: [round(x, 3) for x in v] for k, v in rows.items()}
    return res


@torch.no_grad()
def tokens_per_s(model, tok, batch_sizes, new_tokens, reps, dev) -> dict:
    """Forced-length decoding with the LoRA policy active: {path: {batch: tokens/s}}."""
    from rlhf_core import decoding
    from rlhf_core.sampling import chat_ids
    model.set_adapter("policy")
    auto = decoding.decode_dtype("auto", dev.device)
    paths = {f"loop_{str(auto).split('.')[-1]}": auto, "loop_float32": torch.float32,
             "generate": None}
    out = {name: {} for name in paths}
    for b in batch_sizes:
        queries = [chat_ids(tok, PROMPTS[i % len(PROMPTS)]) for i in range(b)]
        for name, dtype in paths.items():
            rates = []
            for rep in range(reps):
                sampler = decoding.Sampler(list(range(b)), 1.0, device=dev.device)
                kw = {"max_new_tokens": new_tokens, "stop_ids": set(),
                      "pad_id": tok.pad_token_id, "device": dev.device}
                if dtype is None:
                    fn = functools.partial(decoding._hf_generate, model, queries, sampler, **kw)
                else:
                    fn = functools.partial(decoding._loop, model, queries, sampler, dtype=dtype,
                                           **kw)
                _, s = timed(fn, dev)
                rates.append(b * new_tokens / s)
            out[name][str(b)] = round(max(rates), 1)  # best of reps: least disturbed
    return out


def read_bandwidth(dev, matrix_bytes: int, reps: int = 5) -> float:
    """GB/s of summing buffers that rotate through 3 x the largest weight matrix (each read
    once per pass, none left in cache from the pass before), best of `reps` passes."""
    n = max(matrix_bytes, 64 * 2**20) // 4
    bufs = [torch.ones(n, dtype=torch.float32, device=dev.device) for _ in range(3)]
    best = float("inf")
    for _ in range(reps):
        _, s = timed(lambda: [b.sum() for b in bufs], dev)
        best = min(best, s)
    return 3 * n * 4 / best / 1e9


@torch.no_grad()
def batch1_vs_bound(model, tok, dev, paths: dict, rounds: int = 6, new_tokens: int = 64) -> dict:
    """Batch-1 decodes (forced length, the LoRA policy, the decode dtype "auto" picks) against
    the read-bandwidth bound, probe and decodes alternating round by round: probe, each path's
    decode, ..., probe. `paths` {name: RLHF_NATIVE_DECODE value or None to leave it}. Per path:
    best tokens/s and its fraction of the bound of the best probe of the run (the conservative
    figure), and the median over rounds of each decode against the better of the probes just
    before and after it (the paired figure). Round 0 warms up and is not counted."""
    import os

    from rlhf_core import decoding
    from rlhf_core.sampling import chat_ids
    model.set_adapter("policy")
    auto = decoding.decode_dtype("auto", dev.device)
    nbytes = weight_bytes(model.get_base_model(), auto)
    matrix = model.get_output_embeddings().weight.numel() * 4
    queries = [chat_ids(tok, PROMPTS[0])]
    probes, secs = [], {name: [] for name in paths}
    before = os.environ.get("RLHF_NATIVE_DECODE")
    try:
        for r in range(rounds + 1):
            if r:
                probes.append(read_bandwidth(dev, matrix))
            for name, flag in paths.items():
                if flag is not None:
                    os.environ["RLHF_NATIVE_DECODE"] = flag
                sampler = decoding.Sampler([0], 1.0, device=dev.device)
                _, s = timed(lambda: decoding._loop(
                    model, queries, sampler, max_new_tokens=new_tokens, stop_ids=set(),
                    pad_id=tok.pad_token_id, device=dev.device, dtype=auto), dev)
                if r:
                    secs[name].append(s)
        probes.append(read_bandwidth(dev, matrix))
    finally:
        if before is None:
            os.environ.pop("RLHF_NATIVE_DECODE", None)
        else:
            os.environ["RLHF_NATIVE_DECODE"] = before
    bound = max(probes) * 1e9 / nbytes
    out = {"decode_dtype": str(auto), "new_tokens": new_tokens, "rounds": rounds,
           "weight_bytes": nbytes, "read_bandwidth_gb_s_probes": [round(x, 1) for x in probes],
           "read_bandwidth_gb_s": round(max(probes), 1), "bound_tokens_per_s": round(bound, 1)}
    for name, ss in secs.items():
        rates = [new_tokens / s for s in ss]
        paired = [rate / (max(probes[i], probes[i + 1]) * 1e9 / nbytes)
                  for i, rate in enumerate(rates)]
        out[name] = {"tokens_per_s": round(max(rates), 1),
                     "ms_per_token": round(1000 / max(rates), 2),
                     "fraction_of_bound": round(max(rates) / bound, 3),
                     "fraction_paired_median": round(common.median(paired), 3),
                     "fraction_paired": [round(x, 3) for x in paired],
                     "tokens_per_s_rounds": [round(x, 1) for x in rates]}
    return out


def native_read(dev, hidden: int, reps: int = 5):
    """GB/s the native step's matrix-vector product reads a bf16 matrix at (rlhf_core/
    native_decode.py; a step with no layers is the LM-head product alone, over a 170 MB matrix
    no cache holds), best of `reps`; None where the native step is unavailable. A check that
    the bound's probe is not slower than the kernel it bounds."""
    from rlhf_core import native_decode
    mod = native_decode.module() if dev.device.type == "cpu" else None
    if mod is None:
        return None
    g = torch.Generator().manual_seed(0)
    rows = 170 * 2**20 // (2 * hidden)
    head = torch.randn(rows, hidden, generator=g).to(torch.bfloat16)
    step = mod.Step(torch.zeros(2, hidden), torch.ones(hidden), head, [], 1, 1, 2, 1e-5)
    step.bind(torch.zeros(0, 1, 1, 2, 2), torch.zeros(0, 1, 1, 2, 2), torch.zeros(2, 2),
              torch.zeros(2, 2), torch.zeros(2))
    step.step(1, 0)
    best = min(timed(lambda: step.step(1, 0), dev)[1] for _ in range(reps))
    return head.numel() * 2 / best / 1e9


@torch.no_grad()
def kernel_throughput(model, dtype, dev, reps: int = 20) -> float:
    """GB/s the decode loop's batch-1 matmul reads the LM head at (3 copies, rotated)."""
    from rlhf_core import decoding
    w = decoding.Weights(model, dtype, batch_hint=1)
    heads = [w.lm_head] + [decoding.Weights(model, dtype, batch_hint=1).lm_head
                           for _ in range(2)]
    x = torch.randn(1, model.config.hidden_size, device=dev.device)
    nbytes = model.get_output_embeddings().weight.numel() * torch.finfo(dtype).bits // 8
    w.linear(x, heads[0])
    _, s = timed(lambda: [w.linear(x, heads[i % 3]) for i in range(reps)], dev)
    return nbytes * reps / s / 1e9


@torch.no_grad()
def bf16_fidelity(model, tok, prompts, dev, new_tokens: int) -> dict:
    """bf16 loop's own log-probs of its draws vs a float32 forward over the same tokens."""
    from rlhf_core.policy.rollout import generate, policy_logprobs
    model.set_adapter("policy")
    rows = [p for p in prompts for _ in range(2)]
    ro = generate(model, tok, rows, list(range(len(rows))), max_new_tokens=new_tokens,
                  temperature=0.9, max_prompt_tokens=256, batch_size=len(rows), device=dev.device,
                  record_logprobs=True, dtype=torch.bfloat16)
    full, ent = policy_logprobs(model, ro, 0.9, with_entropy=True)
    m = ro.mask.bool()
    diff = (ro.logprobs[m] - full[m]).abs()
    return {"tokens": int(m.sum()), "mean_abs_logprob_diff": round(diff.mean().item(), 4),
            "max_abs_logprob_diff": round(diff.max().item(), 4),
            "mean_logprob_fp32": round(full[m].mean().item(), 4),
            "mean_entropy_fp32": round(ent[m].mean().item(), 4),
            "mean_abs_entropy_diff": round((ro.entropy[m] - ent[m]).abs().mean().item(), 4)}


def weight_bytes(model, dtype=torch.float32) -> int:
    """Bytes read per decoded token at batch 1: every parameter once (tied tensors once),
    at `dtype`."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * torch.finfo(dtype).bits // 8
    return total


def run(quick: bool = False) -> dict:
    from rlhf_core import decoding, models
    from rlhf_core.config import SamplingConfig
    threads = common.set_threads()
    dev = common.device_settings()
    tok, ours, peer = load(dev)
    cfg = SamplingConfig(k=4, max_new_tokens=32 if quick else 128)
    prompts = PROMPTS[:4 if quick else 8]
    fidelity = bf16_fidelity(ours, tok, prompts[:4], dev, 16 if quick else 64)
    models.store_frozen_linears(ours, dev)  # as the worker's Runtime does
    ours_batch(ours, tok, prompts[:1], dataclasses.replace(cfg, max_new_tokens=4), 0,
               adapter=False, dev=dev)  # warm-up
    peer_batch(peer, tok, prompts[:1], dataclasses.replace(cfg, max_new_tokens=4), 0, dev)
    rps = responses_per_s(ours, peer, tok, cfg, prompts, 2 if quick else 3, dev)
    del peer
    tps = tokens_per_s(ours, tok, [1, 4, 16], 32 if quick else 64, 1 if quick else 2, dev)
    auto = decoding.decode_dtype("auto", dev.device)
    b1_run = batch1_vs_bound(ours, tok, dev, {"loop": None}, rounds=2 if quick else 6,
                             new_tokens=32 if quick else 64)
    bw = b1_run["read_bandwidth_gb_s"]  # the best probe of the batch-1 rounds
    kernel = kernel_throughput(ours, auto, dev)
    native_gb_s = native_read(dev, ours.config.hidden_size)
    bytes32, bytes_auto = weight_bytes(ours.get_base_model()), weight_bytes(
        ours.get_base_model(), auto)
    loop_auto = tps[f"loop_{str(auto).split('.')[-1]}"]
    b1 = b1_run["loop"]["tokens_per_s"]
    return {
        "bench": "B1 sampling", "device": str(dev.device), "dtype": str(dev.dtype),
        "decode_dtype_auto": str(auto), "threads": threads,
        "settings": {"k": cfg.k, "max_new_tokens": cfg.max_new_tokens,
                     "temperature": cfg.temperature, "top_p": cfg.top_p,
                     "sequences_per_call": cfg.batch_size, "prompts": len(prompts)},
        "responses_per_s": rps, "ratio": rps["ratio_v0"], "ratio_lora": rps["ratio_lora"],
        "tokens_per_s": tps,
        "loop_vs_generate": {b: round(loop_auto[b] / tps["generate"][b], 2) for b in loop_auto},
        "read_bandwidth_gb_s": round(bw, 1),
        "read_bandwidth_gb_s_probes": b1_run["read_bandwidth_gb_s_probes"],
        "batch1": b1_run,
        "weight_bytes": {"float32": bytes32, str(auto): bytes_auto},
        "batch1_bound_tokens_per_s": {"float32": round(bw * 1e9 / bytes32, 1),
                                      str(auto): round(bw * 1e9 / bytes_auto, 1)},
        "matmul_kernel_gb_s": round(kernel, 1),
        "native_matvec_gb_s": None if native_gb_s is None else round(native_gb_s, 1),
        "batch1_kernel_bound_tokens_per_s": round(kernel * 1e9 / bytes_auto, 1),
        "batch1_fraction_of_bound": b1_run["loop"]["fraction_of_bound"],
        "batch1_fraction_paired_median": b1_run["loop"]["fraction_paired_median"],
        "batch1_fraction_of_float32_bound": round(b1 / (bw * 1e9 / bytes32), 3),
        "batch1_generate_fraction_of_float32_bound": round(
            tps["generate"]["1"] / (bw * 1e9 / bytes32), 3),
        "bf16_fidelity": fidelity,
        "packages": common.package_versions(),
        "goal": "labeling responses/s >= 1.5x generate (ratio); batch-1 >= 50% of the bound",
    }


def batch1(rounds: int = 6, new_tokens: int = 64) -> dict:
    """Only the batch-1 figure (`batch1_vs_bound`, as `run` measures it) for the Python step
    (RLHF_NATIVE_DECODE=0) and the native one (rlhf_core/native_decode.py), interleaved round
    by round in one process. Not written to bench/results."""
    from rlhf_core import models, native_decode
    threads = common.set_threads()
    dev = common.device_settings()
    tok, ours, peer = load(dev)
    del peer
    models.store_frozen_linears(ours, dev)  # as the worker's Runtime does
    t0 = time.perf_counter()
    built = native_decode.module() is not None
    build_s = time.perf_counter() - t0
    out = {"threads": threads, "native_built": built, "native_load_s": round(build_s, 2)}
    out.update(batch1_vs_bound(ours, tok, dev, {"python": "0", "native": "1"}, rounds,
                               new_tokens))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch1", action="store_true",
                    help="only the batch-1 figure, Python step vs native step (not saved)")
    args = ap.parse_args(argv)
    if args.batch1:
        res = batch1()
        print(res)
        return res
    res = run(args.quick)
    common.write_result("b1_sampling", res)
    print({k: res[k] for k in ("ratio", "ratio_lora", "tokens_per_s", "loop_vs_generate",
                               "read_bandwidth_gb_s", "batch1_bound_tokens_per_s",
                               "matmul_kernel_gb_s", "batch1_fraction_of_bound",
                               "bf16_fidelity")})
    return res


if __name__ == "__main__":
    main()
