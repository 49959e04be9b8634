"""The reward network and serving a version: backbone, scoring, loading and validation.

By default a `reward` LoRA adapter plus a `ScalarHead` on the policy's own base (one set of base
weights in memory): score = head(final hidden state at the last real token, the EOS closing the
assistant turn). With `config.reward_model` set, a separate sequence-classification model (one
label) is loaded once into `runtime.reward_base`; it gets LoRA adapters too and its own `score`
layer seeds our scalar head. Training a version is reward_train.py / reward_model.py.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf_core import checkpoints, models
from rlhf_core.advantages import last_token_index
from rlhf_core.sampling import chat_ids

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
    settings: Any = None  # the runtime's models.DeviceSettings: its autocast for every forward

    def autocast(self):
        return models.autocast(self.settings)


def backbone(runtime) -> Backbone:
    if runtime.config.reward_model is None:
        model = runtime.model
        return Backbone(model, runtime.tokenizer, True, runtime.config.model, runtime.loaded,
                        runtime.heads, runtime.device.device, _pad_id(model, runtime.tokenizer),
                        settings=runtime.device)
    if runtime.reward_base is None:
        source = models.resolve_model_source(runtime.config.reward_model, runtime.workspace)
        tok = models.load_tokenizer(source, system_prompt=runtime.config.system_prompt)
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
                                       runtime.device.device, _pad_id(model, tok), init,
                                       settings=runtime.device)
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


def shared_start(input_ids, attention_mask) -> int:
    """Tokens every row starts with at column 0 (right-padded rows: the chat template's system
    prompt and role markers), leaving each row at least one of its own; 0 for left-padded
    rows of different lengths, a single row, or under models.MIN_SHARED_PREFIX shared."""
    n = int(attention_mask.sum(dim=1).min()) - 1
    if (input_ids.shape[0] < 2 or n < models.MIN_SHARED_PREFIX
            or not bool(attention_mask[:, :n].all())):
        return 0
    return models.common_prefix_len(input_ids[:, :n])


def forward_scores(model, head, input_ids, attention_mask, *,
                   prefix_cache: bool = True) -> torch.Tensor:
    """(B,T) token ids, either padding side -> (B,) rewards, read at the last real token.

    With `prefix_cache` the tokens every row starts with (`shared_start`) run once at batch 1,
    with gradients when enabled, and the rows attend to copies of their keys and values: the
    same numbers as one call over the whole rows (tests/test_reward_prefix.py), for ~20% fewer
    token passes on the embedded model's chat template (24 shared tokens of ~125)."""
    attention_mask = attention_mask.long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B,T) padding-independent
    body = _body(model)
    last = last_token_index(attention_mask)  # (B,)
    S = (shared_start(input_ids, attention_mask)
         if prefix_cache and not getattr(body, "gradient_checkpointing", False) else 0)
    if S:
        cache = models.prefix_cache(body, input_ids[:1, :S], input_ids.shape[0])
        hidden = body(input_ids=input_ids[:, S:], attention_mask=attention_mask,
                      position_ids=position_ids[:, S:], use_cache=True,
                      **{models.cache_arg(body): cache}).last_hidden_state  # (B,T-S,H)
        last = last - S
    else:
        hidden = body(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids, use_cache=False).last_hidden_state  # (B,T,H)
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
            self._prompts[prompt] = chat_ids(tok, prompt)
        ids = (self._prompts[prompt] + tok(response, add_special_tokens=False)["input_ids"]
               + [tok.eos_token_id])
        return ids[-self.max_length:]  # too long: drop the prompt's start, keep the scored end


def collate(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = models.pad_sequences(seqs, pad_id)  # (B,T) right-padded
    return ids.to(device), mask.to(device)


@torch.no_grad()
def score_sequences(bb: Backbone, adapter: str, head, seqs: list[list[int]],
                    batch_size: int = 16, prefix_cache: bool = True) -> list[float]:
    """Scores of token sequences, batched by length (less padding), in input order."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [0.0] * len(seqs)
    with using_adapter(bb.model, adapter), bb.autocast():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = collate([seqs[i] for i in idx], bb.pad_id, bb.device)
            scores = forward_scores(bb.model, head, ids, mask, prefix_cache=prefix_cache)
            for i, s in zip(idx, scores.float().tolist()):
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
            with using_adapter(self.backbone.model, self.adapter_name), self.backbone.autocast():
                return forward_scores(
                    self.backbone.model, self.head, input_ids.to(self.backbone.device),
                    attention_mask.to(self.backbone.device),
                    prefix_cache=self.runtime.config.reward.prefix_cache).float()

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
            return score_sequences(self.backbone, self.adapter_name, self.head, seqs, batch_size,
                                   self.runtime.config.reward.prefix_cache)


def load_reward(runtime, version: int | None = None) -> RewardScorer:
    """The promoted reward version (or `version`), loaded once and reused.

    A missing or corrupt version directory raises ModelLoadError before any loaded adapter is
    touched, so whatever version was serving keeps serving.
    """
    data = runtime.data
    current = data.current_version("reward")
    row = current if version is None else data.get_version("reward", int(version))
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
