"""A workspace folder: `rlhf.db`, `models/`, `cache/`, and its saved configuration.

The configuration lives in the DB (settings key "config") so the UI process and
the worker, started separately, agree on the model and the loop's knobs.
Command-line flags update it; everything else keeps its saved value. A flag is checked before
it is saved (types and ranges: config.check_fields; a model must resolve), so a bad one never
reaches the workspace; a saved configuration that does not check is refused, never reset.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rlhf_core.config import (AppConfig, ConfigError, ModelLoadError, from_dict,
                              model_source_kind, to_dict)
from rlhf_core.data import prompts
from rlhf_core.data.store import Store, WorkspaceError

DB_NAME = "rlhf.db"
CONFIG_KEY = "config"


def open_workspace(path: str | Path, *, create: bool = True,
                   **overrides) -> tuple[Store, AppConfig]:
    """Open a workspace (creating it if `create`) and return its store and merged config.

    overrides: top-level AppConfig fields, or "section.field" keys such as
    "sampling.k"; None values are ignored (flag not given). They are saved only once the whole
    configuration checks; without them nothing is written (a new workspace gets its defaults).
    """
    path = Path(path).expanduser().resolve()
    given = {k: v for k, v in overrides.items() if v is not None}
    if not create and not (path / DB_NAME).exists():
        raise WorkspaceError(f"{path} is not a workspace (no {DB_NAME} in it): check --workspace, "
                             "or create one with `rlhf up` or `rlhf import-prompts`")
    if create:
        path.mkdir(parents=True, exist_ok=True)
    store = Store(path / DB_NAME)
    try:
        saved = saved_config(store)
        cfg = dataclasses.replace(merged_config(store, saved or {}, given), workspace=path)
        for key in ("model", "reward_model"):
            if key in given and given[key] != (saved or {}).get(key):
                check_model_source(str(given[key]))
        if given or saved is None:
            store.set_setting(CONFIG_KEY, to_dict(cfg))
    except BaseException:
        store.close()
        raise
    return store, cfg


def merged_config(store: Store, saved: dict, overrides: dict) -> AppConfig:
    """`saved` with `overrides` applied, checked as a whole: a flag may repair a bad saved value.
    A bad value names its field, and says whether the flag or the saved row holds it."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    if merged and "system_prompt" not in merged:
        # saved before the setting existed: its versions were trained on prompts without one,
        # so it keeps that format (a new workspace gets the default)
        merged["system_prompt"] = ""
    for key, value in split_overrides(overrides).items():
        if isinstance(value, dict):
            current = merged.get(key)
            merged[key] = {**(current if isinstance(current, dict) else {}), **value}
        else:
            merged[key] = value
    try:
        return from_dict(AppConfig, merged)
    except ConfigError as exc:
        if exc.field in overrides or exc.field is None:
            raise
        raise saved_config_problem(store, exc) from None


def split_overrides(overrides: dict) -> dict:
    """{"sampling.k": 3, "model": m} -> {"sampling": {"k": 3}, "model": m}; an unknown section
    or field is a ConfigError naming the choices."""
    fields = dataclasses.fields(AppConfig)
    sections = {f.name: f.default_factory for f in fields
                if dataclasses.is_dataclass(f.default_factory)}
    top = [f.name for f in fields if f.name not in sections]
    out: dict = {}
    for key, value in overrides.items():
        section, dot, name = key.partition(".")
        if not dot and key in top:
            out[key] = value
            continue
        if not dot or section not in sections:
            raise ConfigError(f"unknown setting {key!r}: use SECTION.FIELD with a section of "
                              f"{', '.join(sections)}, or one of {', '.join(top)}", key)
        names = [f.name for f in dataclasses.fields(sections[section])]
        if name not in names:
            raise ConfigError(f"unknown setting {key!r}: {section} has {', '.join(names)}", key)
        out.setdefault(section, {})[name] = value
    return out


def apply_overrides(cfg: AppConfig, overrides: dict) -> AppConfig:
    """`cfg` with overrides ("section.field" or top-level keys) applied and checked."""
    replaced = {}
    for key, value in split_overrides(overrides).items():
        replaced[key] = (dataclasses.replace(getattr(cfg, key), **value)
                         if isinstance(value, dict) else value)
    return dataclasses.replace(cfg, **replaced) if replaced else cfg


def saved_config(store: Store) -> dict | None:
    """The saved configuration row as a dict (None when there is none); anything else is an
    error, never a silent reset to the defaults."""
    try:
        saved = store.get_setting(CONFIG_KEY)
    except json.JSONDecodeError as exc:
        raise saved_config_problem(store, ConfigError(f"not valid JSON ({exc})")) from None
    if saved is not None and not isinstance(saved, dict):
        raise saved_config_problem(store, ConfigError(
            f"a JSON {type(saved).__name__} instead of an object of settings"))
    return saved


def saved_config_problem(store: Store, exc: ConfigError) -> ConfigError:
    fix = (f"replace it with `--set {exc.field}=VALUE` (rlhf up, serve or worker)" if exc.field
           else f"repair or remove the {CONFIG_KEY!r} row of its settings table "
                "(without one the defaults apply)")
    return ConfigError(f"{store.path}: the saved configuration is bad: {exc}; {fix}", exc.field)


def check_model_source(source: str, *, hub: bool = False) -> str:
    """Refuse a model source that cannot load, before it is saved, without torch: the embedded
    keyword needs its wheel, a directory a config.json, a Hub id the owner/name shape. With
    `hub` (a process that is about to load it) a Hub id must also resolve: cached, or found on
    the Hub. The UI process does not ask the Hub: the worker may live on another host."""
    kind = model_source_kind(source)
    if hub and kind == "hub":
        import huggingface_hub  # lazy: torch-free, only for a Hub id
        from huggingface_hub import constants
        if isinstance(huggingface_hub.try_to_load_from_cache(source, "config.json"), str):
            return kind
        if constants.HF_HUB_OFFLINE:
            raise ModelLoadError(f"model {source!r} is not in the Hub cache and HF_HUB_OFFLINE "
                                 "is set")
        try:
            huggingface_hub.model_info(source, timeout=10)
        except Exception as exc:  # not found, gated, no network: the worker would fail alike
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            raise ModelLoadError(f"model {source!r} does not resolve on the Hub "
                                 f"({type(exc).__name__}: {first})") from None
    return kind


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
    """The workspace's saved configuration (defaults for a new one); a bad one is refused."""
    return merged_config(store, saved_config(store) or {}, {})


def set_auto(store: Store, on: bool) -> None:
    """The UI's toggle: persisted in the workspace config so the worker sees it."""
    cfg = apply_overrides(read_config(store), {"loop.auto": bool(on)})
    store.set_setting(CONFIG_KEY, to_dict(cfg))
    store.log_event("auto_loop", None, on=bool(on))


def seed_prompts_if_empty(store: Store, cfg: AppConfig) -> int:
    """A new workspace starts with the shipped sample prompts."""
    if prompts.count(store):
        return 0
    from rlhf_core.prompt_io import bundled_prompts_path, read_prompts
    records = read_prompts(bundled_prompts_path())
    return store.add_prompts(records, source="bundled",
                             heldout_fraction=cfg.reward.heldout_fraction)["added"]
