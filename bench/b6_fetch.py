"""B6: the cost of fetching an item as the history grows (issue 16 point 4).

A workspace holds N items, all but `open` of them already ranked (the history every real
workspace accumulates), ranked by 50 past annotators. One fetch is what the Rank tab does per
item: `next_item` + `submit_ranking` + `annotator_progress`. A *waiting* fetch is the tick of a
page with nothing to rank (every open item held by someone else): `next_item` returning None +
`annotator_progress`. Printed as ms per fetch (wall and CPU), not a timed test.

    .venv/bin/python -m bench.b6_fetch [--sizes 1000,10000,100000] [--fetches 200]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench import common

PAST_ANNOTATORS = 50
ITEMS_PER_BATCH = 100
K = 4


def build_history(store, n_items: int, n_open: int) -> None:
    """N items in batches of 100 over 10 policy versions; all but the newest `n_open` ranked
    (a done assignment and a rank record each). Bulk table inserts in one transaction."""
    from rlhf_core.data.store import dumps, now_iso
    at = now_iso()
    store.add_prompts([{"text": f"bench prompt {i}"} for i in range(1000)], source="bench")
    with store.write() as db:
        n_batches = (n_items + ITEMS_PER_BATCH - 1) // ITEMS_PER_BATCH
        db["batches"].insert_all(
            ({"id": b + 1, "policy_version": b * 10 // n_batches, "k": K, "settings": "{}",
              "created_at": at} for b in range(n_batches)), batch_size=1000)
        db["items"].insert_all(
            ({"id": i + 1, "batch_id": i // ITEMS_PER_BATCH + 1, "prompt_id": i % 1000 + 1,
              "status": "ready", "overlap": 1, "kind": "label", "created_at": at}
             for i in range(n_items)), batch_size=1000)
        db["responses"].insert_all(
            ({"item_id": i + 1, "prompt_id": i % 1000 + 1, "position": p,
              "policy_version": i // ITEMS_PER_BATCH * 10 // n_batches,
              "text": f"answer {i}.{p}", "n_tokens": 3, "finish_reason": "stop",
              "settings": "{}", "created_at": at}
             for i in range(n_items) for p in range(K)), batch_size=1000)
        ranked = n_items - n_open
        db["assignments"].insert_all(
            ({"item_id": i + 1, "annotator": f"past-{i % PAST_ANNOTATORS}",
              "token": f"t{i}", "status": "done", "created_at": at, "expires_at": 0.0}
             for i in range(ranked)), batch_size=1000)
        tiers = dumps([[1], [2], [3], [4]])  # ids are not read by a fetch
        db["rankings"].insert_all(
            ({"submission_key": f"k{i}", "annotator": f"past-{i % PAST_ANNOTATORS}",
              "item_id": i + 1, "batch_id": i // ITEMS_PER_BATCH + 1, "policy_version": 0,
              "kind": "rank", "tiers": tiers, "time_spent_s": 20.0, "created_at": at}
             for i in range(ranked)), batch_size=1000)


class TimedLock:
    """The store's write lock, recording how long each hold lasted (everyone else waits)."""

    def __init__(self, lock):
        self.lock, self.held, self.t0 = lock, [], 0.0

    def acquire(self, *args, **kwargs):
        got = self.lock.acquire(*args, **kwargs)
        self.t0 = time.perf_counter()
        return got

    def release(self):
        self.held.append(time.perf_counter() - self.t0)
        self.lock.release()


def measure(store, fetches: int, n_annotators: int) -> dict:
    from rlhf_core.data import annotation
    wall, cpu = [], []
    store._write_lock = lock = TimedLock(store._write_lock)
    for f in range(fetches):
        who = f"past-{f % n_annotators}"  # annotators with a history of their own
        w0, c0 = time.perf_counter(), time.process_time()
        item = annotation.next_item(store, who)
        annotation.submit_ranking(store, annotator=who, item_id=item["id"], token=item["token"],
                                  submission_key=f"bench-{f}",
                                  tiers=[[r["id"]] for r in item["responses"]])
        annotation.annotator_progress(store, who)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    store._write_lock = lock.lock
    held = lock.held
    return {**_summary(wall, cpu), "lock_held_ms_p50": round(1000 * common.percentile(held, 50), 2),
            "lock_held_ms_max": round(1000 * max(held), 2), "writes_per_fetch": len(held) / fetches}


def measure_waiting(store, ticks: int) -> dict:
    """Every open item held by another name; a fresh name's tick finds nothing."""
    from rlhf_core.data import annotation
    holders = 0
    while annotation.next_item(store, f"holder-{holders}") is not None:
        holders += 1
    wall, cpu = [], []
    store._write_lock = lock = TimedLock(store._write_lock)
    for t in range(ticks):
        w0, c0 = time.perf_counter(), time.process_time()
        assert annotation.next_item(store, "waiting") is None
        annotation.annotator_progress(store, "waiting")
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    store._write_lock = lock.lock
    return {**_summary(wall, cpu), "holders": holders,
            "lock_held_ms_p50": round(1000 * common.percentile(lock.held, 50), 2)}


def _summary(wall: list[float], cpu: list[float]) -> dict:
    ms = lambda xs, q: round(1000 * common.percentile(xs, q), 2)  # noqa: E731
    return {"fetches": len(wall), "wall_ms_p50": ms(wall, 50), "wall_ms_p95": ms(wall, 95),
            "cpu_ms_mean": round(1000 * sum(cpu) / len(cpu), 2)}


def run(sizes: list[int], fetches: int, n_open: int) -> dict:
    from rlhf_core.data.store import Store
    out = {}
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-b6-") as tmp:
            store = Store(Path(tmp) / "rlhf.db")
            t0 = time.perf_counter()
            build_history(store, n, n_open)
            setup_s = time.perf_counter() - t0
            fetch = measure(store, fetches, 20)
            waiting = measure_waiting(store, max(20, fetches // 5))
            out[str(n)] = {"items": n, "open_at_start": n_open, "setup_s": round(setup_s, 1),
                           "fetch": fetch, "waiting": waiting}
            store.close()
        print(f"{n:>7} items: fetch {fetch['wall_ms_p50']} ms p50 wall, "
              f"{fetch['cpu_ms_mean']} ms CPU, write lock held {fetch['lock_held_ms_p50']} ms "
              f"p50 / {fetch['lock_held_ms_max']} max; waiting tick {waiting['wall_ms_p50']} ms p50 "
              f"wall, {waiting['cpu_ms_mean']} ms CPU", flush=True)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--fetches", type=int, default=200)
    ap.add_argument("--open", type=int, default=400, help="items not yet ranked at the start")
    ap.add_argument("--label", default="current", help="stored under this key in the results")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    res = run(sizes, args.fetches, args.open)
    path = common.RESULTS / "b6_fetch.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old.setdefault(args.label, {}).update(res)  # sizes run separately add up
    common.write_result("b6_fetch", old)
    return res


if __name__ == "__main__":
    main()
