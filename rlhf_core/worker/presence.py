"""A worker's presence in the workers registry, and how it stops.

`Presence` registers the worker, beats from a thread every `BEAT_S` (idle or in a long forward
pass) and at once when a job starts or ends, marks dead workers (their jobs are released now,
not when their lease runs out: rlhf_core.data.workers), and says `stopped` on the way out.
Under `rlhf up` it also stops the worker when its parent process is gone (even by kill -9).
Stopping is cooperative: `stop` is set, the current job is handed back at its next progress
report (run.py), and the loop ends.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading

from rlhf_core.data.workers import BEAT_S, pid_scope

log = logging.getLogger(__name__)


class Presence:
    def __init__(self, data, name: str, *, stop: threading.Event, kinds: list[str] | None = None,
                 device: str | None = None, parent_pid: int | None = None,
                 every_s: float = BEAT_S):
        self.data, self.name, self.stop, self.kinds = data, name, stop, kinds
        self.device, self.parent_pid, self.every_s = device, parent_pid, every_s
        self.job_id: int | None = None
        self._lock = threading.Lock()  # one beat at a time, so a stale job id never lands last
        self._halt = threading.Event()

    def __enter__(self):
        self._register()
        self._watch_parent()
        self._thread = threading.Thread(target=self._run, name="worker-beat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, *exc):
        self._halt.set()
        self._thread.join(timeout=5)
        reason = "stopped" if exc_type is None else f"stopped by {exc_type.__name__}"
        try:
            self.data.worker_stopped(self.name, reason)
        except Exception:
            log.warning("could not mark worker %s stopped", self.name, exc_info=True)
        return False

    def job(self, job_id: int | None) -> None:
        """A job started (its id) or ended (None): beat now, the Status tab shows it."""
        self.job_id = job_id
        self.beat()

    def set_device(self, device: str) -> None:
        self.device = device
        self.beat()

    def beat(self) -> None:
        with self._lock:
            try:
                if not self.data.worker_beat(self.name, self.job_id, self.device):
                    self._register()  # the row is gone (a replaced database): start again
            except Exception:  # a busy database must not kill the worker; the next beat retries
                log.warning("worker beat failed", exc_info=True)

    def _register(self) -> None:
        try:
            self.data.register_worker(self.name, host=socket.gethostname(), pid=os.getpid(),
                                      scope=pid_scope(), kinds=self.kinds, device=self.device)
        except Exception:
            log.warning("could not register worker %s", self.name, exc_info=True)

    def _run(self) -> None:
        while not self._halt.wait(self.every_s):
            self.beat()
            try:
                for name in self.data.reap_workers(self.name):
                    log.warning("worker %s is dead: its running job was released", name)
            except Exception:
                log.warning("reaping dead workers failed", exc_info=True)
            self._watch_parent()

    def _watch_parent(self) -> None:
        if self.parent_pid and os.getppid() != self.parent_pid and not self.stop.is_set():
            log.warning("parent process %d is gone: stopping", self.parent_pid)
            self.stop.set()


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM, SIGINT, SIGHUP: stop after handing back the current job at its next progress
    report; a second signal stops at once (the job is handed back too). Main thread only."""
    def on_signal(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        log.warning("%s: stopping the worker", signal.Signals(signum).name)
        stop.set()
    for name in ("SIGTERM", "SIGINT", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), on_signal)


def device_label(runtime) -> str | None:
    device = getattr(runtime, "device", None)
    if device is None:
        return None
    precision = "bf16" if device.mixed_precision == "bf16" else str(device.dtype).split(".")[-1]
    return f"{device.device} {precision}"
