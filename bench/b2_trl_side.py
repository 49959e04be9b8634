"""B2, TRL side: one round of `trl.experimental.ppo.PPOTrainer` (trl==1.12.0), run in bench/.venv-trl.

Self-contained (the TRL venv has no rlhf_core). Reads a JSON spec written by b2_ppo_trl.py and
prints `RESULT {json}`: wall time split into generate / score / train, peak RSS.

Setup, as TRL 1.12 documents it for LoRA: the policy gets `peft_config` (the reference is the
policy with its adapter disabled); the value model and the reward model are separate
`AutoModelForSequenceClassification` models (TRL's `get_reward` needs `.score` on a backbone).
Our reward model (LoRA adapter + scalar head on the same base) is merged into such a model, so
both sides score with identical weights; the value model starts as a copy of it (our critic
also starts from the reward model). TRL trains the value model fully: that is its design.
"""
from __future__ import annotations

import json
import resource
import sys
import tempfile
import time


def vm_rss_mb() -> float:
    for line in open("/proc/self/status"):
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
    cfg = json.load(open(f"{spec['reward_adapter']}/adapter_config.json"))
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


def main(spec_path: str) -> None:
    spec = json.load(open(spec_path))
    import torch
    torch.set_num_threads(spec["threads"])
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as mod
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    t_load = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(spec["model_dir"], padding_side="left")
    tok.pad_token = tok.convert_ids_to_tokens(spec["pad_token_id"])
    policy = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    reward = merged_reward_model(spec, torch.float32)
    import copy
    value = copy.deepcopy(reward)
    queries = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                       add_generation_prompt=True) for p in spec["rows"]]
    ids = [tok(q, add_special_tokens=False)["input_ids"][-spec["max_prompt_tokens"]:]
           for q in queries]
    dataset = Dataset.from_dict({"input_ids": ids})
    c = spec["config"]
    out_dir = tempfile.mkdtemp(prefix="trl-ppo-")
    args = PPOConfig(
        output_dir=out_dir, per_device_train_batch_size=c["minibatch_size"],
        gradient_accumulation_steps=len(ids) // c["minibatch_size"],
        num_mini_batches=len(ids) // c["minibatch_size"], num_ppo_epochs=c["epochs"],
        total_episodes=len(ids), response_length=c["max_new_tokens"],
        temperature=c["temperature"], stop_token="eos",
        missing_eos_penalty=-c["missing_eos_penalty"], kl_coef=c["kl_coef"],
        kl_estimator=c["kl_estimator"], vf_coef=c["vf_coef"], cliprange=c["clip_eps"],
        cliprange_value=c["value_clip_eps"], gamma=c["gamma"], lam=c["lam"],
        learning_rate=c["lr"], max_grad_norm=c["max_grad_norm"],
        local_rollout_forward_batch_size=c["generation_batch_size"], num_sample_generations=0,
        save_strategy="no", report_to=[], logging_steps=1, seed=c["seed"], use_cpu=not cuda,
        bf16=dtype == torch.bfloat16, disable_tqdm=True, dataloader_num_workers=0)
    lora = LoraConfig(r=spec["lora"]["r"], lora_alpha=spec["lora"]["alpha"],
                      lora_dropout=spec["lora"]["dropout"],
                      target_modules=list(spec["lora"]["target_modules"]), bias="none",
                      task_type="CAUSAL_LM")
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None,
                         reward_model=reward, train_dataset=dataset, value_model=value,
                         peft_config=lora)
    load_s = time.perf_counter() - t_load
    rss_loaded = vm_rss_mb()

    marks = {}
    real_generation = mod.batch_generation

    def timed_generation(*a, **kw):
        t0 = time.perf_counter()
        out = real_generation(*a, **kw)
        marks.setdefault("gen_s", 0.0)
        marks["gen_s"] += time.perf_counter() - t0
        marks["gen_end"] = time.perf_counter()
        return out
    mod.batch_generation = timed_generation
    real_backward = trainer.accelerator.backward

    def timed_backward(loss, **kw):
        marks.setdefault("first_backward", time.perf_counter())
        return real_backward(loss, **kw)
    trainer.accelerator.backward = timed_backward
    # a tiny warm-up generate (kernels, allocator), as our side gets
    with torch.no_grad():
        trainer.model.policy.generate(torch.tensor([ids[0]]), max_new_tokens=2, do_sample=False,
                                      pad_token_id=tok.pad_token_id)
    t0 = time.perf_counter()
    trainer.train()
    end = time.perf_counter()
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = {
        "side": "trl", "trl": trl.__version__, "wall_s": end - t0, "load_s": load_s,
        "time_generate": marks.get("gen_s"),
        "time_score": marks["first_backward"] - marks["gen_end"],
        "time_train": end - marks["first_backward"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mb": rss_loaded, "trainable_params": n_trainable,
        "sequences": len(ids), "device": "cuda" if cuda else "cpu",
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
