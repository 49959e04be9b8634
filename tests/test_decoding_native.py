"""The native batch-1 decode step (rlhf_core/native_decode.py, csrc/decode_step.cpp): one step
against the Python `_forward` step on tiny bf16 models (Llama with LoRA, Qwen2 with q/k/v
biases and shapes that leave tails in every kernel loop), a whole seeded decode natively and in
Python, and the fallbacks (RLHF_NATIVE_DECODE=0, a failed build, other batches and dtypes).

The extension is built once per session (torch's loader reuses the cached build); the tests
skip only where there is no C++ compiler or the CPU lacks AVX512-BF16."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch

from rlhf_core import decoding, native_decode
from rlhf_core.decoding import Sampler
from tests.test_decoding import STOPS, TEXTS, queries_of, tiny_with_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def native():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the native decode step cannot be built")
    mod = native_decode.build()  # a compiler that fails to build it is a failure, not a skip
    if not mod.cpu_supported():
        pytest.skip("this CPU has no AVX512-BF16: the native step is never used here")
    return mod


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_with_lora(tiny_model_dir, ("q_proj", "v_proj", "gate_proj"), seed=3)


def odd_qwen2():
    """Qwen2 with q/k/v biases, an untied head, hidden 80 (a 16-wide tail in each 32-wide bf16
    block), head dim 20 (a 4-wide tail in the 16-wide float loops), 5 heads over 1 kv head,
    MLP 150 (not a multiple of the 4-row blocks), vocabulary 70."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=70, hidden_size=80, intermediate_size=150,
                                         num_hidden_layers=3, num_attention_heads=5,
                                         num_key_value_heads=1, max_position_embeddings=128,
                                         tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                         layer.self_attn.o_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.5)
    return model


def teacher_forced(model, prompt, steps, dtype, *, native_step: bool):
    """Prefill `prompt`, then `steps` one-token steps on the tokens the Python bf16 step picks
    by argmax (the same inputs for both paths): the list of (logits, last) of every step."""
    w = decoding.Weights(model, dtype, pack=not native_step)
    P, L = len(prompt), len(prompt) + steps + 1
    cache = decoding._Cache(len(w.layers), 1, w.n_kv, L, w.head_dim, "cpu")
    pos = torch.arange(L)[None]
    cos, sin = w.rotary(torch.zeros(1), pos)
    cos, sin = cos.float().unsqueeze(1), sin.float().unsqueeze(1)  # (1,1,L,d)
    bias = torch.zeros(1, 1, P, P).masked_fill(~torch.ones(P, P, dtype=torch.bool).tril(),
                                               float("-inf"))
    out = [decoding._forward(w, cache, torch.tensor([prompt]), 0, cos[..., :P, :],
                             sin[..., :P, :], bias)]
    key_bias = torch.zeros(1, 1, 1, L)
    step = native_decode.Step(w) if native_step else None
    if step is not None:
        step.bind(cache.k, cache.v, cos[0, 0], sin[0, 0], key_bias[0, 0, 0])
    tokens = FORCED.setdefault((id(model), tuple(prompt)), [])
    for t in range(steps):
        at = P + t
        if len(tokens) <= t:  # the Python run (first) chooses the forced tokens
            tokens.append(int(out[-1][0].argmax()))
        if step is not None:
            out.append(step(tokens[t], at))
        else:
            out.append(decoding._forward(w, cache, torch.tensor([[tokens[t]]]), at,
                                         cos[..., at:at + 1, :], sin[..., at:at + 1, :],
                                         key_bias[..., :at + 1]))
    return out


FORCED: dict = {}


@pytest.mark.parametrize("which", ["llama_lora", "qwen2_bias"])
def test_native_step_equals_the_python_step_within_bf16_rounding(native, tiny, which):
    """Logits and last hidden state of 20 teacher-forced steps: native vs the Python bf16 step.
    Both round every product's input and output to bf16; they differ only in the order of the
    float32 sums inside the products (and in the norms' and softmax's sums), so an output can
    land one bf16 step (2^-8 relative) apart and that carries on through the layers. The
    tolerance: no larger than the distance between the Python step in bf16 and in float32 (the
    rounding bf16 decoding accepts anyway), and the same argmax at every step. (On these tiny
    models the two agree exactly, measured; the tolerance is for larger sums.) On two threads
    the native step gives the same bits as on one."""
    if which == "llama_lora":
        model, tok = tiny
        prompt = queries_of(tok, ["write a short poem about the sea"])[0]
    else:
        model, prompt = odd_qwen2(), [5, 6, 7, 8, 9, 10, 11]
    steps = 20
    py = teacher_forced(model, prompt, steps, torch.bfloat16, native_step=False)
    nat = teacher_forced(model, prompt, steps, torch.bfloat16, native_step=True)
    f32 = teacher_forced(model, prompt, steps, torch.float32, native_step=False)
    torch.set_num_threads(2)  # the step split over two threads: every sum in the same order
    try:
        two = teacher_forced(model, prompt, steps, torch.bfloat16, native_step=True)
    finally:
        torch.set_num_threads(1)
    for t in range(1, steps + 1):
        (lp, hp), (ln, hn), (lf, hf) = py[t], nat[t], f32[t]
        assert ln.shape == lp.shape and hn.shape == hp.shape and ln.dtype == torch.float32
        bf16_gap = (lp - lf).abs().max().item()
        assert (ln - lp).abs().max().item() <= max(bf16_gap, 1e-2), t
        assert (hn - hp).abs().max().item() <= max((hp - hf).abs().max().item(), 1e-2), t
        assert ln.argmax().item() == lp.argmax().item(), t
        assert torch.equal(two[t][0], ln) and torch.equal(two[t][1], hn), t


