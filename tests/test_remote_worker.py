"""Remote workers (issue 12): the app and a worker on loopback that share no directory; the
worker reaches the app only through its HTTP worker API with a token."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from app.context import AppContext
from app.launcher import free_port
from app.ui import launch
from rlhf_core.data import jobs, tokens
from rlhf_core.workspace import open_workspace, set_auto
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[1]
gradio_client = pytest.importorskip("gradio_client")


def start_remote_worker(url: str, token: str, home: Path, model: Path, *extra: str):
    env = os.environ | {"RLHF_WORKER_TOKEN": token, "PYTHONPATH": str(ROOT),
                        "OMP_NUM_THREADS": "1", "RLHF_LOG": "WARNING"}
    return subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--server", url,
                             "--workspace", str(home), "--model", str(model), "--cpu",
                             "--threads", "1", "--nice", "0", *extra], env=env, cwd=home,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.stdout.read() if proc.stdout else ""


@pytest.mark.timeout(420)
def test_a_whole_loop_with_a_remote_worker(tmp_path, tiny_model_dir):
    """Sample, rank, train the reward model, a policy round, the next batch: all done by a
    worker that has its own directory (its own copy of the base model) and only HTTP."""
    app_ws, worker_home = tmp_path / "app", tmp_path / "gpu-host"
    worker_home.mkdir()
    model_copy = shutil.copytree(tiny_model_dir, worker_home / "base-model")
    store, cfg = open_workspace(app_ws, model=str(tiny_model_dir), torch_threads=1, **{
        "sampling.max_new_tokens": 6, "sampling.prompts_per_batch": 6, "sampling.k": 3,
        "sampling.min_ready_items": 2, "reward.min_pairs": 4, "ppo.max_new_tokens": 6,
        "ppo.prompts_per_round": 4, "ppo.epochs": 1, "loop.ab_fraction": 0.0,
        "loop.retrain_every": 4, "loop.score_items": False,
        # the flow, not the evidence: 4 rankings never clear the reward promotion gate
        "reward.promote_min_heldout_pairs": 0, "reward.promote_min_accuracy": 0.0})
    store.add_prompts([{"text": f"question {i}: say something"} for i in range(24)],
                      source="test")
    token = tokens.create(store, "gpu-1")
    port = free_port()
    demo = launch(AppContext.from_config(cfg, store=store), port=port, prevent_thread_lock=True,
                  quiet=True)
    url = f"http://127.0.0.1:{port}/"
    worker = start_remote_worker(url, token, worker_home, model_copy)
    try:
        # the app's loop queues a batch; the remote worker samples it
        assert wait_until(lambda: store.open_item_count() >= 2, 120), stop(worker)
        client = gradio_client.Client(url, verbose=False)
        for _ in range(4):
            item = client.predict("ann", api_name="/get_item")["item"]
            res = client.predict("ann", item["id"], item["token"], uuid.uuid4().hex, "abc",
                                 api_name="/submit")
            assert res["ok"], res
        set_auto(store, True)  # 4 rankings >= retrain_every: reward, then a policy round
        assert wait_until(lambda: store.current_version("policy")["version"] >= 1, 240), \
            stop(worker)
        assert wait_until(lambda: store.batch_count(1) >= 1, 120), stop(worker)
    finally:
        log = stop(worker)
        demo.close()
        set_auto(store, False)
    reward, policy = store.current_version("reward"), store.current_version("policy")
    for row in (reward, policy):  # published in the app's workspace, from verified uploads
        path = Path(row["path"])
        assert app_ws in path.parents and (path / "version.json").is_file(), log
        assert row["job_id"] is not None
    assert (Path(policy["path"]) / "policy" / "adapter_model.safetensors").is_file()
    workers = {r["worker"] for r in store.rows("SELECT worker FROM jobs WHERE status = 'done'")}
    assert workers and all(w.startswith("gpu-1/") for w in workers), workers
    kinds = {r["kind"] for r in store.rows("SELECT kind FROM jobs WHERE status = 'done'")}
    assert {"sample_batch", "train_reward", "ppo_round"} <= kinds
    # the worker kept its own copies: nothing of the app's directory is inside its home
    assert (worker_home / "remote" / "models" / "policy" / "v0001").is_dir()
    assert not list(app_ws.rglob("remote"))


# -- the API alone, on a real server -----------------------------------------------------------
class ApiServer:
    """The worker API on its own loopback uvicorn server (stoppable, restartable)."""

    def __init__(self, store, ws: Path, port: int | None = None, **limits):
        import uvicorn

        from app.worker_api import build_app
        from starlette.applications import Starlette
        from starlette.routing import Mount
        self.port = port or free_port()
        self.app = Starlette(routes=[Mount("/worker-api/v1",
                                           app=build_app(store, ws, **limits))])
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        assert wait_until(lambda: self.server.started, 10)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def app_store(tmp_path):
    store, _ = open_workspace(tmp_path / "app")
    store.add_prompts([{"text": f"p{i}"} for i in range(6)], source="t")
    return store


def remote(url, token, home, name="w", **kw):
    from rlhf_core.worker.remote import RemoteData
    return RemoteData(url, token, home, worker=name, **kw)


def test_wrong_or_revoked_tokens_are_refused(app_store, tmp_path):
    from rlhf_core.worker.remote import RemoteError
    token = tokens.create(app_store, "gpu-1")
    assert app_store.one("SELECT token_hash FROM worker_tokens")["token_hash"] != token
    with ApiServer(app_store, tmp_path / "app") as srv:
        good = remote(srv.url, token, tmp_path / "w")
        assert good.next_version_number("policy") == 1
        with pytest.raises(RemoteError, match="401.*unknown or revoked"):
            remote(srv.url, token + "x", tmp_path / "w").next_version_number("policy")
        tokens.revoke(app_store, "gpu-1")
        with pytest.raises(RemoteError, match="401"):
            good.next_version_number("policy")  # refused at its next call


def test_a_worker_cannot_write_another_workers_job(app_store, tmp_path):
    from rlhf_core.data.jobs import JobCancelled
    from rlhf_core.worker.remote import RemoteError
    a_token, b_token = tokens.create(app_store, "a"), tokens.create(app_store, "b")
    job_id = jobs.enqueue(app_store, "sample_batch")
    with ApiServer(app_store, tmp_path / "app") as srv:
        a, b = remote(srv.url, a_token, tmp_path / "a"), remote(srv.url, b_token, tmp_path / "b")
        job = a.claim("a-claims-to-be-b", None)
        assert job["id"] == job_id and job["worker"] == "a/w"  # the token's identity, always
        with pytest.raises(JobCancelled, match="no longer ours"):
            b.report_progress(job_id, "a/w", 0.5, "hijack")  # naming a's worker does not help
        b.finish(job_id, "a/w", result={"hijacked": True})  # ignored: not b's job
        assert jobs.get_job(app_store, job_id)["status"] == "running"
        with pytest.raises(RemoteError, match="403.*hold a running job"):
            b.log_metrics("ppo", {"x": 1.0})
        with pytest.raises(RemoteError, match="403.*running job you hold"):
            b.add_version("policy", 1, path=str(tmp_path), job_id=job_id)  # a's job
        with pytest.raises(RemoteError, match="404"):  # a version is never a bare row
            a.request("POST", "/call/add_version", json={"args": ["policy", 1], "kwargs": {}})
        a.finish(job_id, "anything", result={"ok": True})
        assert jobs.get_job(app_store, job_id)["status"] == "done"


def make_version_dir(root: Path, size: int) -> Path:
    (root / "policy").mkdir(parents=True)
    (root / "policy" / "adapter_model.safetensors").write_bytes(os.urandom(size))
    (root / "version.json").write_text(json.dumps({"kind": "policy"}))
    return root


def test_upload_is_verified_capped_and_published_atomically(app_store, tmp_path):
    from rlhf_core.worker.remote import RemoteError
    token = tokens.create(app_store, "gpu")
    job_id = jobs.enqueue(app_store, "ppo_round")
    local = make_version_dir(tmp_path / "w" / "v1", 300_000)
    with ApiServer(app_store, tmp_path / "app", chunk_bytes=64 * 1024,
                   max_version_bytes=1_000_000) as srv:
        w = remote(srv.url, token, tmp_path / "w")
        w.claim("w", None)
        row = w.add_version("policy", 1, path=str(local), status="published", parent=0,
                            job_id=job_id)
        served = Path(app_store.get_version("policy", 1)["path"])
        assert served.parent.parent.parent == tmp_path / "app"
        assert (served / "policy" / "adapter_model.safetensors").read_bytes() == \
            (local / "policy" / "adapter_model.safetensors").read_bytes()  # 5 chunks, intact
        assert row["path"] != str(served)  # the worker's row points at its own copy
        big = make_version_dir(tmp_path / "w" / "v2", 2_000_000)
        with pytest.raises(RemoteError, match="413"):
            w.add_version("policy", 2, path=str(big), job_id=job_id)
        assert app_store.get_version("policy", 2) is None
        # a chunk whose bytes differ from the declared checksum: refused at commit
        start = w.request("POST", "/uploads", json={
            "kind": "policy", "version": 2, "job_id": job_id,
            "files": [{"path": "a.bin", "size": 4, "sha256": "0" * 64}]})
        w.request("PUT", f"/uploads/{start['upload_id']}/files/a.bin", params={"offset": 0},
                  content=b"abcd")
        with pytest.raises(RemoteError, match="409.*checksum"):
            w.request("POST", f"/uploads/{start['upload_id']}/commit")
        assert app_store.get_version("policy", 2) is None


CRASHING_UPLOADER = """
import os, signal, sys
from pathlib import Path
from rlhf_core.worker.remote import RemoteData
url, token, home, job_id = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
w = RemoteData(url, token, home, worker="dies")
w.claim("dies", None)
root = home / "v1"
(root / "policy").mkdir(parents=True)
(root / "policy" / "adapter_model.safetensors").write_bytes(os.urandom(500_000))
real = w.request
sent = []
def request(method, path, **kw):
    if method == "PUT":
        sent.append(path)
        if len(sent) == 3:  # mid-upload: two chunks arrived, then the host dies
            os.kill(os.getpid(), signal.SIGKILL)
    return real(method, path, **kw)
