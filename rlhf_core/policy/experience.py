"""Policy rounds, steps 1-3 (the experience): rollout, scores / reference log-probs / values,
advantages.

Each step fills fields of the `Rollout` (rollout.py) for this rank's shard; `rollout_stats`
gathers the round metrics over all ranks and `check_rollout` is the gate before any update.
`collect_experience` (steps 1-2) serves every algorithm: PPO samples `rollouts_per_prompt`
responses per prompt and asks the critic; the critic-free rounds (grpo.py, dpo.py) sample
groups of `group_size` with the same sequence budget and skip the critic.
"""
from __future__ import annotations

import random
import time

import torch

from rlhf_core.advantages import (
    compute_gae,
    explained_variance,
    masked_whiten,
    shape_rewards,
)
from rlhf_core.config import PPOConfig
from rlhf_core.decoding import decode_dtype
from rlhf_core.models import autocast
from rlhf_core.policy.rollout import (
    LayerStates,
    Rollout,
    cat_to_width,
    critic_values,
    generate,
    policy_logprobs,
    trunk_forward,
)
from rlhf_core.policy.setup import Plan, PPOHealthError, aborted, critic_entry


# -- 1. rollout ------------------------------------------------------------------------------
def rollout_prompts(data, n: int, seed: int) -> list[str]:
    """`n` train prompts (never held-out ones), a seeded sample without replacement."""
    rows = data.prompts_of_split("train")
    if not rows:
        raise ValueError("no train prompts in the workspace: import some first")
    rng = random.Random(seed)
    picked = rng.sample(rows, min(n, len(rows)))
    return [r["text"] for r in picked]


