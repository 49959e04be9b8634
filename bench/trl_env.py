"""Separate benchmark venvs for TRL (never a project dependency).

- `bench/.venv-trl`        trl==1.12.0 (the last release with `trl.experimental.ppo.PPOTrainer`), B2
- `bench/.venv-trl-latest` trl (current release) for `trl.RewardTrainer`, B3

torch is installed FIRST as `torch==2.13.0` (the CPU wheel on local disk) and pinned through a
constraints file for every later install, so pip can never pull a CUDA build of torch.

    .venv/bin/python -m bench.trl_env            # create both (idempotent)
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
TORCH = "torch==2.13.0"
ENVS = {"ppo": (BENCH / ".venv-trl", "trl==1.12.0"),
        "reward": (BENCH / ".venv-trl-latest", "trl")}


def venv_python(which: str) -> Path:
    return ENVS[which][0] / "bin" / "python"


def _run(cmd: list, **kw) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(cmd, check=True, **kw)


def ensure(which: str) -> Path:
    """Create the venv if its stamp is missing; return its python."""
    root, trl_spec = ENVS[which]
    py, stamp = venv_python(which), root / ".installed"
    if stamp.exists():
        return py
    if not py.exists():
        _run([sys.executable, "-m", "venv", str(root)])
    pip = [str(py), "-m", "pip", "install", "-q"]
    _run(pip + [TORCH])  # first, from local disk
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write(TORCH + "\n")  # pin: nothing later may replace it
    _run(pip + ["-c", fh.name, trl_spec, "peft", "accelerate", "datasets"])
    Path(fh.name).unlink()
    out = subprocess.run([str(py), "-c", "import torch, trl, transformers, peft; print(torch.__version__,"
                          " trl.__version__, transformers.__version__, peft.__version__)"],
                         check=True, capture_output=True, text=True).stdout.strip()
    print(f"{root.name}: torch trl transformers peft = {out}", flush=True)
    stamp.write_text(out + "\n")
    return py


def versions(which: str) -> str:
    stamp = ENVS[which][0] / ".installed"
    return stamp.read_text().strip() if stamp.exists() else "?"


if __name__ == "__main__":
    for name in (sys.argv[1:] or list(ENVS)):
        ensure(name)
