"""The durable job queue: claim, finish, failures, leases, cancel, heartbeats, metrics."""
from __future__ import annotations

import threading
import time

import pytest

from rlhf_core.data import jobs
from rlhf_core.worker import handlers as handler_table
from rlhf_core.worker.data import LocalData
from rlhf_core.worker.run import Heartbeat, Reporter, run_one, worker_loop
from tests.helpers import QueueOnlyRuntime, wait_until


@pytest.fixture
def handlers(monkeypatch):
    """Register test handlers without leaking them into the handler table."""
    def add(name, fn):
        monkeypatch.setitem(handler_table.HANDLERS, name, fn)
    return add


def expire_lease(store, job_id):
    with store.write() as db:
        db.execute("UPDATE jobs SET lease_expires = ? WHERE id = ?", [time.time() - 1, job_id])


def test_enqueue_claim_finish(store, handlers):
    handlers("echo", lambda rt, params, rep: {"echo": params["x"], "rt": rt.tag})
    job_id = jobs.enqueue(store, "echo", {"x": 7}, requested_by="alice")
    job = jobs.get_job(store, job_id)
    assert (job["status"], job["attempts"], job["params"]) == ("queued", 0, {"x": 7})
    done = run_one(QueueOnlyRuntime(store, "RT"), "w1")
    assert done["id"] == job_id and done["status"] == "done"
    assert done["result"] == {"echo": 7, "rt": "RT"} and done["progress"] == 1.0
    assert done["attempts"] == 1 and done["worker"] == "w1" and done["finished_at"]
    assert run_one(QueueOnlyRuntime(store, "RT"), "w1") is None  # queue empty
    kinds = [e["kind"] for e in store.rows("SELECT kind FROM events ORDER BY id")]
    assert "job_queued" in kinds and "job_done" in kinds


def test_claim_order_and_kinds_filter(store):
    a = jobs.enqueue(store, "a")
    b = jobs.enqueue(store, "b")
    assert jobs.claim(store, "w", kinds=["b"])["id"] == b
    assert jobs.claim(store, "w", kinds=["b"]) is None
    assert jobs.claim(store, "w")["id"] == a


def test_background_scoring_waits_behind_loop_jobs(store):
    """score_items (the researcher view) queued first still runs after the loop's jobs."""
    scoring = jobs.enqueue(store, "score_items", {"version": 1})
    ppo = jobs.enqueue(store, "ppo_round")
    assert jobs.claim(store, "w")["id"] == ppo
    sample = jobs.enqueue(store, "sample_batch")  # queued by the round, after the scoring
    assert jobs.claim(store, "w")["id"] == sample
    assert jobs.claim(store, "w")["id"] == scoring  # nothing else queued: now it runs
    assert jobs.claim(store, "w") is None


def test_unique_enqueue(store):
    first = jobs.enqueue(store, "sample_batch", unique=True)
    assert jobs.enqueue(store, "sample_batch", unique=True) == first
    jobs.claim(store, "w")  # running still counts
    assert jobs.enqueue(store, "sample_batch", unique=True) == first
    assert jobs.enqueue(store, "sample_batch") != first  # without unique: a second job
    assert jobs.enqueue(store, "other", unique=True) != first
    jobs.finish(store, first, result={})
    assert store.scalar("SELECT COUNT(*) FROM jobs WHERE kind = 'sample_batch'") == 2


def test_handler_exception_fails_job_and_worker_keeps_going(store, handlers):
    def boom(rt, params, rep):
        rep.progress(0.3, "about to fail")
        raise RuntimeError("the GPU caught fire")

    handlers("boom", boom)
    handlers("ok", lambda rt, params, rep: {"fine": True})
    bad = jobs.enqueue(store, "boom")
    unknown = jobs.enqueue(store, "no_such_kind")
    good = jobs.enqueue(store, "ok")
    stop = threading.Event()
    t = threading.Thread(target=worker_loop, args=(QueueOnlyRuntime(store),),
                         kwargs={"stop": stop, "poll_s": 0.05})
    t.start()
    try:
        assert wait_until(lambda: jobs.get_job(store, good)["status"] == "done", 20)
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()
    failed = jobs.get_job(store, bad)
    assert failed["status"] == "failed"
    assert failed["error"] == "RuntimeError: the GPU caught fire"
    assert failed["progress"] == pytest.approx(0.3)
    assert "unknown job kind" in jobs.get_job(store, unknown)["error"]
    assert jobs.get_job(store, good)["result"] == {"fine": True}


def test_lease_retaken_after_crash_then_failed_after_max_attempts(store):
    job_id = jobs.enqueue(store, "train", max_attempts=2)
    first = jobs.claim(store, "crashed-worker", lease_s=0.05)
    assert first["attempts"] == 1
    assert jobs.claim(store, "w2") is None  # lease still fresh: nobody else may take it
    time.sleep(0.1)  # the worker died: no heartbeat, the lease goes stale
    second = jobs.claim(store, "w2", lease_s=0.05)
    assert second["id"] == job_id and second["worker"] == "w2" and second["attempts"] == 2
    time.sleep(0.1)
    assert jobs.claim(store, "w3") is None
    job = jobs.get_job(store, job_id)
    assert job["status"] == "failed" and "no attempts are left" in job["error"]


