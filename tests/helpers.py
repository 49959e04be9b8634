"""Small helpers shared by tests."""
from __future__ import annotations

import time


def wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    """Poll `predicate` until it returns truthy or `timeout` seconds pass."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class QueueOnlyRuntime:
    """What the worker loop needs of a runtime, without any model: the data interface and the
    config it refreshes per job. `tag` lets a test handler see which runtime ran it."""

    def __init__(self, store, tag=None, *, lease_s: float | None = None):
        from rlhf_core.worker.data import LocalData
        self.data = LocalData(store, **({"lease_s": lease_s} if lease_s else {}))
        self.tag, self.config = tag, None

    def refresh_config(self, config) -> None:
        self.config = config


class served:
    """The real UI for `ctx` on a free loopback port for a `with` block; yields its base URL
    (no trailing slash). Extra keywords go to app.ui.launch."""

    def __init__(self, ctx, **launch_kwargs):
        self.ctx, self.kwargs = ctx, launch_kwargs

    def __enter__(self) -> str:
        from app.launcher import free_port
        from app.ui import launch
        port = free_port()
        self.demo = launch(self.ctx, port=port, prevent_thread_lock=True, quiet=True,
                           **self.kwargs)
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc):
        self.demo.close()
        return False
