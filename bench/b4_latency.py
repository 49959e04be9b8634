"""B4 annotation latency: submit-to-next-item through the real HTTP API on loopback, under load.

The app runs as in production (`app.launcher.start_app`: the Gradio UI in this process, the
worker as a child process, niced). Simulated annotators run in a separate client process
(so the load generator does not share the UI's interpreter) and speak raw HTTP to Gradio's
`/gradio_api/call/<api_name>` routes: POST {"data": [...]} -> {"event_id"}, then GET
`/gradio_api/call/<api_name>/<event_id>` -> an SSE stream ending in `event: complete`.
One sample = submit(ranking) + get_item(next item), measured from the submit POST to the next
item's payload. Each annotator thinks between items, faster than people do (see LEVELS); a
"32-stress" level at ten times a real team's rate shows where the UI process saturates. Every
level runs twice: worker idle, then while a PPO round runs.
Every acknowledged submission is checked in the DB afterwards.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from bench import common

# label -> (annotators, submissions per annotator, think time range in seconds). A person
# needs 10-60 s to rank K=4 responses; the levels still think faster than that: "32" is 32
# people at 4-12 s (~3 rankings/s). "32-stress" (1-3 s, ~300 people's rate) finds where one
# Gradio process on this machine saturates; it is reported beside the goal, not as it.
LEVELS = {"1": (1, 60, (0.1, 0.3)), "8": (8, 20, (1.0, 3.0)), "32": (32, 10, (4.0, 12.0)),
          "32-stress": (32, 10, (1.0, 3.0))}
QUICK_LEVELS = {"1": (1, 20, (0.1, 0.3)), "8": (8, 8, (1.0, 3.0)), "32": (32, 4, (4.0, 12.0)),
                "32-stress": (32, 4, (1.0, 3.0))}


# -- the client process ---------------------------------------------------------------------
async def call(client, base: str, name: str, data: list, session: str) -> dict:
    """One raw API call. `session`: one session_hash per client, as gradio_client sends."""
    r = await client.post(f"{base}gradio_api/call/{name}",
                          json={"data": data, "session_hash": session})
    r.raise_for_status()
    event_id = r.json()["event_id"]
    event = None
    async with client.stream("GET", f"{base}gradio_api/call/{name}/{event_id}") as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                payload = json.loads(line.split(":", 1)[1])
                if event == "error":
                    raise RuntimeError(f"{name}: server error {payload}")
                return payload[0]
    raise RuntimeError(f"{name}: stream ended without a result")


async def annotator(client, base, who, n, think, rng, out):
    session = f"bench-{who}"
    item = (await call(client, base, "get_item", [who], session))["item"]
    for i in range(n):
        if item is None:
            out["no_item"] += 1
            return
        await asyncio.sleep(rng.uniform(*think))
        key = f"{who}-{uuid.uuid4().hex}"
        ranking = "".join(r["label"] for r in item["responses"])
        t0 = time.perf_counter()
        try:
            res = await call(client, base, "submit", [who, item["id"], item["token"], key, ranking,
                                                      False, False, False, "", 1.0], session)
            if res.get("ok"):
                out["acked"].append(key)
            else:
                out["failed"].append(res.get("message"))
            nxt = await call(client, base, "get_item", [who], session)
        except Exception as exc:  # counted, never hidden
            out["failed"].append(f"{type(exc).__name__}: {exc}")
            continue
        out["latency_ms"].append((time.perf_counter() - t0) * 1000)
        item = nxt["item"]


async def run_level(base: str, n: int, per: int, think, tag: str, seed: int) -> dict:
    import httpx
    out = {"latency_ms": [], "acked": [], "failed": [], "no_item": 0}
    limits = httpx.Limits(max_connections=2 * n + 4, max_keepalive_connections=2 * n + 4)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(annotator(client, base, f"{tag}-a{i}", per, think,
                                         random.Random(seed + i), out) for i in range(n)))
        out["wall_s"] = time.perf_counter() - t0
    return out


def client_overhead(base: str, calls: int) -> dict:
    """Per-call time of gradio_client's predict vs the raw two-request call, interleaved."""
    import httpx
    from gradio_client import Client
    client = Client(base, verbose=False)
    raw, gc = [], []

    async def raw_once():
        async with httpx.AsyncClient(timeout=30) as c:
            t0 = time.perf_counter()
            await call(c, base, "get_item", ["overhead-probe"], "bench-overhead-probe")
            return (time.perf_counter() - t0) * 1000
    for _ in range(calls):
        raw.append(asyncio.run(raw_once()))
        t0 = time.perf_counter()
        client.predict("overhead-probe", api_name="/get_item")
        gc.append((time.perf_counter() - t0) * 1000)
    client.close() if hasattr(client, "close") else None
    return {"raw_ms_p50": common.median(raw), "gradio_client_ms_p50": common.median(gc),
            "overhead_ms_p50": common.median(gc) - common.median(raw), "calls": calls}


