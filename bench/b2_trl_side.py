"""B2, TRL side: one round of `trl.experimental.ppo.PPOTrainer` (trl==1.12.0), run in bench/.venv-trl.

    bench/.venv-trl/bin/python -m bench.b2_trl_side SPEC.json {full|lora}

Self-contained (the TRL venv has no rlhf_core). Reads a JSON spec written by b2_ppo_trl.py and
prints `RESULT {json}`: wall time split into generate / score / train, peak RSS at the end of
each phase, generated tokens, optimizer steps, package versions.

Setup, as TRL 1.12 documents it for LoRA: the policy gets `peft_config` (the reference is the
policy with its adapter disabled); the value model and the reward model are separate
`AutoModelForSequenceClassification` models (TRL's `get_reward` needs `.score` on a backbone).
Our reward model (LoRA adapter + scalar head on the same base) is merged into such a model, so
both sides score with identical weights; the value model starts as a copy of it (our critic
also starts from the reward model). Two value-model variants:
- `full`: the copy trains in full (135M parameters), TRL's default design;
- `lora`: the copy is wrapped by `peft.get_peft_model` with our LoRA settings (task SEQ_CLS, so
  its `score` head trains too, through peft's modules_to_save), what a user can pass as
  `value_model`. TRL then reaches the backbone as `getattr(value_model, "model")`, which on a
  PeftModel resolves to the whole LoRA-injected classifier: its forward also computes the
  576->1 score on every position, a negligible extra.

Optimizer steps: `per_device_train_batch_size` = the whole rollout, `gradient_accumulation_steps`
= 1 and `num_mini_batches` = rollout / minibatch: TRL's rollout is `per_device x accumulation`
rows, its micro-batch loop slices the minibatch, so each minibatch of 8 is one backward and one
optimizer step, as on our side (16 steps per round; counted by a torch optimizer-step hook).
"""
from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (  # stdlib-only at import
    package_versions,
    peak_rss_mb,
    reset_peak_rss,
    window_peak_rss_mb,
)


def vm_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0




def merged_reward_model(spec, dtype):
    """Our reward adapter merged into a sequence classifier, our head as its `score`."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=1,
                                                               dtype=torch.float32)
    cfg = json.loads(Path(spec["reward_adapter"], "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    lora = load_file(f"{spec['reward_adapter']}/adapter_model.safetensors")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, a in lora.items():
            if ".lora_A." not in key:
                continue
            b = lora[key.replace(".lora_A.", ".lora_B.")]
            target = key.split(".lora_A.")[0].replace("base_model.model.", "", 1) + ".weight"
            params[target].add_(scale * (b.float() @ a.float()))
        head = load_file(spec["reward_head"])
        model.score.weight.copy_(head["linear.weight"])
        # LlamaForSequenceClassification's score has no bias: ours is a constant shift of every
        # score, which does not change the work done (noted in the report).
    model.config.pad_token_id = spec["pad_token_id"]
    return model.to(dtype).eval()


def lora_config(spec, task_type: str):
    from peft import LoraConfig
    lora = spec["lora"]
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=list(lora["target_modules"]), bias="none",
                      task_type=task_type)


def value_model(reward, spec, variant: str):
    value = copy.deepcopy(reward)
    if variant == "full":
        return value
    from peft import get_peft_model
    return get_peft_model(value, lora_config(spec, "SEQ_CLS"))


def ppo_args(spec, n_rows: int, dtype, bf16: bool = False):
    import torch
    from trl.experimental.ppo import PPOConfig
    c, cuda = spec["config"], torch.cuda.is_available()
    return PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-ppo-"),
        # one optimizer step per minibatch, as ours (see the module docstring)
        per_device_train_batch_size=n_rows, gradient_accumulation_steps=1,
        num_mini_batches=n_rows // c["minibatch_size"], num_ppo_epochs=c["epochs"],
        total_episodes=n_rows, response_length=c["max_new_tokens"],
        temperature=c["temperature"], stop_token="eos",
        missing_eos_penalty=-c["missing_eos_penalty"], kl_coef=c["kl_coef"],
        kl_estimator=c["kl_estimator"], vf_coef=c["vf_coef"], cliprange=c["clip_eps"],
        cliprange_value=c["value_clip_eps"], gamma=c["gamma"], lam=c["lam"],
        learning_rate=c["lr"], max_grad_norm=c["max_grad_norm"],
        local_rollout_forward_batch_size=c["generation_batch_size"], num_sample_generations=0,
        save_strategy="no", report_to=[], logging_steps=1, seed=c["seed"], use_cpu=not cuda,
        bf16=dtype == torch.bfloat16 or bf16, disable_tqdm=True,
        dataloader_num_workers=0,
        # PPOTrainer overrides train(), so it never enables checkpointing itself; stated anyway,
        # as on our side (PPOConfig.gradient_checkpointing=False)
        activation_checkpointing=c["gradient_checkpointing"])


def instrument(trainer, mod, pad_token_id: int) -> dict:
    """Phase marks, peak RSS at each phase's end, generated tokens, optimizer steps.

    generate = every `batch_generation` call; score = from the end of generation to the first
    *training* forward (the PolicyAndValueWrapper's; reference, value and reward forwards go
    through the same `forward`/`get_reward` on other modules); train = from there to the end."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    marks = {"gen_s": 0.0, "tokens": 0, "optimizer_steps": 0}
    real_generation, real_forward = mod.batch_generation, mod.forward
    real_truncate, real_backward = mod.truncate_response, trainer.accelerator.backward

    def generation(*a, **kw):
        reset_peak_rss()  # each phase's own peak: VmHWM from its start
        t0 = time.perf_counter()
        out = real_generation(*a, **kw)
        marks["gen_s"] += time.perf_counter() - t0
        marks["gen_end"] = time.perf_counter()
        marks["rss_generate"] = peak_rss_mb()
        marks["phase_rss_generate"] = max(marks.get("phase_rss_generate", 0),
                                          window_peak_rss_mb() or 0)
        reset_peak_rss()  # the score phase starts here
        return out

    def forward(model, *a, **kw):
        if "train_start" not in marks and isinstance(trainer.accelerator.unwrap_model(model),
                                                     mod.PolicyAndValueWrapper):
            marks["train_start"] = time.perf_counter()
            marks["rss_score"] = peak_rss_mb()
            marks["phase_rss_score"] = window_peak_rss_mb()
            reset_peak_rss()
        return real_forward(model, *a, **kw)

    def truncate(stop_token_id, pad, responses):  # non-pad tokens up to and including the stop
        out = real_truncate(stop_token_id, pad, responses)
        marks["tokens"] += int((out != pad_token_id).sum())
        return out

    def backward(loss, **kw):
        marks.setdefault("first_backward", time.perf_counter())
        return real_backward(loss, **kw)

    def count_step(optimizer, args, kwargs):
        if not marks["optimizer_steps"]:  # checkpointing as it is while training
            inner = trainer.accelerator.unwrap_model(trainer.model)
            marks["checkpointing"] = {"policy": checkpointing_on(inner.policy),
                                      "value": checkpointing_on(inner.value_model)}
        marks["optimizer_steps"] += 1
    mod.batch_generation, mod.forward, mod.truncate_response = generation, forward, truncate
    trainer.accelerator.backward = backward
    marks["hook"] = register_optimizer_step_post_hook(count_step)
    return marks


