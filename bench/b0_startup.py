"""B0 start-up: from `rlhf up` on a new workspace to the first rankable item.

What a newcomer waits for after `make run` (once the venv exists): the worker converts the
embedded GGUF (cold: the first start on a machine; warm: a new workspace reusing the converted
copy in the user's model cache, RLHF_MODEL_CACHE), loads the model
and samples the first batch; the clock stops when the public API hands out an item.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common


def time_to_first_item(workspace: Path, model_cache: Path, timeout_s: float = 900) -> dict:
    from gradio_client import Client

    from app.launcher import free_port
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "up", "--workspace", str(workspace),
                             "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "RLHF_LOG": "WARNING",
                                                         "RLHF_MODEL_CACHE": str(model_cache)})
    try:
        client, ui_ready = None, None
        while time.perf_counter() - t0 < timeout_s:
            try:
                client = client or Client(f"http://127.0.0.1:{port}/", verbose=False)
                ui_ready = ui_ready or time.perf_counter() - t0
                got = client.predict("bench", api_name="/get_item")
                if got.get("item"):
                    return {"ui_ready_s": round(ui_ready, 1),
                            "first_item_s": round(time.perf_counter() - t0, 1),
                            "k": got["item"]["k"]}
            except Exception:  # the server is still starting
                pass
            time.sleep(0.5)
        raise TimeoutError(f"no item within {timeout_s} s")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def run(quick: bool = False, repeats: int = 3) -> dict:
    root = Path(tempfile.mkdtemp(prefix="rlhf-b0-"))
    try:
        # cold: the first start on this machine (an empty model cache: the GGUF is converted)
        cold = time_to_first_item(root / "cold", root / "models")
        # warm: any later new workspace (the converted copy is in the user's model cache)
        runs = [time_to_first_item(root / f"warm{i}", root / "models")
                for i in range(1 if quick else repeats)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    firsts = sorted(r["first_item_s"] for r in runs)
    warm = {**runs[len(runs) // 2], "first_item_s": common.median(firsts),
            "first_item_s_min": firsts[0], "first_item_s_max": firsts[-1],
            "first_item_s_runs": [r["first_item_s"] for r in runs]}
    return {"name": "b0_startup", "cold": cold, "warm": warm, "machine": common.machine(),
            "note": "rlhf up on a new workspace -> first item from /get_item; cold: the first "
                    "start on a machine (the one-time GGUF conversion into the user's model "
                    "cache); warm: a new workspace once that copy exists"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="warm runs (median, min, max)")
    args = ap.parse_args(argv)
    res = run(args.quick, args.repeats)
    common.write_result("b0_startup", res)
    print(res)
    return res


if __name__ == "__main__":
    main()
