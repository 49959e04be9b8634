"""Settings at the boundary (issue 11.6): every config field checked for its type and range, a
bad flag never saved, a bad saved configuration refused (not reset, not written back), and
only commands meant to create a workspace create one."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from rlhf_core.config import (LIMITS, AppConfig, ConfigError, LoopConfig, ModelLoadError,
                              PPOConfig, SamplingConfig, from_dict, section_name, to_dict)
from rlhf_core.data.store import WorkspaceError
from rlhf_core.workspace import (apply_overrides, check_model_source, open_workspace,
                                 parse_settings, read_config)

SECTIONS = [f for f in dataclasses.fields(AppConfig) if dataclasses.is_dataclass(f.default_factory)]


def every_field():
    """(section class or AppConfig, field, dotted name) for every field of every config."""
    out = [(AppConfig, f, f.name) for f in dataclasses.fields(AppConfig) if f not in SECTIONS]
    for s in SECTIONS:
        out += [(s.default_factory, f, f"{s.name}.{f.name}")
                for f in dataclasses.fields(s.default_factory)]
    return out


def wrong_type(annotation):
    """A value of the wrong type for a field annotated `annotation`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if args and typing.get_origin(annotation) is not tuple else annotation
    kind = typing.get_origin(base) or base
    return {bool: "maybe", int: "four", float: "abc", str: 3, tuple: 5}.get(kind, 5)


@pytest.mark.parametrize("cls,f,name", every_field(), ids=lambda x: getattr(x, "name", None)
                         if isinstance(x, dataclasses.Field) else None)
def test_every_field_refuses_a_wrong_type_naming_field_value_and_rule(cls, f, name):
    hints = typing.get_type_hints(cls)
    bad = wrong_type(hints[f.name])
    with pytest.raises(ConfigError) as err:
        cls(**{f.name: bad})
    assert err.value.field == name
    assert f"{name}={bad!r} is not allowed: expected " in str(err.value)


def test_limits_name_real_fields():
    names = {name for _, _, name in every_field()}
    assert set(LIMITS) <= names
    assert section_name(SamplingConfig()) == "sampling" and section_name(AppConfig()) == ""


@pytest.mark.parametrize("key,bad,good", [
    ("sampling.k", 1, 2), ("sampling.k", 9, 8), ("sampling.top_p", 0, 0.5),
    ("sampling.temperature", 0, 0.1), ("sampling.min_ready_items", -1, 0),
    ("ppo.lr", 0, 1e-5), ("ppo.lr", float("nan"), 1e-3), ("ppo.gamma", 1.5, 1.0),
    ("ppo.lam", -0.1, 0.0), ("ppo.kl_estimator", "k2", "k3"), ("ppo.clip_eps", 0, 0.1),
    ("reward.lr", -1e-4, 1e-4), ("reward.heldout_fraction", 1.0, 0.0),
    ("loop.selection", "best", "uncertainty"), ("loop.retire_rule", "drop", "retire"),
    ("loop.ab_baseline", "v", "v3"), ("loop.ab_baseline", "latest", "previous"),
    ("loop.ab_fraction", 2, 1), ("loop.random_share", -0.5, 0.5), ("loop.overlap", 0, 2),
    ("lora.dropout", 1.0, 0.1), ("lora.target_modules", [], ["q_proj"]), ("torch_threads", 0, 1),
    ("model", "", "org/name"), ("port", 70000, 8080),
])
def test_ranges_and_choices(key, bad, good):
    cfg = AppConfig()
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}=.* is not allowed"):
        apply_overrides(cfg, {key: bad})
    assert to_dict(apply_overrides(cfg, {key: good}))  # the allowed value passes


def test_values_from_the_command_line_are_coerced():
    cfg = apply_overrides(AppConfig(), parse_settings([
        "loop.auto=true", "sampling.k=3", "ppo.lr=2e-4", "reward.epochs=3.0",
        "lora.target_modules=q_proj,v_proj", "sampling.temperature=1", "torch_threads=null"]))
    assert cfg.loop.auto is True and cfg.sampling.k == 3 and cfg.ppo.lr == 2e-4
    assert cfg.reward.epochs == 3 and type(cfg.reward.epochs) is int
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert type(cfg.sampling.temperature) is float and cfg.torch_threads is None
    with pytest.raises(ConfigError, match="unknown setting 'ppo.lrr': ppo has .*lr"):
        apply_overrides(AppConfig(), {"ppo.lrr": 1})
    with pytest.raises(ConfigError, match="expected a number > 0"):
        apply_overrides(AppConfig(), parse_settings(["ppo.lr=abc"]))
    assert from_dict(AppConfig, to_dict(AppConfig())) == AppConfig()  # the round trip holds


