"""B8 log-probs + entropy of a training pass: one log-softmax (now) against the former code
(a second log-softmax for the entropy, a (B,T,V) product tensor), in the same process.

The tensors are the shape a PPO minibatch gives on the embedded model (vocabulary 49,152):
`--rows` sequences of `--tokens` response tokens. Forward + backward of the log-probs, with the
entropy as a detached metric, as `rlhf_core.policy.train` uses them. Reports the median time of
`--repeats` passes and, for each side in a fresh process, the peak RSS of one pass above the
RSS with its inputs made (torch keeps no CPU allocator statistics)."""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bench import common
from rlhf_core.advantages import entropy_from_logits, logprobs_and_entropy


def former(logits, ids, temperature):
    """The code before: divide (copy), log_softmax, gather; entropy: log_softmax again, exp,
    where, product, sum."""
    logits = logits.float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    logprobs = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = entropy_from_logits(logits)
    return logprobs, entropy


def current(logits, ids, temperature):
    logits = logits.float()
    logits = logits.div_(temperature) if temperature != 1.0 else logits
    return logprobs_and_entropy(logits, ids)


def one_pass(fn, hidden, weight, ids, temperature):
    logits = hidden @ weight.T  # (B,T,V): the LM head's output, as the model returns it
    logprobs, entropy = fn(logits, ids, temperature)
    logprobs.sum().backward()
    return entropy


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_child(name: str, rows: int, tokens: int, temperature: float) -> float:
    """One pass of `name` in a fresh process: its peak RSS above the RSS it had with the inputs
    made (MB). A child each, so neither side inherits the other's high-water mark."""
    import json
    import subprocess
    import sys
    code = ("import json; from bench.b8_logprobs import _child; "
            f"print(json.dumps(_child({name!r}, {rows}, {tokens}, {temperature})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _child(name: str, rows: int, tokens: int, temperature: float) -> float:
    fn = {"former": former, "current": current}[name]
    hidden, weight, ids = inputs(rows, tokens)
    one_pass(fn, hidden, weight, ids, temperature)  # warm: allocator and kernels
    hidden.grad = None
    before = _rss_mb()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    one_pass(fn, hidden, weight, ids, temperature)
    return round(_hwm_mb() - before, 1)


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def inputs(rows: int, tokens: int, vocab: int = 49152, hidden_size: int = 576):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, tokens, hidden_size, generator=g, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, generator=g) * 0.02
    ids = torch.randint(vocab, (rows, tokens), generator=g)
    return hidden, weight, ids


def run(rows: int, tokens: int, repeats: int, temperature: float) -> dict:
    common.set_threads()
    hidden, weight, ids = inputs(rows, tokens)
    vocab = weight.shape[0]
    out = {}
    # the same numbers on both sides before any timing
    e_old = one_pass(former, hidden, weight, ids, temperature)
    g_old = hidden.grad.clone()
    hidden.grad = None
    e_new = one_pass(current, hidden, weight, ids, temperature)
    torch.testing.assert_close(e_new, e_old, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hidden.grad, g_old, rtol=1e-4, atol=1e-5)
    for name, fn in (("former", former), ("current", current)):
        times = []
        for _ in range(repeats):
            hidden.grad = None
            t0 = time.perf_counter()
            one_pass(fn, hidden, weight, ids, temperature)
            times.append(time.perf_counter() - t0)
        hidden.grad = None
        out[name] = {"median_s": round(statistics.median(times), 4),
                     "min_s": round(min(times), 4), "max_s": round(max(times), 4),
                     "peak_rss_above_inputs_mb": peak_child(name, rows, tokens, temperature)}
    logits_mb = rows * tokens * vocab * 4 / 2**20
    return {"bench": "B8 log-probs + entropy", "shape": [rows, tokens, vocab],
            "temperature": temperature, "repeats": repeats, "one_logits_tensor_mb":
            round(logits_mb, 1), **out,
            "time_ratio_former_over_current": round(out["former"]["median_s"]
                                                    / out["current"]["median_s"], 2),
            "peak_ratio_current_over_former": round(
                out["current"]["peak_rss_above_inputs_mb"]
                / out["former"]["peak_rss_above_inputs_mb"], 2),
            "machine": common.machine()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=0.7)
    a = ap.parse_args(argv)
    res = run(a.rows, a.tokens, a.repeats, a.temperature)
    common.write_result("b8_logprobs", res)
    print(res)
    return res


if __name__ == "__main__":
    main()
