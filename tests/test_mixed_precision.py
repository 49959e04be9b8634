"""`mixed_precision`: which math a runtime picks, and reward and policy rounds that train under
bf16 autocast with float32 weights on a CPU (the suite itself runs float32: see conftest)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_core.config import AppConfig, ConfigError
from rlhf_core.models import resolve_mixed_precision
from rlhf_core.policy.grpo import grpo_round
from rlhf_core.policy.ppo import ppo_round
from rlhf_core.policy.setup import adapter_params
from rlhf_core.reward import round as reward_model
from rlhf_core.worker.presence import device_label
from rlhf_core.worker.runtime import Runtime
from tests.test_ppo import (  # noqa: F401 (ppo_model_dir is a fixture)
    TINY,
    direction_reward,
    evaluate,
    low_id_reward,
    make_runtime,
    ppo_model_dir,
)
from tests.test_reward_model import LEARN, assert_learned, seed_rankings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("setting,device,native,cuda_bf16,env,expected", [
    ("auto", "cpu", True, False, None, "bf16"),  # AVX512-BF16 / AMX
    ("auto", "cpu", False, False, None, "no"),  # emulated bf16 would be slower
    ("auto", "cuda", False, True, None, "bf16"),
    ("auto", "cuda", False, False, None, "no"),
    ("auto", "cpu", True, False, "no", "no"),  # accelerate launch --mixed_precision no
    ("auto", "cpu", False, False, "bf16", "bf16"),
    ("auto", "cpu", True, False, "fp16", "no"),  # fp16 is not ours: float32
    ("no", "cpu", True, False, "bf16", "no"),  # an explicit setting wins over the variable
    ("bf16", "cpu", False, False, None, "bf16"),  # forced, even emulated
    ("bf16", "cuda", False, False, None, "no"),  # a GPU without bf16 could not run it
    ("auto", "mps", True, False, None, "no"),
])
def test_resolve_mixed_precision(setting, device, native, cuda_bf16, env, expected):
    assert resolve_mixed_precision(setting, device, native_cpu=native, cuda_bf16=cuda_bf16,
                                   env=env) == expected


def test_setting_is_validated_and_a_cpu_runtime_keeps_float32_weights(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="mixed_precision"):
        AppConfig(mixed_precision="fp16")
    from rlhf_core.data.store import Store
    store = Store(tmp_path / "rlhf.db")
    try:
        for setting, label in (("bf16", "cpu bf16"), ("no", "cpu float32")):
            rt = Runtime(store, AppConfig(workspace=tmp_path, model=str(tiny_model_dir),
                                          mixed_precision=setting), cpu=True)
            assert rt.device.dtype == torch.float32 and device_label(rt) == label
            assert rt.model.get_input_embeddings().weight.dtype == torch.float32
    finally:
        store.close()


def test_a_cpu_bf16_runtime_stores_the_frozen_base_linears_in_bf16_with_the_same_math(
        tmp_path, tiny_model_dir):
    """bf16 on a CPU: the frozen base's decoder Linear weights are kept in bf16 (half their
    memory), everything trained or outside the decoder layers stays float32, adapters added
    later are float32 too, and a forward under autocast gives the very logits a float32-stored
    base gives under autocast (autocast rounds each weight the same way at every product)."""
    from rlhf_core.data.store import Store
    from rlhf_core.models import autocast
    store = Store(tmp_path / "rlhf.db")
    try:
        runs = {}
        for setting in ("bf16", "no"):
            rt = Runtime(store, AppConfig(workspace=tmp_path, model=str(tiny_model_dir),
                                          mixed_precision=setting), cpu=True)
            rt.ensure_fresh_adapter("value")
            runs[setting] = rt
        bf, fp = runs["bf16"].model, runs["no"].model
        dtypes = {n: p.dtype for n, p in bf.named_parameters()}
        base = [n for n in dtypes if ".layers." in n and ".lora_" not in n
                and n.endswith(("proj.weight", "proj.base_layer.weight"))]
        assert base and all(dtypes[n] == torch.bfloat16 for n in base)
        rest = [n for n in dtypes if n not in base]
        assert any(".value." in n for n in rest) and any("norm" in n for n in rest)
        # LoRA (every adapter), norms, the embedding / LM head
        assert [n for n in rest if dtypes[n] != torch.float32] == []
        assert all(p.dtype == torch.float32 for p in fp.parameters())  # "no": untouched
        # the same LoRA weights in both, then one forward each under bf16 autocast
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            for (n, p), (m, q) in zip(bf.named_parameters(), fp.named_parameters()):
                assert n == m
                if "lora_" in n:  # A: each runtime drew its own; B: 0 until trained
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
                    q.copy_(p)
            ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
            with autocast(runs["bf16"].device):
                a = bf(input_ids=ids).logits
                b = fp(input_ids=ids).logits
            # a caller without autocast still gets an answer: bf16 products, float32 out
            c, d = bf(input_ids=ids).logits, fp(input_ids=ids).logits
        assert torch.isfinite(a).all() and torch.equal(a, b)
        assert c.dtype == torch.float32 and torch.isfinite(c).all()
        assert (c - d).abs().max() < 0.05 * d.abs().max()  # bf16 weight rounding only
    finally:
        store.close()


class MatmulDtypes:
    """Output dtypes of one base projection of the first layer while active."""

    def __init__(self, model):
        layer = model.get_base_model().model.layers[0].self_attn.q_proj
        self.seen: set = set()
        self.handle = layer.base_layer.register_forward_hook(
            lambda mod, args, out: self.seen.add(out.dtype))

    def close(self):
        self.handle.remove()


def bf16_runtime(model_dir: Path, ws: Path) -> Runtime:
    return make_runtime(model_dir, ws, mixed_precision="bf16")


def test_reward_model_learns_under_bf16_autocast(store, tiny_model_dir):
    seed_rankings(store, 40)
    app = AppConfig(workspace=store.path.parent, model=str(tiny_model_dir), reward=LEARN,
                    mixed_precision="bf16")
    runtime = Runtime(store, app, cpu=True)
    spy = MatmulDtypes(runtime.model)
    res = reward_model.train_reward(runtime)
    spy.close()
    assert spy.seen == {torch.bfloat16}  # training and evaluation multiplied in bf16
    assert res["status"] == "promoted", res["reason"]
    assert_learned(res["metrics"])  # the float32 test's thresholds
    # weights, optimizer and what is published stay float32
    params = dict(runtime.model.named_parameters())
    assert all(p.dtype == torch.float32 for n, p in params.items() if ".reward." in n)
    path = Path(store.current_version("reward")["path"])
    tensors = load_file(str(path / "reward" / "adapter_model.safetensors"))
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    scorer = reward_model.load_reward(runtime)
    assert scorer.head.linear.weight.dtype == torch.float32
    assert store.current_version("reward")["config"]["mixed_precision"] == "bf16"  # provenance


@pytest.mark.parametrize("round_fn", [ppo_round, grpo_round], ids=["ppo", "grpo"])
def test_policy_round_under_bf16_autocast_recomputes_old_logprobs(ppo_model_dir, tmp_path,
                                                                   round_fn):
    runtime = bf16_runtime(ppo_model_dir, tmp_path / "ws")
    try:
        spy = MatmulDtypes(runtime.model)
        result = round_fn(runtime, config=TINY, reward_fn=low_id_reward)
        spy.close()
        assert result["status"] == "published"
        assert torch.bfloat16 in spy.seen  # training (and the old log-probs) in bf16
        m = result["metrics"]
        # the old log-probs come from the same bf16 forward as training's (not from the decode
        # loop), so the first minibatch is on-policy (seen: 1.0 exactly, approx_kl <= 1e-15)
        assert m["first_ratio"] == pytest.approx(1.0, abs=1e-3) and m["first_approx_kl"] < 1e-4
        assert all(p.dtype == torch.float32 for p in adapter_params(runtime.model,
                                                                     "policy").values())
        path = Path(runtime.data.store.current_version("policy")["path"])
        tensors = load_file(str(path / "policy" / "adapter_model.safetensors"))
        assert all(t.dtype == torch.float32 for t in tensors.values())
        assert runtime.data.store.current_version("policy")["config"]["mixed_precision"] == "bf16"
    finally:
        runtime.data.store.close()


def test_ppo_rounds_raise_mean_reward_under_bf16(ppo_model_dir, tmp_path):
    """test_ppo's learnable reward and threshold, trained under bf16 autocast."""
    runtime = bf16_runtime(ppo_model_dir, tmp_path / "ws")
    try:
        reward_fn = direction_reward(runtime)
        config = replace(TINY, epochs=4, prompts_per_round=8, rollouts_per_prompt=4,
                         minibatch_size=8, missing_eos_penalty=0.0)
        before = evaluate(runtime, reward_fn)
        for _ in range(4):
            assert ppo_round(runtime, config=config, reward_fn=reward_fn)["status"] == "published"
        after = evaluate(runtime, reward_fn)
        assert after > before + 0.1, (before, after)  # seen: 0.35 -> 0.62 (float32: 0.59)
    finally:
        runtime.data.store.close()