def saved(store):
    return store.get_setting("config")


def test_a_refused_setting_is_not_saved(tmp_path):
    store, _ = open_workspace(tmp_path / "ws")
    before = saved(store)
    for overrides in ({"ppo.lr": "abc"}, {"sampling.k": 12}, {"loop.selection": "best"},
                      {"ppo.lr": 1e-4, "ppo.kl_estimator": "k2"}):  # all or nothing
        with pytest.raises(ConfigError):
            open_workspace(tmp_path / "ws", **overrides)
        assert saved(store) == before
    store.close()


def test_a_model_that_does_not_resolve_is_not_saved(tmp_path, monkeypatch):
    store, _ = open_workspace(tmp_path / "ws")
    before = saved(store)
    (tmp_path / "no-config").mkdir()
    for bad, message in (("/bad", "neither"), (str(tmp_path / "no-config"), "config.json"),
                         ("../up/and/away", "neither")):
        with pytest.raises(ModelLoadError, match=message):
            open_workspace(tmp_path / "ws", model=bad)
        with pytest.raises(ModelLoadError, match=message):
            open_workspace(tmp_path / "ws", reward_model=bad)
        assert saved(store) == before
    # A process that will load the model asks the Hub (offline here: only the cache counts).
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="not in the Hub cache"):
        check_model_source("nobody-here/no-such-model", hub=True)
    assert check_model_source("nobody-here/no-such-model") == "hub"  # the UI checks the shape
    store.close()


def test_a_bad_saved_value_is_refused_not_reset_and_a_flag_repairs_it(tmp_path):
    store, _ = open_workspace(tmp_path / "ws")
    row = saved(store)
    row["sampling"]["k"] = "four"
    store.set_setting("config", row)
    for read in (lambda: read_config(store),
                 lambda: open_workspace(tmp_path / "ws", create=False),
                 lambda: open_workspace(tmp_path / "ws", **{"ppo.lr": 1e-4})):
        with pytest.raises(ConfigError) as err:
            read()
        text = str(err.value)
        assert "saved configuration" in text and "sampling.k='four'" in text
        assert "integer from 2 to 8" in text and "--set sampling.k=" in text
        assert saved(store) == row  # not reset, not written back
    _, cfg = open_workspace(tmp_path / "ws", **{"sampling.k": 3})
    assert cfg.sampling.k == 3 and saved(store)["sampling"]["k"] == 3
    store.close()


@pytest.mark.parametrize("row", [[1, 2], "config", 4, {"sampling": [1]}])
def test_a_saved_config_that_is_not_an_object_is_refused(tmp_path, row):
    store, _ = open_workspace(tmp_path / "ws")
    store.set_setting("config", row)
    with pytest.raises(ConfigError, match="saved configuration is bad"):
        read_config(store)
    with pytest.raises(ConfigError, match="saved configuration is bad"):
        open_workspace(tmp_path / "ws", create=False)
    assert saved(store) == row
    store.close()


def test_reading_a_workspace_writes_nothing(tmp_path):
    store, _ = open_workspace(tmp_path / "ws")
    row = {k: v for k, v in saved(store).items() if k != "ppo"}  # as an older release saved it
    store.set_setting("config", row)
    _, cfg = open_workspace(tmp_path / "ws", create=False)
    assert cfg.ppo == PPOConfig() and saved(store) == row  # defaults fill in, nothing written
    open_workspace(tmp_path / "ws", **{"loop.overlap": 2})  # a flag is saved
    assert saved(store)["loop"]["overlap"] == 2 and "ppo" in saved(store)
    assert read_config(store).loop == LoopConfig(overlap=2)
    store.close()


def test_a_missing_workspace_is_created_only_when_asked(tmp_path):
    with pytest.raises(WorkspaceError, match="is not a workspace"):
        open_workspace(tmp_path / "typo", create=False)
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(WorkspaceError, match="no rlhf.db"):
        open_workspace(tmp_path / "empty", create=False)
    assert list((tmp_path / "empty").iterdir()) == []
    store, _ = open_workspace(tmp_path / "new")
    assert (tmp_path / "new" / "rlhf.db").exists() and saved(store)["sampling"]["k"] == 4
    store.close()
