"""The HTTP door for remote workers: a GPU host that shares nothing with the app but the network.

Mounted at /worker-api/v1 on the UI's server. Workers connect out to it (the GPU host needs no
inbound port) and authenticate with a per-worker token (`Authorization: Bearer ...`, stored
hashed, revocable; `rlhf worker-token`). The app stays the only writer of its SQLite file:
  POST /call/{verb}            one verb of the worker data interface (rlhf_core.worker.data)
  GET  /versions/{kind}/{v}    a version's files (path, size, sha256); GET .../files/{path}
  POST /uploads                start publishing a version: its files (path, size, sha256)
  PUT  /uploads/{id}/files/{path}?offset=N   a chunk (size-capped)
  POST /uploads/{id}/commit    verify every size and checksum, publish atomically, record
A worker may act only as itself: verbs that name a worker get the token's identity, and verbs
that write results need a running job held by that identity. No torch here (UI process).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import re
import secrets
import shutil
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse

from rlhf_core import checkpoints
from rlhf_core.config import to_dict
from rlhf_core.data import tokens, workers
from rlhf_core.data.jobs import JobCancelled
from rlhf_core.worker.data import VERBS, LocalData

log = logging.getLogger(__name__)

PREFIX = "/worker-api/v1"
CHUNK_BYTES = 8 * 1024 * 1024  # largest upload chunk (the body cap of this route)
MAX_VERSION_BYTES = 4 * 1024 ** 3  # largest version upload (adapters + heads, or a full model)
READ_VERBS = {"config", "get_job", "current_version", "get_version", "next_version_number",
              "open_item_count",
              "prompts_of_split", "prompts_by_ids", "least_labeled_prompts", "training_pairs",
              "unscored_responses", "unscored_count", "last_metric_step"}
PUBLISH_ONLY = {"add_version"}  # versions arrive as verified uploads, never as a bare row
WORKER_NAME = re.compile(r"[^A-Za-z0-9_.:@-]")
SAFE_PATH = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


def valid_file_entry(f) -> bool:
    """{"path": relative, no "..", "size": int >= 0, "sha256": 64 hex digits}."""
    return (isinstance(f, dict) and isinstance(f.get("path"), str)
            and bool(SAFE_PATH.match(f["path"])) and ".." not in f["path"].split("/")
            and isinstance(f.get("size"), int) and not isinstance(f["size"], bool)
            and f["size"] >= 0 and bool(re.fullmatch(r"[0-9a-f]{64}", str(f.get("sha256", "")))))


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "error"):
        super().__init__(message)
        self.status, self.kind = status, kind


def identity(token_row: dict, request: Request) -> str:
    """`token-name/worker-name`: a worker acts only under its own token's name."""
    claimed = WORKER_NAME.sub("_", request.headers.get("x-worker", "worker"))[:80] or "worker"
    return f"{token_row['name']}/{claimed}"


