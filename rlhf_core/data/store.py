"""The workspace database: SQLite through sqlite-utils, never torch.

Durability rules (DESIGN.md): WAL, synchronous=FULL, busy_timeout, foreign keys,
every write transaction begins IMMEDIATE (so two writers queue instead of
failing half-way), no model call inside a transaction. Rankings are append-only
records; everything a model learns from is derived from them.

One `Store` is shared by the threads of a process; each thread gets its own
connection (sqlite3 connections must not cross threads).
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

import sqlite_utils

BUSY_TIMEOUT_MS = 15000

# Writers in one process queue on a lock per database file instead of in SQLite's busy
# handler, which polls with sleeps of up to 100 ms: measured with 16 threads ranking at once,
# p99 of a next-item + submit cycle was 241 ms (max 838 ms) through the busy handler. Other
# processes (the worker) still meet the busy timeout, which is rare: they write seldom.
_WRITE_LOCKS: dict[str, threading.RLock] = {}
_WRITE_LOCKS_GUARD = threading.Lock()


def _write_lock(path: Path) -> threading.RLock:
    key = str(path.resolve())
    with _WRITE_LOCKS_GUARD:
        return _WRITE_LOCKS.setdefault(key, threading.RLock())


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


def loads(text, default=None):
    return json.loads(text) if text else default


# Each migration runs once, in order, inside one IMMEDIATE transaction;
# PRAGMA user_version records how many have run. Append, never edit.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE prompts (
        id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, text TEXT NOT NULL,
        category TEXT, source TEXT, source_id TEXT, meta TEXT,
        split TEXT NOT NULL CHECK (split IN ('train', 'heldout')), created_at TEXT NOT NULL);
    CREATE TABLE versions (
        id INTEGER PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('policy', 'reward')),
        version INTEGER NOT NULL, status TEXT NOT NULL, parent INTEGER, reward_version INTEGER,
        path TEXT, base_model TEXT, config TEXT, metrics TEXT, counts TEXT, reason TEXT,
        job_id INTEGER, created_at TEXT NOT NULL, UNIQUE (kind, version));
    CREATE TABLE batches (
        id INTEGER PRIMARY KEY, policy_version INTEGER NOT NULL, job_id INTEGER,
        k INTEGER NOT NULL, settings TEXT, created_at TEXT NOT NULL);
    CREATE TABLE items (
        id INTEGER PRIMARY KEY, batch_id INTEGER NOT NULL REFERENCES batches(id),
        prompt_id INTEGER NOT NULL REFERENCES prompts(id),
        status TEXT NOT NULL DEFAULT 'ready' CHECK (status IN ('ready', 'retired', 'withdrawn')),
        overlap INTEGER NOT NULL DEFAULT 1, kind TEXT NOT NULL DEFAULT 'label',
        selection TEXT, created_at TEXT NOT NULL, closed_at TEXT);
    CREATE INDEX items_status ON items (status, batch_id);
    CREATE TABLE responses (
        id INTEGER PRIMARY KEY, item_id INTEGER NOT NULL REFERENCES items(id),
        prompt_id INTEGER NOT NULL REFERENCES prompts(id), position INTEGER NOT NULL,
        policy_version INTEGER NOT NULL, text TEXT NOT NULL, n_tokens INTEGER,
        finish_reason TEXT, settings TEXT, created_at TEXT NOT NULL);
    CREATE INDEX responses_item ON responses (item_id);
    CREATE TABLE assignments (
        id INTEGER PRIMARY KEY, item_id INTEGER NOT NULL REFERENCES items(id),
        annotator TEXT NOT NULL, token TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'done', 'expired')),
        created_at TEXT NOT NULL, expires_at REAL NOT NULL, UNIQUE (item_id, annotator));
    CREATE TABLE rankings (
        id INTEGER PRIMARY KEY, submission_key TEXT NOT NULL UNIQUE, annotator TEXT NOT NULL,
        item_id INTEGER NOT NULL REFERENCES items(id), batch_id INTEGER NOT NULL,
        policy_version INTEGER, kind TEXT NOT NULL CHECK (kind IN ('rank', 'skip', 'undo')),
        tiers TEXT, all_bad INTEGER NOT NULL DEFAULT 0, flagged INTEGER NOT NULL DEFAULT 0,
        note TEXT, time_spent_s REAL, supersedes INTEGER REFERENCES rankings(id),
        created_at TEXT NOT NULL);
    CREATE INDEX rankings_annotator ON rankings (annotator, id);
    CREATE TABLE pairs (
        id INTEGER PRIMARY KEY, ranking_id INTEGER NOT NULL REFERENCES rankings(id),
        prompt_id INTEGER NOT NULL REFERENCES prompts(id),
        chosen_id INTEGER NOT NULL REFERENCES responses(id),
        rejected_id INTEGER NOT NULL REFERENCES responses(id),
        label REAL NOT NULL DEFAULT 1.0, created_at TEXT NOT NULL);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY, kind TEXT NOT NULL, params TEXT,
        status TEXT NOT NULL DEFAULT 'queued'
            CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
        progress REAL NOT NULL DEFAULT 0, message TEXT, result TEXT, error TEXT,
        worker TEXT, attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL DEFAULT 3,
        heartbeat_at REAL, lease_expires REAL, requested_by TEXT,
        created_at TEXT NOT NULL, started_at TEXT, finished_at TEXT);
    CREATE INDEX jobs_status ON jobs (status, id);
    CREATE TABLE metrics (
        id INTEGER PRIMARY KEY, job_id INTEGER, kind TEXT NOT NULL, version INTEGER,
        step INTEGER, name TEXT NOT NULL, value REAL, created_at TEXT NOT NULL);
    CREATE INDEX metrics_kind ON metrics (kind, name, step);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY, at TEXT NOT NULL, kind TEXT NOT NULL, actor TEXT, payload TEXT);
    -- Training data: pairs of rankings that are neither undone nor flagged.
    CREATE VIEW active_rankings AS
        SELECT r.* FROM rankings r
        WHERE r.kind IN ('rank', 'skip')
          AND NOT EXISTS (SELECT 1 FROM rankings u WHERE u.supersedes = r.id);
    CREATE VIEW active_pairs AS
        SELECT p.* FROM pairs p JOIN active_rankings r ON r.id = p.ranking_id
        WHERE r.flagged = 0 AND r.all_bad = 0 AND r.kind = 'rank';
    """,
    # Reward-model scores of stored responses (the researcher view; rlhf_core.data.scores).
    """
    CREATE TABLE response_scores (
        id INTEGER PRIMARY KEY, response_id INTEGER NOT NULL REFERENCES responses(id),
        reward_version INTEGER NOT NULL, score REAL NOT NULL, created_at TEXT NOT NULL,
        UNIQUE (response_id, reward_version));
    """,
    # Remote workers' tokens (rlhf_core.data.tokens): only a hash is stored.
    """
    CREATE TABLE worker_tokens (
        id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_hash TEXT NOT NULL UNIQUE,
        created_at TEXT NOT NULL, revoked_at TEXT, last_used_at TEXT);
    """,
    # The workers registry (rlhf_core.data.workers): who runs, where, doing what, last beat.
    """
    CREATE TABLE workers (
        name TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, pid_scope TEXT,
        kinds TEXT, device TEXT, started_at TEXT NOT NULL, heartbeat_at REAL NOT NULL,
        job_id INTEGER, reason TEXT,
        status TEXT NOT NULL CHECK (status IN ('idle', 'running', 'stopped', 'dead')));
    """,
    # A fetch costs the same at 1k items or 100k (issue 16.4). `open_items`: the items that still
    # need a ranking (ready, fewer done assignments than their overlap: `need` = how many fewer),
    # keyed in serving order; `annotator_counts`: each annotator's active rankings. Triggers keep
    # both exact inside the transaction of every write to items, assignments and rankings,
    # whichever code writes. `held_until`: how long page heartbeats may keep renewing a hold.
    """
    CREATE VIEW open_item_needs AS
        SELECT i.id AS item_id, b.policy_version, i.overlap - (
            SELECT COUNT(*) FROM assignments a WHERE a.item_id = i.id AND a.status = 'done') AS need
        FROM items i JOIN batches b ON b.id = i.batch_id WHERE i.status = 'ready';
    CREATE TABLE open_items (
        item_id INTEGER PRIMARY KEY, policy_version INTEGER NOT NULL, need INTEGER NOT NULL);
    CREATE INDEX open_items_serving ON open_items (policy_version DESC, item_id);
    INSERT INTO open_items (item_id, policy_version, need)
        SELECT item_id, policy_version, need FROM open_item_needs WHERE need > 0;
    CREATE TRIGGER open_items_item_added AFTER INSERT ON items BEGIN
        INSERT INTO open_items (item_id, policy_version, need) SELECT item_id, policy_version,
            need FROM open_item_needs WHERE item_id = NEW.id AND need > 0;
    END;
    CREATE TRIGGER open_items_item_changed AFTER UPDATE OF status, overlap, batch_id ON items
    BEGIN
        DELETE FROM open_items WHERE item_id IN (OLD.id, NEW.id);
        INSERT INTO open_items (item_id, policy_version, need) SELECT item_id, policy_version,
            need FROM open_item_needs WHERE item_id = NEW.id AND need > 0;
    END;
    CREATE TRIGGER open_items_item_deleted AFTER DELETE ON items BEGIN
        DELETE FROM open_items WHERE item_id = OLD.id;
    END;
    CREATE TRIGGER open_items_done_added AFTER INSERT ON assignments WHEN NEW.status = 'done'
    BEGIN
        DELETE FROM open_items WHERE item_id = NEW.item_id;
        INSERT INTO open_items (item_id, policy_version, need) SELECT item_id, policy_version,
            need FROM open_item_needs WHERE item_id = NEW.item_id AND need > 0;
    END;
    CREATE TRIGGER open_items_done_changed AFTER UPDATE OF status, item_id ON assignments
    WHEN (OLD.status = 'done') != (NEW.status = 'done') OR OLD.item_id != NEW.item_id BEGIN
        DELETE FROM open_items WHERE item_id IN (OLD.item_id, NEW.item_id);
        INSERT INTO open_items (item_id, policy_version, need) SELECT item_id, policy_version,
            need FROM open_item_needs WHERE item_id IN (OLD.item_id, NEW.item_id) AND need > 0;
    END;
    CREATE TRIGGER open_items_done_deleted AFTER DELETE ON assignments WHEN OLD.status = 'done'
    BEGIN
        DELETE FROM open_items WHERE item_id = OLD.item_id;
        INSERT INTO open_items (item_id, policy_version, need) SELECT item_id, policy_version,
            need FROM open_item_needs WHERE item_id = OLD.item_id AND need > 0;
    END;
    CREATE INDEX rankings_supersedes ON rankings (supersedes) WHERE supersedes IS NOT NULL;
    CREATE INDEX rankings_created ON rankings (created_at);
    CREATE TABLE annotator_counts (
        annotator TEXT PRIMARY KEY, active INTEGER NOT NULL DEFAULT 0);
    INSERT INTO annotator_counts (annotator, active)
        SELECT annotator, COUNT(*) FROM active_rankings GROUP BY annotator;
    CREATE TRIGGER annotator_counts_added AFTER INSERT ON rankings
    WHEN NEW.kind IN ('rank', 'skip') BEGIN
        INSERT INTO annotator_counts (annotator, active) VALUES (NEW.annotator, 1)
            ON CONFLICT (annotator) DO UPDATE SET active = active + 1;
    END;
    CREATE TRIGGER annotator_counts_superseded AFTER INSERT ON rankings
    WHEN NEW.supersedes IS NOT NULL BEGIN
        UPDATE annotator_counts SET active = active - 1 WHERE annotator = (
            SELECT r.annotator FROM rankings r WHERE r.id = NEW.supersedes
              AND r.kind IN ('rank', 'skip') AND NOT EXISTS (
                SELECT 1 FROM rankings u WHERE u.supersedes = r.id AND u.id != NEW.id));
    END;
    CREATE INDEX assignments_annotator ON assignments (annotator, status);
    CREATE INDEX assignments_live ON assignments (expires_at) WHERE status = 'open';
    ALTER TABLE assignments ADD COLUMN held_until REAL;
    UPDATE assignments SET held_until = expires_at WHERE status = 'open';
    """,
    # The researcher's Data tab (rlhf_core.data.review). `reviews`: what a researcher did, append
    # only: a flagged ranking resolved (kept: its pairs count from then on) or relabelled (`undo_id` supersedes it, the item is
    # served again), an item given one more annotator (ask_more) or seen (reviewed, as of its
    # newest ranking `ranking_id`). `item_disagreement`: per item, its active 'rank' rankings,
    # the response pairs compared between every two of them by different annotators and how many
    # of those the two order oppositely; kept exact by triggers (as open_items is), so sorting
    # 100k rankings by disagreement reads one row per item instead of comparing rankings.
    """
    CREATE TABLE reviews (
        id INTEGER PRIMARY KEY,
        action TEXT NOT NULL CHECK (action IN ('resolve', 'relabel', 'ask_more', 'reviewed')),
        item_id INTEGER NOT NULL REFERENCES items(id), ranking_id INTEGER REFERENCES rankings(id),
        undo_id INTEGER REFERENCES rankings(id), reviewer TEXT NOT NULL, note TEXT,
        created_at TEXT NOT NULL);
    CREATE UNIQUE INDEX reviews_flag ON reviews (ranking_id) WHERE action IN ('resolve', 'relabel');
    CREATE INDEX reviews_item ON reviews (item_id, action, ranking_id);
    CREATE INDEX rankings_flagged ON rankings (id) WHERE flagged = 1;
    CREATE INDEX rankings_item ON rankings (item_id);
    CREATE INDEX pairs_ranking ON pairs (ranking_id);
    CREATE INDEX pairs_responses ON pairs (chosen_id, rejected_id);
    CREATE TABLE item_disagreement (
        item_id INTEGER PRIMARY KEY, rankings INTEGER NOT NULL DEFAULT 0,
        compared INTEGER NOT NULL DEFAULT 0, discordant INTEGER NOT NULL DEFAULT 0,
        last_ranking_id INTEGER);
    INSERT INTO item_disagreement (item_id, rankings, last_ranking_id)
        SELECT r.item_id, SUM(r.kind = 'rank' AND NOT EXISTS (
            SELECT 1 FROM rankings u WHERE u.supersedes = r.id)), MAX(r.id)
        FROM rankings r GROUP BY r.item_id;
    UPDATE item_disagreement SET (compared, discordant) = (
        SELECT COUNT(*), COALESCE(SUM(p.label = 1.0 AND q.label = 1.0
                                      AND q.chosen_id = p.rejected_id), 0)
        FROM active_rankings a JOIN pairs p ON p.ranking_id = a.id
        JOIN pairs q ON q.chosen_id IN (p.chosen_id, p.rejected_id)
                    AND q.rejected_id IN (p.chosen_id, p.rejected_id)
        JOIN active_rankings b ON b.id = q.ranking_id
        WHERE a.item_id = item_disagreement.item_id AND a.kind = 'rank' AND b.kind = 'rank'
          AND a.id < b.id AND a.annotator != b.annotator)
    WHERE rankings >= 2;
    CREATE TRIGGER item_disagreement_ranked AFTER INSERT ON rankings BEGIN
        INSERT INTO item_disagreement (item_id, rankings, last_ranking_id)
            VALUES (NEW.item_id, NEW.kind = 'rank', NEW.id)
            ON CONFLICT (item_id) DO UPDATE SET rankings = rankings + excluded.rankings,
                last_ranking_id = excluded.last_ranking_id;
    END;
    -- A pair of a new ranking meets the same two responses in every other active ranking of
    -- the item (one row each, ordered or tied): one comparison each, discordant when reversed.
    CREATE TRIGGER item_disagreement_pair AFTER INSERT ON pairs BEGIN
        UPDATE item_disagreement SET (compared, discordant) = (
            SELECT item_disagreement.compared + COUNT(*),
                   item_disagreement.discordant + COALESCE(SUM(
                       NEW.label = 1.0 AND q.label = 1.0 AND q.chosen_id = NEW.rejected_id), 0)
            FROM pairs q JOIN rankings o ON o.id = q.ranking_id
            WHERE q.chosen_id IN (NEW.chosen_id, NEW.rejected_id)
              AND q.rejected_id IN (NEW.chosen_id, NEW.rejected_id)
              AND q.ranking_id != NEW.ranking_id AND o.kind = 'rank'
              AND o.annotator != (SELECT annotator FROM rankings WHERE id = NEW.ranking_id)
              AND NOT EXISTS (SELECT 1 FROM rankings u WHERE u.supersedes = o.id))
        WHERE item_id = (SELECT item_id FROM rankings WHERE id = NEW.ranking_id
                         AND kind = 'rank');
    END;
    -- A superseded 'rank' ranking (undo, relabel) takes its comparisons with it.
    CREATE TRIGGER item_disagreement_superseded AFTER INSERT ON rankings
    WHEN NEW.supersedes IS NOT NULL BEGIN
        UPDATE item_disagreement SET (rankings, compared, discordant) = (
            SELECT item_disagreement.rankings - 1, item_disagreement.compared - COUNT(*),
                   item_disagreement.discordant - COALESCE(SUM(
                       p.label = 1.0 AND q.label = 1.0 AND q.chosen_id = p.rejected_id), 0)
            FROM pairs p JOIN pairs q ON q.chosen_id IN (p.chosen_id, p.rejected_id)
                                     AND q.rejected_id IN (p.chosen_id, p.rejected_id)
            JOIN rankings o ON o.id = q.ranking_id
            WHERE p.ranking_id = NEW.supersedes AND q.ranking_id != NEW.supersedes
              AND o.kind = 'rank'
              AND o.annotator != (SELECT annotator FROM rankings WHERE id = NEW.supersedes)
              AND NOT EXISTS (SELECT 1 FROM rankings u WHERE u.supersedes = o.id))
        WHERE item_id = (SELECT s.item_id FROM rankings s WHERE s.id = NEW.supersedes
                         AND s.kind = 'rank' AND NOT EXISTS (SELECT 1 FROM rankings u
                             WHERE u.supersedes = s.id AND u.id != NEW.id));
    END;
    -- A flag a researcher resolved (kept the ranking) no longer keeps its pairs out of training.
    DROP VIEW active_pairs;
    CREATE VIEW active_pairs AS
        SELECT p.* FROM pairs p JOIN active_rankings r ON r.id = p.ranking_id
        WHERE r.all_bad = 0 AND r.kind = 'rank' AND (r.flagged = 0 OR EXISTS (
            SELECT 1 FROM reviews v WHERE v.ranking_id = r.id  -- (relabelled: not active)
              AND v.action IN ('resolve', 'relabel')));
    """,
]


