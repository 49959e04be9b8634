"""Decoding: the token loop behind every sampler (labeling batches, held-out evaluation, arena
answers, policy rollouts).

`decode` turns prompt token lists into response token lists (each cut after its first stop
token, the stop token kept), drawing every token with a `Sampler`. Llama-family models (llama,
mistral, qwen2) run a hand-written loop instead of `model.generate`:

- the weights are read once per call into a snapshot: the *effective* weights of the active
  LoRA adapter merged in (or the base's when adapters are disabled), q/k/v and gate/up fused
  into one matrix each, cast to the decode dtype;
- a preallocated KV cache; the prompt is prefilled once per distinct prompt (K samples of one
  prompt share it) and the rows that have stopped leave the batch, so a long answer does not
  carry finished ones along;
- the decode dtype: bfloat16 where the hardware multiplies it natively (CUDA, or a CPU with
  AVX512-BF16 / AMX), which halves the bytes read per token — batch-1 decoding is bound by
  reading the weights — and float32 elsewhere. A batch of 32 or more rows keeps its KV cache
  in the decode dtype too (`_attend`); norms, softmax, the residual stream and the logits stay
  float32. In float32 the loop's log-probs equal a forward pass's (tests);
- one row in bf16 on CPU: the decode steps (not the prefill) run in C++, the whole step in one
  call (`native_decode`, built on first use; RLHF_NATIVE_DECODE=0 or a failed build: the
  Python step).

Anything else (another architecture, DoRA, a LoRA bias, a sliding window shorter than the
sequence) falls back to `model.generate` with the same sampler as a logits processor, so every
model works, only slower.

Sampling is Gumbel-max: argmax(logits / temperature + Gumbel noise), after top-k / top-p
filtering, is an exact draw from the filtered softmax. The noise comes from one seeded
generator per row, so a row's tokens do not depend on which other rows share its batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf_core import native_decode
from rlhf_core.advantages import entropy_from_logp
from rlhf_core.models import native_bf16_cpu, pad_sequences

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ARCHITECTURES = ("llama", "mistral", "qwen2")


# -- sampling ----------------------------------------------------------------------------------
def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(b,V) logits with every token outside the top-k and outside the top-p nucleus at -inf.
    The nucleus is the smallest set of most likely tokens whose probability reaches `top_p`
    (the most likely token always stays)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (b,1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (b,V)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # (b,V) mass of the more likely tokens
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class Sampler:
    """Draws each row's next token from softmax(filtered logits / temperature), one seeded
    generator per row. With `record=True` it keeps, per row, the log-prob (at `temperature`,
    unfiltered: the policy's own) and entropy of every token it draws: a rollout's old
    log-probs without a second forward pass. With a `value_head` it also keeps the head's value
    of the hidden state that produced each draw's logits (the loop passes it; `model.generate`
    cannot, so `recorded_values` is then None)."""

    def __init__(self, seeds: list[int], temperature: float, *, top_k: int = 0,
                 top_p: float = 1.0, record: bool = False, device="cpu", value_head=None):
        self.temperature, self.top_k, self.top_p, self.record = temperature, top_k, top_p, record
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.logprobs: list[list[torch.Tensor]] = [[] for _ in seeds]  # per row, per step ()
        self.entropy: list[list[torch.Tensor]] = [[] for _ in seeds]
        self.value_head = value_head
        self.values: list[list[torch.Tensor]] = [[] for _ in seeds]
        self.drawn = [0 for _ in seeds]  # tokens drawn per row

    def pick(self, logits: torch.Tensor, rows: list[int],
             hidden: torch.Tensor | None = None) -> torch.Tensor:
        """(b,V) logits of the rows `rows` -> (b,) token ids; `hidden` (b,H) the final hidden
        states the logits came from (for `value_head`)."""
        for r in rows:
            self.drawn[r] += 1
        if self.value_head is not None and hidden is not None:
            v = self.value_head(hidden).float()  # (b,)
            for j, r in enumerate(rows):
                self.values[r].append(v[j])
        scaled = logits.float() / self.temperature  # (b,V)
        # the noise in one (b,V) buffer, in place: a full-vocabulary tensor per step instead
        # of five (at 64 rows each is 12.6 MB for the embedded model; the transients made up
        # most of a rollout's growth in memory while decoding). Each row's values are its own
        # generator's next V uniforms, as torch.rand(V, generator=...) draws them.
        noise = torch.empty_like(scaled)
        for j, r in enumerate(rows):
            noise[j].uniform_(generator=self.generators[r])  # uniform [0,1)
        noise.clamp_(1e-20, 1.0 - 1e-7).log_().neg_().log_().neg_()  # Gumbel(0,1)
        picked = noise.add_(filter_logits(scaled, self.top_k, self.top_p)).argmax(dim=-1)  # (b,)
        del noise
        if self.record:
            logp = torch.log_softmax(scaled, dim=-1)  # (b,V)
            chosen = logp.gather(-1, picked[:, None]).squeeze(-1)  # (b,)
            ent = entropy_from_logp(logp)  # (b,)
            for j, r in enumerate(rows):
                self.logprobs[r].append(chosen[j])
                self.entropy[r].append(ent[j])
        return picked

    def __call__(self, input_ids, scores):
        """A transformers logits processor for greedy `generate`: every token but the draw at
        -inf, so greedy decoding takes the draw."""
        picked = self.pick(scores, list(range(scores.shape[0])))
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, picked[:, None], 0.0)

    def recorded_values(self) -> torch.Tensor | None:
        """(B,steps) values of the drawn tokens' preceding states, right-padded with 0; None
        unless every draw had its hidden state (the hand-written loop, with a value head)."""
        if self.value_head is None or any(len(v) != n for v, n in zip(self.values, self.drawn)):
            return None
        return _table(self.values, range(len(self.values)))

    def recorded(self, rows: range | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,steps) log-probs and entropies of the drawn tokens, each row right-padded with 0."""
        rows = range(len(self.logprobs)) if rows is None else rows
        return _table(self.logprobs, rows), _table(self.entropy, rows)


