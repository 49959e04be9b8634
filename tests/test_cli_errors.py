"""`rlhf` on bad input and broken workspaces, run as a user would (issues 11.6, 11.7, 16.9):
one line `rlhf CMD: error: ...`, a non-zero exit, no traceback, and nothing on disk changed."""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import build_parser
from app.launcher import free_port
from rlhf_core.data.store import MIGRATIONS, Store
from rlhf_core.workspace import open_workspace
from tests.test_cli import seed_ranking

ROOT = Path(__file__).resolve().parents[1]


def rlhf(*args, timeout=60, **extra_env):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "RLHF_LOG": "WARNING"}
    env.pop("RLHF_DEBUG", None)
    env.update(extra_env)
    return subprocess.run([sys.executable, "-m", "app.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(out, command):
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rlhf {command}: error: "), out.stderr
    return lines[0]


def snapshot(*roots: Path) -> dict:
    """Every file (and directory) under `roots` with its bytes."""
    out = {}
    for root in roots:
        paths = [root] + (sorted(root.rglob("*")) if root.is_dir() else [])
        for p in paths:
            out[str(p)] = p.read_bytes() if p.is_file() else ("dir" if p.is_dir() else None)
    return out


def make_workspace(ws: Path) -> Path:
    store, _ = open_workspace(ws)
    store.add_prompts([{"text": "Name a colour."}], source="test")
    store.close()
    return ws / "rlhf.db"


def set_config(db: Path, mutate) -> None:
    store = Store(db)
    row = store.get_setting("config")
    store.set_setting("config", mutate(row))
    store.close()


def truncated(ws):
    db = make_workspace(ws)
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])


def random_bytes(ws):
    db = make_workspace(ws)
    db.write_bytes(os.urandom(len(db.read_bytes())))


def db_is_a_directory(ws):
    (ws / "rlhf.db").mkdir(parents=True)


def newer_release(ws):
    db = make_workspace(ws)
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 5}")
    conn.commit()
    conn.close()


def bad_saved_value(ws):
    def four(row):
        row["sampling"]["k"] = "four"
        return row
    set_config(make_workspace(ws), four)


def config_is_a_list(ws):
    set_config(make_workspace(ws), lambda row: [row])


def missing(ws):
    ws.parent.mkdir(parents=True, exist_ok=True)


def missing_auth_file(ws):
    make_workspace(ws)
    return ["--auth", ws.parent / "nowhere.json"]


def duplicate_auth_user(ws):
    make_workspace(ws)
    auth = ws.parent / "users.csv"
    auth.write_text("user,password,role\nann,pw1,annotator\nres,pw2,researcher\n"
                    "ann,other,researcher\n")
    return ["--auth", auth]


CASES = {  # name -> (make it, what the message must say)
    "truncated": (truncated, "truncated"),
    "random_bytes": (random_bytes, "not an SQLite database"),
    "db_is_a_directory": (db_is_a_directory, "is a directory"),
    "newer_release": (newer_release, "newer rlhf-loop"),
    "bad_saved_value": (bad_saved_value, "sampling.k='four'"),
    "config_is_a_list": (config_is_a_list, "a JSON list instead of an object"),
    "missing_workspace": (missing, "is not a workspace"),
    "missing_auth_file": (missing_auth_file, "nowhere.json does not exist"),
    "duplicate_auth_user": (duplicate_auth_user, "line 4: user 'ann' again (first on line 2)"),
}
MATRIX = [(case, "status") for case in CASES if "auth" not in case] + [
    (case, "serve") for case in ("truncated", "random_bytes", "newer_release", "bad_saved_value",
                                 "config_is_a_list", "missing_workspace", "missing_auth_file",
                                 "duplicate_auth_user")]


@pytest.mark.parametrize("case,command", MATRIX)
def test_a_broken_workspace_gives_one_line_and_changes_nothing(tmp_path, case, command):
    ws = tmp_path / "ws"
    make, message = CASES[case]
    extra = make(ws) or []
    before = snapshot(tmp_path)
    args = [command, "--workspace", ws, *extra]
    if command == "serve":
        args += ["--port", free_port()]
    out = rlhf(*args, timeout=60)  # a serve that started would run into the timeout
    line = assert_one_line_error(out, command)
    assert message in line
    assert snapshot(tmp_path) == before  # no reset written back, no empty workspace created


def test_debug_shows_the_traceback(tmp_path):
    out = rlhf("status", "--workspace", tmp_path / "typo", RLHF_DEBUG="1")
    assert out.returncode != 0 and "Traceback" in out.stderr and "WorkspaceError" in out.stderr