class WorkspaceError(RuntimeError):
    """A workspace that cannot be used as it is (missing, not a database, from a newer release);
    the message says which file and what to do."""


SQLITE_MAGIC = b"SQLite format 3\x00"


def check_database_file(path: Path) -> None:
    """Refuse, before SQLite touches it, a path that is a directory, a file that is not an SQLite
    database, or one shorter than its own header says (a truncated copy): SQLite would open
    such a file and fail later, half-way through a command."""
    if path.is_dir():
        raise WorkspaceError(f"{path} is a directory, not a database file")
    if not path.exists() or path.stat().st_size == 0:
        return  # a new database
    with open(path, "rb") as fh:
        header = fh.read(100)
    if not header.startswith(SQLITE_MAGIC):
        raise WorkspaceError(f"{path} is not an SQLite database (its first bytes are not "
                             "'SQLite format 3')")
    if len(header) < 100:
        raise WorkspaceError(f"{path} is truncated: {len(header)} bytes, not even a header")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages, changes, valid_for = (int.from_bytes(header[o:o + 4], "big") for o in (28, 24, 92))
    # With a non-empty WAL beside it, a checkpoint may have stopped half-way (header written,
    # file not yet grown): SQLite heals that from the WAL, so only a lone file is judged.
    wal = path.with_name(path.name + "-wal")
    pending = wal.exists() and wal.stat().st_size > 0
    if changes == valid_for and not pending and pages * page_size > path.stat().st_size:
        raise WorkspaceError(f"{path} is truncated: its header counts {pages * page_size} bytes, "
                             f"the file has {path.stat().st_size}; restore it from a backup")


