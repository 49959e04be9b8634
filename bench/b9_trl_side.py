"""B9, TRL side: one round of TRL's GRPOTrainer, RLOOTrainer or OnlineDPOTrainer (bench/.venv-trl-latest).

Self-contained (the TRL venv has no rlhf_core; only stdlib at import time, so the project's
import test can load it). Reads the JSON spec written by b9_algorithms_trl.py and an algorithm
name; prints `RESULT {json}`: the round's seconds (trainer.train()), generation seconds, tokens
generated, optimizer steps (a global torch step hook), peak RSS, the venv's versions.

Each trainer gets what TRL documents for LoRA: the base policy with `peft_config` (the reference
is the policy with its adapter disabled) and a sequence-classifier reward model (our reward
adapter merged into the base, our head as its `score`: b2_trl_side.merged_reward_model).
Settings that TRL defaults differently from ours are set to ours: gradient checkpointing off,
the spec's precision (float32, or bf16 autocast over the float32 models with `bf16=True` when
the spec says "bf16", as ours), dropout off, constant learning rate, Adam eps 1e-5, no weight
decay.
"""
from __future__ import annotations

import json
import resource
import sys
import tempfile
import time

from bench.common import package_versions  # stdlib-only at import


def count_generation(stop_ids: set[int]) -> dict:
    """Wrap transformers' generate(): the seconds it takes, the sequences and the tokens it
    generates (each row up to and including its first stop token, as ours counts them)."""
    from transformers.generation.utils import GenerationMixin
    stats = {"seconds": 0.0, "sequences": 0, "tokens": 0, "calls": 0, "stopped": 0}
    real = GenerationMixin.generate

    def generate(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        t0 = time.perf_counter()
        out = real(self, *args, **kwargs)
        stats["seconds"] += time.perf_counter() - t0
        seqs = out.sequences if hasattr(out, "sequences") else out
        for row in seqs[:, ids.shape[1]:].tolist():
            n = next((i + 1 for i, t in enumerate(row) if t in stop_ids), None)
            stats["tokens"] += n or len(row)
            stats["stopped"] += n is not None
        stats["sequences"] += seqs.shape[0]
        stats["calls"] += 1
        return out
    GenerationMixin.generate = generate
    return stats


def record_scores(reward) -> list[float]:
    """The reward model's raw scores over the round (a sanity check that it scores sensibly;
    without our head's bias, so a constant below ours)."""
    scores: list[float] = []
    reward.register_forward_hook(
        lambda module, args, out: scores.extend(out.logits[:, 0].float().tolist()))
    return scores


def count_optimizer_steps(model=None) -> dict:
    from torch.optim.optimizer import register_optimizer_step_post_hook
    steps = {"n": 0, "checkpointing": None}

    def hook(optimizer, args, kwargs):
        steps["n"] += 1
        if steps["n"] == 1 and model is not None:  # the layers' state while training
            steps["checkpointing"] = checkpointing_active(model)
    register_optimizer_step_post_hook(hook)
    return steps


def checkpointing_active(model) -> bool:
    """True when any layer recomputes its activations (transformers' own flag per layer)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def common_args(spec: dict, out_dir: str) -> dict:
    """TrainingArguments shared by the three trainers, set to our side's settings."""
    c = spec["config"]
    return {"output_dir": out_dir, "learning_rate": c["lr"], "lr_scheduler_type": "constant",
            "warmup_steps": 0, "weight_decay": 0.0, "adam_epsilon": 1e-5,
            "max_grad_norm": c["max_grad_norm"], "seed": c["seed"], "use_cpu": True,
            "bf16": spec.get("mixed_precision") == "bf16", "gradient_checkpointing": False,
            "disable_dropout": True,
            "save_strategy": "no", "report_to": [], "logging_steps": 1000, "disable_tqdm": True,
            "dataloader_num_workers": 0, "temperature": c["temperature"], "top_p": 1.0,
            "top_k": 0}


def missing_eos_reward(stop_ids: set[int], penalty: float):
    """Our missing-EOS penalty as a TRL reward function (GRPO/RLOO have no such option)."""
    def missing_eos(completion_ids, **kwargs):
        return [0.0 if ids and ids[-1] in stop_ids else penalty for ids in completion_ids]
    return missing_eos


def build_trainer(algorithm: str, spec: dict, tok, policy, reward, lora, dataset):
    c, G = spec["config"], spec["group_size"]
    stop_ids = set(spec["stop_ids"])
    n_seq = len(spec["prompts"]) * G
    mb = c["minibatch_size"]
    out_dir = tempfile.mkdtemp(prefix=f"trl-{algorithm}-")
    if algorithm in ("grpo", "rloo"):
        if n_seq % mb:
            raise ValueError(f"{n_seq} sequences do not split into minibatches of {mb}")
        steps_per_generation = n_seq // mb
        group = dict(per_device_train_batch_size=mb, gradient_accumulation_steps=1,
                     steps_per_generation=steps_per_generation, num_generations=G,
                     num_iterations=c["epochs"], max_steps=c["epochs"] * steps_per_generation,
                     max_completion_length=c["max_new_tokens"], beta=c["kl_coef"],
                     epsilon=c["clip_eps"], mask_truncated_completions=False,
                     remove_unused_columns=False, log_completions=False,
                     reward_weights=[1.0, 1.0], **common_args(spec, out_dir))
        rewards = [reward, missing_eos_reward(stop_ids, c["missing_eos_penalty"])]
        if algorithm == "grpo":
            from trl import GRPOConfig, GRPOTrainer
            args = GRPOConfig(scale_rewards="group" if c["grpo_scale"] == "std" else "none",
                              loss_type="bnpo", use_bias_correction_kl=False,
                              importance_sampling_level="token", **group)
            cls = GRPOTrainer
        else:
            from trl import RLOOConfig, RLOOTrainer
            args = RLOOConfig(normalize_advantages=False, **group)
            cls = RLOOTrainer
        return cls(model=policy, reward_funcs=rewards, args=args, train_dataset=dataset,
                   processing_class=tok, reward_processing_classes=[tok, None],
                   peft_config=lora)
    if algorithm == "dpo":
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
        args = OnlineDPOConfig(per_device_train_batch_size=max(1, mb // 2),
                               gradient_accumulation_steps=1, num_train_epochs=c["epochs"],
                               max_new_tokens=c["max_new_tokens"], beta=c["dpo_beta"],
                               loss_type="sigmoid", missing_eos_penalty=-c["missing_eos_penalty"],
                               **common_args(spec, out_dir))
        return OnlineDPOTrainer(model=policy, reward_funcs=reward, args=args,
                                train_dataset=dataset, processing_class=tok,
                                reward_processing_classes=tok, peft_config=lora)
    raise ValueError(f"unknown algorithm {algorithm!r}")


def main(spec_path: str, algorithm: str) -> None:
    with open(spec_path) as fh:
        spec = json.load(fh)
    import os
    # the Accelerator the trainer builds reads this as well as `bf16` (as B2's TRL side)
    os.environ["ACCELERATE_MIXED_PRECISION"] = ("bf16" if spec.get("mixed_precision") == "bf16"
                                                else "no")
    import torch
    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.b2_trl_side import merged_reward_model
    tok = AutoTokenizer.from_pretrained(spec["model_dir"], padding_side="left")
    tok.pad_token = tok.convert_ids_to_tokens(spec["pad_token_id"])  # ours (not EOS)
    policy = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    reward = merged_reward_model(spec, torch.float32)
    lo = spec["lora"]
    lora = LoraConfig(r=lo["r"], lora_alpha=lo["alpha"], lora_dropout=lo["dropout"],
                      target_modules=list(lo["target_modules"]), bias="none",
                      task_type="CAUSAL_LM")
    # our chat-templated prompt texts (system prompt included), as plain-text prompts
    dataset = Dataset.from_dict({"prompt": spec["prompt_texts"]})
    trainer = build_trainer(algorithm, spec, tok, policy, reward, lora, dataset)
    with torch.no_grad():  # a tiny warm-up generate (kernels, allocator), as our side gets
        ids = tok("hello", return_tensors="pt")["input_ids"]
        trainer.model.generate(input_ids=ids, max_new_tokens=2, do_sample=False,
                               pad_token_id=tok.pad_token_id)
    gen = count_generation(set(spec["stop_ids"]))
    steps = count_optimizer_steps(trainer.model)
    scores = record_scores(reward)
    t0 = time.perf_counter()
    out = trainer.train()
    round_s = time.perf_counter() - t0
    print("RESULT " + json.dumps({
        "side": "trl", "algorithm": algorithm, "round_s": round_s, "threads": spec["threads"],
        "optimizer_steps": steps["n"], "global_step": out.global_step,
        "checkpointing_while_training": steps["checkpointing"],
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "decode_dtype": str(next(trainer.model.parameters()).dtype),
        "sequences": gen["sequences"], "tokens_generated": gen["tokens"],
        "generate_calls": gen["calls"], "time_generate": gen["seconds"],
        "stop_rate": gen["stopped"] / max(1, gen["sequences"]),
        "reward_model_mean": sum(scores) / len(scores) if scores else None,
        "reward_model_scored": len(scores),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "versions": package_versions(("trl", "datasets"))}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
