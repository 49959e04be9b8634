"""Training one reward candidate: prepare (warm start or fresh), fit, evaluate, gate, publish.

The steps `reward_model.train_reward` runs in order; the candidate lives in the CANDIDATE adapter
of the reward backbone until it is published (or discarded).
"""
from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path

import torch

from rlhf_core import checkpoints, models
from rlhf_core.config import RewardConfig
from rlhf_core.evaluation import wilson_interval
from rlhf_core.losses import bradley_terry_loss, reward_centering_loss, soft_bradley_terry_loss
from rlhf_core.reward import data as reward_data
from rlhf_core.reward.data import PrefPair, RewardData
from rlhf_core.reward.model import (
    ADAPTER_SUBDIR,
    CANDIDATE,
    Backbone,
    Encoder,
    check_version_dir,
    collate,
    forward_scores,
    score_sequences,
    using_adapter,
)


# -- the candidate: warm start or fresh, then fit ------------------------------------------------
def prepare_candidate(runtime, bb: Backbone, warm_from: dict | None, cfg: RewardConfig,
                      version: int) -> models.ScalarHead:
    """The candidate adapter + head: a copy of `warm_from` (trainable), else fresh and seeded."""
    if CANDIDATE in bb.model.peft_config:
        bb.model.delete_adapter(CANDIDATE)
    hidden = models.hidden_size(bb.model)
    if warm_from is not None:
        path = Path(warm_from["path"] or "")
        head = check_version_dir(path, warm_from["version"], hidden, bb.device)
        models.load_adapter(bb.model, CANDIDATE, path / ADAPTER_SUBDIR, trainable=True)
        return head
    seed = cfg.seed + version
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA A's init draws from the global generator
        models.add_lora_adapter(bb.model, CANDIDATE, runtime.config.lora)
    head = models.ScalarHead(hidden, cfg.head_init_std, seed)
    if bb.init_head is not None:  # a separate classifier: start from its own score layer
        with torch.no_grad():
            head.linear.weight.copy_(bb.init_head["weight"])
            if "bias" in bb.init_head:
                head.linear.bias.copy_(bb.init_head["bias"])
    return head.to(bb.device)


def pair_loss(chosen, rejected, labels, tier_gaps, cfg: RewardConfig) -> torch.Tensor:
    """Mean over a step's pairs of BT (strict, optional tier margin) and soft BT (ties)."""
    strict = labels == 1.0  # (N,)
    n = labels.numel()
    loss = chosen.new_zeros(())
    if strict.any():
        margin = (cfg.margin_scale * (tier_gaps[strict] - 1).clamp(min=0)
                  if cfg.use_margin else None)  # adjacent tiers: no margin
        bt = bradley_terry_loss(chosen[strict], rejected[strict], margin)
        loss = loss + strict.sum() / n * bt
    if (~strict).any():
        loss = loss + (~strict).sum() / n * soft_bradley_terry_loss(
            chosen[~strict], rejected[~strict], labels[~strict])
    if cfg.center_coef:
        loss = loss + reward_centering_loss(chosen, rejected, cfg.center_coef)
    return loss


def fit(bb: Backbone, head, pairs: list[PrefPair], cfg: RewardConfig, *, seed: int,
        progress, reporter=None, version: int | None = None) -> dict:
    """AdamW on the candidate adapter + head; each step holds whole rankings only."""
    model, rng = bb.model, random.Random(seed)
    epochs = [reward_data.ranking_steps(pairs, cfg.rankings_per_step, rng)
              for _ in range(cfg.epochs)]
    total = sum(len(e) for e in epochs)
    if total == 0:
        raise ValueError(f"nothing to train: {len(pairs)} pairs, {cfg.epochs} epochs")
    params = [p for n, p in model.named_parameters() if f".{CANDIDATE}." in n]
    params += list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    encoder, step, losses, t0 = Encoder(bb.tokenizer, cfg.max_length), 0, [], time.perf_counter()
    with using_adapter(model, CANDIDATE, trainable=params):
        for epoch, steps in enumerate(epochs):
            for batch in steps:
                loss, acc = _step(bb, head, batch, cfg, encoder)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                step += 1
                losses.append(loss.item())
                progress(0.15 + 0.7 * step / total, f"epoch {epoch + 1}/{cfg.epochs} "
                         f"step {step}/{total} loss {losses[-1]:.3f}")
                if reporter is not None:
                    reporter.metrics("reward_train", {"loss": losses[-1], "accuracy": acc},
                                     step=step, version=version)
    seconds = time.perf_counter() - t0
    passes = len(pairs) * cfg.epochs
    return {"train_loss_first": losses[0], "train_loss_last": losses[-1], "train_steps": step,
            "train_seconds": seconds, "train_pairs_per_s": passes / seconds if seconds else 0.0}


