"""`rlhf export-policy`: a published policy as a LoRA adapter or a merged model that loads
elsewhere with plain transformers / peft and computes what the loop's policy computes."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlhf_core.policy.export import export_policy
from rlhf_core.policy.ppo import ppo_round
from rlhf_core.worker.runtime import Runtime
from rlhf_core.workspace import open_workspace
from tests.test_ppo import PROMPTS, TINY, low_id_reward, ppo_model_dir  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(ppo_model_dir, tmp_path_factory):  # noqa: F811
    torch.set_num_threads(1)
    ws = tmp_path_factory.mktemp("export") / "ws"
    store, cfg = open_workspace(ws, model=str(ppo_model_dir))
    store.add_prompts([{"text": p} for p in PROMPTS], source="test")
    runtime = Runtime(store, cfg, cpu=True)
    ppo_round(runtime, config=replace(TINY, epochs=1), reward_fn=low_id_reward)
    ids = runtime.tokenizer(["prompt number 3: say something"], return_tensors="pt")
    with torch.no_grad(), runtime.policy(1) as model:
        logits = model(**ids).logits
    return store, cfg, ids, logits


def test_adapter_export_loads_with_peft_and_matches_the_policy(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    store, cfg, ids, logits = trained
    res = export_policy(store, cfg, tmp_path / "adapter")
    out = Path(res["out"])
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "rlhf_loop.json"]
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == Path(cfg.model).name  # no local path
    base = AutoModelForCausalLM.from_pretrained(cfg.model)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, logits, atol=1e-5, rtol=1e-5)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: model\nlibrary_name: peft")
    assert "| v1 | v0 |" in card and str(cfg.workspace) not in card
    assert json.loads((out / "rlhf_loop.json").read_text())["policy_version"] == 1


def test_merged_export_is_a_plain_model_with_the_policys_outputs(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    store, cfg, ids, logits = trained
    out = Path(export_policy(store, cfg, tmp_path / "merged", merge=True)["out"])
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert AutoTokenizer.from_pretrained(out).chat_template
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, logits, atol=1e-4, rtol=1e-4)
    assert "library_name: transformers" in (out / "README.md").read_text()


def test_export_refuses_v0_and_an_existing_folder_via_the_cli(trained, tmp_path):
    store, cfg, _, _ = trained
    with pytest.raises(ValueError, match="v0 is the base model"):
        export_policy(store, cfg, tmp_path / "x", version=0)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "-m", "app.cli", "export-policy", str(tmp_path / "taken"),
                           "--workspace", str(cfg.workspace)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
