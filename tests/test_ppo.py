"""PPO rounds on a tiny random Llama with a synthetic reward (no reward model needed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rlhf_core.config import AppConfig, PPOConfig
from rlhf_core.data import jobs
from rlhf_core.data.store import Store
from rlhf_core.policy.experience import rollout_step
from rlhf_core.policy.ppo import PPOHealthError, ppo_round
from rlhf_core.policy.rollout import Rollout, left_pad, policy_logprobs, right_pad
from rlhf_core.policy.setup import Plan, SingleProcess, adapter_params
from rlhf_core.worker.run import run_one
from rlhf_core.worker.runtime import Runtime
from rlhf_core.workspace import open_workspace

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"prompt number {i}: say something about {w}"
           for i, w in enumerate(["the sea", "dogs", "python", "numbers", "poems", "the fox",
                                  "hello", "lists", "answers", "the world", "maybe", "code"])]
TINY = PPOConfig(prompts_per_round=4, rollouts_per_prompt=2, max_new_tokens=8, epochs=2,
                 minibatch_size=4, lr=1e-2, kl_coef=0.05, generation_batch_size=8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ppo_model_dir(tmp_path_factory):
    """The tiny Llama with 10x embeddings: the random init's logits are then peaked enough
    (entropy ~3.5 nats instead of ~ln V) for a few LoRA steps to move the policy visibly."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import build_tiny_model
    path = build_tiny_model(tmp_path_factory.mktemp("ppo") / "model")
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)  # tied: the LM head scales too
    model.save_pretrained(path)
    return path


def low_id_reward(prompts, responses, response_ids):
    """Synthetic reward: the share of response tokens with an id below 100 (~1/3 at random)."""
    return torch.tensor([(ids < 100).float().mean().item() for ids in response_ids])


def nan_reward(prompts, responses, response_ids):
    return torch.full((len(prompts),), float("nan"))


def make_runtime(model_dir: Path, ws: Path, heldout_fraction: float = 0.25,
                 **settings) -> Runtime:
    store = Store(ws / "rlhf.db")
    store.add_prompts([{"text": p} for p in PROMPTS], source="test",
                      heldout_fraction=heldout_fraction)
    # bare prompts: these rounds' thresholds were set on them (a 40-token system prompt in the
    # tiny byte-level vocabulary only lengthens every query); the system prompt has its own tests
    return Runtime(store, AppConfig(workspace=ws, model=str(model_dir), system_prompt="",
                                    **settings), cpu=True)


@pytest.fixture
def runtime(ppo_model_dir, tmp_path):
    rt = make_runtime(ppo_model_dir, tmp_path / "ws")
    yield rt
    rt.data.store.close()


LAUNCHED = ("prompts_per_round", "rollouts_per_prompt", "max_new_tokens", "epochs",
            "minibatch_size", "lr", "generation_batch_size")


