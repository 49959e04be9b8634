"""GRPO, RLOO and online-DPO rounds on the tiny Llama with synthetic rewards (as test_ppo.py),
and the routing from `loop.algorithm` / a job's "algorithm" to the round."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlhf_core.config import LoopConfig, PPOConfig
from rlhf_core.data import jobs
from rlhf_core.policy.dpo import dpo_round
from rlhf_core.policy.grpo import group_step, grpo_round, rloo_round
from rlhf_core.policy.rollout import Rollout
from rlhf_core.policy.rounds import ROUNDS, policy_round
from rlhf_core.policy.setup import Plan, PPOHealthError, SingleProcess, adapter_params
from rlhf_core.worker.run import run_one
from rlhf_core.workspace import open_workspace
from tests.test_ppo import (  # noqa: F401 (ppo_model_dir, runtime are fixtures)
    TINY,
    direction_reward,
    evaluate,
    fixed_batch,
    low_id_reward,
    make_runtime,
    nan_reward,
    policy_logprobs,
    ppo_model_dir,
    runtime,
    two_process_round,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 4 prompts x 2 = 8 sequences a round; the critic-free rounds spend them as 2 prompts x G = 4
SMALL = replace(TINY, group_size=4)
CRITIC_FREE = {"grpo": grpo_round, "rloo": rloo_round, "dpo": dpo_round}


def constant_reward(prompts, responses, response_ids):
    return torch.ones(len(prompts))


@pytest.mark.parametrize("algorithm", sorted(CRITIC_FREE))
def test_round_publishes_changed_policy_with_its_algorithm(runtime, algorithm):
    model = runtime.model
    before = {n: p.detach().clone() for n, p in adapter_params(model, "policy").items()}
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    result = CRITIC_FREE[algorithm](runtime, config=SMALL, reward_fn=low_id_reward)

    assert result["status"] == "published" and result["version"] == 1
    assert result["algorithm"] == algorithm
    m = result["metrics"]
    assert m["n_sequences"] == 8  # the PPO round's budget: 2 prompts x group_size 4
    assert m["first_ratio"] == pytest.approx(1.0, abs=1e-5)  # on-policy first minibatch
    assert m["first_approx_kl"] < 1e-9 and "critic_init" not in m
    after = adapter_params(model, "policy")
    assert any(not torch.equal(before[n], p) for n, p in after.items())
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(base_before[n], p), n  # the reference is untouched
    path = Path(result["path"])
    assert (path / "policy" / "adapter_model.safetensors").is_file()
    assert not (path / "value").exists()  # no critic
    manifest = json.loads((path / "version.json").read_text())
    assert manifest["algorithm"] == algorithm and manifest["config"]["algorithm"] == algorithm
    assert manifest["config"]["group_size"] == 4
    row = runtime.data.store.current_version("policy")
    assert row["config"]["algorithm"] == algorithm and row["config"]["dpo_beta"] == SMALL.dpo_beta
    names = {r["name"] for r in runtime.data.store.metric_series("ppo")}  # the Dashboard's kind
    for name in ("reward_mean", "kl", "entropy", "response_length", "approx_kl", "loss",
                 "grad_norm", "time_generate", "time_score", "time_train"):
        assert name in names, name
    if algorithm == "dpo":
        assert {"reward_accuracy", "margin"} <= names and m["pairs_sampled"] == 2
    else:
        assert "clipfrac" in names


@pytest.mark.parametrize("algorithm", sorted(CRITIC_FREE))
def test_rounds_raise_mean_reward(runtime, algorithm):
    """Four rounds on the direction reward (the one test_ppo.py uses for PPO, seen there
    0.35 -> 0.59); evaluation on fixed sampling noise, so before/after differ only by the
    policy. DPO moves further per step (every token of a pair pushes one way): dpo_lr 3e-3,
    beta 0.5 (1e-2 trips the approx-KL gate). Seen: 0.35 -> grpo 0.63, rloo 0.59, dpo 0.71."""
    reward_fn = direction_reward(runtime)
    config = replace(SMALL, epochs=4, prompts_per_round=8, rollouts_per_prompt=4,
                     minibatch_size=8, missing_eos_penalty=0.0,
                     **({"dpo_lr": 3e-3, "dpo_beta": 0.5} if algorithm == "dpo" else {}))
    before = evaluate(runtime, reward_fn)
    for i in range(4):
        result = CRITIC_FREE[algorithm](runtime, config=config, reward_fn=reward_fn)
        assert result["version"] == i + 1 and result["parent"] == i
    after = evaluate(runtime, reward_fn)
    print(f"{algorithm}: mean reward {before:.3f} -> {after:.3f}")
    assert after > before + 0.1, (before, after)


@pytest.mark.parametrize("algorithm", sorted(CRITIC_FREE))
def test_nan_reward_aborts_without_publishing(runtime, algorithm):
    with pytest.raises(PPOHealthError, match="non-finite scores") as info:
        CRITIC_FREE[algorithm](runtime, config=SMALL, reward_fn=nan_reward)
    assert info.value.result["status"] == "aborted"
    assert runtime.data.store.current_version("policy")["version"] == 0
    event = runtime.data.store.one("SELECT * FROM events WHERE kind = 'ppo_aborted'")
    assert event and algorithm in event["payload"]


@pytest.mark.parametrize("algorithm", sorted(CRITIC_FREE))
def test_approx_kl_and_kl_gates_abort_and_restore_the_policy(runtime, algorithm):
    round_fn = CRITIC_FREE[algorithm]
    round_fn(runtime, config=SMALL, reward_fn=low_id_reward)  # v1
    policy_before = {n: p.detach().clone()
                     for n, p in adapter_params(runtime.model, "policy").items()}
    with pytest.raises(PPOHealthError, match="approx_kl"):
        round_fn(runtime, config=replace(SMALL, lr=0.5, max_approx_kl=1e-6, epochs=3,
                                         fallback_approx_kl=0.0), reward_fn=low_id_reward)
    with pytest.raises(PPOHealthError, match="mean KL per sequence"):  # v1 has drifted a bit
        # k3 is > 0 for any drift (k1's sample mean may be negative)
        round_fn(runtime, config=replace(SMALL, max_kl=1e-9, kl_estimator="k3"),
                 reward_fn=low_id_reward)
    assert runtime.data.store.current_version("policy")["version"] == 1
    assert runtime.loaded["policy"] == 1
    for n, p in adapter_params(runtime.model, "policy").items():
        assert torch.equal(policy_before[n], p)


@pytest.mark.parametrize("algorithm", sorted(CRITIC_FREE))
def test_the_approx_kl_gate_falls_back_instead_of_aborting(runtime, algorithm):
    """The gate's fallback is the loop every algorithm shares: a minibatch far past a tiny
    gate (lr 0.5) publishes the steps before the first minibatch past half the gate instead of
    aborting (test_ppo checks that the fallback's policy is the early stop's)."""
    res = CRITIC_FREE[algorithm](runtime, config=replace(SMALL, lr=0.5, max_approx_kl=1e-6,
                                                         epochs=3), reward_fn=low_id_reward)
    assert res["status"] == "published"
    m = res["metrics"]
    assert 2 <= m["early_stop"] <= m["gate_fallback"] and m["ppo_steps"] == m["early_stop"] - 1


@pytest.mark.parametrize("algorithm", sorted(CRITIC_FREE))
def test_stop_approx_kl_keeps_the_first_step(runtime, algorithm):
    """The early stop is the loop every algorithm shares: a threshold above the first
    minibatch's approx_kl (ratio 1 there) and below the second's stops at the second,
    publishing the first step (test_ppo checks the stop's exact place)."""
    res = CRITIC_FREE[algorithm](runtime, config=replace(SMALL, stop_approx_kl=1e-9, epochs=2),
                                 reward_fn=low_id_reward)
    assert res["status"] == "published"
    assert res["metrics"]["early_stop"] == 2 and res["metrics"]["ppo_steps"] == 1


def test_dpo_without_any_preference_aborts(runtime):
    with pytest.raises(PPOHealthError, match="no preference pairs"):
        dpo_round(runtime, config=SMALL, reward_fn=constant_reward)
    assert runtime.data.store.current_version("policy")["version"] == 0


def test_dpo_mixes_in_peoples_pairs(runtime, monkeypatch):
    """dpo_human_share 0.5: as many human pairs as sampled ones (train prompts, strict only)."""
    people = [{"prompt": "hello world", "chosen": "yes good", "rejected": "no bad long answer",
               "split": "train", "label": 1.0}] * 3 + [
        {"prompt": "held out", "chosen": "a", "rejected": "b", "split": "heldout", "label": 1.0},
        {"prompt": "a tie", "chosen": "a", "rejected": "b", "split": "train", "label": 0.5}]
    monkeypatch.setattr(runtime.data, "training_pairs", lambda: people)
    result = dpo_round(runtime, config=replace(SMALL, dpo_human_share=0.5),
                       reward_fn=low_id_reward)
    m = result["metrics"]
    assert m["pairs_sampled"] == 2 and m["pairs_human"] == 2
    result = dpo_round(runtime, config=replace(SMALL, dpo_human_share=0.9, epochs=1),
                       reward_fn=low_id_reward)
    assert result["metrics"]["pairs_human"] == 3  # 18 asked, 3 eligible


def test_group_step_advantages_per_sequence():
    """RLOO: the score minus kl_coef * sequence KL, leave-one-out; GRPO: the raw scores'
    group z-score; both broadcast over real tokens, 0 on padding."""
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    logprobs = torch.tensor([[-1.0, -1.0], [-1.0, 0.0], [-2.0, -1.0], [-1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0], [-1.0, 0.0], [-1.0, -1.0], [-1.0, -1.0]])
    rollout = Rollout(prompts=["a"] * 4, responses=[""] * 4, query_ids=torch.ones(4, 1).long(),
                      query_mask=torch.ones(4, 1).long(), response_ids=torch.ones(4, 2).long(),
                      mask=mask, has_stop=torch.ones(4, dtype=torch.bool),
                      scores=torch.tensor([1.0, 0.0, 2.0, 5.0]), logprobs=logprobs,
                      ref_logprobs=ref)
    config = replace(SMALL, group_size=2, kl_coef=0.5)
    group_step(rollout, config, Plan(1, 0, seed=0, kl_coef=0.5, algorithm="rloo"),
               SingleProcess())
    # k1 sequence KL: row0 0.5, row1 0, row2 -1, row3 0 -> returns 0.75, 0, 2.5, 5
    # leave-one-out in groups (0,1), (2,3): 0.75, -0.75, -2.5, 2.5
    torch.testing.assert_close(rollout.seq_advantages, torch.tensor([0.75, -0.75, -2.5, 2.5]))
    torch.testing.assert_close(rollout.advantages,
                               torch.tensor([[0.75, 0.75], [-0.75, 0.0], [-2.5, -2.5],
                                             [2.5, 2.5]]))
    group_step(rollout, config, Plan(1, 0, seed=0, kl_coef=0.5, algorithm="grpo"),
               SingleProcess())
    # scores (1, 0): mean 0.5, std sqrt(0.5) = 0.7071068 -> +-0.5 / 0.7072068 = +-0.7070068
    # scores (2, 5): mean 3.5, std sqrt(4.5) = 2.1213203 -> +-1.5 / 2.1214203 = +-0.7070735
    z1, z2 = 0.5 / (0.5 ** 0.5 + 1e-4), 1.5 / (4.5 ** 0.5 + 1e-4)
    torch.testing.assert_close(rollout.seq_advantages, torch.tensor([z1, -z1, -z2, z2]))


# -- routing ---------------------------------------------------------------------------------------
def test_algorithm_setting_is_validated():
    assert LoopConfig().algorithm == "rloo"  # the default since the 5-round comparisons (README)
    assert LoopConfig(algorithm="ppo").algorithm == "ppo"
    with pytest.raises(ValueError, match="loop.algorithm"):  # a ConfigError
        LoopConfig(algorithm="a2c")
    with pytest.raises(ValueError, match="ppo.group_size"):
        PPOConfig(group_size=1)
    assert set(ROUNDS) == {"ppo", "grpo", "rloo", "dpo"}


JOB = {"prompts_per_round": 4, "rollouts_per_prompt": 2, "group_size": 4, "epochs": 1,
       "max_new_tokens": 8, "minibatch_size": 4}


def test_job_algorithm_param_and_workspace_setting_pick_the_round(runtime, monkeypatch):
    import rlhf_core.worker.handlers as handlers
    seen = []

    def spy(rt, *, algorithm, **kw):
        seen.append(algorithm)
        return policy_round(rt, algorithm=algorithm, reward_fn=low_id_reward, **kw)
    monkeypatch.setattr(handlers, "policy_round", spy)
    jobs.enqueue(runtime.data.store, "ppo_round", JOB)  # a new workspace: the default, rloo
    assert run_one(runtime, "w")["status"] == "done"
    jobs.enqueue(runtime.data.store, "ppo_round", JOB | {"algorithm": "grpo"})
    assert run_one(runtime, "w")["status"] == "done"
    # `--set loop.algorithm=ppo` (the default is rloo): saved in the workspace, read by the
    # worker for the next job
    store, _ = open_workspace(runtime.workspace, **{"loop.algorithm": "ppo"})
    store.close()
    jobs.enqueue(runtime.data.store, "ppo_round", JOB)  # no param: the workspace's setting
    assert run_one(runtime, "w")["status"] == "done"
    jobs.enqueue(runtime.data.store, "ppo_round", JOB | {"algorithm": "dpo"})
    assert run_one(runtime, "w")["status"] == "done"
    assert seen == ["rloo", "grpo", "ppo", "dpo"]
    rows = [runtime.data.store.get_version("policy", v) for v in (1, 2, 3, 4)]
    assert [r["config"]["algorithm"] for r in rows] == ["rloo", "grpo", "ppo", "dpo"]
    assert rows[1]["config"]["epochs"] == 1  # the job's other params still override `ppo`
    jobs.enqueue(runtime.data.store, "ppo_round", JOB | {"algorithm": "a2c"})
    job = run_one(runtime, "w")
    assert job["status"] == "failed" and "loop.algorithm" in job["error"]


def test_next_ppo_round_after_a_critic_free_one_starts_a_critic(runtime):
    """A GRPO version has no value/ dir: the PPO round after it continues the policy and
    starts a fresh critic (no reward model here)."""
    grpo_round(runtime, config=SMALL, reward_fn=low_id_reward)
    batch = fixed_batch(runtime)
    runtime.model.set_adapter("policy")
    with torch.no_grad():
        v1, _ = policy_logprobs(runtime.model, batch, 1.0)
    result = policy_round(runtime, algorithm="ppo", config=TINY, reward_fn=low_id_reward)
    assert result["parent"] == 1 and result["metrics"]["critic_init"] == "fresh"
    assert result["metrics"]["first_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert not torch.equal(v1, torch.zeros_like(v1))


@pytest.mark.timeout(180)
def test_multiprocess_grpo_round_matches_single_process(ppo_model_dir, tmp_path):
    """`loop.algorithm=grpo` under the DDP launcher: groups are gathered over ranks for
    their advantages, losses are global token means, so two processes reproduce one (as the
    PPO test in test_ppo.py; tolerance 1e-3, float reduction order only)."""
    config = replace(SMALL, minibatch_size=8, epochs=2)
    single = grpo_round(make_runtime(ppo_model_dir, tmp_path / "one"), config=config,
                        reward_fn=low_id_reward)
    multi = two_process_round(ppo_model_dir, tmp_path / "two", config, port=29519,
                              keys=("group_size",), algorithm="grpo")
    assert multi["algorithm"] == "grpo" and multi["metrics"]["n_sequences"] == 8
    for k in ("reward_mean", "kl", "entropy", "pg_loss", "loss", "clipfrac", "approx_kl",
              "kl_k3", "first_ratio", "grad_norm"):
        assert multi["metrics"][k] == pytest.approx(single["metrics"][k], rel=1e-3, abs=1e-3), k


@pytest.mark.parametrize("algorithm", sorted(CRITIC_FREE))
def test_dpo_steps_at_its_own_learning_rate(runtime, algorithm, monkeypatch):
    """DPO rounds optimize at `ppo.dpo_lr`, the others at `ppo.lr`."""
    from rlhf_core.policy import train
    seen, real = [], torch.optim.Adam

    def adam(params, lr, **kw):
        seen.append(lr)
        return real(params, lr=lr, **kw)
    monkeypatch.setattr(train.torch.optim, "Adam", adam)
    config = replace(SMALL, lr=7e-4, dpo_lr=3e-5)
    CRITIC_FREE[algorithm](runtime, config=config, reward_fn=low_id_reward)
    assert seen == [3e-5 if algorithm == "dpo" else 7e-4]
