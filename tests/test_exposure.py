"""Exposure (issues 11.9, 16.9, 16.10): login-less serving beyond loopback refused, wrong passwords
throttled per user and address, a user twice in the auth file refused, server paths in job
errors hidden from non-researchers."""
from __future__ import annotations

import re

import httpx
import pytest

from app import status
from app.context import AppContext, load_auth_file
from app.launcher import free_port
from app.login_guard import FREE_FAILURES, LoginThrottle, client_address, is_loopback
from app.ui import launch
from rlhf_core.config import AppConfig
from rlhf_core.data import jobs


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def auth_ctx(tmp_path, store, clock=None):
    auth = tmp_path / "users.csv"
    auth.write_text("user,password,role\nres,pw-res,researcher\nann,pw-ann,annotator\n")
    ctx = AppContext.from_config(AppConfig(workspace=store.path.parent), store=store,
                                 auth_file=auth)
    if clock is not None:
        ctx.throttle = LoginThrottle(clock=clock)
    return ctx


def login(ctx, user, password, address="10.0.0.1"):
    token = client_address.set(address)
    try:
        return ctx.check_password(user, password)
    finally:
        client_address.reset(token)


def test_wrong_passwords_lock_that_user_from_that_address(tmp_path, store):
    clock = Clock()
    ctx = auth_ctx(tmp_path, store, clock)
    for _ in range(FREE_FAILURES):
        assert not login(ctx, "ann", "guess")
    assert not login(ctx, "ann", "pw-ann")  # locked: even the right password fails
    assert login(ctx, "ann", "pw-ann", address="10.0.0.2")  # the user elsewhere is not locked
    assert login(ctx, "res", "pw-res")  # nor another user from this address
    clock.now += 1.01
    assert login(ctx, "ann", "pw-ann")  # the lock expired; a success clears the count
    for _ in range(FREE_FAILURES):
        assert not login(ctx, "ann", "guess")
    waits = []
    for _ in range(4):  # each further failure doubles the lock
        clock.now += ctx.throttle.locked_for("ann", "10.0.0.1") + 0.01
        assert not login(ctx, "ann", "guess")
        waits.append(ctx.throttle.locked_for("ann", "10.0.0.1"))
    assert [round(w) for w in waits] == [2, 4, 8, 16]
    for _ in range(FREE_FAILURES + 1):  # unknown users are throttled alike
        login(ctx, "mallory", "x")
    assert ctx.throttle.locked_for("mallory", "10.0.0.1") > 0


def test_the_throttle_forgets_the_longest_idle_under_a_name_spray(monkeypatch):
    monkeypatch.setattr("app.login_guard.MAX_KEYS", 50)
    throttle = LoginThrottle(clock=Clock())
    for i in range(200):
        throttle.failed(f"user{i}", "10.0.0.9")
    assert len(throttle._failures) == 50


def test_the_real_login_route_is_throttled(tmp_path, store):
    """Through Gradio's /login: the middleware hands check_password the client address."""
    ctx = auth_ctx(tmp_path, store)
    port = free_port()
    demo = launch(ctx, port=port, prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}/login"
        codes = [httpx.post(url, data={"username": "ann", "password": "guess"}).status_code
                 for _ in range(FREE_FAILURES)]
        assert codes == [400] * FREE_FAILURES
        right = httpx.post(url, data={"username": "ann", "password": "pw-ann"})
        assert right.status_code == 400  # locked
        assert ctx.throttle.locked_for("ann", "127.0.0.1") > 0
        assert httpx.post(url, data={"username": "res", "password": "pw-res"}).status_code == 200
    finally:
        demo.close()


def test_launch_refuses_login_less_exposure(tmp_path, store):
    ctx = AppContext.from_config(AppConfig(workspace=store.path.parent), store=store)
    with pytest.raises(ValueError, match="without login"):
        launch(ctx, host="0.0.0.0", port=free_port(), prevent_thread_lock=True)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert not is_loopback("myhost.example")


@pytest.mark.parametrize("name,text,message", [
    ("users.csv", "user,password,role\nann,a,annotator\nbob,b,annotator\nann,c,researcher\n",
     "line 4: user 'ann' again (first on line 2)"),
    ("users.json", '[{"user": "ann", "password": "a"}, {"user": " ann ", "password": "b"}]',
     "entry 2: user 'ann' again (first on entry 1)"),
    ("users.json", '{"ann": "a", "bob": "b", "ann": "c"}', "'ann' appears twice"),
])
def test_a_user_twice_in_the_auth_file_is_refused(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_auth_file(path)


def test_job_errors_show_no_server_paths_to_annotators(tmp_path, store):
    ws = store.path.parent
    job_id = jobs.enqueue(store, "ppo_round", {})
    job = jobs.claim(store, "w1")
    assert job["id"] == job_id
    jobs.finish(store, job_id, worker="w1", error=(
        f"OSError: [Errno 2] No such file or directory: '{ws}/models/policy/v0003/x.safetensors'"
        " and ModelLoadError: /home/alice/private/model has no config.json"))
    ctx = auth_ctx(tmp_path, store)
    annotator = status.status_view(ctx, "ann")["jobs_html"]
    assert "models/policy/v0003/x.safetensors" in annotator and str(ws) not in annotator
    assert "/home/alice" not in annotator and "model has no config.json" in annotator
    researcher = status.status_view(ctx, "res")["jobs_html"]
    assert f"{ws}/models/policy/v0003" in researcher and "/home/alice/private" in researcher
    listed = status.jobs_html(jobs.list_jobs(store))  # the Dashboard's call: hidden by default
    assert "/home/alice" not in listed and str(ws) not in listed
    assert status.hide_paths("see https://example.org/a/b, 1/2 done", ws) == \
        "see https://example.org/a/b, 1/2 done"