def two_process_round(model_dir: Path, ws: Path, config: PPOConfig, *, port: int,
                      keys: tuple[str, ...] = (), algorithm: str = "ppo") -> dict:
    """The round of `config` (its LAUNCHED settings and `keys`) in a new workspace `ws`, run by
    `accelerate launch` on 2 CPU processes with low_id_reward: the launcher's result. The
    launcher runs the workspace's `loop.algorithm`, saved here as `algorithm`."""
    make_runtime(model_dir, ws).data.store.close()
    store, _ = open_workspace(ws, model=str(model_dir), system_prompt="",  # the launcher reads it
                              **{"loop.algorithm": algorithm})
    store.close()
    out = ws.parent / f"{ws.name}-result.json"
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "rlhf_core.policy.launch", "--cpu", "--workspace", str(ws),
           "--reward-fn", "tests.test_ppo:low_id_reward", "--result-json", str(out)]
    for k in LAUNCHED + keys:
        cmd += ["--set", f"ppo.{k}={getattr(config, k)}"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def fixed_batch(rt: Runtime) -> Rollout:
    """A hand-made (query, response) batch for before/after log-prob comparisons."""
    tok = rt.tokenizer
    q = torch.tensor([tok("hello world", add_special_tokens=False)["input_ids"][:3]])
    r = torch.tensor([tok("the quick brown fox", add_special_tokens=False)["input_ids"][:4]])
    return Rollout(prompts=["x"], responses=["y"], query_ids=q, query_mask=torch.ones_like(q),
                   response_ids=r, mask=torch.ones(r.shape), has_stop=torch.tensor([True]))


def test_round_checklist_ratio_params_reference_and_layout(runtime):
    model = runtime.model
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    batch = fixed_batch(runtime)
    with torch.no_grad(), runtime.reference():
        ref_before, _ = policy_logprobs(model, batch, 1.0)
    policy_before = {n: p.detach().clone() for n, p in adapter_params(model, "policy").items()}

    result = ppo_round(runtime, config=TINY, reward_fn=low_id_reward)

    m = result["metrics"]
    assert result["status"] == "published" and result["version"] == 1 and result["parent"] == 0
    # dropout off and old log-probs from the same policy: the first minibatch is on-policy
    assert m["first_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert m["first_approx_kl"] < 1e-9
    assert m["ppo_steps"] == TINY.epochs * 2
    after = adapter_params(model, "policy")
    assert any(not torch.equal(policy_before[n], p) for n, p in after.items())
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(base_before[n], p), n
    with torch.no_grad(), runtime.reference():
        ref_after, _ = policy_logprobs(model, batch, 1.0)
    assert torch.equal(ref_before, ref_after)

    # published layout, version row, metrics and the queued sampling job
    path = Path(result["path"])
    assert path == runtime.workspace / "models" / "policy" / "v0001"
    for f in ("policy/adapter_model.safetensors", "policy/adapter_config.json",
              "value/adapter_model.safetensors", "value/score_head.safetensors", "version.json"):
        assert (path / f).is_file(), f
    assert not list(path.parent.glob(".tmp-*"))
    manifest = json.loads((path / "version.json").read_text())
    assert manifest["parent"] == 0 and manifest["config"]["epochs"] == TINY.epochs
    row = runtime.data.store.current_version("policy")
    assert row["version"] == 1 and row["parent"] == 0 and row["path"] == str(path)
    assert row["config"]["minibatch_size"] == 4 and "reward_mean" in row["metrics"]
    names = {r["name"] for r in runtime.data.store.metric_series("ppo")}
    for name in ("reward_mean", "reward_std", "kl", "kl_std", "entropy", "clipfrac", "approx_kl",
                 "vf_loss", "explained_variance", "response_length", "response_length_std",
                 "stop_rate", "n_sequences",
                 "time_generate", "time_score", "time_train"):
        assert name in names, name
    assert "sample_job" not in result  # the loop policy samples the next batch, not the round


def test_rollout_uses_train_prompts_and_cuts_after_stop(runtime):
    train = {r["text"] for r in runtime.data.store.rows("SELECT text FROM prompts WHERE split='train'")}
    assert len(train) < len(PROMPTS)  # some prompts are held out
    config = replace(TINY, prompts_per_round=len(PROMPTS), max_new_tokens=12)
    runtime.model.set_adapter("policy")
    rollout = rollout_step(runtime, config, Plan(1, 0, seed=3, kl_coef=0.05), SingleProcess())
    assert set(rollout.prompts) == train
    eos = runtime.tokenizer.eos_token_id
    for ids, m, stopped in zip(rollout.response_ids, rollout.mask, rollout.has_stop):
        n = int(m.sum())
        assert torch.all(m[:n] == 1) and torch.all(m[n:] == 0)
        assert (eos in ids[:n].tolist()) == bool(stopped)
        if stopped:
            assert ids[n - 1] == eos and eos not in ids[:n - 1].tolist()
        else:
            assert n == 12


def test_select_drops_padding_columns_without_changing_the_math(runtime):
    """A minibatch of short rows computes on its own width: leading query and trailing
    response columns that are padding in every picked row are dropped, and the per-token
    log-probs of the picked rows equal those computed inside the full-width batch."""
    pad = runtime.tokenizer.pad_token_id
    q_ids, q_mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]], pad)  # P = 6
    r_ids, mask = right_pad([[20, 21, 22, 23, 24], [25, 26], [27]], pad)  # T = 5
    full = Rollout(prompts=["a", "b", "c"], responses=["x", "y", "z"], query_ids=q_ids,
                   query_mask=q_mask, response_ids=r_ids, mask=mask,
                   has_stop=torch.tensor([True, False, True]), values=torch.randn(3, 5))
    part = full.select(torch.tensor([2, 1]))
    assert part.query_ids.shape == (2, 3) and part.response_ids.shape == (2, 2)
    assert part.values.shape == (2, 2) and torch.equal(part.values, full.values[[2, 1], :2])
    assert part.prompts == ["c", "b"] and part.has_stop.tolist() == [True, False]
    assert full.select(torch.tensor([0])).query_ids.shape == (1, 6)  # nothing to drop
    with torch.no_grad():
        lp_full, _ = policy_logprobs(runtime.model, full, 1.0)
        lp_part, _ = policy_logprobs(runtime.model, part, 1.0)
    m = part.mask.bool()
    assert torch.allclose(lp_part[m], lp_full[[2, 1], :2][m], atol=1e-5)


