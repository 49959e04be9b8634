"""The decode loop (rlhf_core/decoding.py): filtering, the sampler's distribution, the
hand-written loop against `model.generate` with the same sampler, adapter states, log-probs
against a forward pass, bfloat16, and the fallback for other architectures."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf_core import decoding, models
from rlhf_core.config import LoraSettings, SamplingConfig
from rlhf_core.decoding import Sampler, decode, filter_logits

INF = float("-inf")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny Llama with a `policy` LoRA adapter whose B != 0 (it changes the outputs)."""
    return tiny_with_lora(tiny_model_dir, LoraSettings().target_modules, seed=3)


def queries_of(tok, texts):
    from rlhf_core.sampling import chat_ids
    return [chat_ids(tok, t) for t in texts]


TEXTS = ["hello world", "write a short poem about the sea", "hello world", "one two"]
# the random model's next token is near uniform: with a sixth of the vocabulary as stop tokens,
# rows stop at different steps
STOPS = set(range(200, 250))


def run(model, tok, queries, *, loop: bool, seeds=(11, 12, 13, 14), record=False,
        dtype=torch.float32, n=12, temperature=0.8):
    sampler = Sampler(list(seeds)[:len(queries)], temperature, record=record)
    kw = {"max_new_tokens": n, "stop_ids": STOPS, "pad_id": tok.pad_token_id, "device": "cpu"}
    if loop:
        rows = decoding._loop(model, queries, sampler, dtype=dtype, **kw)
    else:
        rows = decoding._hf_generate(model, queries, sampler, **kw)
    return [decoding.cut_after_stop(r, STOPS) for r in rows], sampler


# -- pure parts ---------------------------------------------------------------------------------
def test_filter_logits_top_k_and_top_p_by_hand():
    # softmax([0,1,2,3]) = 0.032, 0.087, 0.237, 0.644
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert torch.equal(filter_logits(logits, top_k=2), torch.tensor([[INF, INF, 2.0, 3.0]]))
    # 0.7: 0.644 is short of it, 0.644 + 0.237 reaches it -> tokens 3 and 2
    assert torch.equal(filter_logits(logits, top_p=0.7), torch.tensor([[INF, INF, 2.0, 3.0]]))
    # 0.6: the most likely token alone reaches it
    assert torch.equal(filter_logits(logits, top_p=0.6), torch.tensor([[INF, INF, INF, 3.0]]))
    assert torch.equal(filter_logits(logits), logits)  # both off
    # per row: the order differs between rows
    two = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    assert torch.equal(filter_logits(two, top_k=1),
                       torch.tensor([[3.0, INF, INF, INF], [INF, INF, INF, 3.0]]))


def test_sampler_draws_from_the_tempered_filtered_softmax():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    n = 6000
    sampler = Sampler(list(range(n)), 0.5)
    picks = sampler.pick(logits.expand(n, 4), list(range(n)))
    freq = torch.bincount(picks, minlength=4).float() / n
    expected = torch.softmax(logits / 0.5, dim=0)  # 0.002, 0.016, 0.117, 0.865
    assert (freq - expected).abs().max() < 0.02  # 4 standard errors at n = 6000
    top2 = Sampler(list(range(n)), 1.0, top_k=2).pick(logits.expand(n, 4), list(range(n)))
    assert set(top2.tolist()) == {2, 3}
    share3 = (top2 == 3).float().mean().item()
    assert abs(share3 - math.e / (1 + math.e)) < 0.03  # renormalised over the two kept


def test_sampler_rows_are_independent_of_their_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    together = Sampler([5, 6, 7], 1.0).pick(logits, [0, 1, 2])
    alone = Sampler([5, 6, 7], 1.0).pick(logits[1:2], [1])
    assert alone.item() == together[1].item()


def test_decode_dtype_setting():
    assert decoding.decode_dtype("float32", "cpu") == torch.float32
    assert decoding.decode_dtype("bfloat16", "cpu") == torch.bfloat16
    auto = decoding.decode_dtype("auto", "cpu")
    assert auto == (torch.bfloat16 if decoding.native_bf16_cpu() else torch.float32)
    with pytest.raises(ValueError, match="decode_dtype"):
        SamplingConfig(decode_dtype="float16")


