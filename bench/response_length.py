"""How long may a labeling response be? Share of responses that end on their own.

Samples the embedded model exactly as the `sample_batch` job does (`sample_distinct`, the
default SamplingConfig except max_new_tokens) on N shipped prompts (evenly spaced through the file), at several
max_new_tokens values, and prints the share with finish_reason "stop" (the model emitted a stop
token) versus "length" (cut off). SamplingConfig.max_new_tokens is the smallest value where at
least 90% end on their own.

    python -m bench.response_length                 # 30 prompts, caps 64 128 192 256
    python -m bench.response_length --each          # sample at every cap (4x slower)
    python -m bench.response_length --prompts 10 --lengths 64 256
"""
from __future__ import annotations

import argparse
import dataclasses
import time

from bench import common


def sample(model, tok, prompts: list[str], max_new_tokens: int, seed: int):
    from rlhf_core.config import SamplingConfig
    from rlhf_core.sampling import sample_distinct
    cfg = dataclasses.replace(SamplingConfig(), max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    results = sample_distinct(model, tok, prompts, cfg=cfg, seed=seed)
    return [s for per_prompt in results for s in per_prompt], time.perf_counter() - t0


def row(samples, max_new_tokens: int, seconds: float | None, how: str) -> dict:
    """Share ending on their own within `max_new_tokens`. From a longer run, a response that
    stopped at n_tokens <= max_new_tokens is one that stops with that cap: sampling is the
    same seeded draw token by token until the cap (duplicate re-sampling aside)."""
    stops = [s for s in samples if s.finish_reason == "stop" and s.n_tokens <= max_new_tokens]
    lengths = sorted(min(s.n_tokens, max_new_tokens) for s in samples)
    return {"max_new_tokens": max_new_tokens, "responses": len(samples), "stop": len(stops),
            "stop_share": len(stops) / len(samples) if samples else None,
            "median_tokens": common.median(lengths),
            "p90_tokens": common.percentile(lengths, 90), "seconds": seconds, "how": how}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=30, help="N shipped prompts, evenly spaced (30)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 192, 256])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--system-prompt", default=None,
                    help="the system message (default: AppConfig's; '' for the template's own)")
    ap.add_argument("--each", action="store_true",
                    help="sample once per length (slow); default: once at the longest, the "
                         "shorter caps read from its token counts")
    args = ap.parse_args()
    threads = common.set_threads()
    from rlhf_core import models
    from rlhf_core.config import SamplingConfig
    from rlhf_core.prompt_io import bundled_prompts_path, read_prompts
    shipped = [r["text"] for r in read_prompts(bundled_prompts_path())]
    step = max(1, len(shipped) // args.prompts)  # spread over the file's categories
    prompts = shipped[::step][:args.prompts]
    src = common.embedded_model_dir()
    from rlhf_core.config import AppConfig
    system = AppConfig().system_prompt if args.system_prompt is None else args.system_prompt
    tok = models.load_tokenizer(src, system_prompt=system)
    model = models.load_causal_lm(src, tok).eval()
    rows = []
    print(f"{len(prompts)} shipped prompts, k={SamplingConfig().k}, torch threads {threads}, "
          f"system prompt {system!r}")
    print("max_new_tokens  responses  ended on their own  median tokens  p90 tokens  seconds  how")
    longest = None
    for n in sorted(args.lengths, reverse=not args.each):
        if args.each or longest is None:
            samples, seconds = sample(model, tok, prompts, n, args.seed)
            longest, r = samples, row(samples, n, seconds, "sampled")
        else:
            r = row(longest, n, None, f"from the {max(args.lengths)} run")
        rows.append(r)
    for r in sorted(rows, key=lambda r: r["max_new_tokens"]):
        secs = f"{r['seconds']:7.1f}" if r["seconds"] is not None else "      -"
        print(f"{r['max_new_tokens']:>14}  {r['responses']:>9}  {r['stop']:>6} "
              f"({r['stop_share']:6.1%})  {r['median_tokens']:>13}  {r['p90_tokens']:>10.0f}  "
              f"{secs}  {r['how']}", flush=True)
    ok = [r["max_new_tokens"] for r in rows if r["stop_share"] >= 0.9]
    print(f"smallest max_new_tokens with >= 90% ending on their own: {min(ok) if ok else 'none'}")
    common.write_result("response_length", {"machine": common.machine(), "prompts": len(prompts),
                                            "seed": args.seed, "system_prompt": system,
                                            "rows": rows})


if __name__ == "__main__":
    main()