def run(model, tok, *, n=24, seed=7, record=True):
    """A seeded batch-1 bf16 decode of `n` tokens (no stop tokens: every step runs)."""
    sampler = Sampler([seed], 0.8, record=record)
    rows = decoding._loop(model, queries_of(tok, ["hello world"]), sampler, max_new_tokens=n,
                          stop_ids=set(), pad_id=tok.pad_token_id, device="cpu",
                          dtype=torch.bfloat16)
    return rows[0], sampler


def test_a_seeded_batch1_decode_draws_the_same_tokens_natively(native, tiny, monkeypatch):
    """The same seeded draws and (to bf16 rounding) the same recorded log-probs. Exact token
    equality holds because a draw flips only where two tokens' logit + Gumbel noise come
    within the paths' logit difference (~1e-3 here) of each other; the draws below are checked
    on this machine and deterministic (every output sums in a fixed order on any thread
    count), the log-prob comparison is the part that holds anywhere."""
    model, tok = tiny
    calls = []
    real = native_decode.Step

    class Counting(real):
        def __call__(self, token, at):
            calls.append(at)
            return super().__call__(token, at)
    monkeypatch.setattr(native_decode, "Step", Counting)
    for seed in (7, 8, 9):
        ours, s_native = run(model, tok, seed=seed)
        with monkeypatch.context() as m:
            m.setenv("RLHF_NATIVE_DECODE", "0")
            theirs, s_python = run(model, tok, seed=seed)
        assert ours == theirs and len(ours) == 24
        lp_n, _ = s_native.recorded()
        lp_p, _ = s_python.recorded()
        assert torch.allclose(lp_n, lp_p, atol=2e-2)
    assert calls  # the native step ran


def test_native_step_is_off_by_env_for_batches_and_float32(native, tiny, monkeypatch):
    """RLHF_NATIVE_DECODE=0, more than one row, float32: the Python step on packed weights."""
    model, tok = tiny
    monkeypatch.setattr(native_decode, "Step", None)  # calling it would fail the decode
    monkeypatch.setenv("RLHF_NATIVE_DECODE", "0")
    assert not native_decode.eligible(1, "cpu", torch.bfloat16)
    out, _ = run(model, tok, n=6)
    assert len(out) == 6
    monkeypatch.delenv("RLHF_NATIVE_DECODE")
    assert native_decode.eligible(1, "cpu", torch.bfloat16)
    assert not native_decode.eligible(2, "cpu", torch.bfloat16)
    assert not native_decode.eligible(1, "cpu", torch.float32)
    queries = queries_of(tok, TEXTS[:2])
    rows = decoding._loop(model, queries, Sampler([1, 2], 0.8), max_new_tokens=6, stop_ids=STOPS,
                          pad_id=tok.pad_token_id, device="cpu", dtype=torch.bfloat16)
    assert len(rows) == 2


def test_a_failed_build_warns_once_and_decodes_in_python(native, tiny, monkeypatch, caplog):
    model, tok = tiny
    expected, _ = run(model, tok, n=8)

    def broken(verbose=False):
        raise RuntimeError("Error building extension 'rlhf_decode_step'")
    monkeypatch.setattr(native_decode, "_module", None)
    monkeypatch.setattr(native_decode, "_failure", None)
    monkeypatch.setattr(native_decode, "build", broken)
    with caplog.at_level(logging.WARNING, logger="rlhf_core.native_decode"):
        first, _ = run(model, tok, n=8)
        second, _ = run(model, tok, n=8)
    assert first == second == expected  # the Python step draws what the native one drew
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "Error building" in warnings[0].getMessage()