# -- the loop -----------------------------------------------------------------------------------
def test_loop_draws_what_generate_draws_with_the_same_sampler(tiny):
    """float32, a LoRA adapter with B != 0, left padding (prompts of different lengths), a
    repeated prompt (one prefill shared by two rows), rows that stop at different steps."""
    model, tok = tiny
    queries = queries_of(tok, TEXTS)
    ours, _ = run(model, tok, queries, loop=True)
    theirs, _ = run(model, tok, queries, loop=False)
    assert ours == theirs
    lengths = {len(ids) for ids, _ in ours}
    assert len(lengths) > 1 and any(stopped for _, stopped in ours)
    assert ours[0] != ours[2]  # the same prompt, its own noise


def test_float32_snapshot_reads_the_models_own_mlp_weights(tiny_model_dir):
    """No LoRA on the MLP and no dtype change: the snapshot keeps gate/up as the model's own
    tensors (no fused copy); a LoRA on them, or bf16, fuses them. The loop draws the same
    tokens as `generate` either way (test above: unfused; this one: fused with MLP LoRA)."""
    model, tok = tiny_with_lora(tiny_model_dir, ("q_proj", "v_proj", "gate_proj", "up_proj"))
    mlp = model.get_base_model().model.layers[0].mlp
    w32 = decoding.Weights(model, torch.float32)
    assert w32.layers[0].gate_up is not None  # LoRA on gate/up: merged, so fused
    plain, _ = tiny_with_lora(tiny_model_dir, ("q_proj", "v_proj"))
    pw = decoding.Weights(plain, torch.float32).layers[0]
    pm = plain.get_base_model().model.layers[0].mlp
    assert pw.gate_up is None and pw.gate is pm.gate_proj.weight and pw.up is pm.up_proj.weight
    assert decoding.Weights(plain, torch.bfloat16).layers[0].gate_up is not None
    assert mlp.gate_proj.base_layer.weight.dtype == torch.float32
    queries = queries_of(tok, TEXTS)
    ours, _ = run(model, tok, queries, loop=True)
    theirs, _ = run(model, tok, queries, loop=False)
    assert ours == theirs


def test_a_bf16_stored_base_decodes_as_a_float32_one_does_in_bf16(tiny_model_dir):
    """The frozen base's Linear weights stored in bf16 (CPU bf16 mixed precision): the bf16
    loop reads the same bf16 values it would round a float32 base to, so the draws are equal;
    where the products are prepacked (every matrix copied anyway) gate/up are fused, else the
    MLP's own bf16 tensors are read as they are (no copy)."""
    plain, tok = tiny_with_lora(tiny_model_dir, ("q_proj", "v_proj"))
    stored, _ = tiny_with_lora(tiny_model_dir, ("q_proj", "v_proj"))
    bf16 = models.DeviceSettings(torch.device("cpu"), torch.float32, "bf16")
    assert models.store_frozen_linears(stored, bf16) == 7 * 2  # 2 layers x q k v o gate up down
    mlp = stored.get_base_model().model.layers[0].mlp
    assert mlp.gate_proj.weight.dtype == torch.bfloat16
    snapshot = decoding.Weights(stored, torch.bfloat16)
    w = snapshot.layers[0]
    if snapshot.packed:
        assert w.gate_up is not None and w.gate is None  # one product instead of two
    else:
        assert w.gate_up is None and w.gate is mlp.gate_proj.weight
    queries = queries_of(tok, TEXTS)
    with plain.disable_adapter(), stored.disable_adapter():
        a, _ = run(plain, tok, queries, loop=True, dtype=torch.bfloat16)
        b, _ = run(stored, tok, queries, loop=True, dtype=torch.bfloat16)
    assert a == b and any(len(r) > 1 for r, _ in a)


def tiny_with_lora(path, targets, seed: int = 5):
    """The tiny Llama with a `policy` LoRA adapter on `targets`, its B != 0 (seeded)."""
    tok = models.load_tokenizer(str(path))
    base = models.load_causal_lm(str(path), tok)
    model = models.with_adapters(base, LoraSettings(target_modules=targets), ["policy"])
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model.eval()
    model.set_adapter("policy")
    return model, tok


def test_loop_reads_the_adapter_state_it_is_called_in(tiny):
    model, tok = tiny
    queries = queries_of(tok, TEXTS)
    with model.disable_adapter():
        base_loop, _ = run(model, tok, queries, loop=True)
        base_hf, _ = run(model, tok, queries, loop=False)
    policy_loop, _ = run(model, tok, queries, loop=True)
    assert base_loop == base_hf
    assert base_loop != policy_loop  # the adapter changes the draws: the test can fail


