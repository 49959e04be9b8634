"""The worker process: the only one that holds models.

It lowers its own priority and caps torch threads so a UI on the same cores
stays responsive (DESIGN.md: p95 649 ms beside an un-niced 2-thread job,
312 ms niced), claims jobs, and when idle runs the loop policy (keep items
ready; in automatic mode, retrain and run PPO rounds).
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
from pathlib import Path

from rlhf_core.data import jobs
from rlhf_core.checkpoints import clean_partial

log = logging.getLogger(__name__)

# Modules whose import registers job handlers (optional ones may not exist yet).
HANDLER_MODULES = ["rlhf_core.labeling.batch", "rlhf_core.labeling.heldout", "rlhf_core.reward.round", "rlhf_core.policy.ppo",
                   "rlhf_core.worker.loop", "rlhf_core.data.scores"]


def register_handlers() -> list[str]:
    for name in HANDLER_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            log.warning("job module %s is not available", name)
    return sorted(jobs.HANDLERS)


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
        # Leave a core to the UI on small machines (DESIGN.md: p95 latency doubles otherwise).
        cores = os.cpu_count() or 2
        threads = max(1, cores - 1) if cores <= 4 else cores
    torch.set_num_threads(threads)


def run_worker(workspace: Path, *, stop: threading.Event | None = None, cpu: bool = False,
               nice: int = 10, threads: int | None = None, poll_s: float = 1.0,
               overrides: dict | None = None) -> None:
    from rlhf_core.worker.loop import loop_tick
    from rlhf_core.worker.runtime import Runtime
    from rlhf_core.workspace import open_workspace, seed_prompts_if_empty
    store, cfg = open_workspace(workspace, **(overrides or {}))
    lower_priority(nice, threads or cfg.torch_threads)
    removed = clean_partial(cfg.workspace)
    if removed:
        log.warning("removed %d partial checkpoint dir(s) left by a crashed worker", removed)
    seed_prompts_if_empty(store, cfg)
    kinds = register_handlers()
    log.info("worker handles: %s", ", ".join(kinds))
    runtime = Runtime(store, cfg, cpu=cpu)
    stop = stop or threading.Event()
    # Between jobs: the loop policy (keep items ready; in automatic mode, train and PPO).
    jobs.worker_loop(runtime, store, stop=stop, idle=lambda: loop_tick(store), poll_s=poll_s)