class WorkerApi:
    def __init__(self, store, workspace: Path, *, max_version_bytes: int = MAX_VERSION_BYTES,
                 chunk_bytes: int = CHUNK_BYTES):
        self.store, self.workspace = store, Path(workspace)
        self.data = LocalData(store, self.workspace)
        self.max_version_bytes, self.chunk_bytes = max_version_bytes, chunk_bytes
        self.uploads_dir = self.workspace / "uploads"
        self._replies: OrderedDict = OrderedDict()  # (worker, call id) -> reply: retried calls
        self._lock = threading.Lock()
        self._sha: dict = {}  # (path, size, mtime) -> sha256
        self._touched: dict = {}  # token id -> when its last_used_at was written

    # -- auth ------------------------------------------------------------------------------
    def authenticate(self, request: Request) -> tuple[dict, str]:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        row = tokens.verify(self.store, token)
        if row is None:
            raise ApiError(401, "unknown or revoked worker token", "unauthorized")
        now = time.monotonic()
        if now - self._touched.get(row["id"], -60.0) >= 60.0:  # "last used", once a minute
            self._touched[row["id"]] = now
            tokens.touch(self.store, row["id"])
        return row, identity(row, request)

    # -- verbs -----------------------------------------------------------------------------
    def call(self, verb: str, worker: str, payload: dict):
        if verb not in VERBS or verb in PUBLISH_ONLY:
            raise ApiError(404, f"no worker verb {verb!r}")
        fn = getattr(self.data, verb)
        args, kwargs = list(payload.get("args") or []), dict(payload.get("kwargs") or {})
        params = inspect.signature(fn).parameters
        if "worker" in params:  # act as the token's identity, whatever the client says
            names = list(params)
            if len(args) > names.index("worker"):
                args[names.index("worker")] = worker
            else:
                kwargs["worker"] = worker
        elif verb not in READ_VERBS and not tokens.holds_running_job(self.store, worker):
            raise ApiError(403, f"{verb} writes results: hold a running job first", "forbidden")
        try:
            out = fn(*args, **kwargs)
        except JobCancelled as exc:
            raise ApiError(409, str(exc), "cancelled") from None
        except TypeError as exc:
            raise ApiError(400, f"{verb}: {exc}") from None
        return to_dict(out) if verb == "config" else out

    # -- files ----------------------------------------------------------------------------
    def sha256(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._sha:
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            self._sha[key] = h.hexdigest()
        return self._sha[key]

    def version_dir(self, kind: str, version: int) -> Path:
        row = self.store.get_version(kind, version) if kind in ("policy", "reward") else None
        if row is None or not row.get("path"):
            raise ApiError(404, f"{kind} version {version} is not published")
        return Path(row["path"])

    def list_files(self, kind: str, version: int) -> list[dict]:
        root = self.version_dir(kind, version)
        return [{"path": str(p.relative_to(root)), "size": p.stat().st_size,
                 "sha256": self.sha256(p)} for p in sorted(root.rglob("*")) if p.is_file()]

    # -- uploads --------------------------------------------------------------------------
    def start_upload(self, worker: str, body: dict) -> dict:
        kind, version = body.get("kind"), body.get("version")
        if kind not in ("policy", "reward") or not isinstance(version, int) or version < 1:
            raise ApiError(400, "an upload names kind policy|reward and a version >= 1")
        if not tokens.holds_running_job(self.store, worker, body.get("job_id")):
            raise ApiError(403, "publish a version only for a running job you hold", "forbidden")
        files = body.get("files") or []
        total = 0
        for f in files:
            if not valid_file_entry(f):
                raise ApiError(400, f"bad file entry {str(f)[:120]}")
            total += f["size"]
        if not files or total > self.max_version_bytes:
            raise ApiError(413, f"an upload holds 1 to n files of at most "
                                f"{self.max_version_bytes} bytes in all (this one: {total})")
        upload_id = secrets.token_hex(12)
        stage = self.uploads_dir / upload_id
        (stage / "files").mkdir(parents=True)
        meta = {"kind": kind, "version": version, "job_id": body.get("job_id"), "worker": worker,
                "files": files, "fields": body.get("fields") or {}, "started": time.time()}
        (stage / "upload.json").write_text(json.dumps(meta))
        return {"upload_id": upload_id, "chunk_bytes": self.chunk_bytes}

    def _upload(self, upload_id: str, worker: str) -> tuple[Path, dict]:
        if not re.fullmatch(r"[0-9a-f]{24}", upload_id):
            raise ApiError(404, "no such upload")
        stage = self.uploads_dir / upload_id
        try:
            meta = json.loads((stage / "upload.json").read_text())
        except (OSError, ValueError):
            raise ApiError(404, "no such upload") from None
        if meta["worker"] != worker:
            raise ApiError(403, "this upload belongs to another worker", "forbidden")
        return stage, meta

    def put_chunk(self, upload_id: str, worker: str, path: str, offset: int, chunk: bytes) -> dict:
        stage, meta = self._upload(upload_id, worker)
        entry = next((f for f in meta["files"] if f["path"] == path), None)
        if entry is None:
            raise ApiError(400, f"{path} is not in this upload's file list")
        if len(chunk) > self.chunk_bytes or offset < 0 or offset + len(chunk) > entry["size"]:
            raise ApiError(413, f"chunk past the declared size of {path} or over "
                                f"{self.chunk_bytes} bytes")
        target = stage / "files" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        have = target.stat().st_size if target.exists() else 0
        if offset > have:
            raise ApiError(409, f"{path}: chunk at {offset}, but only {have} bytes arrived",
                           "gap")
        with open(target, "r+b" if target.exists() else "wb") as fh:
            fh.truncate(offset)  # a resent chunk replaces what followed it
            fh.seek(offset)
            fh.write(chunk)
        return {"path": path, "received": offset + len(chunk)}

    def commit(self, upload_id: str, worker: str) -> dict:
        stage, meta = self._upload(upload_id, worker)
        if not tokens.holds_running_job(self.store, worker, meta["job_id"]):
            raise ApiError(403, "the job this upload belongs to is no longer yours", "forbidden")
        files = stage / "files"
        for f in meta["files"]:
            p = files / f["path"]
            if not p.is_file() or p.stat().st_size != f["size"]:
                raise ApiError(409, f"{f['path']}: incomplete upload", "incomplete")
            if self.sha256(p) != f["sha256"]:
                raise ApiError(409, f"{f['path']}: checksum mismatch", "checksum")
        kind, version = meta["kind"], meta["version"]
        manifest = json.loads((files / checkpoints.MANIFEST).read_text()) \
            if (files / checkpoints.MANIFEST).is_file() else {"kind": kind, "version": version}

        def write(tmp: Path) -> None:
            for f in meta["files"]:
                if f["path"] != checkpoints.MANIFEST:
                    dest = tmp / f["path"]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(files / f["path"], dest)

        with self._lock:  # one publish at a time per app
            existing = self.store.get_version(kind, version)
            if existing is not None:
                shutil.rmtree(stage, ignore_errors=True)
                if existing.get("job_id") == meta["job_id"]:
                    return existing  # a retried commit whose reply was lost
                raise ApiError(409, f"{kind} v{version} already exists", "exists")
            path = checkpoints.publish(self.workspace, kind, version, write, manifest,
                                       recorded=self.store.get_version)
            fields = {k: v for k, v in meta["fields"].items()
                      if k in ("status", "parent", "reward_version", "base_model", "config",
                               "metrics", "counts", "reason")}
            row = self.store.add_version(kind, version, path=str(path), job_id=meta["job_id"],
                                         **{"status": "published", **fields})
        shutil.rmtree(stage, ignore_errors=True)
        return row

    def clean_stale_uploads(self, older_than_s: float = 24 * 3600) -> int:
        n = 0
        if self.uploads_dir.is_dir():
            for stage in self.uploads_dir.iterdir():
                try:
                    started = json.loads((stage / "upload.json").read_text())["started"]
                except (OSError, ValueError, KeyError):
                    started = 0
                if time.time() - started > older_than_s:
                    shutil.rmtree(stage, ignore_errors=True)
                    n += 1
        return n

    # -- replies of retried calls ---------------------------------------------------------------
    def remembered(self, key):
        with self._lock:
            return self._replies.get(key)

    def remember(self, key, reply) -> None:
        with self._lock:
            self._replies[key] = reply
            while len(self._replies) > 10000:
                self._replies.popitem(last=False)


def build_app(store, workspace: Path, **limits) -> FastAPI:
    """The FastAPI app serving the routes above (mount it at /worker-api/v1)."""
    api = WorkerApi(store, workspace, **limits)
    app = FastAPI(title="rlhf-loop worker API", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.api = api

    async def guarded(request: Request, fn):
        try:
            token, worker = api.authenticate(request)
            return JSONResponse(await fn(token, worker))
        except ApiError as exc:
            return JSONResponse({"error": str(exc), "kind": exc.kind}, status_code=exc.status)
        except sqlite3.OperationalError as exc:  # locked / disk full: the worker retries
            return JSONResponse({"error": f"database: {exc}", "kind": "retry"}, status_code=503)
        except (ValueError, KeyError) as exc:
            return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=400)

    @app.post("/call/{verb}")
    async def call(verb: str, request: Request):
        async def run(token, worker):
            key = (worker, request.headers.get("x-call-id"))
            if key[1] and (reply := api.remembered(key)) is not None:
                return reply
            payload = await request.json()
            reply = {"result": api.call(verb, worker, payload if isinstance(payload, dict)
                                        else {})}
            if key[1]:
                api.remember(key, reply)
            return reply
        return await guarded(request, run)

    @app.get("/versions/{kind}/{version}")
    async def files(kind: str, version: int, request: Request):
        async def run(token, worker):
            return {"files": api.list_files(kind, version)}
        return await guarded(request, run)

    @app.get("/versions/{kind}/{version}/files/{path:path}")
    async def file(kind: str, version: int, path: str, request: Request):
        try:
            api.authenticate(request)
            root = api.version_dir(kind, version).resolve()
            target = (root / path).resolve()
            if root not in target.parents or not target.is_file():
                raise ApiError(404, f"no file {path} in {kind} v{version}")
            return FileResponse(target)
        except ApiError as exc:
            return JSONResponse({"error": str(exc), "kind": exc.kind}, status_code=exc.status)

    @app.post("/uploads")
    async def start(request: Request):
        async def run(token, worker):
            return api.start_upload(worker, await request.json())
        return await guarded(request, run)

    @app.put("/uploads/{upload_id}/files/{path:path}")
    async def chunk(upload_id: str, path: str, offset: int, request: Request):
        async def run(token, worker):
            return api.put_chunk(upload_id, worker, path, offset, await request.body())
        return await guarded(request, run)

    @app.post("/uploads/{upload_id}/commit")
    async def commit(upload_id: str, request: Request):
        async def run(token, worker):
            return api.commit(upload_id, worker)
        return await guarded(request, run)

    return app


# -- the loop policy, run by the app for remote workers --------------------------------------
_TICKERS: dict[str, threading.Event] = {}


def start_loop_ticker(store, every_s: float = 1.0) -> threading.Event:
    """Apply the loop policy every few seconds from the app process while any worker token is
    active: a remote worker has no database to run it on (a local worker also runs it between
    jobs; queueing is idempotent). One thread per database file; set the event to stop it."""
    from rlhf_core.worker.loop import loop_tick
    key = str(Path(store.path).resolve())
    if key in _TICKERS and not _TICKERS[key].is_set():
        return _TICKERS[key]
    stop = _TICKERS[key] = threading.Event()

    def run():
        while not stop.wait(every_s):
            try:
                if tokens.any_active(store):
                    workers.reap(store)  # a remote worker that went silent: its job goes back
                    loop_tick(store)
            except Exception:  # a busy DB must not end the ticker
                log.warning("loop tick failed", exc_info=True)

    threading.Thread(target=run, name="loop-ticker", daemon=True).start()
    return stop