# A training pass's fixed cost in token-equivalents, for splitting a step's rows by length
# (reward_data.length_chunks): the shared prefix runs again, every layer is one more call and
# fewer rows multiply less efficiently. Measured (bench/reward_chunks.py, embedded model, 2
# cores, bf16 autocast): at 256, answers like labeling batches (median 87, p90 417 tokens)
# train 1.86-2.15x faster than one padded pass, answers of 16-64 tokens 0.98x; at 64, 1.96x /
# 0.87x; at 1024, 1.76x / 0.99x
PASS_OVERHEAD_TOKENS = 256


def _step(bb: Backbone, head, pairs: list[PrefPair], cfg: RewardConfig, encoder: Encoder):
    """Loss of one step; each distinct response is scored once (K responses give K(K-1)/2 pairs)."""
    texts = {}
    for p in pairs:
        texts[p.chosen_id], texts[p.rejected_id] = (p.prompt, p.chosen), (p.prompt, p.rejected)
    rids = sorted(texts)
    seqs = [encoder(*texts[r]) for r in rids]
    # rows of similar length share a pass (less padding); the same scores and gradients as
    # one pass over every row (tests/test_reward_prefix.py)
    chunks = reward_data.length_chunks([len(s) for s in seqs], PASS_OVERHEAD_TOKENS)
    parts = []
    with bb.autocast():
        for idx in chunks:
            ids, mask = collate([seqs[i] for i in idx], bb.pad_id, bb.device)
            parts.append(forward_scores(bb.model, head, ids, mask, prefix_cache=cfg.prefix_cache))
    scores = torch.cat(parts)  # (U,) float32, in the passes' order
    pos = {rids[i]: k for k, i in enumerate(i for idx in chunks for i in idx)}
    chosen = scores[[pos[p.chosen_id] for p in pairs]]  # (N,)
    rejected = scores[[pos[p.rejected_id] for p in pairs]]  # (N,)
    labels = torch.tensor([p.label for p in pairs], dtype=scores.dtype, device=scores.device)
    gaps = torch.tensor([p.tier_gap for p in pairs], dtype=scores.dtype, device=scores.device)
    loss = pair_loss(chosen, rejected, labels, gaps, cfg)
    strict = labels == 1.0
    acc = (chosen[strict] > rejected[strict]).float().mean().item() if strict.any() else None
    return loss, acc


# -- evaluation and the promotion gate ----------------------------------------------------------
def evaluate(bb: Backbone, adapter: str, head, data: RewardData, cfg: RewardConfig, *,
             version: int | None = None, cache: dict | None = None) -> dict:
    """{"heldout": metrics, "fresh": metrics} (see reward_data.pair_metrics).

    `cache` (with `version`): scores of this version's responses from an earlier evaluation in
    this worker, keyed (version, max_length, response id); only the missing ones are scored,
    and the cache keeps this version's scores for the next round (when the candidate evaluated
    now serves, its held-out scores are what the next round's "current" evaluation needs)."""
    texts = {}
    for p in data.heldout + data.fresh:
        texts[p.chosen_id], texts[p.rejected_id] = (p.prompt, p.chosen), (p.prompt, p.rejected)
    rids = sorted(texts)
    use = cache is not None and version is not None
    known = {r: cache[(version, cfg.max_length, r)] for r in rids
             if (version, cfg.max_length, r) in cache} if use else {}
    todo = [r for r in rids if r not in known]
    encoder = Encoder(bb.tokenizer, cfg.max_length)
    values = score_sequences(bb, adapter, head, [encoder(*texts[r]) for r in todo],
                             cfg.eval_batch_size, cfg.prefix_cache) if todo else []
    scores = known | dict(zip(todo, values))
    if use:
        cache.update({(version, cfg.max_length, r): v for r, v in zip(todo, values)})
    return {"heldout": reward_data.pair_metrics(data.heldout, scores),
            "fresh": reward_data.pair_metrics(data.fresh, scores)}