def test_logprobs_recorded_while_sampling_equal_a_full_forward(runtime):
    """The sampler's own log-probs / entropies (old log-probs without a policy pass) match a
    recompute over query + response, at temperature != 1 and over generate() chunks that stop
    at different lengths (each chunk's record is padded to the rollout's width). A rollout that
    records decodes in float32 whatever sampling.decode_dtype says (rlhf_core/decoding.py)."""
    runtime.config = replace(runtime.config, sampling=replace(runtime.config.sampling,
                                                              decode_dtype="bfloat16"))
    config = replace(TINY, prompts_per_round=6, max_new_tokens=10, temperature=0.7,
                     generation_batch_size=3)
    plan = Plan(1, 0, seed=5, kl_coef=0.05)
    runtime.model.set_adapter("policy")
    # the random model almost never stops: make EOS nearly as likely as its favourite token
    top = torch.bincount(rollout_step(runtime, config, plan, SingleProcess())
                         .response_ids.flatten()).argmax()
    lm_head = runtime.model.get_output_embeddings().weight
    with torch.no_grad():
        lm_head[runtime.tokenizer.eos_token_id] = 0.9 * lm_head[top]
    with torch.no_grad():  # a policy that is not the reference: B != 0
        for p in adapter_params(runtime.model, "policy").values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    rec = rollout_step(runtime, config, plan, SingleProcess())
    plain = rollout_step(runtime, replace(config, logprobs_from_sampling=False), plan,
                         SingleProcess())
    assert plain.logprobs is None and rec.logprobs.shape == rec.mask.shape
    assert torch.equal(rec.response_ids, plain.response_ids)  # recording does not change draws
    m = rec.mask.bool()
    lengths = rec.mask.sum(dim=1)
    assert rec.has_stop.any() and lengths.min() < lengths.max()  # chunks of different lengths
    with torch.no_grad():
        full, entropy = policy_logprobs(runtime.model, rec, 0.7, with_entropy=True)
    assert torch.allclose(rec.logprobs[m], full[m], atol=1e-5)
    assert torch.allclose(rec.entropy[m], entropy[m], atol=1e-5)
    assert (rec.logprobs[m] < 0).all()


def direction_reward(runtime):
    """Reward = share of response tokens whose embedding points along a fixed random direction
    (half the vocabulary): one direction in hidden space, so LoRA can learn it."""
    emb = runtime.model.get_input_embeddings().weight.detach()  # (V,H)
    u = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0))  # (H,)
    good = (emb @ u) > 0  # (V,)
    return lambda prompts, responses, ids: torch.tensor([good[i].float().mean().item()
                                                         for i in ids])


