"""PPO rollouts: the `Rollout` experience record, sampling, and the three per-token forwards.

Shapes: `B` sequences, `P` prompt (query) tokens, left-padded, `T` response tokens,
right-padded with the pad token after the stop token. `mask` is 1.0 on real response tokens
(up to and including the stop token), 0.0 on padding (DESIGN.md contract).

Sampling (rlhf_core/decoding.py) is Gumbel-max: argmax(logits / temperature + Gumbel noise) is
an exact draw from softmax(logits / temperature), i.e. the same distribution as
`do_sample=True, top_k=0, top_p=1.0`. The noise comes from one seeded generator per sequence, so
a sequence's tokens do not depend on which other sequences share its batch, or on which rank
generates it: a DDP round samples what the single-process round samples.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace

import torch

from rlhf_core import models
from rlhf_core.advantages import logprobs_and_entropy
from rlhf_core.decoding import Sampler, decode
from rlhf_core.models import pad_sequences
from rlhf_core.sampling import chat_ids, stop_token_ids


@dataclass
class Rollout:
    """One round's experience; later fields are filled in by the round's steps."""
    prompts: list[str]  # B prompt texts
    responses: list[str]  # B decoded responses (special tokens skipped)
    query_ids: torch.Tensor  # (B,P) long, left-padded
    query_mask: torch.Tensor  # (B,P) long
    response_ids: torch.Tensor  # (B,T) long, pad after the stop token
    mask: torch.Tensor  # (B,T) float, 1.0 up to and including the stop token
    has_stop: torch.Tensor  # (B,) bool: the response ended with a stop token
    scores: torch.Tensor | None = None  # (B,) reward-model score (+ missing-stop penalty)
    logprobs: torch.Tensor | None = None  # (B,T) policy, at sampling temperature
    ref_logprobs: torch.Tensor | None = None  # (B,T) reference (adapters disabled)
    values: torch.Tensor | None = None  # (B,T) critic
    entropy: torch.Tensor | None = None  # (B,T) policy entropy (nats)
    rewards: torch.Tensor | None = None  # (B,T) KL-shaped
    kl: torch.Tensor | None = None  # (B,T) per-token KL estimate
    advantages: torch.Tensor | None = None  # (B,T) GAE (whitened), or a sequence's, broadcast
    seq_advantages: torch.Tensor | None = None  # (B,) GRPO / RLOO: one per sequence
    returns: torch.Tensor | None = None  # (B,T) advantages + values
    # (B,P+T,H) the reference's hidden states entering decoder layer `critic_from`, in the rows'
    # layout (the query's columns, then the response's): where a value adapter on the top
    # layers only (ppo.critic_layers) starts its forwards
    critic_states: torch.Tensor | None = None
    critic_from: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, idx: torch.Tensor) -> "Rollout":
        """The rows `idx` (a minibatch); tensors are sliced, lists picked. Columns that are
        padding in every picked row are dropped (leading query columns, trailing response
        columns), so a minibatch of short prompts and responses computes on its own width."""
        picked = {}
        rows = idx.tolist()
        q_mask, mask = self.query_mask[idx], self.mask[idx]  # (b,P), (b,T)
        p0 = int(q_mask.any(dim=0).long().argmax()) if q_mask.any() else 0  # first used column
        t1 = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else 1  # past the last one
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v[idx]
                if f.name in ("query_ids", "query_mask"):
                    v = v[:, p0:]
                elif f.name == "critic_states":  # query columns from p0, response ones to t1
                    v = v[:, p0:self.query_ids.shape[1] + t1]
                elif v.dim() == 2:  # every other (B,T) field is per response token
                    v = v[:, :t1]
                picked[f.name] = v
            elif isinstance(v, list):
                picked[f.name] = [v[i] for i in rows]
        return replace(self, **picked)

    def response_lists(self) -> list[torch.Tensor]:
        """Per row, the response ids cut after the stop token (1-D, unpadded)."""
        lengths = self.mask.sum(dim=1).long().tolist()
        return [self.response_ids[i, :n] for i, n in enumerate(lengths)]


# -- tokenizing --------------------------------------------------------------------
def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries: left-padded ids and a long attention mask."""
    return pad_sequences(seqs, pad_id, side="left")


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Responses: right-padded ids and a float mask (the RL `mask`)."""
    return pad_sequences(seqs, pad_id, side="right", mask_dtype=torch.float32)


# -- sampling ----------------------------------------------------------------------------
@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], seeds: list[int], *, max_new_tokens: int,
             temperature: float, max_prompt_tokens: int, batch_size: int, device,
             record_logprobs: bool = False, dtype: torch.dtype = torch.float32,
             value_head=None) -> Rollout:
    """Sample one response per prompt (repeat prompts for several); `seeds` one per row
    (rlhf_core/decoding.py: a row's draw does not depend on its batch or its rank).

    `record_logprobs`: fill `logprobs` and `entropy` from the sampling step's own logits (exact
    in float32 only: the caller asks for it only then). `value_head`: also fill `values`, the
    head on the hidden state before each response token (a trunk critic), when every chunk
    ran the hand-written loop (else `values` stays None and the score step computes them)."""
    stop_ids = set(stop_token_ids(tokenizer, model))
    queries = [chat_ids(tokenizer, p, max_prompt_tokens) for p in prompts]
    responses: list[list[int]] = []
    has_stop: list[bool] = []
    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
    values: list[torch.Tensor | None] = []
    for start in range(0, len(prompts), batch_size):
        chunk = queries[start:start + batch_size]
        sampler = Sampler(seeds[start:start + batch_size], temperature, device=device,
                          record=record_logprobs, value_head=value_head)
        for cut, stopped in decode(model, chunk, sampler, max_new_tokens=max_new_tokens,
                                   stop_ids=stop_ids, pad_id=tokenizer.pad_token_id,
                                   device=device, dtype=dtype):
            responses.append(cut)
            has_stop.append(stopped)
        if record_logprobs:
            recorded.append(sampler.recorded())
        values.append(sampler.recorded_values())
    rollout = build_rollout(tokenizer, prompts, queries, responses, has_stop, device)
    T = rollout.mask.shape[1]  # chunks generate different lengths
    if value_head is not None and all(v is not None for v in values):
        rollout.values = cat_to_width(values, T).to(device)
    if record_logprobs:
        rollout.logprobs = cat_to_width([lp for lp, _ in recorded], T).to(device)
        rollout.entropy = cat_to_width([e for _, e in recorded], T).to(device)
    return rollout


def build_rollout(tokenizer, prompts: list[str], queries: list[list[int]],
                  responses: list[list[int]], has_stop: list[bool], device) -> Rollout:
    """A Rollout of token lists: queries left-padded, responses right-padded with the RL mask,
    texts decoded (special tokens skipped)."""
    query_ids, query_mask = left_pad(queries, tokenizer.pad_token_id)
    response_ids, mask = right_pad(responses, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return Rollout(prompts=list(prompts), responses=texts, query_ids=query_ids.to(device),
                   query_mask=query_mask.to(device), response_ids=response_ids.to(device),
                   mask=mask.to(device), has_stop=torch.tensor(has_stop, device=device))


def cat_to_width(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    """Row-concatenate (b_i, t_i) tensors, each right-padded with 0 (or cut) to `width`."""
    return torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in parts])


# -- forwards over (query + response) ------------------------------------------------------
def _inputs(batch: Rollout) -> dict:
    input_ids = torch.cat([batch.query_ids, batch.response_ids], dim=1)  # (B,P+T)
    attn = torch.cat([batch.query_mask, batch.mask.long()], dim=1)  # (B,P+T)
    # positions count real tokens only, as generate() does for left-padded prompts
    position_ids = (attn.cumsum(dim=1) - 1).clamp(min=0)  # (B,P+T)
    return {"input_ids": input_ids, "attention_mask": attn, "position_ids": position_ids}


def shared_prefix_len(batch: Rollout) -> int:
    """Tokens every row's query starts with (after its left padding), leaving each row at least
    one query token of its own: the chat template's system prompt and role markers, in practice.
    0 for a single row or a shared prefix shorter than models.MIN_SHARED_PREFIX."""
    q, m = batch.query_ids, batch.query_mask  # (B,P) left-padded
    lengths = m.sum(dim=1)  # (B,)
    n = int(lengths.min()) - 1
    if q.shape[0] < 2 or n < models.MIN_SHARED_PREFIX:
        return 0
    pads = q.shape[1] - lengths  # (B,) left padding of each row
    return models.common_prefix_len(
        q.gather(1, pads[:, None] + torch.arange(n, device=q.device)[None]))  # of (B,n)


LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale")  # model config fields


def logit_transforms(base) -> list[str]:
    """What the model's forward does to the LM head's output (a soft cap, a scale): none, and
    computing the logits from `response_states` equals the model's own forward."""
    return [k for k in LOGIT_TRANSFORMS if getattr(base.config, k, None)]


