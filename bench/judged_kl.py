"""The judged versions' KL from the reference for a finished `rlhf simulate` run.

`rlhf simulate` records `kl_judged` (labeling/heldout.py: the judged version's KL per sequence,
on its own held-out samples) since 2026-11-30; runs before it recorded only the policy round's
rollout KL (of the version the round started from). This fills `kl_judged` into such a run's
table from its workspace, with the evaluation's own settings (the same seed and samples, so
the same held-out answers up to decode-kernel changes since), and re-judges the win-rate with
the oracle as a check that the answers are the run's:

    python -m bench.judged_kl --workspace OUT/ws-ppo --table OUT/ppo.json --oracle mentions:you
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workspace", required=True)
    p.add_argument("--table", required=True, help="the run's JSON table (rewritten in place)")
    p.add_argument("--oracle", required=True)
    p.add_argument("--seed", type=int, default=0, help="the run's --seed (evaluation: seed + 99)")
    p.add_argument("--eval-samples", type=int, default=2)
    p.add_argument("--eval-prompts", type=int)
    args = p.parse_args(argv)
    from rlhf_core.evaluation import win_rate
    from rlhf_core.labeling.heldout import eval_policy
    from rlhf_core.oracles import compare, load_oracle
    from rlhf_core.worker.runtime import Runtime
    from rlhf_core.workspace import open_workspace
    store, cfg = open_workspace(Path(args.workspace))
    runtime = Runtime(store, cfg, cpu=True)
    oracle = load_oracle(args.oracle)
    table = Path(args.table)
    rows = json.loads(table.read_text())

    class Say:
        def progress(self, fraction, message=""):
            pass
    for row in rows:
        v = row["policy_version"]
        if not v:
            continue
        res = eval_policy(runtime, cfg.sampling, reporter=Say(), policy_version=v, baseline=0,
                          samples_per_prompt=args.eval_samples, max_prompts=args.eval_prompts,
                          seed=args.seed + 99)
        outcomes = [compare(oracle, s["prompt"], s["policy"], s["baseline"])
                    for s in res["samples"]]
        again = win_rate(outcomes.count(1.0), outcomes.count(0.5), outcomes.count(0.0))
        row["kl_judged"] = res["kl"]
        print(f"round {row['round']} v{v}: KL {res['kl']:.2f} (rollout KL of the round: "
              f"{row['kl']:.2f}); win-rate re-judged {again['rate']:.1%} (run: "
              f"{row['win_rate']:.1%})", flush=True)
    table.write_text(json.dumps(rows, indent=2))
    store.close()
    return rows


if __name__ == "__main__":
    main()
