"""B5 loop latency: from the ranking that triggers a round to the first item of the next batch,
sampled by the new policy, being ready to rank (reward training + PPO + sampling).

The real worker (a child process, niced, `app.launcher.start_worker`) runs the automatic loop
(`loop.auto`, `retrain_every` = the rankings we submit). The worker has already loaded the
model and sampled the first batch (v0) before the clock starts. `min_ready_items = 0`, so the
loop does not re-sample v0 when the first batch is used up. The split comes from the jobs table:
each job's run time, plus waiting (queue polling, job hand-offs).

`--remote` also runs the same loop with a remote worker (issue 12): the app serves its worker
API on loopback, the worker has its own directory and reaches the app only over HTTP (token,
version downloads and uploads); the ratio remote / local is the transfer overhead. Both sides
serve the UI in this process, as `rlhf up` does (so the only difference is the data path), and
`--repeats N` alternates them N times and compares medians.
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bench import common

WORDS = ("garden river music science cooking travel books light water energy friends city "
         "history weather learning mountain").split()


def overrides(quick: bool, retrain_every: int) -> dict:
    o = {"model": common.embedded_model_dir(), "loop.auto": True,
         "loop.retrain_every": retrain_every, "sampling.min_ready_items": 0,
         "sampling.prompts_per_batch": retrain_every, "loop.ab_fraction": 0.0,
         # 8 rankings cannot clear the promotion gate's evidence rule: it is off here, as the
         # bench times the loop, not the reward model's quality
         "reward.promote_min_heldout_pairs": 0, "reward.promote_min_accuracy": 0.0}
    if quick:
        o |= {"ppo.prompts_per_round": 8, "ppo.epochs": 2, "ppo.max_new_tokens": 32,
              "sampling.max_new_tokens": 32}
    return o


def _ts(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


def rank_all(store, who: str, n: int) -> float:
    """Rank n items (longest response first); returns the time of the last submission."""
    from rlhf_core.data import annotation
    t_last = None
    for i in range(n):
        item = annotation.next_item(store, who)
        if item is None:
            raise RuntimeError(f"only {i} items to rank, needed {n}")
        ranked = sorted(item["responses"], key=lambda r: -len(r["text"]))
        t_last = time.time()
        annotation.submit_ranking(store, annotator=who, item_id=item["id"], token=item["token"],
                                  submission_key=f"{who}-{item['id']}",
                                  tiers=[[r["id"]] for r in ranked])
    return t_last


def wait_for(pred, timeout: float, what: str, poll: float = 0.25):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise TimeoutError(f"waited {timeout} s for {what}")


def serve_ui(store, cfg):
    """The UI (and its worker API) in this process, as `rlhf up` runs it; returns (port, demo)."""
    from app.context import AppContext
    from app.launcher import free_port
    from app.ui import launch
    port = free_port()
    demo = launch(AppContext.from_config(cfg, store=store), port=port, prevent_thread_lock=True,
                  quiet=True)
    return port, demo


def start_local(store, cfg):
    """The UI here and the local worker child on the same workspace; returns a stop function."""
    from app.launcher import start_worker, stop_worker
    _, demo = serve_ui(store, cfg)
    worker = start_worker(cfg.workspace)

    def stop():
        stop_worker(worker)
        demo.close()
    return stop


def start_remote(store, cfg, home: Path):
    """The UI (and its worker API) in this process, a worker child with only a URL and a token;
    returns a stop function."""
    import os
    import subprocess
    import sys

    from app.allocator import with_jemalloc
    from app.launcher import stop_worker
    from rlhf_core.data import tokens
    token = tokens.create(store, "bench")
    port, demo = serve_ui(store, cfg)
    home.mkdir(parents=True, exist_ok=True)
    worker = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", "--server", f"http://127.0.0.1:{port}/",
         "--workspace", str(home), "--model", common.embedded_model_dir()],
        env=with_jemalloc(os.environ | {"RLHF_WORKER_TOKEN": token}), cwd=home)

    def stop():
        stop_worker(worker)
        demo.close()
    return stop


def run(quick: bool = False, remote: bool = False) -> dict:
    from rlhf_core.workspace import open_workspace
    retrain_every = 8
    with tempfile.TemporaryDirectory(prefix="bench-b5-") as tmp:
        ws = Path(tmp) / "ws"
        store, cfg = open_workspace(ws, **overrides(quick, retrain_every))
        rng = random.Random(0)
        store.add_prompts([{"text": f"Loop prompt {i}: tell me about "
                            + " and ".join(rng.sample(WORDS, 2))} for i in range(40)],
                          source="bench", heldout_fraction=0.25)
        if remote:
            stop = start_remote(store, cfg, Path(tmp) / "gpu-host")
        else:
            stop = start_local(store, cfg)
        try:
            # items stream in: wait for the whole v0 batch (its job done), then count them
            wait_for(lambda: store.scalar(
                "SELECT COUNT(*) FROM jobs WHERE kind = 'sample_batch' AND status = 'done'"),
                1800, "the first (v0) batch")
            first = store.scalar("SELECT COUNT(*) FROM items i JOIN batches b ON "
                                 "b.id = i.batch_id WHERE b.policy_version = 0")
            if first < retrain_every:
                raise RuntimeError(f"the v0 batch has {first} items, {retrain_every} needed")
            t0 = rank_all(store, "b5", retrain_every)
            new = wait_for(lambda: store.one(
                "SELECT b.policy_version AS v, MIN(i.created_at) AS at FROM items i "
                "JOIN batches b ON b.id = i.batch_id WHERE b.policy_version > 0 "
                "GROUP BY b.policy_version ORDER BY b.policy_version LIMIT 1"), 3600,
                "the first item from the new policy")
            t_end = _ts(new["at"])
            rows = store.rows("SELECT id, kind, status, created_at, started_at, finished_at, "
                              "params FROM jobs ORDER BY id")
        finally:
            stop()
            store.close()
    split, other = {}, 0.0
    for j in rows:
        start, end = _ts(j["started_at"]), _ts(j["finished_at"])
        if start is None or start < t0 - 0.5 or start > t_end:
            continue
        # the new batch streams in: its job is still sampling when its first item is ready
        end = t_end if end is None else min(end, t_end)
        key = {"train_reward": "reward_training", "ppo_round": "ppo",
               "sample_batch": "sampling"}.get(j["kind"])
        if key:
            split[key] = split.get(key, 0.0) + (end - start)
        else:
            other += end - start
    total = t_end - t0
    split_r = {k: round(v, 2) for k, v in split.items()}
    split_r["other_jobs_s"] = round(other, 2)
    split_r["waiting_s"] = round(total - sum(v for v in split_r.values()), 2)
    kinds = [j["kind"] for j in rows if _ts(j["started_at"]) and t0 - 0.5 <= _ts(j["started_at"])
             <= t_end]
    return {"bench": "B5 loop latency", "worker": "remote (HTTP)" if remote else "local",
            "total_s": round(total, 2), "split": split_r,
            "jobs_in_window": kinds, "new_policy_version": new["v"],
            # split["ppo"] is the ppo_round job, which runs the workspace's policy algorithm
            "policy_algorithm": cfg.loop.algorithm,
            "setting": {k: v for k, v in overrides(quick, retrain_every).items() if k != "model"},
            "note": "real worker child (nice 10); model already loaded; clock starts at the "
                    "ranking that triggers the round"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--remote", action="store_true",
                    help="also run it with a remote worker and report remote / local")
    ap.add_argument("--repeats", type=int, default=1,
                    help="with --remote: alternate local and remote runs this many times")
    args = ap.parse_args(argv)
    if not args.remote:
        res = run(args.quick)
    else:
        import statistics
        locs, fars = [], []
        for i in range(max(1, args.repeats)):
            # alternate which side goes first, so a drift in the machine's load hits both
            order = (False, True) if i % 2 == 0 else (True, False)
            for remote in order:
                r = run(args.quick, remote=remote)
                (fars if remote else locs).append(r)
                print(f"run {i + 1}: {r['worker']} {r['total_s']} s", flush=True)
        med_l = statistics.median(r["total_s"] for r in locs)
        med_r = statistics.median(r["total_s"] for r in fars)
        res = {**locs[0], "remote": fars[0],
               "runs_s": {"local": [r["total_s"] for r in locs],
                          "remote": [r["total_s"] for r in fars]},
               "median_s": {"local": med_l, "remote": med_r},
               "remote_over_local": round(med_r / med_l, 3),
               "remote_over_local_per_run": [round(f["total_s"] / lo["total_s"], 3)
                                             for lo, f in zip(locs, fars)],
               "machine": common.machine()}
    common.write_result("b5_loop", res)
    print(res)
    return res


if __name__ == "__main__":
    main()