def client_main(args) -> None:
    base, levels = args.url, json.loads(args.levels)
    res = {}
    for label, (n, per, think) in levels.items():
        res[label] = asyncio.run(run_level(base, n, per, think, f"{args.tag}-{label}", args.seed))
    if args.overhead:
        res["overhead"] = client_overhead(base, args.overhead)
    print("RESULT " + json.dumps(res), flush=True)


# -- the server side ----------------------------------------------------------------------------
def prepare_workspace(ws: Path, n_items: int, worker_threads: int | None = None) -> None:
    """Model = the cached embedded dir; a few ranked items (reward model for PPO); many open ones.
    `worker_threads`: the workspace's torch_threads (None: the worker's default)."""
    from bench.bench_reward import add_rankings
    from rlhf_core.data import annotation
    from rlhf_core.workspace import open_workspace
    # a PPO bench needs a serving reward model, not evidence: 8 rankings never clear the
    # promotion gate (RewardConfig.promote_min_heldout_pairs), so it is off here
    threads = {"torch_threads": worker_threads} if worker_threads else {}
    store, cfg = open_workspace(ws, model=common.embedded_model_dir(), **{
        "reward.promote_min_heldout_pairs": 0, "reward.promote_min_accuracy": 0.0, **threads})
    add_rankings(store, 8, start=0, seed=0)  # 8 ranked K=4 items -> 48 pairs for train_reward
    rng = random.Random(1)
    recs = [{"text": f"Bench prompt {i}: describe {rng.choice(['a lake', 'a city', 'a song'])}"}
            for i in range(64)]
    store.add_prompts(recs, source="bench", heldout_fraction=0.2)
    pids = [r["id"] for r in store.rows("SELECT id FROM prompts WHERE source = 'bench' "
                                          "AND text LIKE 'Bench prompt%'")]
    for start in range(0, n_items, 200):
        items = [{"prompt_id": pids[(start + j) % len(pids)],
                  "responses": [{"text": f"fake response {start + j}.{r} " + "lorem ipsum " * 20,
                                 "n_tokens": 40, "finish_reason": "stop"} for r in range(4)]}
                 for j in range(min(200, n_items - start))]
        annotation.create_batch(store, policy_version=0, k=4, items=items)
    store.close()


def wait_job(store, job_id: int, timeout: float, states=("done", "failed", "cancelled")):
    from rlhf_core.data import jobs
    t0 = time.time()
    while time.time() - t0 < timeout:
        job = jobs.get_job(store, job_id)
        if job["status"] in states:
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} did not reach {states} in {timeout} s")


class KeepPPORunning:
    """While active, a ppo_round is always queued or running; records when one was running."""

    def __init__(self, store):
        self.store, self.stop = store, threading.Event()
        self.samples, self.running, self.jobs = 0, 0, set()

    def __enter__(self):
        from rlhf_core.data import jobs
        self.jobs.add(jobs.enqueue(self.store, "ppo_round", {}, requested_by="bench", unique=True))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        from rlhf_core.data import jobs
        while not self.stop.wait(0.5):
            busy = self.store.scalar("SELECT COUNT(*) FROM jobs WHERE kind = 'ppo_round' "
                                     "AND status IN ('queued', 'running')")
            if not busy:
                self.jobs.add(jobs.enqueue(self.store, "ppo_round", {}, requested_by="bench",
                                           unique=True))

    def measure(self, fn):
        """Run fn() while sampling (every 0.25 s) whether a PPO round is running."""
        done = threading.Event()

        def probe():
            while not done.wait(0.25):
                self.samples += 1
                self.running += bool(self.store.scalar(
                    "SELECT COUNT(*) FROM jobs WHERE kind = 'ppo_round' AND status = 'running'"))
        t = threading.Thread(target=probe, daemon=True)
        t.start()
        try:
            return fn()
        finally:
            done.set()
            t.join()

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        return False


