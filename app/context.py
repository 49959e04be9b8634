"""What every UI handler needs, built once from an AppConfig and passed explicitly (no globals).

The UI process never loads a model: it holds the store, the config, the workspace paths and
the users of an optional auth file. An auth file is JSON (a list of
`{"user", "password", "role"}` objects, or `{"user": {"password", "role"}}`) or CSV with a
`user,password,role` header; role is `annotator` (default) or `researcher`.

Roles: with an auth file, a user's role comes from it (or `config.researchers`). Without one the
app is on loopback for a trusted team: everybody is a researcher unless `config.researchers`
names who is.
"""
from __future__ import annotations

import csv
import hmac
import json
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from app.login_guard import LoginThrottle, client_address
from rlhf_core.config import AppConfig
from rlhf_core.data.store import Store

ROLES = ("annotator", "researcher")
MAX_NAME_LEN = 64
log = logging.getLogger(__name__)


@dataclass
class AppContext:
    store: Store
    config: AppConfig
    workspace: Path
    users: dict[str, dict] = field(default_factory=dict)  # user -> {"password", "role"}
    browser_secret: str = ""  # encrypts BrowserState; kept in the DB so drafts survive restarts
    throttle: LoginThrottle = field(default_factory=LoginThrottle, repr=False, compare=False)

    @classmethod
    def from_config(cls, config: AppConfig, *, auth_file: str | Path | None = None,
                    store: Store | None = None) -> "AppContext":
        workspace = Path(config.workspace)
        store = store or Store(workspace / "rlhf.db")
        auth_file = auth_file or config.auth_file
        users = load_auth_file(auth_file) if auth_file else {}
        secret = store.get_setting("ui_browser_secret")
        if not secret:
            secret = secrets.token_urlsafe(24)
            store.set_setting("ui_browser_secret", secret)
        return cls(store=store, config=config, workspace=workspace, users=users,
                   browser_secret=secret)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.users)

    def check_password(self, user: str, password: str) -> bool:
        """The `auth=` callable for Gradio's login form (constant-time compare), throttled per
        user and client address (app.login_guard: a lockout after repeated failures)."""
        address = client_address.get()
        wait = self.throttle.locked_for(user, address)
        if wait > 0:
            log.warning("login as %r from %s refused: locked for %.0f s after repeated wrong "
                        "passwords", user, address, wait)
            return False
        entry = self.users.get(user)
        if entry is None:
            hmac.compare_digest(password.encode(), b"x" * 16)  # same work for unknown users
            ok = False
        else:
            ok = hmac.compare_digest(password.encode(), str(entry["password"]).encode())
        (self.throttle.succeeded if ok else self.throttle.failed)(user, address)
        return ok

    def role(self, annotator: str | None) -> str:
        if not annotator:
            return "annotator"
        if annotator in self.config.researchers:
            return "researcher"
        if self.auth_enabled:
            return self.users.get(annotator, {}).get("role", "annotator")
        return "annotator" if self.config.researchers else "researcher"

    def is_researcher(self, annotator: str | None) -> bool:
        return self.role(annotator) == "researcher"


def load_auth_file(path: str | Path) -> dict[str, dict]:
    """Parse a JSON or CSV auth file into {user: {"password", "role"}}; errors name the entry
    (a CSV's line). A user twice is refused: which of two passwords counts is not for a file's
    order to decide."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except (json.JSONDecodeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None
        if isinstance(data, dict):
            data = [{"user": u, **(v if isinstance(v, dict) else {"password": v})}
                    for u, v in data.items()]
        rows, where = (data if isinstance(data, list) else [data]), "entry {}"
    else:
        rows, where = list(csv.DictReader(text.splitlines())), "line {}"
    users: dict[str, dict] = {}
    first_seen: dict[str, int] = {}
    for i, row in enumerate(rows, start=1):
        n = i + 1 if where == "line {}" else i  # a CSV's line 1 is its header
        if not isinstance(row, dict):
            raise ValueError(f"{path}: entry {i} is not an object")
        user = str(row.get("user") or row.get("username") or "").strip()
        password = str(row.get("password") or "")
        role = str(row.get("role") or "annotator").strip().lower()
        if not user or not password:
            raise ValueError(f"{path}: entry {i} needs a user and a password")
        if role not in ROLES:
            raise ValueError(f"{path}: entry {i} has role {role!r}; use one of {ROLES}")
        if user in users:
            raise ValueError(f"{path}: {where.format(n)}: user {user!r} again (first on "
                             f"{where.format(first_seen[user])}); each user once")
        users[user] = {"password": password, "role": role}
        first_seen[user] = n
    if not users:
        raise ValueError(f"{path}: no users")
    return users


def _no_duplicate_keys(pairs: list[tuple]) -> dict:
    keys = [k for k, _ in pairs]
    for k in keys:
        if keys.count(k) > 1:
            raise ValueError(f"{k!r} appears twice in one object (each user once)")
    return dict(pairs)
