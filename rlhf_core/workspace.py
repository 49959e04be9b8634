"""A workspace folder: `rlhf.db`, `models/`, `cache/`, and its saved configuration.

The configuration lives in the DB (settings key "config") so the UI process and
the worker, started separately, agree on the model and the loop's knobs.
Command-line flags update it; everything else keeps its saved value.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rlhf_core.config import AppConfig, from_dict, to_dict
from rlhf_core.data import prompts
from rlhf_core.data.store import Store

DB_NAME = "rlhf.db"


def open_workspace(path: str | Path, **overrides) -> tuple[Store, AppConfig]:
    """Open (creating if needed) a workspace and return its store and merged config.

    overrides: top-level AppConfig fields, or "section.field" keys such as
    "sampling.k"; None values are ignored (flag not given).
    """
    path = Path(path).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    store = Store(path / DB_NAME)
    saved = store.get_setting("config", {})
    cfg = from_dict(AppConfig, saved) if saved else AppConfig()
    cfg = apply_overrides(cfg, {k: v for k, v in overrides.items() if v is not None})
    cfg = dataclasses.replace(cfg, workspace=path)
    store.set_setting("config", to_dict(cfg))
    return store, cfg


def apply_overrides(cfg: AppConfig, overrides: dict) -> AppConfig:
    top, sections = {}, {}
    for key, value in overrides.items():
        if "." in key:
            section, field = key.split(".", 1)
            sections.setdefault(section, {})[field] = value
        else:
            top[key] = value
    try:
        for section, fields in sections.items():
            current = getattr(cfg, section, None)
            if not dataclasses.is_dataclass(current):
                raise TypeError(f"no config section {section!r}")
            top[section] = dataclasses.replace(current, **fields)
        return dataclasses.replace(cfg, **top) if top else cfg
    except TypeError as exc:  # an unknown field name
        raise ValueError(f"bad setting in {sorted(overrides)}: {exc}") from None


def parse_settings(pairs: list[str]) -> dict:
    """`["ppo.lr=2e-4", "loop.selection=uncertainty"]` -> {"ppo.lr": 0.0002, ...}."""
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects SECTION.FIELD=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def read_config(store: Store) -> AppConfig:
    """The workspace's saved configuration (defaults for a new one)."""
    saved = store.get_setting("config", {})
    return from_dict(AppConfig, saved) if saved else AppConfig()


def set_auto(store: Store, on: bool) -> None:
    """The UI's toggle: persisted in the workspace config so the worker sees it."""
    cfg = apply_overrides(read_config(store), {"loop.auto": bool(on)})
    store.set_setting("config", to_dict(cfg))
    store.log_event("auto_loop", None, on=bool(on))


def seed_prompts_if_empty(store: Store, cfg: AppConfig) -> int:
    """A new workspace starts with the shipped sample prompts."""
    if prompts.count(store):
        return 0
    from rlhf_core.prompt_io import bundled_prompts_path, read_prompts
    records = read_prompts(bundled_prompts_path())
    return store.add_prompts(records, source="bundled",
                             heldout_fraction=cfg.reward.heldout_fraction)["added"]