def test_loop_logprobs_equal_a_forward_pass(tiny):
    """What the loop records while drawing (float32) is what a forward pass over prompt +
    response computes, row by row, including rows that stopped early."""
    from rlhf_core.policy.rollout import build_rollout, policy_logprobs
    model, tok = tiny
    queries = queries_of(tok, TEXTS)
    rows, sampler = run(model, tok, queries, loop=True, record=True, temperature=0.7)
    ro = build_rollout(tok, TEXTS, queries, [r for r, _ in rows], [s for _, s in rows], "cpu")
    full, entropy = policy_logprobs(model, ro, 0.7, with_entropy=True)
    rec_lp, rec_ent = sampler.recorded()
    m = ro.mask.bool()
    T = m.shape[1]
    assert torch.allclose(rec_lp[:, :T][m], full[m], atol=1e-5)
    assert torch.allclose(rec_ent[:, :T][m], entropy[m], atol=1e-5)


@pytest.mark.parametrize("copies", [1, 8])
def test_bfloat16_loop_stays_close_to_float32(tiny, monkeypatch, copies):
    """bf16 weights (4 rows: a float32 KV cache; 32 rows: a bf16 cache and bf16 attention):
    log-probs within bf16 rounding of a float32 forward pass."""
    model, tok = tiny
    texts = TEXTS * copies
    queries = queries_of(tok, texts)
    caches = []

    class Recorded(decoding._Cache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            caches.append(self)
    monkeypatch.setattr(decoding, "_Cache", Recorded)
    rows, sampler = run(model, tok, queries, loop=True, record=True, dtype=torch.bfloat16,
                        seeds=range(11, 11 + len(texts)))
    assert len(texts) == 4 * copies and decoding.LOW_PRECISION_CACHE_ROWS == 32
    assert [c.k.dtype for c in caches] == [torch.float32 if copies == 1 else torch.bfloat16]
    from rlhf_core.policy.rollout import build_rollout, policy_logprobs
    ro = build_rollout(tok, texts, queries, [r for r, _ in rows], [s for _, s in rows], "cpu")
    full, _ = policy_logprobs(model, ro, 0.8)
    rec, _ = sampler.recorded()
    m = ro.mask.bool()
    diff = (rec[:, :m.shape[1]][m] - full[m]).abs()
    assert diff.mean() < 0.05 and diff.max() < 0.3  # bf16 rounding, not another model
    assert diff.max() > 0  # it really ran in bf16


def test_attend_bf16_cache_matches_float32_attention():
    """One decode step over a bf16 cache (grouped products, float32 softmax) = float32
    attention over the same keys and values, query heads grouped as repeat_kv does (head j
    reads kv head j // group), masked keys ignored."""
    g = torch.Generator().manual_seed(0)
    B, h, kv, S, d = 3, 6, 2, 7, 8
    q = torch.randn(B, h, 1, d, generator=g)
    k = torch.randn(B, kv, S, d, generator=g).bfloat16()
    v = torch.randn(B, kv, S, d, generator=g).bfloat16()
    bias = torch.zeros(B, 1, 1, S)
    bias[1, ..., 4:] = float("-inf")  # row 1 sees its first 4 keys only
    got = decoding._attend(q, k, v, bias)
    assert got.dtype == torch.float32 and got.shape == (B, h, 1, d)
    kf, vf = k.float().repeat_interleave(h // kv, 1), v.float().repeat_interleave(h // kv, 1)
    want = torch.softmax(q @ kf.transpose(-1, -2) / d ** 0.5 + bias, -1) @ vf  # by hand
    assert torch.allclose(got, want, atol=0.03)
    # masked keys do not count: changing them leaves row 1 as it was
    v2 = v.clone()
    v2[1, :, 4:] = 100
    assert torch.equal(decoding._attend(q, k, v2, bias)[1], got[1])
    # a float32 cache takes the fused kernel: equal to the hand computation to float32 rounding
    assert torch.allclose(decoding._attend(q, k.float(), v.float(), bias), want, atol=1e-5)


def test_decode_falls_back_to_generate_for_other_architectures():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2,
                                       n_positions=64)).eval()
    assert "gpt2" in decoding.unsupported(model)
    queries = [[1, 2, 3], [4, 5]]
    out = decode(model, queries, Sampler([1, 2], 1.0), max_new_tokens=5, stop_ids={0},
                 pad_id=39, device="cpu")
    assert len(out) == 2 and all(1 <= len(ids) <= 5 for ids, _ in out)
    again = decode(model, queries, Sampler([1, 2], 1.0), max_new_tokens=5, stop_ids={0},
                   pad_id=39, device="cpu")
    assert out == again  # seeded


