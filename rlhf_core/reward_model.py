"""The reward model: Bradley-Terry on ranked pairs, retrained incrementally, gated, versioned.

Architecture. By default a `reward` LoRA adapter plus a `ScalarHead` on the policy's own
base (one set of base weights in memory): score = head(final hidden state at the last real
token, the EOS closing the assistant turn). With `config.reward_model` set, a separate
sequence-classification model (one label) is loaded once into `runtime.reward_base`; it
gets LoRA adapters too (not a full fine-tune: the same lean, safetensors-only version
format, and warm starts stay cheap) and its own `score` layer seeds our scalar head.

A round reads as a checklist (`train_reward`):
  1. select pairs: new train pairs + replay, held-out prompts, fresh pairs (reward_data)
  2. evaluate the current version on held-out and fresh pairs (before it is replaced)
  3. warm-start a candidate from the current adapter + head (first version: from scratch)
  4. fit: Bradley-Terry (+ soft ties, margin, centering), one step per few whole rankings
  5. evaluate the candidate; the promotion gate compares held-out accuracy
  6. publish atomically (adapter, head, manifest), then the DB row, LAST
Dropout stays off throughout (`eval()`): scores are deterministic and a warm start is exact.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf_core import checkpoints, models, reward_data
from rlhf_core.config import RewardConfig, from_dict, to_dict
from rlhf_core.jobs import handler
from rlhf_core.losses import bradley_terry_loss, reward_centering_loss, soft_bradley_terry_loss
from rlhf_core.reward_data import PrefPair, RewardData, RewardDataError  # noqa: F401 (re-export)
from rlhf_core.store import Store, now_iso

log = logging.getLogger(__name__)

SERVING = "reward"  # adapter (and head) name of the promoted version
CANDIDATE = "reward_candidate"  # the version being trained
INIT_ADAPTER = "_unused"  # a separate reward base's placeholder adapter (peft needs one)
ADAPTER_SUBDIR = "reward"


# -- the network: body + LoRA adapter + scalar head ------------------------------------------
@dataclass
class Backbone:
    """The PeftModel a reward adapter lives in, with its tokenizer and bookkeeping."""
    model: Any
    tokenizer: Any
    shares_base: bool
    source: str
    loaded: dict  # adapter name -> version loaded into it
    heads: dict  # adapter name -> ScalarHead
    device: Any
    pad_id: int
    init_head: dict | None = None  # a separate classifier's own `score` weights


def backbone(runtime) -> Backbone:
    if runtime.config.reward_model is None:
        model = runtime.model
        return Backbone(model, runtime.tokenizer, True, runtime.config.model, runtime.loaded,
                        runtime.heads, runtime.device.device, _pad_id(model, runtime.tokenizer))
    if runtime.reward_base is None:
        source = models.resolve_model_source(runtime.config.reward_model, runtime.workspace)
        tok = models.load_tokenizer(source)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(runtime.config.reward.seed)  # a fresh `score` layer is seeded
            clf = models.load_sequence_classifier(source, tok, dtype=runtime.device.dtype,
                                                  device=runtime.device.device)
        score = getattr(clf, "score", None)
        init = ({k: v.detach().float().cpu().clone() for k, v in score.state_dict().items()}
                if isinstance(score, torch.nn.Linear) and score.out_features == 1 else None)
        model = models.with_classifier_adapters(clf, runtime.config.lora, [INIT_ADAPTER])
        model.eval()
        runtime.reward_base = Backbone(model, tok, False, runtime.config.reward_model, {}, {},
                                       runtime.device.device, _pad_id(model, tok), init)
    return runtime.reward_base


def _pad_id(model, tokenizer) -> int:
    # Padded positions are masked out; any in-vocabulary id will do (a separate classifier
    # is not resized for a pad token its tokenizer had to add).
    vocab = model.get_input_embeddings().num_embeddings
    pad = tokenizer.pad_token_id
    return pad if pad is not None and pad < vocab else tokenizer.eos_token_id


def _body(model):
    """The transformer without its LM/classification head (saves the vocab projection)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix)


def forward_scores(model, head, input_ids, attention_mask) -> torch.Tensor:
    """(B,T) token ids, either padding side -> (B,) rewards, read at the last real token."""
    attention_mask = attention_mask.long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B,T) padding-independent
    hidden = _body(model)(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=False).last_hidden_state  # (B,T,H)
    last = models.last_token_index(attention_mask)  # (B,)
    return head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])  # (B,)