def evaluate(runtime, reward_fn) -> float:
    """Mean reward over every train prompt x 4, with fixed sampling noise (common random
    numbers: before/after differ only by the policy, not by the draw)."""
    config = replace(TINY, prompts_per_round=100, rollouts_per_prompt=4, generation_batch_size=64)
    rollout = rollout_step(runtime, config, Plan(99, 0, seed=424242, kl_coef=0.0), SingleProcess())
    return reward_fn(None, None, rollout.response_lists()).mean().item()


LEARNING = replace(TINY, epochs=4, prompts_per_round=8, rollouts_per_prompt=4,
                   minibatch_size=8, missing_eos_penalty=0.0)


def assert_rounds_raise_mean_reward(runtime, config: PPOConfig) -> None:
    """Four PPO rounds of `config` on the direction reward raise its mean by more than 0.1
    (seen with LEARNING: 0.35 -> 0.59); evaluation on fixed sampling noise."""
    reward_fn = direction_reward(runtime)
    before = evaluate(runtime, reward_fn)
    for i in range(4):
        result = ppo_round(runtime, config=config, reward_fn=reward_fn)
        assert result["version"] == i + 1 and result["parent"] == i
    after = evaluate(runtime, reward_fn)
    assert after > before + 0.1, (before, after)


def test_rounds_raise_mean_reward(runtime):
    config = LEARNING
    assert_rounds_raise_mean_reward(runtime, config)
    assert runtime.data.store.get_version("policy", 4)["metrics"]["critic_init"] == "continued"
    steps = [r["step"] for r in runtime.data.store.metric_series("ppo", "approx_kl")]
    assert steps == sorted(set(steps)) and len(steps) == 4 * config.epochs * 4  # runs on


def test_nan_reward_aborts_without_publishing(runtime):
    before_rows = runtime.data.store.scalar("SELECT COUNT(*) FROM versions")
    with pytest.raises(PPOHealthError, match="non-finite scores") as info:
        ppo_round(runtime, config=TINY, reward_fn=nan_reward)
    assert info.value.result["status"] == "aborted"
    assert runtime.data.store.scalar("SELECT COUNT(*) FROM versions") == before_rows
    assert not (runtime.workspace / "models" / "policy").exists() or not any(
        (runtime.workspace / "models" / "policy").iterdir())
    assert runtime.data.store.scalar("SELECT COUNT(*) FROM jobs") == 0
    assert runtime.data.store.one("SELECT * FROM events WHERE kind = 'ppo_aborted'")


def test_approx_kl_gate_aborts_and_restores_policy(runtime):
    ppo_round(runtime, config=TINY, reward_fn=low_id_reward)  # v1
    config = replace(TINY, lr=0.5, max_approx_kl=1e-6, epochs=3, fallback_approx_kl=0.0)
    policy_before = {n: p.detach().clone()
                     for n, p in adapter_params(runtime.model, "policy").items()}
    with pytest.raises(PPOHealthError, match="approx_kl"):
        ppo_round(runtime, config=config, reward_fn=low_id_reward)
    assert runtime.data.store.current_version("policy")["version"] == 1
    assert runtime.loaded["policy"] == 1
    for n, p in adapter_params(runtime.model, "policy").items():
        assert torch.equal(policy_before[n], p)