def test_cancel_queued_job(store):
    job_id = jobs.enqueue(store, "x")
    assert jobs.cancel(store, job_id) is True
    assert jobs.get_job(store, job_id)["status"] == "cancelled"
    assert jobs.claim(store, "w") is None
    assert jobs.cancel(store, job_id) is False  # already finished


def test_cancel_running_job_stops_at_next_progress(store, handlers):
    steps = []
    started, cancelled = threading.Event(), threading.Event()

    def long_job(rt, params, rep):
        for i in range(100):
            rep.progress(i / 100, f"step {i}")
            steps.append(i)
            started.set()
            cancelled.wait(5)
        return {"finished": True}

    handlers("long", long_job)
    job_id = jobs.enqueue(store, "long")
    t = threading.Thread(target=run_one, args=(QueueOnlyRuntime(store), "w"))
    t.start()
    assert started.wait(10)
    assert jobs.get_job(store, job_id)["status"] == "running"
    assert jobs.cancel(store, job_id) is True
    cancelled.set()
    t.join(10)
    job = jobs.get_job(store, job_id)
    assert job["status"] == "cancelled" and "cancelled" in job["error"]
    assert job["result"] is None
    assert len(steps) < 100


def test_stale_worker_does_not_cancel_the_new_owner(store, handlers):
    """A worker that lost its lease must stop without touching the job its successor runs."""
    def slow(rt, params, rep):
        expire_lease(store, rep.job_id)  # this worker stalled past its lease...
        taken = jobs.claim(store, "w2")  # ...and another worker re-took the job
        assert taken["id"] == rep.job_id and taken["attempts"] == 2
        rep.progress(0.5, "still here")  # the stale worker notices it lost the job
        return {"never": True}

    handlers("slow", slow)
    job_id = jobs.enqueue(store, "slow")
    row = run_one(QueueOnlyRuntime(store), "w1")
    assert row["status"] == "running" and row["worker"] == "w2"
    assert row["result"] is None and row["error"] is None
    jobs.finish(store, job_id, result={"by": "w2"}, worker="w2")
    assert jobs.get_job(store, job_id)["status"] == "done"


def test_finish_by_other_worker_is_ignored(store):
    job_id = jobs.enqueue(store, "x")
    jobs.claim(store, "w1")
    jobs.finish(store, job_id, result={"a": 1}, worker="intruder")
    assert jobs.get_job(store, job_id)["status"] == "running"


def test_heartbeat_thread_renews_lease_during_long_handler(store):
    job_id = jobs.enqueue(store, "long")
    jobs.claim(store, "w1", lease_s=0.3)
    reporter = Reporter(LocalData(store, lease_s=0.3), job_id, "w1")
    first_lease = jobs.get_job(store, job_id)["lease_expires"]
    stolen = []
    with Heartbeat(reporter, every_s=0.05):
        end = time.monotonic() + 1.0  # one long "forward pass", over three lease lengths
        while time.monotonic() < end:
            stolen.append(jobs.claim(store, "w2"))
            time.sleep(0.1)
    job = jobs.get_job(store, job_id)
    assert stolen and all(s is None for s in stolen)
    assert job["worker"] == "w1" and job["attempts"] == 1
    assert job["lease_expires"] > first_lease + 0.5
    assert job["heartbeat_at"] > time.time() - 0.5


def test_progress_is_a_heartbeat_and_is_clamped(store):
    job_id = jobs.enqueue(store, "x")
    jobs.claim(store, "w1", lease_s=0.01)
    rep = Reporter(LocalData(store, lease_s=60), job_id, "w1")
    rep.progress(1.7, "over")
    job = jobs.get_job(store, job_id)
    assert job["progress"] == 1.0 and job["message"] == "over"
    assert job["lease_expires"] > time.time() + 50


def test_reporter_metrics_land_in_metrics_table(store, handlers):
    def train(rt, params, rep):
        for step in range(3):
            rep.metrics("reward", {"loss": 1.0 / (step + 1), "acc": 0.5}, step=step, version=2)
        return {}

    handlers("train", train)
    job_id = jobs.enqueue(store, "train")
    assert run_one(QueueOnlyRuntime(store), "w")["status"] == "done"
    rows = store.metric_series("reward", "loss")
    assert [(r["step"], r["value"], r["job_id"], r["version"]) for r in rows] == \
        [(0, 1.0, job_id, 2), (1, 0.5, job_id, 2), (2, pytest.approx(1 / 3), job_id, 2)]
    assert len(store.metric_series("reward")) == 6


def test_list_jobs_newest_first(store):
    ids = [jobs.enqueue(store, k) for k in ("a", "b", "c")]
    assert [j["id"] for j in jobs.list_jobs(store)] == ids[::-1]
    assert [j["id"] for j in store.status()["jobs"]] == ids[::-1]


def test_cancel_of_a_dead_workers_job_is_not_lost(store):
    """The worker died before seeing the cancel: the next claim must not re-run the job."""
    job_id = jobs.enqueue(store, "x")
    jobs.claim(store, "died", lease_s=0.05)
    assert jobs.cancel(store, job_id) is True
    time.sleep(0.1)
    assert jobs.claim(store, "w2") is None
    job = jobs.get_job(store, job_id)
    assert job["status"] == "cancelled" and job["attempts"] == 1
