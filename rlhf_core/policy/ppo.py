"""One PPO round: rollout -> score -> advantages -> PPO epochs -> health gates -> publish.

`ppo_round` reads as that checklist; each step is a named function in a module of its own:
setup (0: plan, reward source, actor and critic), experience (1-3 and gate 5a), train
(4 and gate 5b), publish (6, and the round's output). The round does not queue anything: the
loop policy samples the next batch from the published version. Roles share one base model
(DESIGN.md): the `policy` LoRA adapter is the actor, the `value` adapter plus a scalar head the
critic, the reference is the base with adapters disabled, and the reward model is its own
adapter + head (or a separate base). peft runs one adapter at a time, so each minibatch does
a policy forward/backward with `policy` active, then a value forward/backward with `value`
active; the two parameter sets are disjoint, so the summed gradients equal those of
`pg_loss + vf_coef * vf_loss`. The value adapter sits on the top `ppo.critic_layers` decoder
layers only: below them it computes what the reference computes, so its forwards start there
from the reference's hidden states, kept when the score step runs the reference.

Multi-process (DDP via `accelerate launch`, see launch.py): every rank samples its shard of
the rollout, statistics (whitening, metrics, gates) are computed over all ranks, each loss is a
token sum over the global token count, and gradients are all-reduced by hand (the adapter switch
between two backward passes is not something DDP's reducer hooks support). With a minibatch that
covers the whole rollout the multi-process round equals the single-process one up to float error.
"""
from __future__ import annotations

from rlhf_core.config import PPOConfig
from rlhf_core.policy.experience import advantages_step, checked_stats, collect_experience

# The round reads top to bottom here; each step lives in setup / experience / train / publish.
from rlhf_core.policy.publish import Output, publish_step
from rlhf_core.policy.setup import (
    PPOHealthError,  # noqa: F401 (raised by the gates; importers catch it from here)
    SingleProcess,
    guard_round,
    plan_round,
    reward_source,
    setup_actor_critic,
)
from rlhf_core.policy.train import train_step


def ppo_round(runtime, *, config: PPOConfig | None = None, reporter=None, reward_fn=None,
              prompts: list[str] | None = None, dist=None) -> dict:
    """Run one PPO round and publish the next policy version. Raises PPOHealthError on a gate.

    `reward_fn(prompts, responses, response_ids) -> Tensor(B)` replaces the reward model
    (`response_ids`: one 1-D tensor per response, cut after its stop token).
    `prompts` replaces the sampled train prompts (each gets `rollouts_per_prompt` responses).
    """
    config = config or runtime.config.ppo
    dist = dist or SingleProcess()
    out = Output(runtime.data, reporter, dist)
    with runtime.lock:
        plan = plan_round(runtime, config, dist)
        score_fn = reward_source(runtime, reward_fn, plan)
        saved = setup_actor_critic(runtime, plan, config)
        with guard_round(runtime, saved, plan, out):  # any failure: the parent keeps serving
            rollout, times = collect_experience(runtime, config, plan, dist, score_fn, out,
                                                prompts)  # 1. rollout, 2. scores, ref, values
            advantages_step(rollout, config, plan, dist)  # 3. KL shaping, GAE, whitening
            stats = checked_stats(rollout, config, plan, dist, out, times)  # 5a. gates first
            stats |= train_step(runtime, rollout, config, plan, dist, out)  # 4. epochs (+5b)
        return publish_step(runtime, config, plan, stats, dist, out)  # 6.
