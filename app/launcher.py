"""Start the app's two processes: the UI here, the worker as a child process."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from app.allocator import with_jemalloc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(workspace: Path, *extra: str) -> subprocess.Popen:
    """The worker child. In its own session, so a terminal's Ctrl-C reaches only this process,
    which stops the worker (stop_worker); it exits by itself when this process is gone."""
    return subprocess.Popen([sys.executable, "-m", "app.cli", "worker",
                             "--workspace", str(workspace), *extra],
                            env=with_jemalloc({**os.environ, "RLHF_PARENT_PID": str(os.getpid())}),
                            start_new_session=True)


def interrupt_on_signals() -> None:
    """SIGTERM and SIGHUP end this process as Ctrl-C does (KeyboardInterrupt in the main
    thread: Gradio's wait loop closes the server, callers' `finally` stops the worker). Once:
    a repeated signal while stopping is ignored. Main thread only."""
    signums = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]

    def on_signal(signum, frame):
        for s in signums:
            signal.signal(s, signal.SIG_IGN)
        print(f"{signal.Signals(signum).name}: stopping the UI and the worker", flush=True)
        raise KeyboardInterrupt
    for s in signums:
        signal.signal(s, on_signal)


def stop_worker(worker: subprocess.Popen, timeout: float = 30) -> None:
    if worker.poll() is not None:
        return
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def start_app(workspace: Path, port: int | None = None):
    """UI on a loopback port in this process + a worker child. Returns (url, stop)."""
    from app.context import AppContext
    from app.ui import launch
    from rlhf_core.workspace import open_workspace
    port = port or free_port()
    store, cfg = open_workspace(workspace)
    worker = start_worker(cfg.workspace)
    ctx = AppContext.from_config(cfg, store=store)
    demo = launch(ctx, host="127.0.0.1", port=port, prevent_thread_lock=True)

    def stop():
        stop_worker(worker)
        demo.close()
    return f"http://127.0.0.1:{port}/", stop