def test_stop_approx_kl_ends_training_early_and_keeps_the_updates(ppo_model_dir, tmp_path,
                                                                   monkeypatch):
    """Two identical rounds (fresh workspaces, same seeds), the second with `stop_approx_kl`
    between two of the first's minibatch approx_kl values: it runs the same minibatches up to
    the first one above the threshold, stops there without its optimizer step, and publishes
    the updates so far."""
    config = replace(TINY, epochs=3, max_approx_kl=100.0)
    full_rt = make_runtime(ppo_model_dir, tmp_path / "full")
    ppo_round(full_rt, config=config, reward_fn=low_id_reward)
    series = [r["value"] for r in full_rt.data.store.metric_series("ppo", "approx_kl")]
    assert len(series) == 3 * 2  # 3 epochs of 2 minibatches
    # a minibatch from the third on whose approx_kl exceeds all before it: stop there
    k = next(i for i in range(2, len(series)) if series[i] > max(series[:i]))
    threshold = (max(series[:k]) + series[k]) / 2
    steps = []
    real_step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step",
                        lambda self, *a, **kw: steps.append(1) or real_step(self, *a, **kw))
    rt = make_runtime(ppo_model_dir, tmp_path / "stop")
    parent = {n: p.detach().clone() for n, p in adapter_params(rt.model, "policy").items()}
    res = ppo_round(rt, config=replace(config, stop_approx_kl=threshold),
                    reward_fn=low_id_reward)
    assert res["status"] == "published" and res["version"] == 1
    m = res["metrics"]
    assert m["early_stop"] == k + 1 and m["ppo_steps"] == k and len(steps) == k
    kept = [r["value"] for r in rt.data.store.metric_series("ppo", "approx_kl")]
    assert kept == pytest.approx(series[:k], abs=1e-6)
    stop = rt.data.store.metric_series("ppo", "early_stop_approx_kl")
    assert [r["value"] for r in stop] == pytest.approx([series[k]], abs=1e-6)
    assert rt.data.store.get_version("policy", 1)["metrics"]["early_stop"] == k + 1
    moved = adapter_params(rt.model, "policy")
    assert any(not torch.equal(parent[n], p) for n, p in moved.items())  # updates kept


def test_the_approx_kl_gate_falls_back_to_what_the_early_stop_would_have_published(
        ppo_model_dir, tmp_path):
    """Three identical rounds (fresh workspaces, same seeds): one without gates sets the
    scene; one with `stop_approx_kl` at T stops before minibatch k; one with the gate G below a
    later minibatch j's approx_kl (no early stop) and `fallback_approx_kl` = T / G trips the
    gate at j and publishes instead of aborting: the same policy as the early stop's, not the
    one it had reached at j, with the trip recorded (metrics, event, version)."""
    config = replace(TINY, epochs=4, max_approx_kl=100.0)
    full_rt = make_runtime(ppo_model_dir, tmp_path / "full")
    ppo_round(full_rt, config=config, reward_fn=low_id_reward)
    series = [r["value"] for r in full_rt.data.store.metric_series("ppo", "approx_kl")]
    assert len(series) == 4 * 2
    peaks = [i for i in range(2, len(series)) if series[i] > max(series[:i])]  # new maxima
    assert len(peaks) >= 2, series
    k, j = peaks[0], peaks[-1]
    stop = (max(series[:k]) + series[k]) / 2
    gate = (max(series[:j]) + series[j]) / 2

    stop_rt = make_runtime(ppo_model_dir, tmp_path / "stop")
    ppo_round(stop_rt, config=replace(config, stop_approx_kl=stop), reward_fn=low_id_reward)
    fb_rt = make_runtime(ppo_model_dir, tmp_path / "fallback")
    res = ppo_round(fb_rt, config=replace(config, max_approx_kl=gate,
                                          fallback_approx_kl=stop / gate),
                    reward_fn=low_id_reward)
    assert res["status"] == "published" and res["version"] == 1
    m = fb_rt.data.store.get_version("policy", 1)["metrics"]
    assert m["gate_fallback"] == j + 1 and m["early_stop"] == k + 1 and m["ppo_steps"] == k
    got = adapter_params(fb_rt.model, "policy")
    want = adapter_params(stop_rt.model, "policy")
    reached = adapter_params(full_rt.model, "policy")
    for n, p in got.items():
        torch.testing.assert_close(p, want[n], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(p, reached[n]) for n, p in got.items())
    trip = fb_rt.data.store.metric_series("ppo", "gate_fallback_approx_kl")
    assert [r["value"] for r in trip] == pytest.approx([series[j]], rel=1e-4)
    event = fb_rt.data.store.one("SELECT * FROM events WHERE kind = 'approx_kl_fallback'")
    assert event and json.loads(event["payload"])["kept_steps"] == k