@contextlib.contextmanager
def using_adapter(model, name: str, trainable: list | None = None):
    """Compute as adapter `name` in eval mode; only `trainable` params get gradients.
    The previous active adapter, requires_grad flags and train/eval mode are restored."""
    prev, was_training = model.active_adapter, model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.set_adapter(name)
    model.eval()  # dropout off, whether scoring or training
    if trainable is not None:
        keep = {id(p) for p in trainable}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    try:
        yield model
    finally:
        if prev in model.peft_config:
            model.set_adapter(prev)
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad_(flags[n])
        model.train(was_training)


class Encoder:
    """prompt (chat template, one user turn) + response as the assistant turn + EOS -> ids."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length
        self._prompts: dict[str, list[int]] = {}

    def __call__(self, prompt: str, response: str) -> list[int]:
        tok = self.tokenizer
        if prompt not in self._prompts:
            chat = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            self._prompts[prompt] = tok(chat, add_special_tokens=False)["input_ids"]
        ids = (self._prompts[prompt] + tok(response, add_special_tokens=False)["input_ids"]
               + [tok.eos_token_id])
        return ids[-self.max_length:]  # too long: drop the prompt's start, keep the scored end


def collate(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B,T) right-padded
    mask = torch.zeros((len(seqs), T), dtype=torch.long)  # (B,T)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def score_sequences(bb: Backbone, adapter: str, head, seqs: list[list[int]],
                    batch_size: int = 16) -> list[float]:
    """Scores of token sequences, batched by length (less padding), in input order."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [0.0] * len(seqs)
    with using_adapter(bb.model, adapter):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = collate([seqs[i] for i in idx], bb.pad_id, bb.device)
            for i, s in zip(idx, forward_scores(bb.model, head, ids, mask).float().tolist()):
                out[i] = s
    return out


