"""Which policy round runs: `loop.algorithm` (or a job's "algorithm") -> the round's function.

Every round takes the same keywords (`config`, `reporter`, `reward_fn`, `prompts`, `dist`) and
publishes a policy version the same way; the comparison behind the default is in the README
("Choosing the algorithm").
"""
from __future__ import annotations

from rlhf_core.policy.dpo import dpo_round
from rlhf_core.policy.grpo import grpo_round, rloo_round
from rlhf_core.policy.ppo import ppo_round

ROUNDS = {"ppo": ppo_round, "grpo": grpo_round, "rloo": rloo_round, "dpo": dpo_round}


def policy_round(runtime, *, algorithm: str | None = None, **kwargs) -> dict:
    """One round of `algorithm` (default: the workspace's `loop.algorithm`)."""
    algorithm = algorithm or runtime.config.loop.algorithm
    if algorithm not in ROUNDS:
        raise ValueError(f"unknown policy algorithm {algorithm!r}: one of {', '.join(ROUNDS)}")
    return ROUNDS[algorithm](runtime, **kwargs)
