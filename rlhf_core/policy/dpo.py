"""Online DPO round: preference pairs from the reward model's ranking of fresh policy samples.

  0. plan, reward source, actor (setup.py; no critic)
  1-2. `group_size` samples per prompt from the policy, reward-model scores, reference
       log-probs (experience.collect_experience, as GRPO/RLOO)
  3. the sequence KL to the reference, for the metrics and the gates (5a, before any update)
  3'. pairs (`pairs_step`): the best vs the worst sample of each group by score (a group whose
      samples all scored the same gives none), mixed with `dpo_human_share` of people's own
      strict pairs on train prompts; every pair's log-probs under the round's starting policy
      (for the approx-KL gate) and the reference (base with adapters disabled)
  4. epochs of `dpo_loss` on summed response log-probs (+ 5b: non-finite and approx-KL gates)
  6. publish `policy/` with the algorithm and its settings
Runs in one process (pair counts differ per rank; the DDP launcher runs ppo/grpo/rloo).
"""
from __future__ import annotations

import random

import torch

from rlhf_core.advantages import zero_padding
from rlhf_core.config import PPOConfig
from rlhf_core.losses import dpo_loss, policy_drift
from rlhf_core.policy.experience import checked_stats, forward_step, kl_step
from rlhf_core.policy.grpo import critic_free_round
from rlhf_core.models import autocast
from rlhf_core.policy.rollout import Rollout, build_rollout, policy_logprobs
from rlhf_core.policy.setup import Plan, PPOHealthError, aborted, adapter_params
from rlhf_core.policy.train import backward_if_finite, reduce_and_clip, run_epochs
from rlhf_core.sampling import chat_ids, stop_token_ids


def dpo_round(runtime, *, dist=None, **kwargs) -> dict:
    """Run one online-DPO round and publish the next policy version. Raises PPOHealthError on
    a gate (or when no group gave a pair). Keywords as `ppo_round`."""
    if dist is not None and dist.world_size > 1:
        raise ValueError("online DPO runs in one process; use ppo, grpo or rloo under launch")

    def update(rollout: Rollout, times: dict, config: PPOConfig, plan: Plan, dist, out) -> dict:
        kl_step(rollout, config, plan)  # 3. finite gate, KL to the reference
        chosen, rejected, counts = pairs_step(runtime, rollout, config, plan)  # 3'.
        stats = checked_stats(rollout, config, plan, dist, out, times | counts)  # 5a.
        return stats | dpo_train_step(runtime, chosen, rejected, config, plan, dist, out)  # 4.
    return critic_free_round(runtime, "dpo", update, dist=dist, **kwargs)


# -- 3'. pairs ---------------------------------------------------------------------------------
def pairs_step(runtime, rollout: Rollout, config: PPOConfig,
               plan: Plan) -> tuple[Rollout, Rollout, dict]:
    """(chosen, rejected, counts): row i of `chosen` beats row i of `rejected`; both carry
    `logprobs` (the round's starting policy) and `ref_logprobs`."""
    G = config.group_size
    scores = rollout.scores.reshape(-1, G)  # (prompts, G), a prompt's samples contiguous
    spread = scores.max(dim=1).values - scores.min(dim=1).values
    starts = torch.arange(scores.shape[0], device=scores.device) * G
    keep = spread > 1e-6  # equal scores: no preference to learn
    best = (starts + scores.argmax(dim=1))[keep].tolist()
    worst = (starts + scores.argmin(dim=1))[keep].tolist()
    if not best:
        reason = "no preference pairs: every group's samples scored the same"
        raise PPOHealthError(reason, aborted(plan, reason))
    ids = rollout.response_lists()
    sampled = [(rollout.prompts[b], ids[b].tolist(), bool(rollout.has_stop[b]),
                ids[w].tolist(), bool(rollout.has_stop[w])) for b, w in zip(best, worst)]
    share = config.dpo_human_share
    human = human_pairs(runtime, round(len(sampled) * share / (1 - share)), plan.seed)
    rows = sampled + human
    chosen, rejected = (pair_side(runtime, config, rows, side) for side in (0, 1))
    return chosen, rejected, {"pairs_sampled": len(sampled), "pairs_human": len(human)}