def keep_cached_versions(cache: dict, versions: set) -> None:
    """Drop cached scores of every reward version but `versions`."""
    for key in [k for k in cache if k[0] not in versions]:
        del cache[key]


def promotion_gate(after: dict, before: dict, current: dict | None,
                   cfg: RewardConfig) -> tuple[str, str]:
    """("promoted" | "rejected", reason naming the evidence and the rule).

    A version serves (and drives PPO) only with evidence that it beats a coin flip: at least
    `promote_min_heldout_pairs` strict held-out pairs, and the low end of the Wilson interval
    on its held-out accuracy at or above `promote_min_accuracy`. A later version must also not
    be worse than the current one (both measured now, on the same held-out pairs) by more than
    `promote_tolerance`.
    """
    held = after.get("heldout", {})
    acc, n = held.get("accuracy"), int(held.get("strict_pairs") or 0)
    lo, hi = wilson_interval(acc * n, n, cfg.promote_z) if acc is not None else (0.0, 1.0)
    need, floor = cfg.promote_min_heldout_pairs, cfg.promote_min_accuracy
    shown = (f"held-out accuracy {acc:.3f} on {n} pairs (at least {need} needed), "
             f"{_level(cfg.promote_z)} interval [{lo:.3f}, {hi:.3f}]" if acc is not None
             else f"no strict held-out pairs (at least {need} needed)")
    keeps = f"; v{current['version']} keeps serving" if current else ""
    if n < need:
        return "rejected", (f"not enough evidence: {shown} (promote_min_heldout_pairs); "
                            f"rank more items{keeps}")
    cur = before.get("heldout", {}).get("accuracy") if current else None
    if cur is not None and acc is not None and acc < cur - cfg.promote_tolerance:
        return "rejected", (f"{shown} is worse than v{current['version']}'s {cur:.3f} by more "
                            f"than the tolerance {cfg.promote_tolerance} (promote_tolerance)"
                            f"{keeps}")
    if lo < floor:
        return "rejected", (f"not better than chance yet: {shown} reaches below {floor} "
                            f"(promote_min_accuracy){keeps}")
    if current is None:
        return "promoted", f"first reward version, {shown}: at or above {floor}"
    if cur is None:  # no held-out pairs, and the gate asks for none
        return "promoted", "no held-out pairs to compare on: promoted without the accuracy gate"
    return "promoted", (f"{shown}: at or above {floor}; v{current['version']} had {cur:.3f} "
                        f"on the same pairs (tolerance {cfg.promote_tolerance})")


def _level(z: float) -> str:
    """The two-sided confidence of a normal z as a label: 1.96 -> "95%"."""
    return f"{math.erf(z / math.sqrt(2)):.0%}"


def publish_candidate(runtime, bb: Backbone, head, version: int, manifest: dict) -> Path:
    """vNNNN/: reward/adapter_model.safetensors + adapter_config.json, score_head.safetensors,
    version.json (rlhf_core.checkpoints.publish: one protocol for every kind of version)."""
    def write(tmp: Path) -> None:
        models.save_adapter(bb.model, CANDIDATE, tmp)
        os.replace(tmp / CANDIDATE, tmp / ADAPTER_SUBDIR)
        models.save_head(head, tmp, meta={"kind": "reward", "version": version})

    return checkpoints.publish(runtime.workspace, "reward", version, write, manifest,
                               recorded=runtime.data.get_version)
