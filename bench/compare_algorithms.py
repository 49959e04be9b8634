"""Policy algorithms compared by measurement: `rlhf simulate` once per algorithm, same settings.

    python -m bench.compare_algorithms --out bench/results/algorithms/labels24 -- \
        --oracle contains:you --rounds 2 --labels-per-round 24 --annotators 2 --eval-prompts 24 \
        --eval-samples 2 --max-new-tokens 32 --seed 0 --set ppo.prompts_per_round=8 \
        --set torch_threads=1 --set loop.ab_fraction=0

Every algorithm gets a new workspace (OUT/ws-ALG) and the same `rlhf simulate` arguments (given
after `--`) and seed, so round 1 ranks the same base-model batch; the runs are sequential, so
their seconds are comparable (on a shared machine, only roughly). `--collect` rebuilds the table
from OUT/ALG.json. `--algorithms` also takes `ppo-trunk` (PPO with `ppo.critic=trunk`)
and `ppo-allcritic` (`ppo.critic_layers=0`).
Win-rate per minute = (win-rate - 0.5) per minute of policy-round time, the
gain over the reference bought by the round's compute (labeling and evaluation are the same
work for every algorithm).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


# variants: a name -> the algorithm and its --set values
VARIANTS = {"ppo-trunk": ("ppo", ["--set", "ppo.critic=trunk"]),
            # the value adapter on every layer (ppo.critic_layers' default was 0 until 12-01)
            "ppo-allcritic": ("ppo", ["--set", "ppo.critic_layers=0"])}


def run(algorithm: str, out: Path, sim_args: list[str]) -> None:
    base, settings = VARIANTS.get(algorithm, (algorithm, []))
    cmd = [sys.executable, "-m", "app.cli", "simulate", "--workspace", str(out / f"ws-{algorithm}"),
           "--algorithm", base, "--out", str(out / algorithm), *sim_args, *settings]
    print("$", " ".join(cmd), flush=True)
    t0 = time.monotonic()
    subprocess.run(cmd, check=True)
    print(f"{algorithm}: {time.monotonic() - t0:.0f} s in all", flush=True)


def table(out: Path, algorithms: list[str]) -> str:
    lines = ["| algorithm | round | policy | win-rate vs reference [95% CI] | n | KL | rollout KL "
             "| tokens (ref) | distinct-2 | policy round s | round s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = []
    for algorithm in algorithms:
        path = out / f"{algorithm}.json"
        if not path.exists():
            lines.append(f"| {algorithm} | not run | | | | | | | | | |")
            continue
        rows = json.loads(path.read_text())
        for r in rows:
            win = ("-" if r["win_rate"] is None else
                   f"{r['win_rate']:.0%} [{r['win_lo']:.0%}, {r['win_hi']:.0%}]")
            lines.append(
                f"| {algorithm} | {r['round']} | v{r['policy_version']} | {win} | "
                f"{r['comparisons']} | {_f(r.get('kl_judged'))} | {_f(r['kl'])} | "
                f"{_f(r['mean_tokens'], 1)} "
                f"({_f(r['reference_tokens'], 1)}) | {_f(r.get('distinct_2'))} | "
                f"{_f(r.get('policy_seconds'), 0)} | {r['seconds']:.0f} |")
        policy_s = sum(r.get("policy_seconds") or 0 for r in rows)
        last = rows[-1] if rows else None
        if last and last["win_rate"] is not None and policy_s:
            kl = (f"KL {_f(last['kl_judged'])}" if last.get("kl_judged") is not None
                  else f"rollout KL {_f(last['kl'])}")  # results from before kl_judged
            summary.append(f"{algorithm}: last win-rate {last['win_rate']:.0%} "
                           f"[{last['win_lo']:.0%}, {last['win_hi']:.0%}], {kl}, "
                           f"{(last['win_rate'] - 0.5) / (policy_s / 60):+.3f} win-rate per "
                           f"policy-minute ({policy_s / 60:.1f} min of policy rounds)")
    return "\n".join(lines + [""] + summary)


def _f(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sim_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m bench.compare_algorithms", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--algorithms", default="ppo,grpo,rloo,dpo")
    ap.add_argument("--collect", action="store_true", help="only print the table")
    args = ap.parse_args(own)
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.collect:
        for algorithm in algorithms:
            run(algorithm, args.out, sim_args)
    text = table(args.out, algorithms)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