def _table(per_row: list[list[torch.Tensor]], rows) -> torch.Tensor:
    """(len(rows), longest) float32 on CPU: the rows' per-step scalars, right-padded with 0."""
    out = torch.zeros(len(rows), max([len(per_row[r]) for r in rows] + [1]))
    for i, r in enumerate(rows):
        if per_row[r]:
            out[i, :len(per_row[r])] = torch.stack(per_row[r]).float().cpu()
    return out


# -- the dtype ---------------------------------------------------------------------------------
def decode_dtype(setting: str, device) -> torch.dtype:
    """`sampling.decode_dtype` -> a dtype: "auto" = bfloat16 on CUDA or a CPU with native bf16
    (bandwidth-bound decoding reads half the bytes), float32 elsewhere."""
    if setting != "auto":
        return DTYPES[setting]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and native_bf16_cpu() else torch.float32


# -- the loop ----------------------------------------------------------------------------------
def _effective(module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (out,in), bias) a Linear computes now: a LoRA layer's base weight plus the active
    adapters' deltas (none while adapters are disabled); None for what the loop cannot merge."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return (module.weight, module.bias) if isinstance(module, torch.nn.Linear) else None
    if not isinstance(base, torch.nn.Linear):
        return None
    weight = base.weight
    if not module.disable_adapters and not module.merged:
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            if module.use_dora.get(name) or module.lora_bias.get(name):
                return None
            weight = weight + module.get_delta_weight(name)
    return weight, base.bias