def test_a_two_process_round_trains_in_the_workers_precision(ppo_model_dir, tmp_path):
    """`rlhf worker --processes 2` on a CPU: the ranks train in the workspace's precision (bf16
    here, although the suite's environment says "no"), and the launcher hands it to accelerate
    (`--mixed_precision bf16`: its CPU Accelerator accepts it)."""
    from rlhf_core.data import jobs
    from rlhf_core.worker.run import run_one
    from rlhf_core.workspace import open_workspace
    from tests.test_ppo import PROMPTS, publish_random_reward
    store, cfg = open_workspace(tmp_path / "ws", model=str(ppo_model_dir), mixed_precision="bf16")
    store.add_prompts([{"text": p} for p in PROMPTS], source="test", heldout_fraction=0.25)
    publish_random_reward(Runtime(store, cfg, cpu=True))
    jobs.enqueue(store, "ppo_round", {
        "prompts_per_round": 4, "rollouts_per_prompt": 2, "max_new_tokens": 8, "epochs": 1,
        "minibatch_size": 8, "generation_batch_size": 8})
    job = run_one(Runtime(store, cfg, cpu=True, processes=2), "w")
    assert job["status"] == "done", job["error"]
    assert job["result"]["processes"] == 2
    row = store.get_version("policy", 1)
    assert row["config"]["mixed_precision"] == "bf16"
    assert row["metrics"]["first_ratio"] == pytest.approx(1.0, abs=1e-3)
    store.close()
