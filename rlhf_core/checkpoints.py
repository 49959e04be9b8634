"""Atomic publishing of model versions: temp dir, fsync, os.replace, then the DB row.

A worker killed at any point leaves either no `vNNNN/` or a complete one;
a version is only served once its DB row exists, and the row is written last.
Only safetensors and JSON are written or read here: never pickle.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from rlhf_core.models import fsync_tree

MANIFEST = "version.json"


def version_dir(workspace: Path, kind: str, version: int) -> Path:
    return Path(workspace) / "models" / kind / f"v{version:04d}"


def publish(workspace: Path, kind: str, version: int, write: Callable[[Path], None],
            manifest: dict) -> Path:
    """Call `write(tmp_dir)`, add the manifest, fsync, and rename into place."""
    final = version_dir(workspace, kind, version)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        raise FileExistsError(f"{final} already exists: versions are never overwritten")
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    try:
        write(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        fsync_tree(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_manifest(path: Path) -> dict:
    path = Path(path)
    try:
        return json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is not a published version (no {MANIFEST})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path / MANIFEST} is corrupt: {exc}") from None


def clean_partial(workspace: Path) -> int:
    """Remove temp dirs left by a worker that died mid-publish. Returns how many."""
    n = 0
    root = Path(workspace) / "models"
    if root.exists():
        for tmp in root.glob("*/.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
            n += 1
    return n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
