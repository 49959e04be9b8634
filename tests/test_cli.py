"""`rlhf` commands, run as a user would: `python -m app.cli ...` in a subprocess."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from app.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def rlhf(ws, *args, timeout=240):
    env = {**os.environ, "RLHF_WORKSPACE": str(ws), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "RLHF_LOG": "WARNING"}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_command_has_help_with_an_example():
    cmds = subcommands()
    assert {"up", "serve", "worker", "import-prompts", "export", "status", "sample"} <= set(cmds)
    for name, sp in cmds.items():
        text = sp.format_help()
        assert "example: rlhf " in text, name
        assert "--workspace" in text, name
        assert sp.description, name


def test_help_runs_as_a_command(tmp_path):
    out = rlhf(tmp_path, "import-prompts", "--help")
    assert out.returncode == 0
    assert "example: rlhf import-prompts" in out.stdout
    assert not (tmp_path / "rlhf.db").exists()  # help touches no workspace


def test_workspace_defaults_to_env(tmp_path):
    out = rlhf(tmp_path / "env-ws", "status", "--json")  # status creates no workspace
    assert out.returncode != 0 and str(tmp_path / "env-ws") in out.stderr
    assert not (tmp_path / "env-ws").exists()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Why?"}) + "\n")
    out = rlhf(tmp_path / "env-ws", "import-prompts", str(prompts))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "env-ws" / "rlhf.db").exists()


def count_prompts(ws):
    from rlhf_core.data.store import Store
    s = Store(Path(ws) / "rlhf.db")
    try:
        return s.scalar("SELECT COUNT(*) FROM prompts")
    finally:
        s.close()


def test_import_prompts_good_and_bad_file(tmp_path):
    ws = tmp_path / "ws"
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"prompt": f"question {i}?"}) for i in range(5))
                    + "\n" + json.dumps({"prompt": "question 0?"}) + "\n")
    out = rlhf(ws, "import-prompts", str(good))
    assert out.returncode == 0, out.stderr
    assert "5 prompts added" in out.stdout and "1 duplicates inside the file" in out.stdout
    assert count_prompts(ws) == 5
    again = rlhf(ws, "import-prompts", str(good))
    assert again.returncode == 0 and "0 prompts added, 5 already present" in again.stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "fresh one"}) + "\n"
                   + json.dumps({"prompt": "fresh two"}) + "\n"
                   + '{"prompt": "broken\n'
                   + json.dumps({"prompt": "fresh four"}) + "\n"
                   + json.dumps({"prompt": ""}) + "\n")
    out = rlhf(ws, "import-prompts", str(bad))
    assert out.returncode != 0
    # every bad line named at once (3: broken JSON, 5: an empty prompt)
    assert "line 3" in out.stderr and "line 5" in out.stderr and "nothing was added" in out.stderr
    assert count_prompts(ws) == 5  # the good lines 1-2 did not land either


def test_status_json(tmp_path):
    from rlhf_core.workspace import open_workspace
    open_workspace(tmp_path)[0].close()
    out = rlhf(tmp_path, "status", "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["policy_version"] == 0
    assert isinstance(status["jobs"], list)
    assert {"prompts", "items_ready", "rankings", "pairs"} <= set(status["counts"])
    text = rlhf(tmp_path, "status")
    assert text.returncode == 0 and "policy v0" in text.stdout


def seed_ranking(ws):
    from rlhf_core.data import annotation
    from rlhf_core.workspace import open_workspace
    store, _ = open_workspace(ws)
    store.add_prompts([{"text": "Name a colour."}], source="test")
    annotation.create_batch(store, policy_version=0, k=3, items=[{"prompt_id": 1, "responses": [
        {"text": "Blue.", "n_tokens": 2, "finish_reason": "stop"},
        {"text": "Red.", "n_tokens": 2, "finish_reason": "stop"},
        {"text": "I like turtles", "n_tokens": 4, "finish_reason": "length"}]}])
    item = annotation.next_item(store, "alice")
    by_text = {r["text"]: r["id"] for r in item["responses"]}
    annotation.submit_ranking(store, annotator="alice", item_id=item["id"], token=item["token"],
                              submission_key="key-1", time_spent_s=4.0,
                              tiers=[[by_text["Blue."], by_text["Red."]],
                                     [by_text["I like turtles"]]])
    store.close()


def test_export_jsonl(tmp_path):
    ws = tmp_path / "ws"
    seed_ranking(ws)
    out_file = tmp_path / "pairs.jsonl"
    out = rlhf(ws, "export", str(out_file), "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    pairs = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(pairs) == 2  # ties excluded by default
    for p in pairs:
        assert p["prompt"] == "Name a colour."
        assert p["chosen"] in {"Blue.", "Red."} and p["rejected"] == "I like turtles"
        assert p["annotator"] == "alice" and p["item_policy_version"] == 0 and p["ranking_id"] == 1
    rankings = [json.loads(line) for line in
                (tmp_path / "pairs.rankings.jsonl").read_text().splitlines()]
    assert len(rankings) == 1
    r = rankings[0]
    assert r["submission_key"] == "key-1" and len(r["tiers"]) == 2 and len(r["tiers"][0]) == 2
    assert len(r["responses"]) == 3
    ties = rlhf(ws, "export", str(tmp_path / "new" / "all.jsonl"), "--include-ties")
    assert ties.returncode == 0, ties.stderr  # a missing output folder is created
    assert len((tmp_path / "new" / "all.jsonl").read_text().splitlines()) == 3


def test_export_hf(tmp_path):
    import datasets
    ws = tmp_path / "ws"
    seed_ranking(ws)
    out_dir = tmp_path / "pairs_hf"
    out = rlhf(ws, "export", str(out_dir), "--format", "hf")
    assert out.returncode == 0, out.stderr
    ds = datasets.load_from_disk(str(out_dir))
    assert {"prompt", "chosen", "rejected", "annotator", "ranking_id",
            "item_policy_version"} <= set(ds.column_names)
    assert ds.num_rows == 2 and set(ds["rejected"]) == {"I like turtles"}
    assert (tmp_path / "pairs_hf.rankings.jsonl").exists()
    refused = rlhf(ws, "export", str(out_dir), "--format", "hf")  # no silent overwrite
    assert refused.returncode != 0
    assert datasets.load_from_disk(str(out_dir)).num_rows == 2


def test_sample_on_tiny_model(tmp_path, tiny_model_dir):
    from rlhf_core.workspace import open_workspace
    ws = tmp_path / "ws"
    # One torch thread: on shared cores two threads beside other jobs run ~10x slower.
    store, _ = open_workspace(ws, torch_threads=1)
    store.close()
    out = rlhf(ws, "sample", "--model", str(tiny_model_dir), "--max-new-tokens", "8",
               "--prompts", "2", "--k", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout[out.stdout.index("{"):])
    assert result["items"] >= 1 and result["policy_version"] == 0
    status = json.loads(rlhf(ws, "status", "--json").stdout)
    assert status["counts"]["prompts"] >= 200  # the shipped sample prompts were seeded
    assert status["counts"]["items_ready"] == result["items"]
    (job,) = status["jobs"]
    assert job["kind"] == "sample_batch" and job["status"] == "done" and job["progress"] == 1.0