def test_stop_approx_kl_below_the_first_minibatch_aborts(runtime):
    """A threshold below the first minibatch's approx_kl (before any step) is a setting error:
    the round aborts with a reason that says so, nothing published."""
    ppo_round(runtime, config=TINY, reward_fn=low_id_reward)  # v1, the parent that must stay
    with pytest.raises(PPOHealthError, match="before any step: raise ppo.stop_approx_kl"):
        ppo_round(runtime, config=replace(TINY, stop_approx_kl=1e-30, max_approx_kl=10.0),
                  reward_fn=low_id_reward)
    assert runtime.data.store.current_version("policy")["version"] == 1


def test_job_handler_reports_health_error(runtime, monkeypatch):
    import rlhf_core.worker.handlers as handlers
    real = handlers.policy_round
    monkeypatch.setattr(handlers, "policy_round",
                        lambda rt, **kw: real(rt, reward_fn=nan_reward, **kw))
    job_id = jobs.enqueue(runtime.data.store, "ppo_round",
                          {"prompts_per_round": 2, "epochs": 1, "max_new_tokens": 4})
    job = run_one(runtime, "test-worker")
    assert job["id"] == job_id and job["status"] == "failed"
    assert "PPOHealthError" in job["error"] and "non-finite scores" in job["error"]