w.request = request
w.add_version("policy", 1, path=str(root), job_id=job_id)
"""


def test_kill_9_mid_upload_leaves_no_version_and_the_job_is_released(app_store, tmp_path):
    token = tokens.create(app_store, "gpu")
    job_id = jobs.enqueue(app_store, "ppo_round")
    with ApiServer(app_store, tmp_path / "app", chunk_bytes=64 * 1024) as srv:
        proc = subprocess.run([sys.executable, "-c", CRASHING_UPLOADER, srv.url, token,
                               str(tmp_path / "w"), str(job_id)],
                              env=os.environ | {"PYTHONPATH": str(ROOT)}, timeout=60,
                              capture_output=True, text=True)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        assert app_store.get_version("policy", 1) is None
        assert not (tmp_path / "app" / "models" / "policy" / "v0001").exists()
        with app_store.write() as db:  # the dead worker's lease runs out
            db.execute("UPDATE jobs SET lease_expires = ? WHERE id = ?", [time.time() - 1, job_id])
        again = jobs.claim(app_store, "another")
        assert again["id"] == job_id and again["attempts"] == 2


def test_the_app_away_for_a_while_loses_nothing(app_store, tmp_path):
    """The app restarts (or the network drops) while a worker finishes its job: the worker's
    calls retry until the app answers again, and the result lands once."""
    token = tokens.create(app_store, "gpu")
    job_id = jobs.enqueue(app_store, "sample_batch")
    port = free_port()
    with ApiServer(app_store, tmp_path / "app", port=port) as srv:
        w = remote(srv.url, token, tmp_path / "w", retry_s=60)
        w.claim("w", None)
    t0 = time.monotonic()
    done = threading.Event()
    threading.Thread(target=lambda: (w.finish(job_id, "w", result={"n": 3}), done.set()),
                     daemon=True).start()
    time.sleep(4)  # the app is down: the worker keeps retrying
    assert not done.is_set() and jobs.get_job(app_store, job_id)["status"] == "running"
    with ApiServer(app_store, tmp_path / "app", port=port):
        assert done.wait(30)
    assert time.monotonic() - t0 >= 4
    job = jobs.get_job(app_store, job_id)
    assert job["status"] == "done" and job["result"] == {"n": 3}


def test_a_retried_call_is_answered_once(app_store, tmp_path):
    """A write whose reply was lost is retried with the same call id: applied once."""
    token = tokens.create(app_store, "gpu")
    jobs.enqueue(app_store, "sample_batch")
    with ApiServer(app_store, tmp_path / "app") as srv:
        w = remote(srv.url, token, tmp_path / "w")
        w.claim("w", None)
        headers = {"x-call-id": "same-id"}
        body = {"args": ["ppo", {"loss": 1.0}], "kwargs": {"step": 1}}
        for _ in range(3):
            w.request("POST", "/call/log_metrics", json=body, headers=headers)
    assert len(app_store.metric_series("ppo", "loss")) == 1