def rollout_step(runtime, config: PPOConfig, plan: Plan, dist, prompts=None, *,
                 per_prompt: int | None = None, critic: bool = False) -> Rollout:
    """This rank's shard of prompts x `per_prompt` responses (default rollouts_per_prompt) from
    the policy, a prompt's responses contiguous. Without `prompts`, as many train prompts as
    keep the round's budget of prompts_per_round x rollouts_per_prompt sequences. A trunk
    critic's values are recorded while decoding too (`critic` and ppo.critic=trunk), from the
    same float32 hidden states as the old log-probs."""
    per_prompt = per_prompt or config.rollouts_per_prompt
    n_prompts = max(1, config.prompts_per_round * config.rollouts_per_prompt // per_prompt)
    prompts = prompts or rollout_prompts(runtime.data, n_prompts, plan.seed)
    rows = [p for p in prompts for _ in range(per_prompt)]
    if len(rows) % dist.world_size:
        raise ValueError(f"{len(rows)} rollouts do not split over {dist.world_size} processes")
    n = len(rows) // dist.world_size
    lo = dist.rank * n  # contiguous shards: the global row order is rank-major
    seeds = [plan.seed * 10_007 + g for g in range(lo, lo + n)]  # one noise stream per row
    model = runtime.model
    model.set_adapter("policy")
    # Old log-probs from the sampling step itself need float32 decoding (only then do they
    # equal a forward pass). Measured (bench/b9_algorithms_trl.py, GRPO round): bf16 decoding
    # saved 3-4 s of generation but its float32 forward for the old log-probs cost 8-9 s (69.3
    # vs 58.4 s a round), so a rollout that can record decodes in float32; the rest decode at
    # sampling.decode_dtype and the forward step computes the log-probs.
    record = config.logprobs_from_sampling and runtime.device.mixed_precision != "bf16"
    dtype = (torch.float32 if record
             else decode_dtype(runtime.config.sampling.decode_dtype, runtime.device.device))
    with autocast(runtime.device):
        return generate(model, runtime.tokenizer, rows[lo:lo + n], seeds,
                        max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                        max_prompt_tokens=config.max_prompt_tokens,
                        batch_size=config.generation_batch_size, device=runtime.device.device,
                        record_logprobs=record, dtype=dtype,
                        value_head=(runtime.heads["value"] if record and critic
                                    and config.critic == "trunk" else None))


def collect_experience(runtime, config: PPOConfig, plan: Plan, dist, score_fn, out,
                       prompts=None, *, per_prompt: int | None = None,
                       critic: bool = True) -> tuple[Rollout, dict]:
    """Steps 1-2: sample this rank's rollout, then score it; returns it with the two timings."""
    out.progress(0.02, f"v{plan.version}: generating")
    t0 = time.perf_counter()
    rollout = rollout_step(runtime, config, plan, dist, prompts, per_prompt=per_prompt,
                           critic=critic)  # 1.
    times = {"time_generate": time.perf_counter() - t0}
    out.progress(0.25, f"v{plan.version}: scoring")
    t0 = time.perf_counter()
    score_step(runtime, rollout, config, score_fn, critic=critic)  # 2.
    times["time_score"] = time.perf_counter() - t0
    return rollout, times


# -- 2. score, reference log-probs, values -----------------------------------------------------
@torch.no_grad()
def score_step(runtime, rollout: Rollout, config: PPOConfig, score_fn, *,
               critic: bool = True) -> None:
    """Reference log-probs, values (with `critic`) and scores; the policy's log-probs only when
    the rollout did not record them while sampling."""
    forward_step(runtime, rollout, config, critic=critic)
    with autocast(runtime.device):
        scores = torch.as_tensor(score_fn(rollout), dtype=torch.float32).to(rollout.mask.device)
    # a response that never stopped is penalised (TRL's missing_eos_penalty)
    rollout.scores = scores.reshape(-1) + config.missing_eos_penalty * (~rollout.has_stop).float()


@torch.no_grad()
def forward_step(runtime, rollout: Rollout, config: PPOConfig, *, critic: bool = True) -> None:
    """Fill `ref_logprobs`, `values` (with `critic`) and, unless recorded while sampling,
    `logprobs` and `entropy`: one chunk of `minibatch_size` rows at a time, 0 on padding.
    A trunk critic reads the policy adapter's hidden states: one pass gives the policy's
    log-probs and its values (or only the values, without the LM head, when recorded)."""
    model = runtime.model
    chunks = list(_chunks(len(rollout), config.minibatch_size))
    recorded = rollout.logprobs is not None
    trunk = critic and config.critic == "trunk"
    values_recorded = trunk and recorded and rollout.values is not None
    cached = config.prefix_cache
    # a value adapter on the top layers only starts its forwards from the reference's states
    entry = critic_entry(model) if critic and not trunk else 0
    kept: list = []  # per chunk: the states entering layer `entry`, and the chunk's query width
    parts = {"ref_logprobs": []} | ({"values": []} if critic and not values_recorded else {}) | (
        {} if recorded else {"logprobs": [], "entropy": []})
    with autocast(runtime.device):
        for idx in chunks:
            batch = rollout.select(idx)
            if values_recorded:
                pass  # the decode loop gave log-probs and values: nothing of the policy's here
            elif trunk:
                model.set_adapter("policy")
                if recorded:
                    values = critic_values(model, runtime.heads["value"], batch,
                                           prefix_cache=cached)
                else:
                    logprobs, entropy, values = trunk_forward(
                        model, runtime.heads["value"], batch, config.temperature,
                        with_entropy=True, prefix_cache=cached)
                    parts["logprobs"].append(logprobs.float())
                    parts["entropy"].append(entropy.float())
                parts["values"].append(values.float())
            elif not recorded:
                model.set_adapter("policy")
                logprobs, entropy = policy_logprobs(model, batch, config.temperature,
                                                    with_entropy=True, prefix_cache=cached)
                parts["logprobs"].append(logprobs.float())
                parts["entropy"].append(entropy.float())
            capture = LayerStates(entry) if entry else None
            with runtime.reference():
                ref_logprobs, _ = policy_logprobs(model, batch, config.temperature,
                                                  prefix_cache=cached, capture=capture)
            parts["ref_logprobs"].append(ref_logprobs.float())
            if capture is not None:
                kept.append((capture.states, batch.query_ids.shape[1]))
                batch.critic_states, batch.critic_from = capture.states, entry
            if critic and not trunk:
                model.set_adapter("value")
                parts["values"].append(critic_values(model, runtime.heads["value"], batch,
                                                     prefix_cache=cached).float())
    model.set_adapter("policy")
    T = rollout.mask.shape[1]  # chunks come trimmed to their own width (Rollout.select)
    if kept and all(states is not None for states, _ in kept):
        rollout.critic_states = rows_layout(kept, rollout.query_ids.shape[1], T)
        rollout.critic_from = entry
    for k in ("logprobs", "entropy", "ref_logprobs") + (("values",) if critic else ()):
        v = cat_to_width(parts[k], T) if k in parts else getattr(rollout, k)
        setattr(rollout, k, torch.where(rollout.mask.bool(), v.float(), 0.0))  # 0 on padding


def rows_layout(chunks: list[tuple[torch.Tensor, int]], P: int, T: int) -> torch.Tensor:
    """Chunks of (b, P_c + T_c, H) states, each trimmed to its own query width P_c and response
    width T_c, as one (B, P + T, H): query columns right-aligned (left padding 0), response
    columns left-aligned (right padding 0), as the rollout's own tensors."""
    out = []
    for states, Pc in chunks:
        q, r = states[:, :Pc], states[:, Pc:]
        out.append(torch.cat([torch.nn.functional.pad(q, (0, 0, P - Pc, 0)),
                              torch.nn.functional.pad(r, (0, 0, 0, T - r.shape[1]))], dim=1))
    return torch.cat(out)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield torch.arange(start, min(n, start + size))


# -- 3. KL-shaped rewards, GAE, whitening ---------------------------------------------------------
def kl_step(rollout: Rollout, config: PPOConfig, plan: Plan) -> None:
    """The finite gate, then per-token KL to the reference and KL-shaped rewards (B,T)."""
    gate_finite(rollout, plan)  # before shaping: a nan score must not reach the advantages
    rollout.rewards, rollout.kl = shape_rewards(rollout.scores, rollout.logprobs,
                                                rollout.ref_logprobs, rollout.mask,
                                                plan.kl_coef, config.kl_estimator)


def advantages_step(rollout: Rollout, config: PPOConfig, plan: Plan, dist) -> None:
    kl_step(rollout, config, plan)
    advantages, rollout.returns = compute_gae(rollout.rewards, rollout.values, rollout.mask,
                                              config.gamma, config.lam)  # (B,T) each
    if config.whiten_advantages:  # over every rank's tokens, like one big batch
        n, T = advantages.shape
        all_adv = masked_whiten(dist.gather_rows(advantages), dist.gather_rows(rollout.mask))
        advantages = all_adv[dist.rank * n:(dist.rank + 1) * n, :T]
    rollout.advantages = advantages


def gate_finite(rollout: Rollout, plan: Plan) -> None:
    """Gate 5a': every score and per-token number of the rollout is finite (values if any)."""
    m = rollout.mask.bool()
    for name in ("scores", "logprobs", "ref_logprobs", "values"):
        t = getattr(rollout, name)
        if t is None:  # no critic in this round
            continue
        t = t if name == "scores" else t[m]
        if not torch.isfinite(t).all():
            raise PPOHealthError(f"non-finite {name} in the rollout",
                                 aborted(plan, f"non-finite {name}"))


def rollout_stats(rollout: Rollout, plan: Plan, dist) -> dict:
    """Round metrics over all ranks (gathered), so every rank takes the same gate decisions."""
    g = dist.gather_rows
    mask = g(rollout.mask)  # (B,T)
    scores = g(rollout.scores)  # (B,)
    kl_seq = g(rollout.kl.sum(dim=1))  # (B,) KL of each sequence
    lengths = mask.sum(dim=1)  # (B,)
    entropy = g(rollout.entropy).sum() / mask.sum()
    stats = {"reward_mean": scores.mean().item(), "reward_std": scores.std().item(),
             "kl": kl_seq.mean().item(), "kl_std": kl_seq.std().item(), "kl_coef": plan.kl_coef,
             "rlhf_reward": (scores - plan.kl_coef * kl_seq).mean().item(),
             "entropy": entropy.item(), "response_length": lengths.mean().item(),
             "response_length_std": lengths.float().std().item(),  # spreads: the Dashboard's bars
             "stop_rate": g(rollout.has_stop.float()).mean().item(),
             "n_sequences": int(mask.shape[0])}
    if rollout.values is not None:  # a critic to judge
        ev = explained_variance(g(rollout.values), g(rollout.returns), mask)
        stats["explained_variance"] = ev.item()
    return stats


def checked_stats(rollout: Rollout, config: PPOConfig, plan: Plan, dist, out,
                  extra: dict) -> dict:
    """5a: the round's rollout metrics (with `extra`, e.g. timings), gated, then logged."""
    stats = rollout_stats(rollout, plan, dist) | extra
    check_rollout(stats, config, plan)
    out.metrics(stats, step=out.step0, version=plan.version)
    return stats


def check_rollout(stats: dict, config: PPOConfig, plan: Plan) -> None:
    if stats["kl"] > config.max_kl:
        reason = f"mean KL per sequence {stats['kl']:.3g} > max_kl {config.max_kl}"
        raise PPOHealthError(reason, aborted(plan, reason) | {"metrics": stats})