# -- serving a version ------------------------------------------------------------------------
@dataclass
class RewardScorer:
    """A loaded reward version. `score_ids` expects ids from `runtime.tokenizer` when
    `shares_base`; with a separate reward base use `score_texts`."""
    runtime: Any
    backbone: Backbone
    version: int
    adapter_name: str
    head: models.ScalarHead
    path: Path
    max_length: int = 320
    _encoder: Encoder | None = field(default=None, repr=False)

    @property
    def shares_base(self) -> bool:
        return self.backbone.shares_base

    def _ready(self):
        if self.backbone.loaded.get(self.adapter_name) != self.version:
            # The serving slot moved on to a newer version: keep scoring as ours, in its own slot.
            self.adapter_name = f"reward@v{self.version}"
            if self.backbone.loaded.get(self.adapter_name) == self.version:
                self.head = self.backbone.heads[self.adapter_name]
            else:
                self.head = _load_into(self.backbone, self.version, self.path, self.adapter_name)

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,T) ids and mask (left or right padded) -> (B,) float32 rewards."""
        with self.runtime.lock:
            self._ready()
            with using_adapter(self.backbone.model, self.adapter_name):
                return forward_scores(self.backbone.model, self.head,
                                      input_ids.to(self.backbone.device),
                                      attention_mask.to(self.backbone.device)).float()

    def score_texts(self, prompts: list[str], responses: list[str],
                    batch_size: int = 16) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return []
        self._encoder = self._encoder or Encoder(self.backbone.tokenizer, self.max_length)
        seqs = [self._encoder(p, r) for p, r in zip(prompts, responses)]
        with self.runtime.lock:
            self._ready()
            return score_sequences(self.backbone, self.adapter_name, self.head, seqs, batch_size)


def load_reward(runtime, version: int | None = None) -> RewardScorer:
    """The promoted reward version (or `version`), loaded once and reused.

    A missing or corrupt version directory raises ModelLoadError before any loaded adapter is
    touched, so whatever version was serving keeps serving.
    """
    store = runtime.store
    current = store.current_version("reward")
    row = current if version is None else store.get_version("reward", int(version))
    if row is None:
        raise models.ModelLoadError(
            "no reward model has been promoted yet: train one first (a train_reward job)"
            if version is None else f"reward version {version} does not exist")
    v = row["version"]
    name = SERVING if current and current["version"] == v else f"reward@v{v}"
    bb = backbone(runtime)
    with runtime.lock:
        if bb.loaded.get(name) == v and name in bb.heads:
            head = bb.heads[name]
        else:
            head = _load_into(bb, v, Path(row["path"] or ""), name)
    return RewardScorer(runtime, bb, v, name, head, Path(row["path"]),
                        runtime.config.reward.max_length)


def _load_into(bb: Backbone, version: int, path: Path, name: str, *, trainable=False):
    head = check_version_dir(path, version, models.hidden_size(bb.model), bb.device)
    models.load_adapter(bb.model, name, path / ADAPTER_SUBDIR, trainable=trainable)
    bb.loaded[name] = version
    bb.heads[name] = head
    return head


def check_version_dir(path: Path, version: int, hidden_size: int, device="cpu"):
    """Validate a published version (manifest, adapter, head) fully; return its head."""
    from safetensors.torch import load_file
    what = f"reward version {version} ({path})"
    if not str(path) or not path.is_dir():
        raise models.ModelLoadError(f"{what}: the directory is missing; the previous version "
                                    "keeps serving")
    try:
        checkpoints.read_manifest(path)
        load_file(str(path / ADAPTER_SUBDIR / "adapter_model.safetensors"))  # reads every byte
        (path / ADAPTER_SUBDIR / "adapter_config.json").read_text()
    except Exception as exc:  # missing file, truncated or foreign bytes, bad JSON
        raise models.ModelLoadError(f"{what} is incomplete or corrupt: {exc}; the previous "
                                    "version keeps serving") from None
    head = models.load_head(path, hidden_size, device=device)
    head.eval()
    return head


# -- training ---------------------------------------------------------------------------------
class _Progress:
    """reporter.progress when run as a job, a tqdm bar on a terminal otherwise."""

    def __init__(self, reporter):
        self.reporter, self.bar = reporter, None
        if reporter is None:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=100, desc="reward", disable=None, leave=False)

    def __call__(self, fraction: float, message: str) -> None:
        if self.reporter is not None:
            self.reporter.progress(fraction, message)
        elif self.bar is not None:
            self.bar.n = int(100 * fraction)
            self.bar.set_postfix_str(message, refresh=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def train_reward(runtime, *, reporter=None, config: RewardConfig | None = None,
                 from_scratch: bool = False) -> dict:
    """Train, evaluate, gate and publish the next reward version.

    Returns {"version", "status": "promoted"|"rejected", "reason", "metrics", "counts", "path"}.
    Raises RewardDataError (too few pairs, all ties, nothing new) before touching any model.
    """
    cfg, store = config or runtime.config.reward, runtime.store
    progress = _Progress(reporter)
    try:
        with runtime.lock:
            return _train_round(runtime, store, cfg, reporter, progress, from_scratch)
    finally:
        progress.close()


def _train_round(runtime, store: Store, cfg: RewardConfig, reporter, progress, from_scratch):
    progress(0.0, "selecting pairs")
    current = store.current_version("reward")
    version = store.next_version_number("reward")
    incremental = current is not None and not from_scratch
    max_trained = int(current["counts"].get("max_pair_id", 0)) if current else 0
    data = reward_data.select_data(
        reward_data.load_pairs(store), max_trained=max_trained, replay_ratio=cfg.replay_ratio,
        soft_ties=cfg.soft_ties, min_pairs=cfg.min_pairs, seed=cfg.seed + version,
        incremental=incremental)
    bb = backbone(runtime)
    before, clock = {}, _Clock()
    if current is not None:
        progress(0.05, f"evaluating the current version v{current['version']}")
        serving = load_reward(runtime)
        before = evaluate(bb, serving.adapter_name, serving.head, data, cfg)
    clock.lap("eval_current_seconds")
    head = _prepare_candidate(runtime, bb, current if incremental else None, cfg, version)
    try:
        fit_stats = fit(bb, head, data.train, cfg, seed=cfg.seed + version, progress=progress,
                        reporter=reporter, version=version)
        clock.lap("prepare_and_fit_seconds")
        progress(0.85, "evaluating the candidate")
        after = evaluate(bb, CANDIDATE, head, data, cfg)
        clock.lap("eval_candidate_seconds")
        status, reason = promotion_gate(after, before, current, cfg.promote_tolerance)
        metrics = {**_flat(after, ""), **_flat(before, "current_"), **fit_stats, **clock.laps}
        progress(0.95, f"publishing v{version} ({status})")
        manifest = {"kind": "reward", "version": version, "status": status, "reason": reason,
                    "parent": current["version"] if incremental else None,
                    "base_model": bb.source, "shares_base": bb.shares_base,
                    "config": to_dict(cfg), "lora": to_dict(runtime.config.lora),
                    "counts": data.counts, "metrics": metrics, "created_at": now_iso()}
        path = publish_candidate(runtime, bb, head, version, manifest)
    finally:
        if CANDIDATE in bb.model.peft_config:
            bb.model.delete_adapter(CANDIDATE)
    store.add_version("reward", version, status=status, path=str(path), reason=reason,
                      parent=manifest["parent"], base_model=bb.source, config=to_dict(cfg),
                      metrics=metrics, counts=data.counts,
                      job_id=getattr(reporter, "job_id", None))
    if reporter is not None:
        reporter.metrics("reward", metrics, version=version)
    if status == "promoted":
        load_reward(runtime)  # serve it now (and prove the published copy loads)
    progress(1.0, f"reward v{version} {status}")
    return {"version": version, "status": status, "reason": reason, "metrics": metrics,
            "counts": data.counts, "path": str(path)}


class _Clock:
    def __init__(self):
        self.laps, self._t = {}, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self._t = now - self._t, now


def _flat(groups: dict, prefix: str) -> dict:
    return {f"{prefix}{g}_{k}": v for g, vals in groups.items() for k, v in vals.items()}


def _prepare_candidate(runtime, bb: Backbone, warm_from: dict | None, cfg: RewardConfig,
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


def _step(bb: Backbone, head, pairs: list[PrefPair], cfg: RewardConfig, encoder: Encoder):
    """Loss of one step; each distinct response is scored once (K responses give K(K-1)/2 pairs)."""
    texts = {}
    for p in pairs:
        texts[p.chosen_id], texts[p.rejected_id] = (p.prompt, p.chosen), (p.prompt, p.rejected)
    rids = sorted(texts)
    ids, mask = collate([encoder(*texts[r]) for r in rids], bb.pad_id, bb.device)
    scores = forward_scores(bb.model, head, ids, mask)  # (U,)
    pos = {r: i for i, r in enumerate(rids)}
    chosen = scores[[pos[p.chosen_id] for p in pairs]]  # (N,)
    rejected = scores[[pos[p.rejected_id] for p in pairs]]  # (N,)
    labels = torch.tensor([p.label for p in pairs], dtype=scores.dtype, device=scores.device)
    gaps = torch.tensor([p.tier_gap for p in pairs], dtype=scores.dtype, device=scores.device)
    loss = pair_loss(chosen, rejected, labels, gaps, cfg)
    strict = labels == 1.0
    acc = (chosen[strict] > rejected[strict]).float().mean().item() if strict.any() else None
    return loss, acc


# -- evaluation and the promotion gate ----------------------------------------------------------
def evaluate(bb: Backbone, adapter: str, head, data: RewardData, cfg: RewardConfig) -> dict:
    """{"heldout": metrics, "fresh": metrics} (see reward_data.pair_metrics)."""
    texts = {}
    for p in data.heldout + data.fresh:
        texts[p.chosen_id], texts[p.rejected_id] = (p.prompt, p.chosen), (p.prompt, p.rejected)
    rids = sorted(texts)
    encoder = Encoder(bb.tokenizer, cfg.max_length)
    values = score_sequences(bb, adapter, head, [encoder(*texts[r]) for r in rids],
                             cfg.eval_batch_size)
    scores = dict(zip(rids, values))
    return {"heldout": reward_data.pair_metrics(data.heldout, scores),
            "fresh": reward_data.pair_metrics(data.fresh, scores)}


def promotion_gate(after: dict, before: dict, current: dict | None,
                   tolerance: float) -> tuple[str, str]:
    """Promote unless held-out accuracy fell more than `tolerance` below the current's
    (both measured now, on the same held-out pairs)."""
    acc = after["heldout"].get("accuracy")
    if current is None:
        return "promoted", "first reward version" + (f" (held-out accuracy {acc:.3f})"
                                                     if acc is not None else "")
    cur = before.get("heldout", {}).get("accuracy")
    if acc is None or cur is None:
        return "promoted", "no held-out pairs to compare on: promoted without the accuracy gate"
    if acc < cur - tolerance:
        return "rejected", (f"held-out accuracy {acc:.3f} is worse than v{current['version']}'s "
                            f"{cur:.3f} by more than the tolerance {tolerance}; "
                            f"v{current['version']} keeps serving")
    return "promoted", (f"held-out accuracy {acc:.3f} vs v{current['version']}'s {cur:.3f} "
                        f"(tolerance {tolerance})")


def publish_candidate(runtime, bb: Backbone, head, version: int, manifest: dict) -> Path:
    """vNNNN/: reward/adapter_model.safetensors + adapter_config.json, score_head.safetensors,
    version.json. A directory without a DB row (a worker died after the rename) is set aside."""
    final = checkpoints.version_dir(runtime.workspace, "reward", version)
    if final.exists() and runtime.store.get_version("reward", version) is None:
        os.replace(final, final.with_name(f".orphan-{final.name}-{int(time.time())}"))

    def write(tmp: Path) -> None:
        models.save_adapter(bb.model, CANDIDATE, tmp)
        os.replace(tmp / CANDIDATE, tmp / ADAPTER_SUBDIR)
        models.save_head(head, tmp, meta={"kind": "reward", "version": version})

    return checkpoints.publish(runtime.workspace, "reward", version, write, manifest)


# -- history, jobs --------------------------------------------------------------------------------
def reward_history(store: Store) -> list[dict]:
    """Per version, oldest first: what the UI's accuracy-history table shows."""
    out = []
    for v in store.list_versions("reward"):
        m, c = v["metrics"], v["counts"]
        out.append({
            "version": v["version"], "status": v["status"], "reason": v["reason"],
            "created_at": v["created_at"], "parent": v["parent"],
            "heldout_accuracy": m.get("heldout_accuracy"), "heldout_loss": m.get("heldout_loss"),
            "fresh_accuracy": m.get("fresh_accuracy"),
            "fresh_accuracy_before": m.get("current_fresh_accuracy"),  # the serving version's
            "mean_p_chosen": m.get("heldout_mean_p_chosen"),
            "observed_p_chosen": m.get("heldout_observed_p_chosen"),
            "ece": m.get("heldout_ece"),
            "train_pairs": c.get("train_pairs"), "new_pairs": c.get("new_pairs"),
            "heldout_pairs": c.get("heldout_pairs"), "fresh_pairs": c.get("fresh_pairs"),
        })
    return out


