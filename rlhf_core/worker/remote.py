"""The worker data interface over HTTP: a worker on a GPU host that shares nothing with the app.

`RemoteData` offers the verbs of `LocalData` (rlhf_core.worker.data) by calling the app's worker
API (app/worker_api.py) with a per-worker token. Model versions move as files: a version the
worker needs is downloaded once into its own cache directory (checked by size and SHA-256), and
a version it publishes is written there first, then uploaded in checksummed chunks; the app
publishes it only after verifying every file. Calls are retried with backoff while the app or
the network is away (a retried call carries the same call id, so the app answers it once).
"""
from __future__ import annotations

import hashlib
import logging
import time
import uuid
from pathlib import Path

import httpx

from rlhf_core import checkpoints
from rlhf_core.config import AppConfig, from_dict
from rlhf_core.data.jobs import JobCancelled
from rlhf_core.durable import write_dir
from rlhf_core.worker.data import VERBS
from rlhf_core.workspace import apply_overrides

log = logging.getLogger(__name__)
API = "/worker-api/v1"


class RemoteError(RuntimeError):
    """The app refused a call (the message is the app's); not retried."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class RemoteData:
    def __init__(self, server: str, token: str, workspace: Path, *, worker: str,
                 overrides: dict | None = None, retry_s: float = 300.0, timeout_s: float = 120.0,
                 transport: httpx.BaseTransport | None = None):
        self.server, self.token = server, token  # a multi-process round's rank 0 reuses them
        self.base = server.rstrip("/") + API
        self.workspace = Path(workspace)
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        self.retry_s = retry_s
        self.http = httpx.Client(timeout=timeout_s, transport=transport, headers={
            "authorization": f"Bearer {token}", "x-worker": worker})
        self._verified: set[tuple[str, int]] = set()

    # -- transport -------------------------------------------------------------------------------
    def request(self, method: str, path: str, *, retry_s: float | None = None, **kw) -> dict:
        """One API call, retried on network errors and 503 (busy database) until `retry_s`."""
        deadline = time.monotonic() + (self.retry_s if retry_s is None else retry_s)
        delay = 0.5
        while True:
            try:
                resp = self.http.request(method, self.base + path, **kw)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 503 or resp.status_code >= 500:
                    problem = f"HTTP {resp.status_code}: {resp.text[:200]}"
                else:
                    return self._reply(resp)
            if time.monotonic() + delay > deadline:
                raise RemoteError(f"the app at {self.base} did not answer: {problem}")
            log.warning("worker API %s %s: %s; retrying in %.1f s", method, path, problem, delay)
            time.sleep(delay)
            delay = min(delay * 2, 8.0)

    @staticmethod
    def _reply(resp: httpx.Response) -> dict:
        try:
            body = resp.json()
        except ValueError:
            body = {"error": resp.text[:300]}
        if resp.status_code == 200:
            return body
        if resp.status_code == 409 and body.get("kind") == "cancelled":
            raise JobCancelled(body.get("error", "cancelled"))
        raise RemoteError(f"HTTP {resp.status_code}: {body.get('error', body)}")

    def call(self, verb: str, *args, **kwargs):
        """One verb of the data interface; the call id makes a retry idempotent."""
        headers = {"x-call-id": uuid.uuid4().hex}
        return self.request("POST", f"/call/{verb}", json={"args": list(args), "kwargs": kwargs},
                            headers=headers)["result"]

    def __getattr__(self, verb: str):
        if verb in VERBS:
            return lambda *args, **kwargs: self.call(verb, *args, **kwargs)
        raise AttributeError(verb)

    # -- verbs that differ from a plain call ----------------------------------------------------------
    def config(self) -> AppConfig:
        """The app's settings, with this worker's own overrides (e.g. its --model) on top."""
        cfg = from_dict(AppConfig, self.call("config"))
        cfg = apply_overrides(cfg, self.overrides)
        return cfg.__class__(**{**cfg.__dict__, "workspace": self.workspace})

    def current_version(self, kind: str) -> dict | None:
        return self._local(self.call("current_version", kind))

    def get_version(self, kind: str, version: int) -> dict | None:
        return self._local(self.call("get_version", kind, version))

    def add_version(self, kind: str, version: int, *, path: str, **fields) -> dict:
        """Upload the version directory written at `path`, then the app publishes and records it."""
        return self._local(self.upload(kind, version, Path(path), fields))

    # -- files ---------------------------------------------------------------------------------------
    def _local(self, row: dict | None) -> dict | None:
        """The row with `path` pointing at this worker's verified copy of the version's files."""
        if row is None or not row.get("path"):
            return row
        local = checkpoints.version_dir(self.workspace, row["kind"], row["version"])
        key = (row["kind"], row["version"])
        if key not in self._verified:
            self.download(row["kind"], row["version"], local)
            self._verified.add(key)
        return {**row, "path": str(local)}

    def download(self, kind: str, version: int, local: Path) -> None:
        files = self.request("GET", f"/versions/{kind}/{version}")["files"]
        have = {f["path"] for f in files if (local / f["path"]).is_file()
                and (local / f["path"]).stat().st_size == f["size"]
                and file_sha256(local / f["path"]) == f["sha256"]}
        if len(have) == len(files):
            return
        log.info("downloading %s v%d (%d files)", kind, version, len(files) - len(have))

        def write(tmp: Path) -> None:
            for f in files:
                dest = tmp / f["path"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                if f["path"] in have:
                    dest.write_bytes((local / f["path"]).read_bytes())
                    continue
                with self.http.stream("GET", f"{self.base}/versions/{kind}/{version}/files/"
                                             f"{f['path']}") as resp:
                    if resp.status_code != 200:
                        raise RemoteError(f"download {kind} v{version}/{f['path']}: "
                                          f"HTTP {resp.status_code}")
                    with open(dest, "wb") as out:
                        for block in resp.iter_bytes(1 << 20):
                            out.write(block)
                if file_sha256(dest) != f["sha256"]:
                    raise RemoteError(f"download {kind} v{version}/{f['path']}: checksum mismatch")

        write_dir(local, write, overwrite=True)

    def upload(self, kind: str, version: int, root: Path, fields: dict) -> dict:
        files = [{"path": str(p.relative_to(root)), "size": p.stat().st_size,
                  "sha256": file_sha256(p)} for p in sorted(root.rglob("*")) if p.is_file()]
        start = self.request("POST", "/uploads", json={
            "kind": kind, "version": version, "job_id": fields.get("job_id"), "files": files,
            "fields": {k: v for k, v in fields.items() if k != "job_id"}})
        upload_id, chunk = start["upload_id"], int(start["chunk_bytes"])
        for f in files:
            with open(root / f["path"], "rb") as fh:
                offset = 0
                while offset < f["size"] or (offset == 0 and f["size"] == 0):
                    block = fh.read(chunk)
                    self.request("PUT", f"/uploads/{upload_id}/files/{f['path']}",
                                 params={"offset": offset}, content=block)
                    offset += len(block)
                    if not block:
                        break
        row = self.request("POST", f"/uploads/{upload_id}/commit")
        self._verified.add((kind, version))  # the local copy is what was uploaded
        return row

    def close(self) -> None:
        self.http.close()
