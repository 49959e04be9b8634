"""The worker process: the only one that holds models.

It lowers its own priority and caps torch threads so a UI on the same cores stays responsive
(DESIGN.md: p95 649 ms beside an un-niced 2-thread job, 312 ms niced), claims jobs, runs each
through the table in handlers.py, and when idle runs the loop policy (loop.py). It reaches the
workspace's data only through a data interface (data.py: `LocalData`).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import traceback
from pathlib import Path
from typing import Callable

from rlhf_core.checkpoints import clean_partial
from rlhf_core.data.jobs import LEASE_S, JobCancelled
from rlhf_core.worker.presence import Presence, device_label

log = logging.getLogger(__name__)


class WorkerStopping(Exception):
    """The worker was asked to stop: the job is handed back (re-queued) at this report."""


class Reporter:
    """Handed to a job handler: progress (which is also the heartbeat) and metrics.
    Once `stop` is set, the next progress report ends the job (WorkerStopping)."""

    def __init__(self, data, job_id: int, worker: str, stop: threading.Event | None = None):
        self.data, self.job_id, self.worker, self.stop = data, job_id, worker, stop

    def progress(self, fraction: float, message: str = "") -> None:
        if self.stop is not None and self.stop.is_set():
            raise WorkerStopping("the worker stopped")
        self.data.report_progress(self.job_id, self.worker, fraction, message)

    def metrics(self, kind: str, values: dict, *, step: int | None = None,
                version: int | None = None) -> None:
        self.data.log_metrics(kind, values, step=step, version=version, job_id=self.job_id)


class Heartbeat:
    """Renews the lease from a thread, so one long forward pass is not mistaken for death."""

    def __init__(self, reporter: Reporter, every_s: float = LEASE_S / 4):
        self.reporter, self.every_s = reporter, every_s
        self._stop = threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.every_s):
            try:
                self.reporter.data.renew_lease(self.reporter.job_id, self.reporter.worker)
            except Exception:  # a busy DB must not kill the job; the next beat retries
                log.warning("heartbeat failed", exc_info=True)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        return False


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 10000}"


def run_one(runtime, worker: str, kinds: list[str] | None = None, *,
            stop: threading.Event | None = None, presence=None) -> dict | None:
    """Claim and run one job. Returns the finished job row, or None if the queue was empty.
    With `stop` set mid-job, the job is handed back at its next progress report; `presence`
    (the workers registry) hears when the job starts and ends."""
    from rlhf_core.worker.handlers import HANDLERS
    data = runtime.data
    job = data.claim(worker, kinds)
    if job is None:
        return None
    reporter = Reporter(data, job["id"], worker, stop)
    fn = HANDLERS.get(job["kind"])
    if presence is not None:
        presence.job(job["id"])
    try:
        if fn is None:
            raise ValueError(f"unknown job kind {job['kind']!r}")
        runtime.refresh_config(data.config())  # read once per claimed job, from one place
        with Heartbeat(reporter):
            result = fn(runtime, job["params"] or {}, reporter)
        data.finish(job["id"], worker, result=result or {})
    except WorkerStopping as exc:
        data.abandon(job["id"], worker, str(exc))
    except JobCancelled as exc:
        data.mark_cancelled(job["id"], worker, str(exc))
    except Exception as exc:  # a failed job must never take the worker down
        log.error("job %s (%s) failed:\n%s", job["id"], job["kind"], traceback.format_exc())
        data.finish(job["id"], worker, error=f"{type(exc).__name__}: {exc}")
    except BaseException:  # KeyboardInterrupt, SystemExit: hand the job back, then go
        data.abandon(job["id"], worker, "the worker was interrupted")
        raise
    finally:
        if presence is not None:
            presence.job(None)
    return data.get_job(job["id"])


def worker_loop(runtime, *, stop: threading.Event, idle: Callable | None = None,
                poll_s: float = 1.0, kinds: list[str] | None = None, presence=None) -> None:
    """Run jobs until `stop` is set. `idle()` runs when the queue is empty (the loop policy).
    The worker is in the workers registry throughout (`presence`, else one made here)."""
    if presence is None:
        presence = Presence(runtime.data, worker_name(), stop=stop, kinds=kinds,
                            device=device_label(runtime))
        with presence:
            return worker_loop(runtime, stop=stop, idle=idle, poll_s=poll_s, kinds=kinds,
                               presence=presence)
    worker = presence.name
    log.info("worker %s started", worker)
    while not stop.is_set():
        try:
            ran = run_one(runtime, worker, kinds, stop=stop, presence=presence)
            if ran is None and idle is not None:
                idle()
        except Exception:
            log.error("worker loop error:\n%s", traceback.format_exc())
            ran = None
        if ran is None:
            stop.wait(poll_s)


def lower_priority(nice: int, threads: int | None) -> None:
    import torch

    from rlhf_core.models import quiet_transformers
    quiet_transformers()
    if nice:
        try:
            os.nice(nice)
        except OSError:
            log.warning("could not lower the worker's priority")
    if threads is None:
        # Every core, niced: bench/b4_latency.py --worker-threads 2 on a 2-core VM kept the
        # ranking UI's p95 at 62.6 ms with 32 annotators during a PPO round (goal <= 150 ms;
        # 33.8 ms at 1 thread), while a round at 2 threads takes ~2/3 of its time at 1.
        # `torch_threads` (or `--threads`) caps it where the UI needs more room.
        threads = os.cpu_count() or 1
    torch.set_num_threads(threads)


def run_worker(workspace: Path, *, stop: threading.Event | None = None, cpu: bool = False,
               nice: int = 10, threads: int | None = None, poll_s: float = 1.0,
               overrides: dict | None = None, kinds: list[str] | None = None,
               parent_pid: int | None = None, processes: int = 1) -> None:
    """`parent_pid`: the `rlhf up` process that started this worker; when it is gone (even by
    kill -9), the worker stops."""
    from rlhf_core.worker.data import LocalData
    from rlhf_core.worker.handlers import HANDLERS
    from rlhf_core.worker.loop import loop_tick
    from rlhf_core.worker.runtime import Runtime
    from rlhf_core.workspace import open_workspace, seed_prompts_if_empty
    store, cfg = open_workspace(workspace, **(overrides or {}))
    data, stop = LocalData(store, cfg.workspace), stop or threading.Event()
    # In the registry before the slow imports: the UI says a worker is starting, not "none".
    with Presence(data, worker_name(), stop=stop, kinds=kinds, parent_pid=parent_pid) as presence:
        lower_priority(nice, threads or cfg.torch_threads)
        removed = clean_partial(cfg.workspace)
        if removed:
            log.warning("removed %d partial checkpoint dir(s) left by a crashed worker", removed)
        seed_prompts_if_empty(store, cfg)
        log.info("worker handles: %s", ", ".join(sorted(HANDLERS)))
        runtime = Runtime(data, cfg, cpu=cpu, processes=processes)
        presence.set_device(device_label(runtime))
        # Between jobs: the loop policy (keep items ready; in automatic mode, train and PPO).
        worker_loop(runtime, stop=stop, idle=lambda: loop_tick(store), poll_s=poll_s,
                    kinds=kinds, presence=presence)


def run_remote_worker(server: str, token: str, cache: Path, *, stop: threading.Event | None = None,
                      cpu: bool = False, nice: int = 10, threads: int | None = None,
                      poll_s: float = 1.0, kinds: list[str] | None = None,
                      overrides: dict | None = None, processes: int = 1) -> None:
    """A worker on a host that shares nothing with the app but the network: the app's worker
    API (app/worker_api.py) is its data interface, `cache` holds the versions it downloaded
    or wrote. The app runs the loop policy; this process only claims `kinds` of jobs."""
    from rlhf_core.worker.remote import RemoteData
    from rlhf_core.worker.runtime import Runtime
    cache = Path(cache).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    data = RemoteData(server, token, cache, worker=worker_name(), overrides=overrides)
    cfg = data.config()  # also proves the token before any model loads
    lower_priority(nice, threads or cfg.torch_threads)
    removed = clean_partial(cache)
    if removed:
        log.warning("removed %d partial checkpoint dir(s) left by a crashed worker", removed)
    log.info("remote worker for %s (cache %s), kinds: %s", server, cache,
             ", ".join(kinds) if kinds else "all")
    runtime = Runtime(data, cfg, cpu=cpu, processes=processes)
    stop = stop or threading.Event()
    try:
        worker_loop(runtime, stop=stop, idle=None, poll_s=poll_s, kinds=kinds)
    finally:
        data.close()
