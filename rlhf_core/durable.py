"""Durable writes (stdlib only): build in a temp sibling, fsync, `os.replace`, fsync the parent.

One helper for every directory the project publishes (converted models, model versions,
exported datasets) and one for files (exports): a crash at any point leaves either the old
target or the complete new one, never a half-written one, plus at most a `.tmp-*` sibling that
`remove_temps` clears.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

TEMP_PREFIX = ".tmp-"


class TargetExists(FileExistsError):
    """The target exists and replacing it was not asked for."""


def fsync_dir(directory: Path) -> None:
    """Make a rename durable; not every platform can open a directory, so best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(Path(root))


def _occupied(target: Path) -> bool:
    return target.exists() and (not target.is_dir() or any(target.iterdir()))


def write_dir(target: Path, write: Callable[[Path], None], *, overwrite: bool = False,
              before_replace: Callable[[], None] | None = None) -> Path:
    """Call `write(tmp_dir)`, fsync it, and rename it onto `target`.

    An existing non-empty `target` raises TargetExists unless `overwrite`; then it is moved
    aside first and removed after the rename. `before_replace` runs after the fsync, just
    before the rename (a fault-injection point for tests)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if _occupied(target) and not overwrite:
        raise TargetExists(f"{target} already exists (pass overwrite to replace it)")
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{TEMP_PREFIX}{target.name}-"))
    old = None
    try:
        write(tmp)
        fsync_tree(tmp)
        if before_replace is not None:
            before_replace()
        if target.is_dir() and any(target.iterdir()):
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{TEMP_PREFIX}old-"))
            os.replace(target, old / "previous")
        elif target.exists() and not target.is_dir():
            target.unlink()
        os.replace(tmp, target)  # an empty directory target is replaced by the rename
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


def write_file(target: Path, write: Callable[[object], None], *, overwrite: bool = False,
               mode: str = "w") -> Path:
    """Call `write(handle)` on a temp file beside `target`, fsync it, rename it onto `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not overwrite:
        raise TargetExists(f"{target} already exists (pass overwrite to replace it)")
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f"{TEMP_PREFIX}{target.name}-")
    try:
        kwargs = {"encoding": "utf-8", "newline": "\n"} if "b" not in mode else {}
        with os.fdopen(fd, mode, **kwargs) as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target


def remove_temps(directory: Path) -> int:
    """Remove `.tmp-*` entries a crashed writer left in `directory`. Returns how many."""
    n = 0
    directory = Path(directory)
    if directory.is_dir():
        for tmp in directory.glob(f"{TEMP_PREFIX}*"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            n += 1
    return n