def human_pairs(runtime, n: int, seed: int) -> list[tuple]:
    """Up to `n` of people's strict pairs on train prompts (seeded), as token lists that end
    with the stop token: (prompt, chosen_ids, True, rejected_ids, True)."""
    if n <= 0:
        return []
    pool = [p for p in runtime.data.training_pairs()
            if p["split"] == "train" and p["label"] == 1.0]
    picked = random.Random(seed).sample(pool, min(n, len(pool)))
    tok = runtime.tokenizer
    stop = tok.eos_token_id if tok.eos_token_id is not None else stop_token_ids(tok)[0]

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"] + [stop]
    return [(p["prompt"], encode(p["chosen"]), True, encode(p["rejected"]), True)
            for p in picked]


def pair_side(runtime, config: PPOConfig, rows: list[tuple], side: int) -> Rollout:
    """One side of the pairs (0 chosen, 1 rejected) as a Rollout with its log-probs."""
    tok = runtime.tokenizer
    prompts = [r[0] for r in rows]
    queries = [chat_ids(tok, p, config.max_prompt_tokens) for p in prompts]
    responses = [r[1 + 2 * side] for r in rows]  # people's pairs keep their whole length
    has_stop = [r[2 + 2 * side] for r in rows]
    side_rollout = build_rollout(tok, prompts, queries, responses, has_stop,
                                 runtime.device.device)
    forward_step(runtime, side_rollout, config, critic=False)  # policy and reference
    return side_rollout


# -- 4. DPO epochs -------------------------------------------------------------------------------
def dpo_train_step(runtime, chosen: Rollout, rejected: Rollout, config: PPOConfig, plan: Plan,
                   dist, out) -> dict:
    """Epochs over the pairs, `minibatch_size / 2` pairs (two sequences each) per step."""
    policy = list(adapter_params(runtime.model, "policy").values())
    mb = max(1, config.minibatch_size // 2)

    def update(idx):
        idx = idx.to(chosen.mask.device)
        return dpo_update(runtime, chosen.select(idx), rejected.select(idx), config, dist,
                          policy)
    return run_epochs(runtime, len(chosen), mb, config, plan, dist, out, policy, update,
                      lr=config.dpo_lr)


def dpo_update(runtime, chosen: Rollout, rejected: Rollout, config: PPOConfig, dist,
               params) -> dict:
    model = runtime.model
    with autocast(runtime.device):
        model.set_adapter("policy")
        cached = config.prefix_cache
        logprobs_c, _ = policy_logprobs(model, chosen, config.temperature,
                                        prefix_cache=cached)  # (b,T)
        logprobs_r, _ = policy_logprobs(model, rejected, config.temperature,
                                        prefix_cache=cached)
        loss, stats = dpo_loss(seq_logps(logprobs_c, chosen), seq_logps(logprobs_r, rejected),
                               seq_logps(chosen.ref_logprobs, chosen),
                               seq_logps(rejected.ref_logprobs, rejected),
                               config.dpo_beta, config.dpo_label_smoothing)
    backward_if_finite(loss, params)
    grad_norm = reduce_and_clip(dist, params, config.max_grad_norm)
    # drift from the round's starting policy, on the chosen and the rejected tokens
    drift_c = policy_drift(logprobs_c, chosen.logprobs, chosen.mask)
    drift_r = policy_drift(logprobs_r, rejected.logprobs, rejected.mask)
    drift = {k: (drift_c[k] + drift_r[k]) / 2 for k in drift_c}
    return {"loss": loss.item(), **{k: v.item() for k, v in (stats | drift).items()},
            "grad_norm": grad_norm}


def seq_logps(logprobs: torch.Tensor, batch: Rollout) -> torch.Tensor:
    """(B,T) per-token log-probs -> (B,) summed over the response's real tokens."""
    return zero_padding(logprobs, batch.mask).sum(dim=1)