def test_sampling_generate_uses_the_loop_and_is_seeded(tiny):
    from rlhf_core.sampling import generate
    model, tok = tiny
    cfg = SamplingConfig(k=2, max_new_tokens=8, batch_size=3, decode_dtype="float32")
    a = generate(model, tok, TEXTS[:2], n=2, cfg=cfg, seed=4)
    b = generate(model, tok, TEXTS[:2], n=2, cfg=cfg, seed=4)
    c = generate(model, tok, TEXTS[:2], n=2, cfg=cfg, seed=5)
    assert [[s.text for s in x] for x in a] == [[s.text for s in x] for x in b]
    assert [[s.text for s in x] for x in a] != [[s.text for s in x] for x in c]
    assert all(s.finish_reason in ("stop", "length") and 1 <= s.n_tokens <= 8
               for x in a for s in x)



def test_loop_matches_generate_on_qwen2_with_qkv_bias():
    """Another supported family: Qwen2 (biases on q/k/v, untied head), no tokenizer needed."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=128,
                                         tie_word_embeddings=False)).eval()
    with torch.no_grad():  # random biases: a loop that dropped them would draw otherwise
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    assert decoding.unsupported(model) is None
    queries = [[5, 6, 7, 8], [9, 10], [5, 6, 7, 8]]
    kw = {"max_new_tokens": 10, "stop_ids": set(range(50, 60)), "pad_id": 0, "device": "cpu"}
    ours = decoding._loop(model, queries, Sampler([1, 2, 3], 0.9), dtype=torch.float32, **kw)
    theirs = decoding._hf_generate(model, queries, Sampler([1, 2, 3], 0.9), **kw)
    stops = set(range(50, 60))
    assert ([decoding.cut_after_stop(r, stops) for r in ours]
            == [decoding.cut_after_stop(r, stops) for r in theirs])


def test_an_mlp_bias_falls_back_to_generate():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         mlp_bias=True)).eval()
    assert decoding.unsupported(model) == "MLP bias"
    out = decode(model, [[1, 2, 3]], Sampler([1], 1.0), max_new_tokens=4, stop_ids={0},
                 pad_id=39, device="cpu")
    assert 1 <= len(out[0][0]) <= 4


def test_compaction_moves_only_as_many_rows_as_stopped():
    from rlhf_core.decoding import compaction
    # rows 1 and 4 of 6 stopped: row 5 fills the hole at 1, rows 0, 2, 3 stay
    assert compaction([0, 2, 3, 5]) == ([0, 5, 2, 3], [(1, 5)])
    assert compaction([0, 1, 2]) == ([0, 1, 2], [])
    assert compaction([3]) == ([3], [(0, 3)])
    assert compaction([1, 2, 4, 5]) == ([4, 1, 2, 5], [(0, 4), (3, 5)])


def test_kv_cache_rows_expand_and_compact_in_place():
    """The decode loop's cache grows to one row per query and sheds stopped rows without a
    second copy of itself: the same storage throughout, every row's values where `order` says."""
    from rlhf_core.decoding import _Cache, compaction
    cache = _Cache(2, 5, 1, 3, 2, "cpu")
    ptr = cache.k.untyped_storage().data_ptr()
    head = cache.head(3)  # prefill of 3 distinct prompts
    head.k.copy_(torch.arange(3.0).view(1, 3, 1, 1, 1).expand_as(head.k))
    head.v.copy_(-head.k)
    cache.expand([0, 0, 1, 2, 2])  # queries A A B C C
    row = lambda c: c.k[0, :, 0, 0, 0].tolist()  # noqa: E731
    assert row(cache) == [0, 0, 1, 2, 2] and cache.v[1, :, 0, 0, 0].tolist() == [0, 0, -1, -2, -2]
    order, moves = compaction([1, 2, 4])  # rows 0 and 3 stopped
    before = row(cache)
    cache.compact(moves, 3)
    assert row(cache) == [before[j] for j in order] and cache.k.shape[1] == 3
    assert cache.k.untyped_storage().data_ptr() == ptr  # no new cache was allocated
