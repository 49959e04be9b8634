"""Issue 13's cost goal, measured: the default policy round against "today's PPO round", the
PPO round of the code the issue was filed against, on this machine, in one run.

The issue (filed 2026-11-30, before commit 854934a: the restructure, pure moves) asks for the
default round to take <= 0.5x the PPO round of that day. That PPO round was timed on another
VM (92 s); this runs that commit's own `bench.bench_ppo` (its defaults: float32, the value
adapter on every layer) from a `git archive` of it, beside today's `bench.bench_ppo
--algorithm rloo` (the default round, the project's defaults) and today's PPO, interleaved,
`--runs` times each, with the order rotated run by run. Every side: one round of the same
work (64 rollouts x 32 tokens, 2 epochs of 8 minibatches, a random reward head), the same
machine, threads and venv; only the code differs. Writes bench/results/round_vs_filed.json.

    .venv/bin/python -m bench.round_vs_filed [--runs 3] [--commit 854934a] [--repo DIR]

(`--repo`: the git checkout to take the old commit from, when this runs from an export.)
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bench import common

FILED = "854934a"  # the restructure that opened the round issue 13 was filed in (pure moves)
SIDES = ("filed-ppo", "rloo", "ppo")


def export(commit: str, dest: Path, repo: Path | None = None) -> Path:
    """The commit's tree, extracted under dest (no checkout: the working tree is not touched)."""
    data = subprocess.run(["git", "archive", commit], cwd=repo or common.BENCH.parent,
                          check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def one_round(side: str, tree: Path, out: Path) -> dict:
    """A subprocess per round; the old tree's package shadows the installed one (its folder
    comes first on sys.path), which the result checks."""
    if side == "filed-ppo":
        cmd, cwd, result = [sys.executable, "-m", "bench.bench_ppo"], tree, \
            tree / "bench" / "results" / "ppo.json"
    else:
        cmd, cwd, result = [sys.executable, "-m", "bench.bench_ppo", "--algorithm", side,
                            "--out", str(out)], common.BENCH.parent, out
    probe = subprocess.run([sys.executable, "-c", "import rlhf_core; print(rlhf_core.__file__)"],
                           cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    if not probe.startswith(str(cwd)):
        raise RuntimeError(f"{side}: rlhf_core came from {probe}, not {cwd}")
    result.unlink(missing_ok=True)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode or not result.exists():
        raise RuntimeError(f"{side} failed:\n{proc.stderr[-3000:]}")
    r = json.loads(result.read_text())
    return {"round_s": r["round_s"], "phase_s": r["phase_s"], "sequences": r["sequences"],
            "mean_response_tokens": r["mean_response_tokens"], "steps": r["ppo_steps"],
            "peak_rss_mb": r["peak_rss_mb"], "threads": r["threads"],
            "mixed_precision": r.get("mixed_precision", "no (before the setting existed)")}


def run(runs: int = 3, commit: str = FILED, repo: Path | None = None) -> dict:
    rows: dict[str, list[dict]] = {s: [] for s in SIDES}
    with tempfile.TemporaryDirectory(prefix="round-vs-filed-") as tmp:
        tree = export(commit, Path(tmp) / "filed", repo)
        for r in range(runs):
            for side in SIDES[r % 3:] + SIDES[:r % 3]:
                rows[side].append(one_round(side, tree, Path(tmp) / f"{side}.json"))
                print(f"run {r} {side}: {rows[side][-1]['round_s']} s", flush=True)
    med = {s: common.median([x["round_s"] for x in xs]) for s, xs in rows.items()}
    spread = {s: [min(x["round_s"] for x in xs), max(x["round_s"] for x in xs)]
              for s, xs in rows.items()}
    out = {"bench": "the default policy round vs the PPO round of the commit issue 13 was filed "
                    "against", "filed_commit": commit, "runs": runs,
           "machine": common.machine(), "versions": common.package_versions(),
           "round_s_median": med, "round_s_min_max": spread,
           "ratio_rloo_over_filed_ppo": round(med["rloo"] / med["filed-ppo"], 3),
           "ratio_ppo_over_filed_ppo": round(med["ppo"] / med["filed-ppo"], 3),
           "ratio_rloo_over_ppo": round(med["rloo"] / med["ppo"], 3),
           "goal": "the default round <= 0.5x the PPO round of the day the issue was filed",
           "per_run": rows}
    path = common.write_result("round_vs_filed", out)
    print(json.dumps({k: v for k, v in out.items() if k.startswith(("ratio", "round_s"))},
                     indent=1))
    print(f"-> {path}")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--commit", default=FILED)
    ap.add_argument("--repo", type=Path, help="git checkout holding --commit (default: this one)")
    args = ap.parse_args(argv)
    return run(args.runs, args.commit, args.repo)


if __name__ == "__main__":
    main()
