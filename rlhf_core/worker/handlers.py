"""The one table from a job kind to the library call it runs.

A handler adapts a claimed job to a plain function: it applies the job's parameters over the
matching config section (`with_overrides`; the config itself was read once when the job was
claimed) and passes the reporter for progress and metrics. Library code never sees the queue;
follow-up jobs are queued by the loop policy alone (loop.py).
"""
from __future__ import annotations

from rlhf_core.config import with_overrides
from rlhf_core.labeling.arena import sample_arena
from rlhf_core.labeling.batch import sample_batch
from rlhf_core.labeling.heldout import eval_policy
from rlhf_core.policy.launch import run_launched
from rlhf_core.policy.rounds import policy_round
from rlhf_core.reward.round import score_items, train_reward


def sample_batch_job(runtime, params: dict, reporter) -> dict:
    cfg = runtime.config
    return sample_batch(runtime, with_overrides(cfg.sampling, params),
                        with_overrides(cfg.loop, params), reporter=reporter,
                        policy_version=params.get("policy_version"), seed=params.get("seed"),
                        prompt_ids=params.get("prompt_ids"))


def sample_arena_job(runtime, params: dict, reporter) -> dict:
    """An annotator's own prompt (the Arena tab): `params["prompt_id"]`, answered K times by
    the current policy, one item held for the annotator who asked (rlhf_core.data.arena)."""
    return sample_arena(runtime, with_overrides(runtime.config.sampling, params),
                        prompt_id=params["prompt_id"], reporter=reporter, seed=params.get("seed"))


def train_reward_job(runtime, params: dict, reporter) -> dict:
    return train_reward(runtime, reporter=reporter,
                        config=with_overrides(runtime.config.reward, params),
                        from_scratch=bool(params.get("from_scratch")))


def ppo_round_job(runtime, params: dict, reporter) -> dict:
    """The policy round (kind `ppo_round` for every algorithm): `params["algorithm"]` or the
    workspace's `loop.algorithm` picks ppo / grpo / rloo / dpo; other params override `ppo`."""
    algorithm = with_overrides(runtime.config.loop, params).algorithm  # validated there
    config = with_overrides(runtime.config.ppo, params)
    processes = getattr(runtime, "processes", 1)
    if processes > 1:  # `rlhf worker --processes N`: accelerate launch, rank 0 reports
        return run_launched(runtime, algorithm=algorithm, config=config, reporter=reporter,
                            processes=processes)
    return policy_round(runtime, algorithm=algorithm, config=config, reporter=reporter)


def eval_policy_job(runtime, params: dict, reporter) -> dict:
    return eval_policy(runtime, with_overrides(runtime.config.sampling, params),
                       reporter=reporter, policy_version=params.get("policy_version"),
                       baseline=int(params.get("baseline", 0)),
                       samples_per_prompt=int(params.get("samples_per_prompt", 2)),
                       seed=int(params.get("seed", 1234)), max_prompts=params.get("max_prompts"))


def score_items_job(runtime, params: dict, reporter) -> dict:
    return score_items(runtime, version=params.get("version"), limit=params.get("limit"),
                       reporter=reporter)


HANDLERS = {
    "sample_batch": sample_batch_job,
    "sample_arena": sample_arena_job,
    "train_reward": train_reward_job,
    "ppo_round": ppo_round_job,
    "eval_policy": eval_policy_job,
    "score_items": score_items_job,
}