class Store:
    """The workspace DB. `store.db` is this thread's sqlite_utils.Database."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        check_database_file(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._write_lock = _write_lock(self.path)
        self._migrate()

    # -- connections and transactions -------------------------------------
    @property
    def db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys=ON")
            db = sqlite_utils.Database(conn)
            self._local.db = db
        return db

    @contextlib.contextmanager
    def write(self):
        """One IMMEDIATE write transaction (nested calls become savepoints)."""
        db = self.db
        if db.conn.in_transaction:
            with db.atomic():
                yield db
            return
        if not self._write_lock.acquire(timeout=BUSY_TIMEOUT_MS / 1000):
            raise sqlite3.OperationalError("database is locked (another writer in this process)")
        try:
            db.conn.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.rollback()
                raise
            else:
                db.conn.execute("COMMIT")
        finally:
            self._write_lock.release()

    def close(self):
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def _migrate(self):
        db = self.db
        schema = db.conn.execute("PRAGMA user_version").fetchone()[0]
        if schema > len(MIGRATIONS):  # its tables may mean something this release does not know
            self.close()
            raise WorkspaceError(f"{self.path} was written by a newer rlhf-loop (schema {schema}; "
                                 f"this release knows {len(MIGRATIONS)}): upgrade rlhf-loop")
        with self.write():
            done = db.conn.execute("PRAGMA user_version").fetchone()[0]
            for i, script in enumerate(MIGRATIONS[done:], start=done + 1):
                for stmt in _statements(script):
                    db.conn.execute(stmt)
                db.conn.execute(f"PRAGMA user_version={i}")
            if not db.conn.execute("SELECT 1 FROM versions WHERE kind='policy'").fetchone():
                # Policy v0 is the base model: the reference every later version is measured against.
                db.conn.execute(
                    "INSERT INTO versions (kind, version, status, created_at, reason) "
                    "VALUES ('policy', 0, 'published', ?, 'base model (reference)')", [now_iso()])

    # -- small read helpers -------------------------------------------------
    def rows(self, sql: str, params=()) -> list[dict]:
        return list(self.db.query(sql, params))

    def one(self, sql: str, params=()) -> dict | None:
        rows = self.rows(sql, params)
        return rows[0] if rows else None

    def scalar(self, sql: str, params=()):
        row = self.db.conn.execute(sql, params).fetchone()
        return row[0] if row else None

    # -- settings ------------------------------------------------------------
    def get_setting(self, key: str, default=None):
        row = self.one("SELECT value FROM settings WHERE key = ?", [key])
        return loads(row["value"]) if row else default

    def set_setting(self, key: str, value) -> None:
        with self.write() as db:
            db.execute("INSERT INTO settings (key, value) VALUES (?, ?) "
                       "ON CONFLICT(key) DO UPDATE SET value = excluded.value", [key, dumps(value)])

    # -- events and metrics -------------------------------------------------------
    def log_event(self, kind: str, actor: str | None = None, **payload) -> None:
        with self.write() as db:
            db["events"].insert({"at": now_iso(), "kind": kind, "actor": actor,
                                 "payload": dumps(payload)})

    def log_metrics(self, kind: str, values: dict, *, step: int | None = None,
                    version: int | None = None, job_id: int | None = None) -> None:
        at = now_iso()
        rows = [{"job_id": job_id, "kind": kind, "version": version, "step": step,
                 "name": k, "value": float(v), "created_at": at}
                for k, v in values.items() if v is not None]
        with self.write() as db:
            db["metrics"].insert_all(rows)

    def last_metric_step(self, kind: str) -> int | None:
        """The highest step logged for `kind` (per-step series run on across rounds)."""
        return self.scalar("SELECT MAX(step) FROM metrics WHERE kind = ?", [kind])

    def metric_series(self, kind: str, name: str | None = None) -> list[dict]:
        sql = "SELECT * FROM metrics WHERE kind = ?"
        params: list = [kind]
        if name:
            sql += " AND name = ?"
            params.append(name)
        return self.rows(sql + " ORDER BY id", params)

    # -- prompts ----------------------------------------------------------------
    def add_prompts(self, records: list[dict], *, source: str, heldout_fraction: float = 0.2) -> dict:
        """Insert validated prompt records in one transaction; known prompts are skipped."""
        from rlhf_core.preferences import split_for_prompt
        from rlhf_core.prompt_io import prompt_key
        at, added, dupes = now_iso(), 0, 0
        with self.write() as db:
            for rec in records:
                key = prompt_key(rec["text"])
                cur = db.execute(
                    "INSERT INTO prompts (key, text, category, source, source_id, meta, split, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO NOTHING",
                    [key, rec["text"], rec.get("category"), source, rec.get("source_id"),
                     dumps(rec.get("meta") or {}), split_for_prompt(key, heldout_fraction), at])
                added += cur.rowcount
                dupes += 1 - cur.rowcount
        self.log_event("prompts_imported", None, source=source, added=added, duplicates=dupes)
        return {"added": added, "duplicates": dupes}

    # -- versions ---------------------------------------------------------------------
    def current_version(self, kind: str) -> dict | None:
        status = "published" if kind == "policy" else "promoted"
        row = self.one("SELECT * FROM versions WHERE kind = ? AND status = ? "
                       "ORDER BY version DESC LIMIT 1", [kind, status])
        return _decode_version(row)

    def get_version(self, kind: str, version: int) -> dict | None:
        return _decode_version(self.one(
            "SELECT * FROM versions WHERE kind = ? AND version = ?", [kind, version]))

    def list_versions(self, kind: str) -> list[dict]:
        return [_decode_version(r) for r in self.rows(
            "SELECT * FROM versions WHERE kind = ? ORDER BY version", [kind])]

    def next_version_number(self, kind: str) -> int:
        return (self.scalar("SELECT MAX(version) FROM versions WHERE kind = ?", [kind]) or 0) + 1

    def add_version(self, kind: str, version: int, *, status: str, path: str | None = None,
                    parent: int | None = None, reward_version: int | None = None,
                    base_model: str | None = None, config: dict | None = None,
                    metrics: dict | None = None, counts: dict | None = None,
                    reason: str | None = None, job_id: int | None = None) -> dict:
        with self.write() as db:
            db["versions"].insert({
                "kind": kind, "version": version, "status": status, "path": path,
                "parent": parent, "reward_version": reward_version, "base_model": base_model,
                "config": dumps(config or {}), "metrics": dumps(metrics or {}),
                "counts": dumps(counts or {}), "reason": reason, "job_id": job_id,
                "created_at": now_iso()})
        self.log_event(f"{kind}_version", None, version=version, status=status, reason=reason)
        return self.get_version(kind, version)

    # -- status ---------------------------------------------------------------------
    def open_item_count(self) -> int:
        """Items that still need a ranking."""
        return self.scalar(OPEN_ITEMS_SQL) or 0

    def ranking_count(self) -> int:
        """Active (not undone) rankings that are not skips."""
        return self.scalar("SELECT COUNT(*) FROM active_rankings WHERE kind = 'rank'") or 0

    def batch_count(self, policy_version: int) -> int:
        """Labeling batches sampled from this version (an arena answer is not one)."""
        return self.scalar("SELECT COUNT(*) FROM batches b WHERE policy_version = ? AND NOT "
                           "EXISTS (SELECT 1 FROM items i WHERE i.batch_id = b.id "
                           "AND i.kind = 'arena')", [policy_version]) or 0

    def counts(self) -> dict:
        q = self.scalar
        return {
            "prompts": q("SELECT COUNT(*) FROM prompts"),
            "items_ready": q("SELECT COUNT(*) FROM items WHERE status = 'ready'"),
            "items_open": q(OPEN_ITEMS_SQL),
            "rankings": q("SELECT COUNT(*) FROM active_rankings WHERE kind = 'rank'"),
            "skips": q("SELECT COUNT(*) FROM active_rankings WHERE kind = 'skip'"),
            "flagged": q("SELECT COUNT(*) FROM active_rankings WHERE flagged = 1"),
            "pairs": q("SELECT COUNT(*) FROM active_pairs WHERE label = 1.0"),
            "tie_pairs": q("SELECT COUNT(*) FROM active_pairs WHERE label != 1.0"),
            "annotators": q("SELECT COUNT(DISTINCT annotator) FROM active_rankings"),
        }

    def status(self) -> dict:
        policy, reward = self.current_version("policy"), self.current_version("reward")
        jobs = self.rows("SELECT id, kind, status, progress, message, error, attempts, "
                         "created_at, started_at, finished_at FROM jobs ORDER BY id DESC LIMIT 50")
        return {
            "workspace": str(self.path.parent),
            "policy_version": policy["version"] if policy else 0,
            "reward_version": reward["version"] if reward else None,
            "counts": self.counts(),
            "versions": {"policy": self.list_versions("policy"),
                         "reward": self.list_versions("reward")},
            "jobs": jobs,
        }


# Items that still need a ranking: ready, and fewer finished rankings than the overlap asks
# (kept by triggers in `open_items`, so counting them does not scan every item ever made).
OPEN_ITEMS_SQL = "SELECT COUNT(*) FROM open_items"


def _decode_version(row: dict | None) -> dict | None:
    if row is None:
        return None
    out = dict(row)
    for k in ("config", "metrics", "counts"):
        out[k] = loads(out.get(k), {})
    return out


def _statements(script: str):
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                yield buf.strip()
            buf = ""
    if buf.strip():
        yield buf.strip()
