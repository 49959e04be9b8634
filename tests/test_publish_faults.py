"""The version publish protocol under kill -9 at each of its steps (issue 16.2).

A child process publishes a version the way a policy or reward round does
(checkpoints.publish, then the DB row) and is SIGKILLed at a named step. After each crash the
workspace must serve what it served before, and the next publish of the same number (what the
next round picks from the database) must succeed: no FileExistsError for ever, no temp dirs.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_core import checkpoints
from rlhf_core.data.store import Store

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["publish:written", "publish:synced", "publish:renamed"]

CHILD = """
import sys
from pathlib import Path
from rlhf_core import checkpoints
from rlhf_core.data.store import Store
ws, kind, payload = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
store = Store(ws / "rlhf.db")
version = store.next_version_number(kind)
def write(tmp):
    (tmp / "weights.txt").write_text(payload)
path = checkpoints.publish(ws, kind, version, write, {"version": version, "payload": payload},
                           recorded=store.get_version)
store.add_version(kind, version, status="published" if kind == "policy" else "promoted",
                  path=str(path))
print(version)
"""


def publish_in_child(ws: Path, kind: str, payload: str, failpoint: str | None = None):
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    env.pop(checkpoints.FAILPOINT_ENV, None)
    if failpoint:
        env[checkpoints.FAILPOINT_ENV] = failpoint
    return subprocess.run([sys.executable, "-c", CHILD, str(ws), kind, payload], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("kind", ["policy", "reward"])
@pytest.mark.parametrize("step", STEPS)
def test_kill_at_each_publish_step_then_the_next_publish_succeeds(tmp_path, kind, step):
    ws = tmp_path / "ws"
    ws.mkdir()
    store = Store(ws / "rlhf.db")
    first = publish_in_child(ws, kind, "v1")
    assert first.returncode == 0, first.stderr
    before = store.current_version(kind)

    crashed = publish_in_child(ws, kind, "lost", failpoint=step)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr  # really killed there
    # what was serving still serves; nothing half-written became a version
    assert store.current_version(kind) == before
    assert store.get_version(kind, 2) is None
    orphan = checkpoints.version_dir(ws, kind, 2)
    assert orphan.exists() == (step == "publish:renamed")

    checkpoints.clean_partial(ws)  # what a worker does when it starts
    assert not list((ws / "models" / kind).glob(".tmp-*"))
    again = publish_in_child(ws, kind, "v2")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "2"
    row = store.get_version(kind, 2)
    assert Path(row["path"]) == orphan
    assert (orphan / "weights.txt").read_text() == "v2"
    assert json.loads((orphan / checkpoints.MANIFEST).read_text())["payload"] == "v2"
    assert sorted(p.name for p in (ws / "models" / kind).iterdir()) == ["v0001", "v0002"]


def test_a_recorded_version_is_never_overwritten(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    store = Store(ws / "rlhf.db")
    assert publish_in_child(ws, "reward", "v1").returncode == 0
    with pytest.raises(FileExistsError, match="never overwritten"):
        checkpoints.publish(ws, "reward", 1, lambda tmp: None, {}, recorded=store.get_version)
    assert (checkpoints.version_dir(ws, "reward", 1) / "weights.txt").read_text() == "v1"


def test_old_orphan_dirs_of_earlier_releases_are_cleaned(tmp_path):
    kind_dir = tmp_path / "models" / "reward"
    (kind_dir / ".orphan-v0002-1700000000").mkdir(parents=True)
    (kind_dir / ".tmp-v0003-abc").mkdir()
    (kind_dir / "v0001").mkdir()
    assert checkpoints.clean_partial(tmp_path) == 2
    assert [p.name for p in kind_dir.iterdir()] == ["v0001"]
