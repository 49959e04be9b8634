"""B7: what abandoned sessions cost a real UI server (issue 16.6).

A UI server on loopback (its own process, no worker) with 50 ready items; a client makes
`--calls` raw `/get_item` calls, each with a fresh session_hash and a fresh invented name, as a
script that never reuses its session does, and never submits. Printed: the server's resident
memory every 100 calls (MB, from /proc) and per abandoned session, and how many items the
invented names hold at the end, and for how long. `--capacity` overrides launch()'s
state_session_capacity. Not a timed test.

    .venv/bin/python -m bench.b7_sessions [--calls 500] [--capacity N]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench import common


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def serve(ws: str, port: int, capacity: int | None) -> None:
    from app.context import AppContext
    from app.ui import launch
    from rlhf_core.config import AppConfig
    ctx = AppContext.from_config(AppConfig(workspace=Path(ws)))
    kwargs = {} if capacity is None else {"state_session_capacity": capacity}
    launch(ctx, port=port, quiet=True, **kwargs)


def seed(ws: Path, n: int = 50) -> None:
    from rlhf_core.data.annotation import create_batch
    from rlhf_core.data.store import Store
    store = Store(ws / "rlhf.db")
    store.add_prompts([{"text": f"session prompt {i}"} for i in range(n)], source="bench")
    ids = [r["id"] for r in store.rows("SELECT id FROM prompts ORDER BY id")]
    create_batch(store, policy_version=0, k=4, items=[
        {"prompt_id": pid, "responses": [{"text": f"answer {pid}.{j}"} for j in range(4)]}
        for pid in ids])
    store.close()


def call(client, base: str, name: str, data: list, session: str) -> dict:
    r = client.post(f"{base}gradio_api/call/{name}", json={"data": data, "session_hash": session})
    r.raise_for_status()
    event_id = r.json()["event_id"]
    with client.stream("GET", f"{base}gradio_api/call/{name}/{event_id}") as resp:
        event = None
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "complete":
                return json.loads(line[5:])[0]
    raise RuntimeError(f"{name}: no complete event")


def run(calls: int, capacity: int | None) -> dict:
    import httpx

    from app.launcher import free_port
    from rlhf_core.data.store import Store
    with tempfile.TemporaryDirectory(prefix="bench-b7-") as tmp:
        ws = Path(tmp) / "ws"
        seed(ws)
        port = free_port()
        args = [sys.executable, "-m", "bench.b7_sessions", "--serve", str(ws), str(port)]
        if capacity is not None:
            args += ["--capacity", str(capacity)]
        server = subprocess.Popen(args, cwd=common.BENCH.parent)
        base = f"http://127.0.0.1:{port}/"
        try:
            with httpx.Client(timeout=30) as client:
                _wait_up(client, base)
                for i in range(20):  # warm-up on one session: caches, first compiles
                    call(client, base, "get_item", ["warm"], "warm-session")
                before = rss_mb(server.pid)
                curve, ok, t0 = [], 0, time.perf_counter()
                for i in range(1, calls + 1):
                    out = call(client, base, "get_item", [f"invented-{i}"], uuid.uuid4().hex)
                    ok += bool(out.get("item"))
                    if i % 100 == 0:
                        curve.append((i, round(rss_mb(server.pid), 1)))
                seconds = time.perf_counter() - t0
                after = rss_mb(server.pid)
            store = Store(ws / "rlhf.db")
            held = store.scalar("SELECT COUNT(*) FROM assignments WHERE status = 'open' "
                                "AND expires_at > ? AND annotator LIKE 'invented-%'",
                                [time.time()])
            max_expiry = store.scalar("SELECT MAX(expires_at) FROM assignments "
                                      "WHERE annotator LIKE 'invented-%'")
            store.close()
        finally:
            server.terminate()
            server.wait(30)
    return {"calls": calls, "capacity": capacity or "launch() default (app.ui.SESSION_CAPACITY)",
            "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
            "kb_per_session": round(1024 * (after - before) / calls, 1), "curve": curve,
            "items_given": ok, "items_held_at_end": held,
            "longest_hold_s": round(max_expiry - time.time(), 0) if max_expiry else None,
            "ms_per_call": round(1000 * seconds / calls, 1)}


def _wait_up(client, base: str, timeout: float = 90) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if client.get(base + "gradio_api/info").status_code == 200:
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise TimeoutError("UI did not come up")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--capacity", type=int, default=None)
    ap.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--label", default="current")
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.capacity)
        return {}
    res = run(args.calls, args.capacity)
    print(json.dumps(res, indent=1))
    path = common.RESULTS / "b7_sessions.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old[args.label] = res
    common.write_result("b7_sessions", old)
    return res


if __name__ == "__main__":
    main()
