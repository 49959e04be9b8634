"""The batch-1 bf16 decode step in C++ (`csrc/decode_step.cpp`), for `decoding._loop`.

At batch 1 a token is bound by reading the weights once (269 MB in bf16 for the embedded
SmolLM2-135M), yet the Python step (`decoding._forward`) spent 12.1 ms a token here: 5.6-5.8 ms
in its 121 prepacked oneDNN products and the rest in ~1,000 small torch ops at 2-3 us each.
The extension runs the whole step (embedding row -> layers -> final norm -> LM head) in one
call: its own AVX512-BF16 matrix-vector product over the snapshot's unpacked bf16 matrices, the
small ops as plain loops, the products split by rows over `torch.get_num_threads()` threads.

Measured here (2 cores, the embedded model, a LoRA policy adapter, 64 forced tokens; the
machine was noisy: read bandwidth 48-73 GB/s between runs): the step 4.6-5.5 ms (the LM head
alone reads at 78-87 GB/s on two threads, 35-37 on one); a whole batch-1 decode 6.7-7.3 ms a
token against 13.3-14.2 for the Python step in the same runs (B1 `--batch1`), of which the
weight snapshot ~0.6 ms (40 ms a call, allocated per call, over a float32-stored base; 23-33
ms over the bf16-stored base the worker holds, `models.store_frozen_linears`), the prefill
(still `_forward`, on unpacked matrices: 28-38 ms against 25-28 packed) ~0.5 ms and the sampler
0.2 ms. The Python step's 1.2-1.9x from oneDNN's prepacked layout is not needed here: this
product reads the plain row-major matrices at bandwidth, and skipping the packing saves
~60 ms a call.

It is compiled on first use with `torch.utils.cpp_extension.load` into
~/.cache/rlhf-loop/torch_extensions/<torch version>-<python version> (or $RLHF_EXTENSIONS_DIR),
never at import time; `build()` compiles it ahead (setup, tests). The kernels carry their own
target attributes and the module checks the CPU at run time, so the build flags are portable
(-O3 -fopenmp, no -march=native). A failed build or a CPU without AVX512-BF16 logs one warning
and the loop keeps its Python step; RLHF_NATIVE_DECODE=0 turns the native step off.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "decode_step.cpp"
_lock = threading.Lock()
_module = None
_failure: str | None = None  # why the extension is unavailable (once known)


def enabled() -> bool:
    """RLHF_NATIVE_DECODE=0 (or false/no/off) turns the native step off."""
    return os.environ.get("RLHF_NATIVE_DECODE", "1").strip().lower() not in ("0", "false", "no",
                                                                             "off")


def build_dir() -> Path:
    root = os.environ.get("RLHF_EXTENSIONS_DIR") or Path.home() / ".cache" / "rlhf-loop" / \
        "torch_extensions"
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    return Path(root) / tag.replace("+", "_")


def build(verbose: bool = False):
    """Compile (or load the cached build of) the extension; returns the module, raises on a
    failed build. torch's loader rebuilds when the source or flags change and serialises
    concurrent builds with a lock file in the build directory."""
    global _module, _failure
    with _lock:
        if _module is not None:
            return _module
        from torch.utils import cpp_extension
        path = build_dir()
        path.mkdir(parents=True, exist_ok=True)
        _module = cpp_extension.load(name="rlhf_decode_step", sources=[str(SOURCE)],
                                     extra_cflags=["-O3", "-fopenmp"],
                                     extra_ldflags=["-fopenmp"], build_directory=str(path),
                                     verbose=verbose)
        _failure = None
        return _module


def module():
    """The extension, built on first call; None (one warning logged) if it cannot be built or
    this CPU lacks AVX512-BF16."""
    global _failure
    if _module is None and _failure is None:
        log.info("loading the native decode step (compiled once per torch version: ~20 s the "
                 "first time unless `make setup` built it)")
        try:
            build()
            if not _module.cpu_supported():
                _failure = "this CPU has no AVX512-BF16"
        except Exception as e:  # no compiler, a failed build: the Python step still works
            _failure = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e) else ''}"
        if _failure is not None:
            log.warning("native decode step unavailable, decoding in Python: %s", _failure)
    return _module if _failure is None else None


def eligible(rows: int, device, dtype: torch.dtype) -> bool:
    """Whether `_loop` decodes with the native step: one row, on CPU, in bf16, not turned off,
    and the extension available (building it on the first eligible call)."""
    return (enabled() and rows == 1 and torch.device(device).type == "cpu"
            and dtype == torch.bfloat16 and module() is not None)


class Step:
    """The native step over an unpacked bf16 `decoding.Weights` snapshot. `bind` a decode's
    KV cache (row 0) and rotary/key-bias rows, then `step(token, position)` -> float32 logits
    (1,V) and the final normed hidden state (1,H), the same contract as `_forward` for one
    token of one row."""

    def __init__(self, weights):
        if weights.packed or weights.dtype != torch.bfloat16:
            raise ValueError("the native step reads unpacked bf16 weights")
        layers = []
        for ly in weights.layers:
            if ly.gate_up is not None:  # fused rows: gate then up (contiguous views)
                inter = ly.gate_up.shape[0] // 2
                gate, up = ly.gate_up[:inter], ly.gate_up[inter:]
            else:
                gate, up = ly.gate.to(torch.bfloat16), ly.up.to(torch.bfloat16)
            layers.append({"ln1": ly.ln1, "ln2": ly.ln2, "qkv": ly.qkv, "qkv_bias": ly.qkv_bias,
                           "o": ly.o, "o_bias": ly.o_bias, "gate": gate.contiguous(),
                           "up": up.contiguous(), "down": ly.down.contiguous()})
        embed = weights.embed.detach()
        if embed.dtype not in (torch.float32, torch.bfloat16):
            embed = embed.float()
        self._step = module().Step(embed.contiguous(), weights.norm.contiguous(),
                                   weights.lm_head.contiguous(), layers, weights.n_heads,
                                   weights.n_kv, weights.head_dim, float(weights.eps))

    def bind(self, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             key_bias: torch.Tensor) -> None:
        """k, v (layers, rows, kv heads, L, head dim) float32 (row 0 is read and written);
        cos, sin (L, head dim) float32; key_bias (L,) float32."""
        self._step.bind(k, v, cos.contiguous(), sin.contiguous(), key_bias.contiguous())

    def __call__(self, token: int, at: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._step.step(int(token), int(at))


def step_or_none(weights) -> Step | None:
    """A `Step` over `weights`, or None (one warning) if it refuses them: the Python step."""
    try:
        return Step(weights)
    except Exception as e:  # a layout the extension does not take
        log.warning("native decode step refused the weights (%s): decoding in Python", e)
        return None


if __name__ == "__main__":  # `python -m rlhf_core.native_decode`: build ahead (make setup)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    mod = module()
    print(f"native decode step: {'ready' if mod is not None else 'unavailable (' + _failure + ')'}"
          f" ({build_dir()})")