def unsupported(model, total_len: int | None = None) -> str | None:
    """Why the hand-written loop cannot run this model (None: it can)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = inner.config
    if cfg.model_type not in ARCHITECTURES:
        return f"architecture {cfg.model_type!r}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return "pretraining_tp"
    if getattr(cfg, "mlp_bias", False):
        return "MLP bias"
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and (total_len or 0) > window:
        return "sequence longer than the sliding window"
    body = getattr(inner, "model", None)
    if body is None or not hasattr(body, "rotary_emb") or not hasattr(body, "layers"):
        return "layout"
    head = inner.get_output_embeddings()
    if _effective(head) is None or getattr(head, "bias", None) is not None:
        return "output layer"
    if not isinstance(body.embed_tokens, torch.nn.Embedding):
        return "embedding"
    for layer in body.layers:
        a, m = layer.self_attn, layer.mlp
        for mod in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            if _effective(mod) is None:
                return "a LoRA variant the loop does not merge (DoRA, LoRA bias)"
        if hasattr(a, "q_norm") or hasattr(a, "k_norm"):
            return "q/k norms"
    return None


def _cat_bias(mats, out_sizes):
    biases = [b for _, b in mats]
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else torch.zeros(n, device=mats[0][0].device)
                      for b, n in zip(biases, out_sizes)])


def _cat_rows(mats: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """torch.cat(mats).to(dtype) in one pass: each matrix cast into its rows of the result (the
    same values, without the concatenated copy in the source dtype)."""
    out = torch.empty(sum(m.shape[0] for m in mats), mats[0].shape[1], dtype=dtype,
                      device=mats[0].device)
    row = 0
    for m in mats:
        out[row:row + m.shape[0]].copy_(m)
        row += m.shape[0]
    return out


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: torch.Tensor  # (q+k+v, H) decode dtype
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor | None  # (2I, H); None: gate and up kept apart, as the model's own
    down: torch.Tensor  # (H, I)
    gate: torch.Tensor | None = None  # (I, H) each, when not fused
    up: torch.Tensor | None = None


class Weights:
    """The model's weights as the loop reads them, taken at construction (so the adapter state
    then counts: `model.disable_adapter()` gives the base's)."""

    @torch.no_grad()
    def __init__(self, model, dtype: torch.dtype, batch_hint: int = 1, pack: bool = True):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg, body = inner.config, inner.model
        self.dtype = dtype
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.rotary = body.rotary_emb
        self.embed = body.embed_tokens.weight  # float as stored: a lookup reads few bytes
        self.norm = body.norm.weight.float()
        self.lm_head = _effective(inner.get_output_embeddings())[0].to(dtype)
        # pack=False: the plain matrices, for the native step (it reads them as they are)
        pack = _packer(dtype, self.lm_head.device, batch_hint) if pack else None
        self.layers = []
        for layer in body.layers:
            a, m = layer.self_attn, layer.mlp
            qkv = [_effective(x) for x in (a.q_proj, a.k_proj, a.v_proj)]
            o_w, o_b = _effective(a.o_proj)
            gu = [_effective(x) for x in (m.gate_proj, m.up_proj)]
            down_w, down_b = _effective(m.down_proj)
            if any(b is not None for _, b in gu) or down_b is not None:
                raise ValueError("MLP bias")  # unsupported() lets none through
            # gate/up fused into one product, except when both are the model's own tensors in
            # the decode dtype (no LoRA on the MLP) and nothing is packed: a fused copy would
            # hold 2 x I x H more (212 MB for the embedded model in float32) for no fewer bytes
            # read. Packing copies every matrix anyway, so packed ones are fused (30 products
            # a token fewer at batch 1)
            own = pack is None and all(w.dtype == dtype and w is getattr(x, "base_layer", x).weight
                                       for (w, _), x in zip(gu, (m.gate_proj, m.up_proj)))
            self.layers.append(_Layer(
                ln1=layer.input_layernorm.weight.float(),
                ln2=layer.post_attention_layernorm.weight.float(),
                qkv=_cat_rows([w for w, _ in qkv], dtype),
                qkv_bias=_cat_bias(qkv, [w.shape[0] for w, _ in qkv]),
                o=o_w.to(dtype).contiguous(), o_bias=o_b,
                gate_up=None if own else _cat_rows([w for w, _ in gu], dtype),
                gate=gu[0][0] if own else None, up=gu[1][0] if own else None,
                down=down_w.to(dtype).contiguous()))
        self.packed = pack is not None
        if pack is not None:
            self.lm_head = pack(self.lm_head)
            for ly in self.layers:
                ly.qkv, ly.o, ly.down = pack(ly.qkv), pack(ly.o), pack(ly.down)
                ly.gate_up = pack(ly.gate_up)

    def linear(self, x: torch.Tensor, w, b: torch.Tensor | None = None):
        """float32 in and out; the product in the decode dtype."""
        if self.packed:
            y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), w, None, "none", [], "")
        else:
            y = F.linear(x.to(w.dtype), w)
        y = y.float()
        return y + b.float() if b is not None else y