def reward_config(base: RewardConfig, params: dict) -> RewardConfig:
    """`base` with a job's overrides (top-level keys or a "config" dict) applied."""
    overrides = {**{k: v for k, v in params.items() if k in RewardConfig.__dataclass_fields__},
                 **(params.get("config") or {})}
    return from_dict(RewardConfig, {**to_dict(base), **overrides})


@handler("train_reward")
def train_reward_job(runtime, params: dict, reporter) -> dict:
    cfg = reward_config(runtime.config.reward, params or {})
    return train_reward(runtime, reporter=reporter, config=cfg,
                        from_scratch=bool((params or {}).get("from_scratch")))


@handler("score")
def score_job(runtime, params: dict, reporter) -> dict:
    """Score texts ({"prompts", "responses"}) or stored responses ({"response_ids"} or
    {"item_ids"}: then also each item's agreement with its latest active ranking)."""
    scorer = load_reward(runtime, params.get("version"))
    store, out = runtime.store, {"version": scorer.version}
    if params.get("item_ids") or params.get("response_ids"):
        rows = _stored_responses(store, params)
        scores = scorer.score_texts([r["prompt"] for r in rows], [r["text"] for r in rows])
        by_id = {r["id"]: s for r, s in zip(rows, scores)}
        out.update(response_ids=[r["id"] for r in rows], scores=scores)
        if params.get("item_ids"):
            out["items"] = [_agreement(store, int(i), by_id) for i in params["item_ids"]]
    else:
        out["scores"] = scorer.score_texts(list(params.get("prompts", [])),
                                           list(params.get("responses", [])))
    reporter.progress(1.0, f"scored {len(out['scores'])} responses with reward v{scorer.version}")
    return out


def _stored_responses(store: Store, params: dict) -> list[dict]:
    sql = ("SELECT r.id, r.item_id, r.text, p.text AS prompt FROM responses r "
           "JOIN prompts p ON p.id = r.prompt_id WHERE ")
    if params.get("item_ids"):
        ids = [int(i) for i in params["item_ids"]]
        sql += f"r.item_id IN ({','.join('?' * len(ids))}) ORDER BY r.item_id, r.position"
    else:
        ids = [int(i) for i in params["response_ids"]]
        sql += f"r.id IN ({','.join('?' * len(ids))}) ORDER BY r.id"
    return store.rows(sql, ids)


def _agreement(store: Store, item_id: int, scores: dict[int, float]) -> dict:
    pairs = store.rows("SELECT chosen_id, rejected_id FROM active_pairs p JOIN rankings r "
                       "ON r.id = p.ranking_id WHERE r.item_id = ? AND p.label = 1.0", [item_id])
    agree = sum(scores.get(p["chosen_id"], 0) > scores.get(p["rejected_id"], 0) for p in pairs)
    return {"item_id": item_id, "pairs": len(pairs),
            "agreement": agree / len(pairs) if pairs else None}
