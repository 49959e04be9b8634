"""Wall time and peak memory of one policy round on the embedded model (SmolLM2-135M), per phase.

Phases: generate (rollout sampling), score (reward + policy/reference log-probs + values),
train (PPO epochs). The reward model is a fresh random reward adapter + head on the shared base
(the cost of scoring is real, the scores are noise), as no reward version exists in a new
workspace. Writes bench/results/ppo.json; `--algorithm grpo|rloo|dpo` times that round
instead (same config) and writes bench/results/policy_round_<algorithm>.json.

    .venv/bin/python -m bench.bench_ppo                      # the PPOConfig defaults
    .venv/bin/python -m bench.bench_ppo --set epochs=1 --set prompts_per_round=4   # smoke
    .venv/bin/python -m bench.bench_ppo --algorithm rloo     # the default round
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.common import embedded_model_dir, machine, peak_rss_mb, set_threads, write_result
from rlhf_core import models
from rlhf_core.config import AppConfig, PPOConfig, to_dict, with_overrides
from rlhf_core.data.store import Store
from rlhf_core.policy.rounds import ROUNDS
from rlhf_core.worker.runtime import Runtime
from rlhf_core.workspace import parse_settings, seed_prompts_if_empty

# progress messages -> phase: every round reports "<ALGORITHM> step i/n" while it trains
PHASES = {"generating": "generate", "scoring": "score",
          **{f"{a.upper()} step": "train" for a in ROUNDS}, "published": "publish"}


class RssSampler(threading.Thread):
    """Samples this process's RSS every 50 ms; keeps the peak of each phase."""

    def __init__(self):
        super().__init__(daemon=True)
        self.phase, self.peaks, self._done = "load", {}, threading.Event()

    def run(self):
        page = 4096
        while not self._done.wait(0.05):
            rss = int(Path("/proc/self/statm").read_text().split()[1]) * page / 2**20
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss)

    def stop(self):
        self._done.set()
        self.join(timeout=1)


class BenchReporter:
    """A job reporter stand-in: progress messages switch the sampler's phase."""
    job_id = None

    def __init__(self, store: Store, sampler: RssSampler):
        self.store, self.sampler = store, sampler

    def progress(self, fraction: float, message: str = "") -> None:
        for key, phase in PHASES.items():
            if key in message:
                self.sampler.phase = phase

    def metrics(self, kind, values, *, step=None, version=None):
        self.store.log_metrics(kind, values, step=step, version=version)


def random_reward_fn(runtime):
    """Score with a fresh reward adapter + random head: the reward model's real cost."""
    from rlhf_core.reward import model as reward_scoring
    runtime.ensure_fresh_adapter("reward_bench")
    head = models.ScalarHead(runtime.hidden_size, seed=0).to(runtime.device.device)
    bb = reward_scoring.backbone(runtime)
    encoder = reward_scoring.Encoder(runtime.tokenizer, runtime.config.reward.max_length)

    def reward_fn(prompts, responses, response_ids):
        seqs = [encoder(p, r) for p, r in zip(prompts, responses)]
        return torch.tensor(reward_scoring.score_sequences(bb, "reward_bench", head, seqs))
    return reward_fn


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a PPOConfig field (JSON value)")
    ap.add_argument("--algorithm", default="ppo", choices=sorted(ROUNDS),
                    help="the policy round to time (default ppo)")
    ap.add_argument("--out", help="result name under bench/results, or a path ending in .json "
                                  "(default: ppo, or policy_round_<algorithm>)")
    args = ap.parse_args(argv)
    threads = set_threads()
    config = with_overrides(PPOConfig(), parse_settings(args.set))
    sampler = RssSampler()
    sampler.start()
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        t0 = time.perf_counter()
        model_dir = embedded_model_dir()
        ws = Path(tmp)
        store = Store(ws / "rlhf.db")
        app = AppConfig(workspace=ws, model=model_dir, ppo=config)
        seed_prompts_if_empty(store, app)
        runtime = Runtime(store, app)
        runtime.model  # load now, outside the timed round
        reward_fn = random_reward_fn(runtime)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = ROUNDS[args.algorithm](runtime, config=config,
                                        reporter=BenchReporter(store, sampler),
                                        reward_fn=reward_fn)
        round_s = time.perf_counter() - t0
        store.close()
    sampler.stop()
    m = result["metrics"]
    out = {
        "algorithm": args.algorithm, "mixed_precision": runtime.device.mixed_precision,
        "model": "embedded:smollm2-135m-instruct", "device": str(runtime.device.device),
        "threads": threads, "machine": machine(), "config": to_dict(config),
        "sequences": m["n_sequences"], "minibatch_size": config.minibatch_size,
        "max_new_tokens": config.max_new_tokens,
        "mean_response_tokens": round(m["response_length"], 1),
        "stop_rate": round(m["stop_rate"], 3), "ppo_steps": m["ppo_steps"],
        "load_s": round(load_s, 1), "round_s": round(round_s, 1),
        "phase_s": {"generate": round(m["time_generate"], 1), "score": round(m["time_score"], 1),
                    "train": round(m["time_train"], 1)},
        "phase_peak_rss_mb": {k: round(v) for k, v in sampler.peaks.items()},
        "peak_rss_mb": round(peak_rss_mb()),
        "first_ratio": m.get("first_ratio"), "approx_kl": m.get("approx_kl"), "kl": m.get("kl"),
    }
    name = args.out or ("ppo" if args.algorithm == "ppo" else f"policy_round_{args.algorithm}")
    path = write_result(name, out)
    print(f"{args.algorithm.upper()} round on {out['model']} ({out['device']}, {threads} threads): "
          f"{out['sequences']} sequences, minibatch {out['minibatch_size']}, "
          f"max_new_tokens {out['max_new_tokens']} (mean {out['mean_response_tokens']}), "
          f"{out['ppo_steps']} optimizer steps")
    for phase in ("generate", "score", "train"):
        print(f"  {phase:9s} {out['phase_s'][phase]:7.1f} s   "
              f"peak RSS {out['phase_peak_rss_mb'].get(phase, float('nan')):7.0f} MB")
    print(f"  round     {out['round_s']:7.1f} s   peak RSS {out['peak_rss_mb']:7.0f} MB "
          f"(load {out['load_s']} s)\n-> {path}")
    return out


if __name__ == "__main__":
    main()