def run_client(url: str, levels: dict, tag: str, overhead: int = 0) -> dict:
    cmd = [sys.executable, "-m", "bench.b4_latency", "--client", url, "--levels",
           json.dumps(levels), "--tag", tag, "--overhead", str(overhead)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        raise RuntimeError(f"client failed: {proc.stderr[-2000:]}")
    return json.loads(line[-1][7:])


def summarize(raw: dict, store) -> dict:
    out = {}
    for n, r in raw.items():
        if n == "overhead":
            continue
        acked = r["acked"]
        found = 0
        for start in range(0, len(acked), 500):
            chunk = acked[start:start + 500]
            found += store.scalar(f"SELECT COUNT(*) FROM rankings WHERE submission_key IN "
                                  f"({','.join('?' * len(chunk))})", chunk)
        lat = r["latency_ms"]
        out[n] = {"p50_ms": _r(common.percentile(lat, 50)), "p95_ms": _r(common.percentile(lat, 95)),
                  "p99_ms": _r(common.percentile(lat, 99)), "samples": len(lat),
                  "acked": len(acked), "acked_in_db": found, "lost": len(acked) - found,
                  "failed": len(r["failed"]), "failures": r["failed"][:5],
                  "ran_out_of_items": r["no_item"],
                  "cycles_per_s": _r(len(lat) / r["wall_s"]) if r["wall_s"] else None}
    return out


def _r(x):
    return None if x is None else round(x, 1)


def run(quick: bool = False, worker_threads: int | None = None) -> dict:
    from app.launcher import start_app
    from rlhf_core.config import LoopConfig
    from rlhf_core.data import jobs
    from rlhf_core.data.store import Store
    levels = QUICK_LEVELS if quick else LEVELS
    need = 2 * sum(n * (per + 2) for n, per, _ in levels.values()) + 200
    with tempfile.TemporaryDirectory(prefix="bench-b4-") as tmp:
        ws = Path(tmp) / "ws"
        prepare_workspace(ws, need, worker_threads)
        url, stop = start_app(ws)
        store = Store(ws / "rlhf.db")
        try:
            _wait_up(url)
            reward_job = jobs.enqueue(store, "train_reward", {}, requested_by="bench")
            job = wait_job(store, reward_job, 900)  # the worker loads the model, trains
            if job["status"] != "done":
                raise RuntimeError(f"train_reward failed: {job['error']}")
            idle = run_client(url, levels, "idle", overhead=10 if quick else 30)
            with KeepPPORunning(store) as keeper:
                wait_job(store, min(keeper.jobs), 300, states=("running",))
                time.sleep(3)  # past model set-up, into generation
                busy = keeper.measure(lambda: run_client(url, levels, "ppo"))
            ppo_jobs = [jobs.get_job(store, j) for j in sorted(keeper.jobs)]
            result = {
                "bench": "B4 annotation latency",
                "levels": {k: {"annotators": v[0], "submissions_each": v[1], "think_s": v[2]}
                           for k, v in levels.items()},
                "idle": summarize(idle, store), "ppo": summarize(busy, store),
                "ppo_running_fraction": round(keeper.running / max(keeper.samples, 1), 3),
                "ppo_jobs": [{"id": j["id"], "status": j["status"], "error": j["error"]}
                             for j in ppo_jobs],
                "load_label": "ppo_round job in the worker (niced), as in production",
                # the ppo_round job kind runs the workspace's policy algorithm (the default's)
                "policy_algorithm": LoopConfig().algorithm,
                "worker_threads": worker_threads or "default",
                "packages": common.package_versions(),
                "gradio_client": idle.get("overhead"),
                "goal": "p95 <= 150 ms at 32 annotators during a policy round; 0 failed, 0 lost",
            }
            # cancel what we queued so the worker stops promptly
            for j in keeper.jobs:
                jobs.cancel(store, j)
        finally:
            store.close()
            stop()
    return result


def _wait_up(url: str, timeout: float = 60) -> None:
    import httpx
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if httpx.get(url + "gradio_api/info", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("UI did not come up")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--levels", help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="x", help=argparse.SUPPRESS)
    ap.add_argument("--overhead", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--worker-threads", type=int, dest="worker_threads",
                    help="the worker's torch threads (default: the app's default)")
    ap.add_argument("--out", default="b4_latency", help="result name (bench/results/OUT.json)")
    args = ap.parse_args(argv)
    if args.client:
        args.url = args.client
        client_main(args)
        return {}
    res = run(args.quick, args.worker_threads)
    common.write_result(args.out, res)
    print(json.dumps({k: res[k] for k in ("idle", "ppo", "gradio_client")}, indent=1))
    return res


if __name__ == "__main__":
    main()