@pytest.mark.timeout(180)
def test_multiprocess_round_matches_single_process(ppo_model_dir, tmp_path):
    """Same prompts, seeds and global minibatch (= the whole rollout): the 2-process DDP round
    must reproduce the single-process metrics. Tolerance: 1e-3 relative/absolute — both runs
    do identical math, only float reduction order and batch shapes differ (seen: 4e-8)."""
    config = replace(TINY, minibatch_size=8, epochs=2)
    single = ppo_round(make_runtime(ppo_model_dir, tmp_path / "one"), config=config,
                       reward_fn=low_id_reward)
    multi = two_process_round(ppo_model_dir, tmp_path / "two", config, port=29517)
    assert multi["version"] == 1 and multi["metrics"]["n_sequences"] == 8
    keys = ("reward_mean", "reward_std", "kl", "entropy", "response_length", "stop_rate",
            "explained_variance", "pg_loss", "vf_loss", "clipfrac", "approx_kl",
            "first_ratio", "grad_norm")
    print("max |multi - single|:", max(abs(multi["metrics"][k] - single["metrics"][k])
                                       for k in keys))
    for k in keys:
        assert multi["metrics"][k] == pytest.approx(single["metrics"][k], rel=1e-3, abs=1e-3), k
    from safetensors.torch import load_file
    a = load_file(str(Path(single["path"]) / "policy" / "adapter_model.safetensors"))
    b = load_file(str(Path(multi["path"]) / "policy" / "adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3


def test_gradient_checkpointing_round_stays_on_policy(runtime):
    config = replace(TINY, gradient_checkpointing=True, epochs=1)
    result = ppo_round(runtime, config=config, reward_fn=low_id_reward)
    assert result["metrics"]["first_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert result["metrics"]["first_approx_kl"] < 1e-9
    assert not runtime.model.training  # back in eval mode for sampling


def publish_random_reward(runtime) -> None:
    """A promoted reward version on the shared base: a random LoRA adapter + head."""
    from rlhf_core import models
    from rlhf_core.checkpoints import publish
    model = runtime.model
    runtime.ensure_fresh_adapter("rw_src")
    with torch.no_grad():
        for p in adapter_params(model, "rw_src").values():
            p.normal_(0.0, 0.05)
    head = models.ScalarHead(runtime.hidden_size, init_std=0.5, seed=3)

    def write(tmp: Path) -> None:
        models.save_adapter(model, "rw_src", tmp)
        (tmp / "rw_src").rename(tmp / "reward")
        models.save_head(head, tmp)
    path = publish(runtime.workspace, "reward", 1, write, {"version": 1, "kind": "reward"},
                   recorded=runtime.data.get_version)
    model.delete_adapter("rw_src")
    model.set_adapter("policy")
    runtime.data.store.add_version("reward", 1, status="promoted", path=str(path))


def test_round_with_reward_model_initialises_critic_from_it(runtime):
    publish_random_reward(runtime)
    result = ppo_round(runtime, config=replace(TINY, epochs=1))
    assert result["reward_version"] == 1
    assert result["metrics"]["critic_init"] == "reward"
    row = runtime.data.store.get_version("policy", 1)
    assert row["reward_version"] == 1 and row["parent"] == 0
    assert torch.isfinite(torch.tensor(result["metrics"]["reward_mean"]))


def test_next_round_in_a_new_worker_continues_from_published_dirs(runtime):
    first = ppo_round(runtime, config=TINY, reward_fn=low_id_reward)
    batch = fixed_batch(runtime)
    runtime.model.set_adapter("policy")
    with torch.no_grad():
        v1_logprobs, _ = policy_logprobs(runtime.model, batch, 1.0)
    fresh = Runtime(runtime.data.store, runtime.config, cpu=True)  # a restarted worker
    second = ppo_round(fresh, config=replace(TINY, epochs=1), reward_fn=low_id_reward)
    assert first["version"] == 1 and second["version"] == 2 and second["parent"] == 1
    assert second["metrics"]["critic_init"] == "continued"
    assert second["metrics"]["first_ratio"] == pytest.approx(1.0, abs=1e-5)
    fresh2 = Runtime(runtime.data.store, runtime.config, cpu=True)
    with torch.no_grad(), fresh2.policy(1) as model:
        reloaded, _ = policy_logprobs(model, batch, 1.0)
    torch.testing.assert_close(reloaded, v1_logprobs)


def test_an_orphan_version_dir_does_not_block_later_rounds(runtime):
    """Issue 16.2: a round that died between the rename and the DB row left models/policy/v0001
    without a row; the next rounds publish v1 and v2 instead of FileExistsError for ever."""
    orphan = runtime.workspace / "models" / "policy" / "v0001"
    orphan.mkdir(parents=True)
    (orphan / "junk.bin").write_bytes(b"half a checkpoint")
    first = ppo_round(runtime, config=replace(TINY, epochs=1), reward_fn=low_id_reward)
    second = ppo_round(runtime, config=replace(TINY, epochs=1), reward_fn=low_id_reward)
    assert (first["version"], second["version"]) == (1, 2)
    assert not (orphan / "junk.bin").exists() and (orphan / "version.json").is_file()


@pytest.mark.timeout(240)
def test_a_worker_runs_a_queued_round_on_two_processes(ppo_model_dir, tmp_path):
    """Issue 12.4: `rlhf worker --processes 2` takes a policy round from the queue and runs it
    under accelerate launch; rank 0 reports progress and publishes as the worker holding the
    job, the other rank touches neither the database nor the app."""
    store, cfg = open_workspace(tmp_path / "ws", model=str(ppo_model_dir))
    store.add_prompts([{"text": p} for p in PROMPTS], source="test", heldout_fraction=0.25)
    publish_random_reward(Runtime(store, cfg, cpu=True))
    job_id = jobs.enqueue(store, "ppo_round", {
        "prompts_per_round": 4, "rollouts_per_prompt": 2, "max_new_tokens": 8, "epochs": 1,
        "minibatch_size": 8, "generation_batch_size": 8})
    runtime = Runtime(store, cfg, cpu=True, processes=2)
    job = run_one(runtime, "gpu-host:1")
    assert job["id"] == job_id and job["status"] == "done", job["error"]
    assert job["result"]["processes"] == 2 and job["result"]["version"] == 1
    assert job["result"]["metrics"]["n_sequences"] == 8  # both ranks' shares
    assert job["message"] == "published policy v1"  # rank 0 reported, as this worker
    row = store.get_version("policy", 1)
    assert row["job_id"] == job_id and row["reward_version"] == 1
    assert {m["job_id"] for m in store.metric_series("ppo")} == {job_id}
    assert runtime._model is None  # the worker itself loaded no model
