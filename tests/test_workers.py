"""Is a worker alive (issue 11 point 4): the workers registry on a real store, the lease rules
it triggers at once, a stopping worker's hand-back, and what the Rank and Status tabs say.
Real processes (SIGKILL, SIGTERM, SIGHUP): tests/test_worker_processes.py."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from app import handlers as ui_handlers
from app.context import AppContext
from app.status import status_view
from rlhf_core.config import AppConfig
from rlhf_core.data import jobs, workers
from rlhf_core.worker import handlers as handler_table
from rlhf_core.worker.run import run_one
from tests.helpers import QueueOnlyRuntime, wait_until


def register(store, name="w1", *, scope=None, pid=None, kinds=None):
    workers.register(store, name, host="somewhere", pid=pid or 1, scope=scope, kinds=kinds,
                     device="cpu float32")


# -- the registry -----------------------------------------------------------------------------------
def test_registry_lists_beats_and_the_current_job(store):
    register(store, "w1", kinds=["sample_batch"])
    job_id = jobs.enqueue(store, "sample_batch")
    jobs.claim(store, "w1")
    jobs.report_progress(store, job_id, "w1", 0.25, "sampling")
    assert workers.beat(store, "w1", job_id=job_id)
    (w,) = workers.list_workers(store)
    assert (w["status"], w["job_id"], w["job_kind"], w["job_progress"]) == \
        ("running", job_id, "sample_batch", 0.25)
    assert w["kinds"] == ["sample_batch"] and w["age_s"] < 2
    assert [a["name"] for a in workers.alive(store)] == ["w1"]
    workers.stopped(store, "w1")
    assert workers.alive(store) == [] and workers.list_workers(store)[0]["status"] == "stopped"
    assert not workers.beat(store, "never-registered")


def test_silent_worker_is_dead_and_its_job_released_at_once(store):
    """Another host (no pid check): three missed beats are enough, not the 60 s lease."""
    kept = jobs.enqueue(store, "a")
    last = jobs.enqueue(store, "b", max_attempts=1)
    cancelled = jobs.enqueue(store, "c")
    for name, job in (("w-kept", kept), ("w-last", last), ("w-cancel", cancelled)):
        register(store, name, scope="another host")
        assert jobs.claim(store, name, kinds=[jobs.get_job(store, job)["kind"]])["id"] == job
        workers.beat(store, name, job_id=job)
    register(store, "w-alive", scope="another host")
    jobs.cancel(store, cancelled)
    time.sleep(0.3)
    workers.beat(store, "w-alive")
    assert sorted(workers.reap(store, stale_s=0.2)) == ["w-cancel", "w-kept", "w-last"]
    row = jobs.get_job(store, kept)
    assert row["status"] == "queued" and "worker died: no heartbeat" in row["message"]
    assert jobs.get_job(store, last)["status"] == "failed"
    assert "no attempts are left" in jobs.get_job(store, last)["error"]
    assert jobs.get_job(store, cancelled)["status"] == "cancelled"
    states = {w["name"]: w["status"] for w in workers.list_workers(store)}
    assert states == {"w-kept": "dead", "w-last": "dead", "w-cancel": "dead", "w-alive": "idle"}
    assert workers.reap(store, stale_s=0.2) == []  # once


def test_gone_pid_on_this_host_is_dead_before_any_beat_is_missed(store):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    zombie.kill()
    wait_until(lambda: not workers.pid_alive(zombie.pid), 5)
    assert not workers.pid_alive(zombie.pid)  # killed, not yet waited for: still dead
    zombie.wait()
    job_id = jobs.enqueue(store, "x")
    register(store, "gone", pid=gone.pid, scope=workers.pid_scope())
    register(store, "me", pid=os.getpid(), scope=workers.pid_scope())
    register(store, "elsewhere", pid=gone.pid, scope="another host")  # its pid means nothing here
    jobs.claim(store, "gone")
    assert workers.reap(store) == ["gone"]
    assert jobs.get_job(store, job_id)["status"] == "queued"
    rows = {w["name"]: w for w in workers.list_workers(store)}
    assert rows["gone"]["reason"] == f"process {gone.pid} is gone"
    assert rows["me"]["status"] == rows["elsewhere"]["status"] == "idle"


def test_the_status_tab_shows_a_dead_workers_job_released(tmp_path):
    """`rlhf serve` alone, its worker killed: one refresh of the Status tab, not 60 s."""
    ctx = AppContext.from_config(AppConfig(workspace=tmp_path / "ws"))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    register(ctx.store, "killed", pid=gone.pid, scope=workers.pid_scope())
    job_id = jobs.enqueue(ctx.store, "sample_batch")
    jobs.claim(ctx.store, "killed")
    jobs.report_progress(ctx.store, job_id, "killed", 0.25, "sampling")
    view = status_view(ctx, "ada")
    assert 'data-status="queued"' in view["jobs_html"] and "running" not in view["jobs_html"]
    assert 'data-status="dead"' in view["workers_html"] and "No worker is running" in \
        view["workers_html"]


def test_rows_of_long_gone_workers_are_forgotten(store):
    register(store, "old")
    workers.stopped(store, "old")
    with store.write() as db:
        db.execute("UPDATE workers SET heartbeat_at = heartbeat_at - ?", [workers.FORGET_S + 1])
    register(store, "new")
    assert [w["name"] for w in workers.list_workers(store)] == ["new"]


def test_a_stopping_worker_hands_its_job_back(store, monkeypatch):
    stop = threading.Event()

    def stops_midway(runtime, params, reporter):
        reporter.progress(0.5, "half")
        stop.set()  # SIGTERM arrives
        reporter.progress(0.6, "never recorded")
        return {"finished": True}
    monkeypatch.setitem(handler_table.HANDLERS, "long", stops_midway)
    job_id = jobs.enqueue(store, "long")
    row = run_one(QueueOnlyRuntime(store), "w1", stop=stop)
    assert row["status"] == "queued" and row["attempts"] == 0  # not counted against it
    assert "the worker stopped" in row["message"] and row["result"] is None
    assert jobs.claim(store, "w2")["id"] == job_id


# -- what the UI says ---------------------------------------------------------------------------------
def test_rank_tab_and_status_say_no_worker_runs_instead_of_sampling(tmp_path):
    ctx = AppContext.from_config(AppConfig(workspace=tmp_path / "ws"))
    form = ui_handlers.load_form(ctx, "ada", {})
    assert form["waiting"] and "sampling" not in form["message"]
    assert "no worker is running" in form["message"]
    assert f"rlhf worker --workspace {ctx.workspace}" in form["message"]
    view = status_view(ctx, "ada")
    assert "No worker is running" in view["workers_html"]
    assert f"rlhf worker --workspace {ctx.workspace}" in view["workers_html"]

    register(ctx.store, "host:1:2", pid=os.getpid(), scope=workers.pid_scope())
    job_id = jobs.enqueue(ctx.store, "sample_batch")
    jobs.claim(ctx.store, "host:1:2")
    workers.beat(ctx.store, "host:1:2", job_id=job_id)
    assert "no worker" not in ui_handlers.load_form(ctx, "ada", {})["message"]
    html = status_view(ctx, "ada")["workers_html"]
    assert "No worker" not in html and "host:1:2" in html and "running" in html
    assert f"#{job_id} sample_batch 0%" in html and "heartbeat 0 s ago" in html


def test_annotators_see_no_hosts_pids_or_paths(tmp_path):
    ctx = AppContext.from_config(AppConfig(workspace=tmp_path / "ws", researchers=("rex",)))
    register(ctx.store, "gpu-host:4242:1", pid=4242, scope="another host")
    workers.stopped(ctx.store, "gpu-host:4242:1")
    html = status_view(ctx, "ada")["workers_html"]
    assert "gpu-host" not in html and "4242" not in html and str(ctx.workspace) not in html
    assert "rlhf worker --workspace …" in html and "worker 1" in html
    assert "gpu-host:4242:1" in status_view(ctx, "rex")["workers_html"]