def checkpointing_on(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def main(spec_path: str, variant: str = "full", precision: str = "float32") -> None:
    """precision "bf16": TrainingArguments' bf16=True and, since PPOTrainer builds its own
    Accelerator without it (its precision comes from accelerate's variable, as under
    `accelerate launch --mixed_precision bf16`), ACCELERATE_MIXED_PRECISION=bf16; on a CPU both
    mean bf16 autocast over the float32 models, as our mixed_precision=bf16. The result records
    the Accelerator's own mixed_precision."""
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if precision == "bf16" else "no"
    spec = json.loads(Path(spec_path).read_text())
    import torch
    torch.set_num_threads(spec["threads"])
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.ppo import PPOTrainer
    from trl.experimental.ppo import ppo_trainer as mod
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    t_load = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(spec["model_dir"], padding_side="left")
    tok.pad_token = tok.convert_ids_to_tokens(spec["pad_token_id"])
    policy = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    reward = merged_reward_model(spec, torch.float32)
    value = value_model(reward, spec, variant)
    queries = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                       add_generation_prompt=True) for p in spec["rows"]]
    ids = [tok(q, add_special_tokens=False)["input_ids"][-spec["max_prompt_tokens"]:]
           for q in queries]
    trainer = PPOTrainer(args=ppo_args(spec, len(ids), dtype, bf16=precision == "bf16"),
                         processing_class=tok,
                         model=policy, ref_model=None, reward_model=reward,
                         train_dataset=Dataset.from_dict({"input_ids": ids}),
                         value_model=value, peft_config=lora_config(spec, "CAUSAL_LM"))
    load_s = time.perf_counter() - t_load
    rss_loaded = vm_rss_mb()
    marks = instrument(trainer, mod, tok.pad_token_id)
    # a tiny warm-up generate (kernels, allocator), as our side gets
    with torch.no_grad():
        trainer.model.policy.generate(torch.tensor([ids[0]]), max_new_tokens=2, do_sample=False,
                                      pad_token_id=tok.pad_token_id)
    marks["optimizer_steps"] = 0
    t0 = time.perf_counter()
    trainer.train()
    end = time.perf_counter()
    marks["hook"].remove()
    inner = trainer.accelerator.unwrap_model(trainer.model)
    print("RESULT " + json.dumps({
        "side": f"trl-{variant}", "variant": variant, "trl": trl.__version__,
        "wall_s": end - t0, "load_s": load_s, "threads": torch.get_num_threads(),
        "time_generate": marks["gen_s"],
        "time_score": marks["train_start"] - marks["gen_end"],
        "time_train": end - marks["train_start"],
        # the former split (to the first backward), which held the first training forward
        "time_score_to_first_backward": marks["first_backward"] - marks["gen_end"],
        "peak_rss_mb": peak_rss_mb(), "rss_after_load_mb": rss_loaded,
        "peak_rss_generate_mb": marks["rss_generate"], "peak_rss_score_mb": marks["rss_score"],
        "peak_rss_train_mb": peak_rss_mb(),
        "phase_peak_rss_generate_mb": marks.get("phase_rss_generate"),
        "phase_peak_rss_score_mb": marks.get("phase_rss_score"),
        "phase_peak_rss_train_mb": window_peak_rss_mb(),
        "tokens": marks["tokens"], "optimizer_steps": marks["optimizer_steps"],
        "trainable_params": sum(p.numel() for p in inner.parameters() if p.requires_grad),
        "value_trainable_params": sum(p.numel() for p in inner.value_model.parameters()
                                      if p.requires_grad),
        "value_model_class": type(inner.value_model).__name__,
        "gradient_checkpointing": {"args": bool(trainer.args.activation_checkpointing),
                                   **marks.get("checkpointing", {})},
        "sequences": len(ids), "device": "cuda" if cuda else "cpu",
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "versions": package_versions(("trl", "datasets")),
    }), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