@dataclass
class LayerStates:
    """Hidden states entering decoder layer `k` (k >= 1), (B,P+T,H) in the rows' layout: the
    query's columns (left padding included), then the response's. Passed as `capture`, a
    forward fills `states` (None when the architecture's layers cannot be hooked); passed as
    `enter`, a forward runs layers k.. only, starting from `states`."""
    k: int
    states: torch.Tensor | None = None


class _Skip(torch.nn.Module):
    """Stands in for a decoder layer below the entry layer: returns its input unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Enter(torch.nn.Module):
    """Stands in for the decoder layer just below the entry layer: returns the kept states."""

    def __init__(self, states: torch.Tensor):
        super().__init__()
        self.states = states

    def forward(self, hidden_states, *args, **kwargs):
        return self.states


@contextlib.contextmanager
def _layer_io(layers, sink: list, capture: LayerStates | None = None,
              enter: LayerStates | None = None):
    """For one backbone call: with `capture`, append the output of decoder layer k-1 (the
    states entering layer k) to `sink`; with `enter`, the layers below its k stand aside and
    the rows enter layer k with its states."""
    handle = None
    saved = [layers[i] for i in range(enter.k)] if enter else []
    try:
        if capture:
            def hook(module, args, output):
                sink.append(output if isinstance(output, torch.Tensor) else None)
            handle = layers[capture.k - 1].register_forward_hook(hook)
        if enter:
            for i in range(enter.k - 1):
                layers[i] = _Skip()
            layers[enter.k - 1] = _Enter(enter.states)
        yield
    finally:
        if handle is not None:
            handle.remove()
        for i, layer in enumerate(saved):
            layers[i] = layer


def response_states(model, batch: Rollout, *, prefix_cache: bool = True,
                    capture: LayerStates | None = None,
                    enter: LayerStates | None = None) -> torch.Tensor:
    """(B,T,H) the final hidden state that precedes each response token (position t predicts
    response token t), from the active adapter's trunk (the base under `disable_adapter()`).

    With `prefix_cache` the tokens that every query starts with (`shared_prefix_len`: the chat
    template's system prompt) run once at batch 1, with gradients when enabled, and the rows
    attend to copies of its keys and values: the same numbers as one forward over the whole rows
    (positions and masks are those of the full rows; tests/test_prefix_cache.py), for ~20-30%
    fewer token passes with 32-64-token answers (a 24-token prefix before ~44 query tokens).
    Not with gradient checkpointing (it turns the cache off).

    `capture` keeps the states entering its layer (`LayerStates`); `enter` starts the rows at
    its layer from kept states (the shared prefix still runs every layer: one short row)."""
    base = model.get_base_model()
    backbone = getattr(base, base.base_model_prefix)  # the transformer without its LM head
    layers = models.decoder_layers(model) if (capture or enter) else None
    P, T = batch.query_ids.shape[1], batch.response_ids.shape[1]
    S = (shared_prefix_len(batch)
         if prefix_cache and not getattr(backbone, "gradient_checkpointing", False) else 0)
    sink: list = []
    if S == 0:
        with _layer_io(layers, sink, capture, enter):
            hidden = backbone(**_inputs(batch), use_cache=False).last_hidden_state  # (B,P+T,H)
        if capture:
            capture.states = sink[0]
        return hidden[:, P - 1:P - 1 + T]
    q, m = batch.query_ids, batch.query_mask
    B, dev = q.shape[0], q.device
    pads = P - m.sum(dim=1)  # (B,)
    prefix = q[:1, int(pads[0]):int(pads[0]) + S]  # (1,S)
    with _layer_io(layers, sink, capture):
        cache = models.prefix_cache(backbone, prefix, B)
    # each row without its S prefix tokens: its padding, then the rest of its query
    cols = torch.arange(P - S, device=dev)[None]  # (1,P-S)
    idx = cols + S * (cols >= pads[:, None]).long()  # (B,P-S): the query column of each
    rest = torch.cat([q.gather(1, idx), batch.response_ids], dim=1)  # (B,P-S+T)
    rest_mask = torch.cat([m.gather(1, idx), batch.mask.long()], dim=1)  # (B,P-S+T)
    attn = torch.cat([torch.ones(B, S, dtype=rest_mask.dtype, device=dev), rest_mask], dim=1)
    position_ids = (S + rest_mask.cumsum(dim=1) - 1).clamp(min=0)  # as in the full rows
    if enter:  # the kept states of the rows' columns, without the prefix's
        H = enter.states.shape[-1]
        enter = LayerStates(enter.k, torch.cat([enter.states[:, :P].gather(
            1, idx[..., None].expand(-1, -1, H)), enter.states[:, P:]], dim=1))  # (B,P-S+T,H)
    with _layer_io(layers, sink, capture, enter):
        hidden = backbone(input_ids=rest, attention_mask=attn, position_ids=position_ids,
                          use_cache=True, **{models.cache_arg(backbone): cache}).last_hidden_state
    if capture:
        capture.states = _captured_rows(sink, idx, pads, P, S)
    return hidden[:, P - S - 1:P - S - 1 + T]  # (B,T,H) of (B,P-S+T,H)


def _captured_rows(sink: list, idx, pads, P: int, S: int) -> torch.Tensor | None:
    """The prefix call's (1,S,H) and the rows' call's (B,P-S+T,H) states, as (B,P+T,H) in the
    rows' layout: the prefix at each row's columns pads..pads+S, the rest where it came from."""
    if len(sink) != 2 or any(x is None for x in sink):
        return None
    pre, rest = sink
    B, H, T = rest.shape[0], rest.shape[-1], rest.shape[1] - (P - S)
    full = rest.new_zeros(B, P + T, H)
    full[:, P:] = rest[:, P - S:]
    full[:, :P].scatter_(1, idx[..., None].expand(-1, -1, H), rest[:, :P - S])
    at = pads[:, None] + torch.arange(S, device=pads.device)[None]  # (B,S)
    full[:, :P].scatter_(1, at[..., None].expand(-1, -1, H), pre.expand(B, -1, -1))
    return full


def _logits(model, batch: Rollout, temperature: float, prefix_cache: bool,
            capture: LayerStates | None = None):
    """(B,T,V) float32 logits at `temperature` and the hidden states (None through the model's
    own forward)."""
    base = model.get_base_model()
    if not logit_transforms(base):
        h = response_states(model, batch, prefix_cache=prefix_cache, capture=capture)
        raw = base.get_output_embeddings()(h)  # (B,T,V)
    else:
        h, T, sink = None, batch.response_ids.shape[1], []
        with _layer_io(models.decoder_layers(model), sink, capture):
            raw = model(**_inputs(batch), logits_to_keep=T + 1, use_cache=False).logits[:, :-1]
        if capture:
            capture.states = sink[0]
    logits = raw.float()
    if temperature != 1.0:
        # in place when .float() made no copy: the LM head's backward does not need its output
        logits = logits.div_(temperature) if logits.dtype == raw.dtype else logits / temperature
    return logits, h


def policy_logprobs(model, batch: Rollout, temperature: float, *, with_entropy: bool = False,
                    prefix_cache: bool = True, capture: LayerStates | None = None):
    """(logprobs (B,T), entropy (B,T) or None) of the response tokens, at `temperature`;
    `capture` keeps the states entering its layer on the way (`response_states`)."""
    logits, _ = _logits(model, batch, temperature, prefix_cache, capture)
    return logprobs_and_entropy(logits, batch.response_ids, with_entropy=with_entropy)


def trunk_forward(model, head, batch: Rollout, temperature: float, *,
                  with_entropy: bool = False, prefix_cache: bool = True):
    """One pass of the active adapter's trunk feeding both heads (`ppo.critic = "trunk"`):
    (logprobs (B,T), entropy (B,T) or None, values (B,T)). The LM head and the value head read
    the same hidden state, the one that precedes each response token, so the log-probs equal
    `policy_logprobs` and the values equal `critic_values` run on the same adapter. The value
    head reads it detached: the value loss trains the head alone, never the policy (measured
    on the tiny model's learnable reward, tests/test_trunk_critic.py: with the value gradient
    reaching the policy adapter 4 rounds went 0.35 -> 0.42, detached 0.35 -> 0.64, the adapter
    critic 0.35 -> 0.59). Only for models with plain logits (setup.check_trunk_model)."""
    logits, h = _logits(model, batch, temperature, prefix_cache)  # (B,T,V), (B,T,H)
    logprobs, entropy = logprobs_and_entropy(logits, batch.response_ids,
                                             with_entropy=with_entropy)
    return logprobs, entropy, head(h.detach())


def critic_values(model, head, batch: Rollout, *, prefix_cache: bool = True) -> torch.Tensor:
    """(B,T) values: the head on the hidden state that precedes each response token. With the
    batch's `critic_states` (a value adapter on the top layers only) the forward starts at
    layer `critic_from` from them."""
    enter = (LayerStates(batch.critic_from, batch.critic_states)
             if batch.critic_states is not None else None)
    return head(response_states(model, batch, prefix_cache=prefix_cache, enter=enter))  # (B,T)


