"""Issue 15.3: `rlhf config` lists every setting; each command shows only the flags it uses."""
from __future__ import annotations

import dataclasses
import json

from app.cli import overrides_from
from rlhf_core.config import AppConfig
from rlhf_core.config_help import HELP, settings_table
from tests.test_cli import rlhf, subcommands
from tests.test_house import HEAVY, imported_modules

# The flags of the one-shot job commands, and why each is there: anything more would be
# accepted, saved in the workspace and ignored by the job (as --k on `ppo` was).
JOB_FLAGS = {
    "sample": {"--model", "--set", "--k", "--max-new-tokens", "--overlap", "--cpu",
               "--queue-only", "--prompts"},  # sample_batch: policy, sampling.*, loop.overlap
    "train-reward": {"--model", "--reward-model", "--set", "--cpu", "--queue-only"},
    "ppo": {"--model", "--reward-model", "--set", "--cpu", "--queue-only", "--algorithm"},
}


def _flags(sp) -> set[str]:
    return {o for a in sp._actions for o in a.option_strings
            if o.startswith("--") and o not in ("--help", "--workspace")}


def test_every_command_has_help_with_an_example_and_help_on_every_flag():
    for name, sp in subcommands().items():
        text = sp.format_help()
        assert f"example: rlhf {name}" in text and sp.description, name
        for action in sp._actions:
            assert action.help, f"rlhf {name} {action.option_strings or action.dest}: no help"


def test_job_commands_show_only_their_own_flags():
    cmds = subcommands()
    for name, expected in JOB_FLAGS.items():
        assert _flags(cmds[name]) == expected, name
    # every flag of them reaches a setting (or the command itself), none is dropped
    args = cmds["sample"].parse_args(["--k", "3", "--max-new-tokens", "99", "--overlap", "2"])
    args.command = "sample"
    got = {k: v for k, v in overrides_from(args).items() if v is not None}
    assert got == {"sampling.k": 3, "sampling.max_new_tokens": 99, "loop.overlap": 2}


def test_every_setting_has_type_default_allowed_and_help():
    rows = {r["name"]: r for r in settings_table()}
    cfg = AppConfig()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        names = ([f"{f.name}.{g.name}" for g in dataclasses.fields(value)]
                 if dataclasses.is_dataclass(value) else [f.name])
        for name in names:
            assert rows[name]["help"], f"{name} has no help in rlhf_core/config_help.HELP"
            assert rows[name]["type"] and rows[name]["default"] and rows[name]["allowed"]
    assert set(HELP) == set(rows)  # no help for a setting that is gone
    assert rows["sampling.k"]["allowed"] == "from 2 to 8" and rows["sampling.k"]["type"] == "int"
    assert "'ppo'" in rows["loop.algorithm"]["allowed"]
    assert rows["reward_model"]["default"] == "unset"


def test_rlhf_config_prints_the_table_and_the_workspace_values(tmp_path):
    out = rlhf(tmp_path / "none", "config")
    assert out.returncode == 0, out.stderr
    assert "sampling.max_new_tokens" in out.stdout and "allowed · help" in out.stdout
    assert not (tmp_path / "none").exists()  # config creates no workspace
    from rlhf_core.workspace import open_workspace
    open_workspace(tmp_path / "ws", **{"sampling.k": 3})[0].close()
    rows = json.loads(rlhf(tmp_path / "ws", "config", "--json").stdout)
    k = next(r for r in rows if r["name"] == "sampling.k")
    assert k["default"] == "4" and k["value"] == "3"


def test_rlhf_config_imports_no_torch(tmp_path):
    code = ("import sys; from app.cli import main; "
            f"sys.argv = ['rlhf', 'config', '--workspace', {str(tmp_path / 'x')!r}]; main()")
    assert not imported_modules(code) & set(HEAVY)