def _packer(dtype: torch.dtype, device, batch_hint: int):
    """bf16 on CPU: a function that turns a (out, in) weight into oneDNN's prepacked layout
    (the layout its matmul would otherwise build on every call; 1.2-1.9x per product measured
    here), for `Weights.linear`. A private op: used only when it answers like F.linear on a
    probe, else None (the plain product)."""
    probe = getattr(getattr(torch.ops, "mkldnn", None), "_reorder_linear_weight", None)
    if dtype != torch.bfloat16 or torch.device(device).type != "cpu" or probe is None:
        return None
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(8, 64, generator=g).to(dtype)
        x = torch.randn(2, 64, generator=g).to(dtype)
        got = torch.ops.mkldnn._linear_pointwise(x, probe(w, batch_hint), None, "none", [], "")
        if not torch.allclose(got.float(), F.linear(x, w).float(), rtol=1e-2, atol=1e-2):
            return None
    except Exception:  # an op that moved or changed: the plain product is correct
        return None
    return lambda t: probe(t, batch_hint)


class _Cache:
    """Per layer K and V, (B, kv heads, L, head dim), L = prompt + new tokens; float32, or bf16
    (half the decode's largest buffer: 0.39 -> 0.19 GB for a 64-row rollout of the embedded
    model). Rows move in place, one row at a time: the cache never exists twice
    (indexing it with the kept rows would copy all of it while the old one is alive)."""

    def __init__(self, n_layers, batch, n_kv, length, head_dim, device,
                 dtype: torch.dtype = torch.float32):
        shape = (n_layers, batch, n_kv, length, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def head(self, n: int) -> "_Cache":
        """The first n rows, sharing this cache's memory."""
        view = object.__new__(_Cache)
        view.k, view.v = self.k[:, :n], self.v[:, :n]
        return view

    def copy_rows(self, moves) -> None:
        for dst, src in moves:
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]

    def expand(self, source: list[int]) -> None:
        """Row j becomes a copy of row source[j], where source[j] <= j (rows of the distinct
        prompts in order of first appearance): from the last row down, so every source is
        read before it is overwritten."""
        self.copy_rows((j, s) for j, s in reversed(list(enumerate(source))) if s != j)

    def compact(self, moves, n: int) -> None:
        """`compaction`'s moves, then the first n rows are the cache."""
        self.copy_rows(moves)
        self.k, self.v = self.k[:, :n], self.v[:, :n]