def test_status_on_a_typo_creates_nothing_but_up_commands_create(tmp_path):
    assert_one_line_error(rlhf("export", tmp_path / "out.jsonl", "--workspace",
                               tmp_path / "typo"), "export")
    assert not (tmp_path / "typo").exists() and not (tmp_path / "out.jsonl").exists()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Why is the sky blue?"}) + "\n")
    out = rlhf("import-prompts", prompts, "--workspace", tmp_path / "new")
    assert out.returncode == 0, out.stderr
    assert rlhf("status", "--workspace", tmp_path / "new").returncode == 0


@pytest.mark.parametrize("fmt,out_name", [("hf", "pairs_hf"), ("jsonl", "pairs.jsonl")])
def test_export_into_an_existing_target_says_overwrite(tmp_path, fmt, out_name):
    ws = tmp_path / "ws"
    seed_ranking(ws)
    target = tmp_path / out_name
    assert rlhf("export", target, "--format", fmt, "--workspace", ws).returncode == 0
    before = snapshot(tmp_path)
    line = assert_one_line_error(rlhf("export", target, "--format", fmt, "--workspace", ws),
                                 "export")
    assert "already exist" in line and "--overwrite" in line and str(target) in line
    assert snapshot(tmp_path) == before
    again = rlhf("export", target, "--format", fmt, "--workspace", ws, "--overwrite")
    assert again.returncode == 0 and "exported 2 pairs" in again.stdout, again.stderr


def test_a_bad_setting_is_refused_and_not_saved(tmp_path):
    db = make_workspace(tmp_path / "ws")
    before = snapshot(tmp_path)
    line = assert_one_line_error(rlhf("serve", "--workspace", tmp_path / "ws", "--port",
                                      free_port(), "--set", "ppo.lr=abc"), "serve")
    assert "ppo.lr='abc' is not allowed: expected a number > 0" in line
    line = assert_one_line_error(rlhf("serve", "--workspace", tmp_path / "ws", "--port",
                                      free_port(), "--set", "ppo.lrr=1"), "serve")
    assert "unknown setting 'ppo.lrr'" in line
    assert snapshot(tmp_path) == before
    assert db.exists()


def test_sample_with_a_bad_model_says_so_in_one_line_and_keeps_the_saved_one(tmp_path):
    make_workspace(tmp_path / "ws")
    before = snapshot(tmp_path)
    line = assert_one_line_error(rlhf("sample", "--workspace", tmp_path / "ws", "--model",
                                      "/bad"), "sample")
    assert "'/bad'" in line and "Hub id" in line
    line = assert_one_line_error(rlhf("sample", "--workspace", tmp_path / "ws", "--model",
                                      "nobody-here/no-such-model"), "sample")
    assert "not in the Hub cache" in line
    assert snapshot(tmp_path) == before  # the saved model is still the embedded one


def test_a_failing_job_ends_in_one_line_not_a_traceback(tmp_path):
    """A model directory that passes the check but does not load: the job fails in this
    process; its traceback is kept for RLHF_DEBUG=1, the user gets the job's error."""
    make_workspace(tmp_path / "ws")
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    out = rlhf("sample", "--workspace", tmp_path / "ws", "--model", broken, "--prompts", "1",
               timeout=240)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("rlhf sample: error: job 1 (sample_batch) failed: "), out.stderr
    assert "RLHF_DEBUG=1" in last


def test_serve_on_a_busy_port(tmp_path):
    make_workspace(tmp_path / "ws")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = assert_one_line_error(rlhf("serve", "--workspace", tmp_path / "ws", "--port",
                                          port), "serve")
    assert f"127.0.0.1:{port}" in line and "--port" in line


def test_serving_beyond_loopback_needs_login_or_an_explicit_flag(tmp_path):
    make_workspace(tmp_path / "ws")
    port = free_port()
    line = assert_one_line_error(rlhf("serve", "--workspace", tmp_path / "ws", "--host",
                                      "0.0.0.0", "--port", port), "serve")
    assert "without login" in line and "--auth" in line and "--insecure-no-auth" in line
    from app.cli import check_serving
    parse = build_parser().parse_args
    check_serving(parse(["serve", "--host", "0.0.0.0", "--port", str(port),
                         "--insecure-no-auth"]))  # asked for explicitly: allowed
    auth = tmp_path / "users.csv"
    auth.write_text("user,password,role\nann,pw,annotator\n")
    check_serving(parse(["serve", "--host", "0.0.0.0", "--port", str(port), "--auth", str(auth)]))
    check_serving(parse(["serve", "--host", "127.0.0.1", "--port", str(port)]))
