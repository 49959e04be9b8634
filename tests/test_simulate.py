"""End to end: scripted annotators rank through the real HTTP API, the worker (a real
child process) trains the reward model, runs PPO and evaluates, on tiny models."""
from __future__ import annotations

import argparse
import json
import textwrap

import pytest

from app import simulate
from app.launcher import start_app
from rlhf_core.workspace import open_workspace

# The flow, not the evidence: a tiny model on a dozen rankings never clears the reward
# promotion gate (tests/test_reward_model.py tests the gate), so these runs turn it off.
NO_GATE = {"reward.promote_min_heldout_pairs": 0, "reward.promote_min_accuracy": 0.0}


def _args(ws, out, **kw):
    p = argparse.ArgumentParser()
    p.add_argument("--workspace")
    simulate.add_arguments(p)
    args = p.parse_args(["--workspace", str(ws), "--out", str(out)])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


@pytest.fixture
def judge_module(tmp_path, monkeypatch):
    """A user's own oracle (`module:function`) that records every call."""
    (tmp_path / "judge_mod.py").write_text(textwrap.dedent("""
        import json, os
        LOG = os.environ["JUDGE_LOG"]
        def judge(prompt, responses):
            with open(LOG, "a") as fh:
                fh.write(json.dumps({"prompt": prompt, "n": len(responses)}) + "\\n")
            order = sorted(range(len(responses)), key=lambda i: len(responses[i]))
            return [[i] for i in order]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    log = tmp_path / "judge.log"
    monkeypatch.setenv("JUDGE_LOG", str(log))
    return log


def test_simulate_two_rounds_end_to_end(tmp_path, tiny_model_dir, judge_module):
    ws = tmp_path / "ws"
    store, _ = open_workspace(ws, model=str(tiny_model_dir), torch_threads=1, **{
        "sampling.max_new_tokens": 8, "reward.min_pairs": 4, "ppo.max_new_tokens": 8,
        "ppo.prompts_per_round": 4, "loop.ab_fraction": 0.0, **NO_GATE})
    store.add_prompts([{"text": f"question number {i}: say something"} for i in range(30)],
                      source="test")
    args = _args(ws, tmp_path / "table", oracle="judge_mod:judge", rounds=2,
                 labels_per_round=6, annotators=2, eval_samples=1)
    rows = simulate.main(args, start_app)

    assert [r.round for r in rows] == [1, 2]
    assert rows[-1].labels == 12
    # The custom oracle was called for every ranking and its tiers were recorded.
    calls = [json.loads(line) for line in judge_module.read_text().splitlines()]
    assert len(calls) >= 12
    rankings = store.rows("SELECT annotator, tiers FROM rankings WHERE kind = 'rank'")
    assert len(rankings) == 12
    assert {r["annotator"] for r in rankings} <= {"sim-1", "sim-2"}
    # strict orders from the judge: every tier holds one response
    assert all(all(len(t) == 1 for t in json.loads(r["tiers"])) for r in rankings)
    # The reward model was trained and a policy published and evaluated against the reference.
    assert store.current_version("reward") is not None
    assert rows[-1].policy_version >= 1
    assert rows[-1].win_rate is not None and 0.0 <= rows[-1].win_rate <= 1.0
    # the judged version's own KL from the reference, beside the round's rollout KL
    assert rows[-1].kl_judged is not None and abs(rows[-1].kl_judged) < 1e3
    assert rows[-1].kl is not None
    assert rows[-1].comparisons == store.scalar(
        "SELECT COUNT(*) FROM prompts WHERE split = 'heldout'")
    # The table was written as CSV and JSON.
    data = json.loads((tmp_path / "table.json").read_text())
    assert [d["round"] for d in data] == [1, 2]
    assert (tmp_path / "table.csv").read_text().startswith("round,labels,")


def test_simulate_runs_the_chosen_algorithm(tmp_path, tiny_model_dir, judge_module):
    """`--algorithm dpo` reaches the worker's policy round; the table says which ran, the
    policy round's own seconds and the diversity of the judged samples."""
    ws = tmp_path / "ws"
    store, _ = open_workspace(ws, model=str(tiny_model_dir), torch_threads=1, **{
        "sampling.max_new_tokens": 8, "reward.min_pairs": 4, "ppo.max_new_tokens": 8,
        "ppo.prompts_per_round": 4, "loop.ab_fraction": 0.0, **NO_GATE})
    store.add_prompts([{"text": f"question number {i}: say something"} for i in range(30)],
                      source="test")
    args = _args(ws, tmp_path / "table", oracle="judge_mod:judge", rounds=1,
                 labels_per_round=6, annotators=1, eval_samples=1, eval_prompts=3,
                 algorithm="dpo")
    (row,) = simulate.main(args, start_app)
    assert row.algorithm == "dpo" and row.policy_seconds > 0 and row.comparisons == 3
    assert row.distinct_2 is not None and 0.0 <= row.distinct_2 <= 1.0
    version = store.current_version("policy")
    assert version["version"] == 1 and version["config"]["algorithm"] == "dpo"
    assert "dpo" in simulate.format_table([row])


def test_a_policy_round_stopped_by_a_health_gate_is_noted_and_the_run_goes_on(
        tmp_path, tiny_model_dir, judge_module):
    """A gate abort (here: every minibatch's approx_kl above a tiny max_approx_kl) publishes
    nothing; the run records it in the round's notes and goes on to the next round instead of
    losing the run."""
    ws = tmp_path / "ws"
    store, _ = open_workspace(ws, model=str(tiny_model_dir), torch_threads=1, **{
        "sampling.max_new_tokens": 8, "reward.min_pairs": 4, "ppo.max_new_tokens": 8,
        "ppo.prompts_per_round": 4, "loop.ab_fraction": 0.0, "ppo.max_approx_kl": 1e-12,
        "ppo.fallback_approx_kl": 0.0,
        **NO_GATE})
    store.add_prompts([{"text": f"question number {i}: say something"} for i in range(30)],
                      source="test")
    args = _args(ws, tmp_path / "table", oracle="judge_mod:judge", rounds=2,
                 labels_per_round=6, annotators=1, eval_samples=1, eval_prompts=3)
    rows = simulate.main(args, start_app)
    assert [r.round for r in rows] == [1, 2] and rows[-1].labels == 12
    for r in rows:
        assert r.policy_aborted and r.policy_version == 0 and r.win_rate is None
        assert any("approx_kl" in n and "max_approx_kl" in n for n in r.notes), r.notes
    assert "round 2: policy round aborted" in simulate.format_table(rows)
    assert store.current_version("policy")["version"] == 0
    data = json.loads((tmp_path / "table.json").read_text())
    assert [d["policy_aborted"] for d in data] == [True, True]


def test_seed_seeds_the_batches_the_reward_model_and_the_policy_rounds(tmp_path):
    """`--seed N` makes another run: the labeling batches, the reward model and the policy
    rounds take N too (a `--set` of one of them wins); without `--seed` the workspace's own
    seeds stay as they are."""
    seeded = simulate.workspace_overrides(_args(tmp_path, tmp_path / "out", seed=3,
                                                settings=["ppo.seed=7"]))
    assert (seeded["sampling.seed"], seeded["reward.seed"], seeded["ppo.seed"]) == (3, 3, 7)
    plain = simulate.workspace_overrides(_args(tmp_path, tmp_path / "out"))
    assert not {"sampling.seed", "reward.seed", "ppo.seed"} & set(plain)
    store, cfg = open_workspace(tmp_path / "ws", **seeded)
    store.close()
    assert (cfg.sampling.seed, cfg.reward.seed, cfg.ppo.seed) == (3, 3, 7)