def compaction(live: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """The rows that go on (ascending old indexes) -> (order, moves): `order[j]` is the old
    row that becomes row j, `moves` the (new, old) row copies that make it so. Live rows
    already among the first len(live) stay where they are; the holes there take the live rows
    from beyond, so as few rows move as rows stopped (the batch's order changes)."""
    n = len(live)
    kept = set(live)
    holes = [j for j in range(n) if j not in kept]
    tail = [j for j in live if j >= n]
    order = list(range(n))
    for h, src in zip(holes, tail):
        order[h] = src
    return order, list(zip(holes, tail))


# a rollout or labeling batch of at least this many rows keeps its KV cache in a bf16 decode
# dtype: half the bytes of the decode's largest buffer, at the same speed from 32 rows
# (measured on the embedded model, 64 and 256 tokens: within +-5% at 32 and 64 rows; 5-10%
# slower at 8-16 rows, where the cache is small anyway)
LOW_PRECISION_CACHE_ROWS = 32


def _attend(q, k, v, bias):
    """Attention of q (B,h,T,d) float32 over the cache's k, v (B,kv,S,d), h a multiple of kv
    (grouped queries); `bias` (B,1,T,S) float32. A float32 cache: the fused kernel. A bf16
    cache: one decode step (T=1) as two grouped batched products in bf16 with a float32
    softmax (torch's fused CPU kernel runs 5-7x slower in bf16 than in float32 here, the two
    products 1.5-2.5x faster than float32 at 16-64 rows); a longer block (the prefill) in
    float32 on an upcast copy."""
    B, h, T, d = q.shape
    kv = k.shape[1]
    if k.dtype == torch.float32 or (T > 1 and k.device.type == "cpu"):
        return F.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=bias,
                                              enable_gqa=kv != h)
    if k.device.type != "cpu":  # CUDA's fused kernels are fast in bf16
        return F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=bias.to(k.dtype),
                                              enable_gqa=kv != h).float()
    grouped = q.to(k.dtype).view(B, kv, h // kv, d)  # query heads of a kv head, in order
    scores = torch.matmul(grouped, k.transpose(-1, -2)).float() * d ** -0.5 + bias
    probs = scores.softmax(dim=-1).to(v.dtype)  # (B,kv,g,S)
    return torch.matmul(probs, v).float().view(B, h, 1, d)


def _rope(x, cos, sin):  # x (B,h,T,d); cos/sin (B,1,T,d)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _forward(w: Weights, cache: _Cache, tokens, start: int, cos, sin, key_bias):
    """Tokens (B,T) at cache positions [start, start+T) -> float32 logits (B,V) of the last
    position and its final (normed) hidden state (B,H). `key_bias` (B,1,T,start+T): 0 where a
    query may attend, -inf elsewhere."""
    B, T = tokens.shape
    nq, nk = w.n_heads * w.head_dim, w.n_kv * w.head_dim
    end = start + T
    h = F.embedding(tokens, w.embed).float()  # (B,T,H)
    for i, ly in enumerate(w.layers):
        x = F.rms_norm(h, (h.shape[-1],), ly.ln1, w.eps)
        qkv = w.linear(x, ly.qkv, ly.qkv_bias)  # (B,T,nq+2nk)
        q = qkv[..., :nq].view(B, T, w.n_heads, w.head_dim).transpose(1, 2)
        k = qkv[..., nq:nq + nk].view(B, T, w.n_kv, w.head_dim).transpose(1, 2)
        v = qkv[..., nq + nk:].view(B, T, w.n_kv, w.head_dim).transpose(1, 2)
        cache.k[i, :, :, start:end] = _rope(k, cos, sin)  # cast to the cache's dtype
        cache.v[i, :, :, start:end] = v
        att = _attend(_rope(q, cos, sin), cache.k[i, :, :, :end], cache.v[i, :, :, :end],
                      key_bias)  # (B,h,T,d)
        h = h + w.linear(att.transpose(1, 2).reshape(B, T, nq), ly.o, ly.o_bias)
        x = F.rms_norm(h, (h.shape[-1],), ly.ln2, w.eps)
        if ly.gate_up is not None:
            gate, up = w.linear(x, ly.gate_up).chunk(2, dim=-1)
        else:
            gate, up = w.linear(x, ly.gate), w.linear(x, ly.up)
        h = h + w.linear(F.silu(gate) * up, ly.down)
    last = F.rms_norm(h[:, -1], (h.shape[-1],), w.norm, w.eps)  # (B,H)
    return w.linear(last, w.lm_head), last  # (B,V), (B,H)


@torch.no_grad()
def _loop(model, queries, sampler: Sampler, *, max_new_tokens, stop_ids, pad_id, device,
          dtype, step_progress=None) -> list[list[int]]:
    # one row in bf16 on CPU: the decode steps run natively (`native_decode`), on the plain
    # matrices; the prefill still runs `_forward`
    native = native_decode.eligible(len(queries), device, dtype)
    weights = Weights(model, dtype, batch_hint=len(queries), pack=not native)
    step = native_decode.step_or_none(weights) if native else None
    # one prefill per distinct prompt; rows are copies of their prompt's cache
    distinct: dict[tuple, int] = {}
    for q in queries:
        distinct.setdefault(tuple(q), len(distinct))
    first = torch.tensor([distinct[tuple(q)] for q in queries], device=device)  # (B,)
    uniq = [list(q) for q in distinct]
    ids, attn = pad_sequences(uniq, pad_id, side="left")  # (U,P)
    ids, attn, P = ids.to(device), attn.to(device), ids.shape[1]
    L = P + max_new_tokens
    # positions count real tokens only (left padding), as generate() does
    pos = (attn.cumsum(dim=1) - 1).clamp(min=0)  # (U,P)
    pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, max_new_tokens + 1, device=device)], 1)
    cos, sin = weights.rotary(torch.zeros(1, device=device), pos)  # (U,L,d) float32
    cos, sin = cos.float().unsqueeze(1), sin.float().unsqueeze(1)  # (U,1,L,d)
    keys = torch.cat([attn.bool(), torch.ones(len(uniq), max_new_tokens, dtype=torch.bool,
                                              device=device)], dim=1)  # (U,L)
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    allowed = (causal[None] & keys[:, None, :P]) | torch.eye(P, dtype=torch.bool,
                                                             device=device)[None]
    prefill_bias = torch.zeros(len(uniq), 1, P, P, device=device).masked_fill(
        ~allowed[:, None], float("-inf"))  # a padding query sees itself: no empty row, no NaN
    cache = _Cache(len(weights.layers), len(queries), weights.n_kv, L, weights.head_dim,
                   device, dtype if len(queries) >= LOW_PRECISION_CACHE_ROWS else torch.float32)
    logits, last = _forward(weights, cache.head(len(uniq)), ids, 0, cos[..., :P, :],
                            sin[..., :P, :], prefill_bias)
    # expand to one row per query, in place
    cache.expand(first.tolist())
    logits, last, cos, sin, keys = logits[first], last[first], cos[first], sin[first], keys[first]
    key_bias = torch.zeros(len(queries), 1, 1, L, device=device).masked_fill(
        ~keys[:, None, None, :], float("-inf"))  # (B,1,1,L)
    if step is not None:  # one row: no padding, no compaction (it stops, the loop ends)
        step.bind(cache.k, cache.v, cos[0, 0], sin[0, 0], key_bias[0, 0, 0])
    rows = list(range(len(queries)))  # original index of each live row
    out: list[list[int]] = [[] for _ in queries]
    stops = set(stop_ids)
    for t in range(max_new_tokens):
        picked = sampler.pick(logits, rows, hidden=last).tolist()
        live = []
        for j, (r, tok) in enumerate(zip(rows, picked)):
            out[r].append(tok)
            if tok not in stops:
                live.append(j)
        if step_progress:
            step_progress((t + 1) / max_new_tokens)
        if not live or t == max_new_tokens - 1:
            break
        if len(live) < len(rows):  # stopped rows leave the batch
            order, moves = compaction(live)
            cache.compact(moves, len(live))
            keep = torch.tensor(order, device=device)
            cos, sin, key_bias = cos[keep], sin[keep], key_bias[keep]
            rows = [rows[j] for j in order]
            picked = [picked[j] for j in order]
        at = P + t  # the position of the token just drawn
        if step is not None:
            logits, last = step(picked[0], at)
            continue
        tok = torch.tensor(picked, device=device)[:, None]  # (b,1)
        logits, last = _forward(weights, cache, tok, at, cos[..., at:at + 1, :],
                                sin[..., at:at + 1, :], key_bias[..., :at + 1])
    return out


