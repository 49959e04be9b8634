"""Where a batch-1 decode token's time goes in our loop (`rlhf_core/decoding._loop`).

B1 gives the totals (tokens/s at batch 1 against the read-bandwidth bound and the matmul
kernel's own read rate); this splits one token: torch.profiler over a forced-length batch-1
decode of the embedded model with a LoRA policy adapter, at the decode dtype `auto` picks
here. Prints per token: wall ms, operator calls, and self CPU ms by operator (the matrix
products apart from the rest); writes bench/results/decode_profile.json.

    .venv/bin/python -m bench.decode_profile            # ~1 min
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from bench import common
from bench.b1_sampling import PROMPTS, load

MATMUL_OPS = ("mkldnn::_linear_pointwise", "aten::linear", "aten::mm", "aten::addmm",
              "aten::matmul", "aten::bmm")


def run(new_tokens: int = 64, threads: int | None = None) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from rlhf_core import decoding
    from rlhf_core.sampling import chat_ids
    if threads:
        torch.set_num_threads(threads)
    else:
        common.set_threads()
    dev = common.device_settings()
    tok, model, _ = load(dev)
    model.set_adapter("policy")
    dtype = decoding.decode_dtype("auto", dev.device)
    queries = [chat_ids(tok, PROMPTS[0])]

    def decode():
        sampler = decoding.Sampler([0], 1.0, device=dev.device)
        return decoding._loop(model, queries, sampler, max_new_tokens=new_tokens, stop_ids=set(),
                              pad_id=tok.pad_token_id, device=dev.device, dtype=dtype)
    decode()  # warm-up: oneDNN's first calls, allocator
    t0 = time.perf_counter()
    decode()
    plain = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode()
    by_op = defaultdict(lambda: [0, 0.0])  # name -> [calls, self CPU us]
    for ev in prof.key_averages():
        by_op[ev.key][0] += ev.count
        by_op[ev.key][1] += ev.self_cpu_time_total
    per_token = {k: {"calls": c / new_tokens, "self_ms": us / 1000 / new_tokens}
                 for k, (c, us) in by_op.items()}
    matmul_ms = sum(v["self_ms"] for k, v in per_token.items() if k in MATMUL_OPS)
    total_self = sum(v["self_ms"] for v in per_token.values())
    calls = sum(v["calls"] for k, v in per_token.items() if k.startswith("aten::")
                or k.startswith("mkldnn::"))
    top = sorted(per_token.items(), key=lambda kv: -kv[1]["self_ms"])[:15]
    return {"bench": "batch-1 decode profile", "machine": common.machine(),
            "dtype": str(dtype), "new_tokens": new_tokens, "threads": torch.get_num_threads(),
            "ms_per_token_unprofiled": round(plain * 1000 / new_tokens, 2),
            "tokens_per_s_unprofiled": round(new_tokens / plain, 1),
            "ms_per_token_self_cpu": round(total_self, 2),
            "matmul_ms_per_token": round(matmul_ms, 2),
            "operator_calls_per_token": round(calls),
            "top": [{"op": k, "calls_per_token": round(v["calls"], 1),
                     "self_ms_per_token": round(v["self_ms"], 3)} for k, v in top]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    out = run(args.tokens, args.threads)
    common.write_result("decode_profile", out)
    print(f"{out['tokens_per_s_unprofiled']} tokens/s ({out['ms_per_token_unprofiled']} ms per "
          f"token unprofiled); profiled self CPU {out['ms_per_token_self_cpu']} ms per token, of "
          f"which matrix products {out['matmul_ms_per_token']} ms; "
          f"{out['operator_calls_per_token']} operator calls per token")
    for row in out["top"]:
        print(f"  {row['op']:<40} {row['calls_per_token']:>7} calls {row['self_ms_per_token']:>8}"
              " ms")
    return out


if __name__ == "__main__":
    main()
