"""Model versions on disk: one publish protocol for every kind (policy, reward).

The protocol, in order (each step a fault point the tests kill a process at):
  1. `write(tmp)` fills a `.tmp-*` sibling of `models/KIND/vNNNN/` (safetensors + JSON only);
  2. the manifest is added and the tree fsynced;
  3. `os.replace` renames it to `vNNNN/` and the parent is fsynced;
  4. the caller records the version's DB row, LAST: a version is served only once its row exists.
A crash before 3 leaves a `.tmp-*` that `clean_partial` removes; a crash between 3 and 4 leaves
an orphan `vNNNN/` with no row, which the next publish of that number removes (it was never
served) instead of failing for ever. Never pickle: nothing here reads anything but JSON.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Callable

from rlhf_core.durable import remove_temps, write_dir

log = logging.getLogger(__name__)

MANIFEST = "version.json"
FAILPOINT_ENV = "RLHF_FAILPOINT"  # tests: "publish:<step>" kills this process at that step


def version_dir(workspace: Path, kind: str, version: int) -> Path:
    return Path(workspace) / "models" / kind / f"v{version:04d}"


def failpoint(name: str) -> None:
    """Kill this process (SIGKILL, as a power cut would) when RLHF_FAILPOINT names `name`."""
    if os.environ.get(FAILPOINT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def publish(workspace: Path, kind: str, version: int, write: Callable[[Path], None],
            manifest: dict, *, recorded: Callable[[str, int], dict | None]) -> Path:
    """Steps 1-3 of the protocol. `recorded(kind, version)` says whether a DB row exists: an
    existing directory with a row is never overwritten; one without a row is an orphan."""
    final = version_dir(workspace, kind, version)
    if final.exists():
        if recorded(kind, version) is not None:
            raise FileExistsError(f"{final} already exists: versions are never overwritten")
        log.warning("removing %s: left without a DB row by a process that died", final)
        shutil.rmtree(final)

    def fill(tmp: Path) -> None:
        write(tmp)
        failpoint("publish:written")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))

    path = write_dir(final, fill, before_replace=lambda: failpoint("publish:synced"))
    failpoint("publish:renamed")
    return path


def read_manifest(path: Path) -> dict:
    path = Path(path)
    try:
        return json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is not a published version (no {MANIFEST})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path / MANIFEST} is corrupt: {exc}") from None


def clean_partial(workspace: Path) -> int:
    """Remove temp dirs (and old `.orphan-*` dirs of earlier releases) left by a worker that
    died mid-publish. Returns how many."""
    n = 0
    root = Path(workspace) / "models"
    if root.exists():
        for kind_dir in root.iterdir():
            if kind_dir.is_dir():
                n += remove_temps(kind_dir)
                for orphan in kind_dir.glob(".orphan-*"):
                    shutil.rmtree(orphan, ignore_errors=True)
                    n += 1
    return n