def _hf_generate(model, queries, sampler: Sampler, *, max_new_tokens, stop_ids, pad_id, device):
    ids, attn = pad_sequences(queries, pad_id, side="left")  # (B,P)
    out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                         do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                         eos_token_id=sorted(stop_ids), pad_token_id=pad_id,
                         logits_processor=[sampler], use_cache=True)
    return out[:, ids.shape[1]:].tolist()


def cut_after_stop(tokens: list[int], stop_ids) -> tuple[list[int], bool]:
    """Keep tokens up to and including the first stop token; (tokens, stopped)."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:i + 1], True
    return tokens, False


@torch.no_grad()
def decode(model, queries: list[list[int]], sampler: Sampler, *, max_new_tokens: int,
           stop_ids, pad_id: int, device, dtype: torch.dtype = torch.float32,
           step_progress=None) -> list[tuple[list[int], bool]]:
    """Per query: (response token ids cut after the first stop token, ended on a stop token).

    The hand-written loop where `unsupported(model)` is None, else `model.generate`."""
    stop_ids = set(stop_ids)
    total = max(len(q) for q in queries) + max_new_tokens
    if unsupported(model, total) is None:
        ctx = (torch.autocast(device_type=torch.device(device).type, enabled=False)
               if torch.is_autocast_enabled(torch.device(device).type)
               else contextlib.nullcontext())
        with ctx:  # the loop casts by itself: autocast would move norms and attention to bf16
            rows = _loop(model, queries, sampler, max_new_tokens=max_new_tokens,
                         stop_ids=stop_ids, pad_id=pad_id, device=device, dtype=dtype,
                         step_progress=step_progress)
    else:
        rows = _hf_generate(model, queries, sampler, max_new_tokens=max_new_tokens,
                            stop_ids=stop_ids, pad_id=pad_id, device=device)
    return [cut_after_stop(r, stop_ids) for r in rows]

