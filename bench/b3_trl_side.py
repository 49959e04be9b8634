"""B3, TRL side: `trl.RewardTrainer` (current release) in bench/.venv-trl-latest.

Self-contained (no rlhf_core). The pairs arrive pre-tokenized exactly as our `Encoder` builds
them (chat-templated user turn + response + EOS, the last `max_length` tokens), as TRL's
`chosen_ids` / `rejected_ids` columns, so both sides see identical token sequences. Model: a
sequence classifier on the same base with the same LoRA (TRL's documented peft path; its `score`
layer trains too, as our head does). Prints `RESULT {json}`.
"""
from __future__ import annotations

import json
import resource
import sys
import tempfile
import time


def encode(tok, prompt: str, response: str, max_length: int) -> list[int]:
    chat = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    ids = (tok(chat, add_special_tokens=False)["input_ids"]
           + tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    return ids[-max_length:]


def main(spec_path: str) -> None:
    spec = json.load(open(spec_path))
    import torch
    torch.set_num_threads(spec["threads"])
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer
    c, cuda = spec["config"], torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.pad_token = tok.unk_token  # as rlhf_core.models.load_tokenizer does
    enc = lambda ps: Dataset.from_dict({  # noqa: E731
        "chosen_ids": [encode(tok, p["prompt"], p["chosen"], c["max_length"]) for p in ps],
        "rejected_ids": [encode(tok, p["prompt"], p["rejected"], c["max_length"]) for p in ps]})
    train = enc([p for p in spec["train"] if p["label"] == 1.0])
    torch.manual_seed(c["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=1,
                                                               dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    lora = spec["lora"]
    peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules=lora["target_modules"], bias="none",
                             task_type="SEQ_CLS")
    args = RewardConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-rm-"), per_device_train_batch_size=c["pairs_per_step"],
        num_train_epochs=c["epochs"], learning_rate=c["lr"], lr_scheduler_type="constant",
        weight_decay=0.0, warmup_steps=0, max_grad_norm=c["max_grad_norm"],
        max_length=c["max_length"], save_strategy="no", report_to=[], logging_steps=1000,
        seed=c["seed"], use_cpu=not cuda, bf16=cuda and torch.cuda.is_bf16_supported(),
        disable_tqdm=True, dataloader_num_workers=0,
        # RewardConfig turns checkpointing on by default; our side does not checkpoint, so the
        # peer runs without it too (same work per step: issue 14's bench hygiene)
        gradient_checkpointing=False)
    trainer = RewardTrainer(model=model, args=args, train_dataset=train, processing_class=tok,
                            peft_config=peft_config)
    t0 = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - t0
    steps = out.global_step
    acc = heldout_accuracy(trainer.model, tok, spec["heldout"], c["max_length"])
    print("RESULT " + json.dumps({
        "side": "trl", "trl": trl.__version__, "pairs_per_s": len(train) * c["epochs"] / train_s,
        "train_s": train_s, "steps": steps, "train_pairs": len(train),
        "heldout_accuracy": acc, "heldout_pairs": sum(p["label"] == 1.0 for p in spec["heldout"]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def heldout_accuracy(model, tok, pairs, max_length) -> float | None:
    import torch
    pairs = [p for p in pairs if p["label"] == 1.0]
    if not pairs:
        return None
    model.eval()
    device = next(model.parameters()).device

    def score(seqs):
        out = []
        for i in range(0, len(seqs), 16):
            chunk = seqs[i:i + 16]
            T = max(map(len, chunk))
            ids = torch.full((len(chunk), T), tok.pad_token_id)
            mask = torch.zeros((len(chunk), T), dtype=torch.long)
            for j, s in enumerate(chunk):
                ids[j, :len(s)], mask[j, :len(s)] = torch.tensor(s), 1
            with torch.no_grad():
                out += model(input_ids=ids.to(device),
                             attention_mask=mask.to(device)).logits[:, 0].float().tolist()
        return out
    ch = score([encode(tok, p["prompt"], p["chosen"], max_length) for p in pairs])
    rj = score([encode(tok, p["prompt"], p["rejected"], max_length) for p in pairs])
    return sum(a > b for a, b in zip(ch, rj)) / len(pairs)


if __name__ == "__main__":
    main(sys.argv[1])
