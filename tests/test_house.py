"""House rules that keep the layout honest (DESIGN.md, "Layout"): checked, not hoped for.

- SQL lives in the data layer (rlhf_core/data/) only.
- The UI process imports no torch or transformers (`rlhf status`, `rlhf serve`).
- The pure math imports torch and each other, nothing else.
- No private name crosses a wing's border; `__init__.py` files stay empty.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("rlhf_core", "app") for p in (ROOT / d).rglob("*.py"))
DATA_LAYER = ROOT / "rlhf_core" / "data"
SQL = re.compile(r"\b(SELECT\s+[\w*(]|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|"
                 r"CREATE\s+(TABLE|INDEX|VIEW)|ALTER\s+TABLE|DROP\s+TABLE|PRAGMA\s+\w)",
                 )


def string_literals(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value
        elif isinstance(node, ast.JoinedStr):  # f-strings: their literal parts
            text = "".join(v.value for v in node.values
                           if isinstance(v, ast.Constant) and isinstance(v.value, str))
            yield node.lineno, text


def test_sql_lives_only_in_the_data_layer():
    found = [f"{p.relative_to(ROOT)}:{line}: {text.strip()[:60]!r}"
             for p in SOURCES if DATA_LAYER not in p.parents
             for line, text in string_literals(p) if SQL.search(text)]
    assert not found, "SQL outside rlhf_core/data/:\n" + "\n".join(found)


def test_the_sql_check_catches_a_literal(tmp_path):
    """The check above must be able to fail: a query in a plain module is found."""
    bad = tmp_path / "bad.py"
    bad.write_text('def f(store):\n    return store.rows("SELECT id FROM prompts")\n')
    assert [t for _, t in string_literals(bad) if SQL.search(t)]


HEAVY = ("torch", "transformers", "peft", "accelerate")


def imported_modules(code: str) -> set[str]:
    """Top-level packages a fresh interpreter imported while running `code` (-X importtime)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.mark.parametrize("path,code", [
    ("status", "import sys; from app.cli import main; "
               "sys.argv = ['rlhf', 'status', '--workspace', sys.argv[1]]; main()"),
    ("serve", "from app import cli, ui, context, api, ui_status, ui_research, ui_dashboard; "
              "cli.build_parser().parse_args(['serve'])"),
])
def test_the_ui_process_imports_no_torch(tmp_path, path, code):
    if path == "status":
        code = code.replace("sys.argv[1]", repr(str(tmp_path / "ws")))
        from rlhf_core.workspace import open_workspace
        open_workspace(tmp_path / "ws")[0].close()
    heavy = imported_modules(code) & set(HEAVY)
    assert not heavy, f"`rlhf {path}` imports {sorted(heavy)}"


def test_the_import_check_sees_torch():
    assert "torch" in imported_modules("import rlhf_core.models")


@pytest.mark.parametrize("module", ["advantages", "losses"])
def test_pure_math_imports_only_torch_and_each_other(module):
    tree = ast.parse((ROOT / "rlhf_core" / f"{module}.py").read_text())
    allowed = {"torch", "rlhf_core.advantages", "rlhf_core.losses", "__future__"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module]
        else:
            continue
        for name in names:
            assert name in allowed or name.split(".")[0] == "torch", f"{module} imports {name}"


def wing_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0] + "." + parts[1]


def test_no_private_name_crosses_a_module_border():
    """`from x import _name` or `x._name` on another module of ours is a hidden coupling."""
    ours = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in SOURCES}
    crossings = []
    for p in SOURCES:
        tree = ast.parse(p.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ours:
                crossings += [f"{p.relative_to(ROOT)}: {node.module}.{a.name}"
                              for a in node.names if a.name.startswith("_")]
                aliases |= {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                aliases |= {a.asname or a.name: a.name for a in node.names if a.name in ours}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                    and aliases.get(node.value.id, "") in ours):
                crossings.append(f"{p.relative_to(ROOT)}: {node.value.id}.{node.attr}")
    assert not crossings, "\n".join(crossings)


def test_init_files_stay_empty():
    for p in (ROOT / "rlhf_core").rglob("__init__.py"):
        assert p.read_text().strip() == "", p
    assert (ROOT / "app" / "__init__.py").read_text().strip() == ""


def test_every_job_kind_maps_to_a_library_call():
    from rlhf_core.worker.handlers import HANDLERS
    assert set(HANDLERS) == {"sample_batch", "sample_arena", "train_reward", "ppo_round",
                             "eval_policy", "score_items"}
    for fn in HANDLERS.values():
        assert fn.__module__ == "rlhf_core.worker.handlers"


def test_training_code_does_not_know_the_queue():
    """Only the loop policy (and the worker loop) queue or run jobs."""
    allowed = {"rlhf_core/worker/loop.py", "rlhf_core/worker/run.py", "rlhf_core/worker/data.py",
               "rlhf_core/worker/remote.py"}
    offenders = []
    for p in (ROOT / "rlhf_core").rglob("*.py"):
        rel = str(p.relative_to(ROOT))
        if rel in allowed or DATA_LAYER in p.parents:
            continue
        text = p.read_text()
        if re.search(r"from rlhf_core\.data import[^\n]*\bjobs\b|rlhf_core\.data\.jobs", text):
            offenders.append(rel)
    assert not offenders, offenders
