"""Policy rounds, step 6 and output: publish the next policy version; metrics, progress, events.

Every algorithm publishes the same layout (`policy/` adapter; PPO adds its critic in `value/`)
and records which algorithm made the version, with its settings, in the manifest and the
version row (`config.algorithm`). Metrics of every algorithm go to the "ppo" metric kind, the
one the Dashboard plots (reward, KL, entropy, length per step).
"""
from __future__ import annotations

from pathlib import Path

from rlhf_core import models
from rlhf_core.advantages import AdaptiveKLController
from rlhf_core.checkpoints import publish
from rlhf_core.config import PPOConfig, to_dict
from rlhf_core.policy.setup import TRUNK, Plan


# -- 6. publish ---------------------------------------------------------------------------------------
def publish_step(runtime, config: PPOConfig, plan: Plan, stats: dict, dist, out, *,
                 critic: bool = True) -> dict:
    """Rank 0 writes policy/ (+ value/: adapter, head, with a critic) atomically, then the
    version row."""
    if config.adaptive_kl:
        ctl = AdaptiveKLController(plan.kl_coef, config.target_kl, config.kl_horizon)
        stats["kl_coef_next"] = ctl.update(stats["kl"], stats["n_sequences"])
    else:
        stats["kl_coef_next"] = plan.kl_coef
    trunk = critic and config.critic == "trunk"
    if critic:
        stats["critic_init"] = plan.critic_init
    result = {"status": "published", "version": plan.version, "parent": plan.parent,
              "reward_version": plan.reward_version, "algorithm": plan.algorithm,
              "metrics": stats}
    # provenance of the version: its settings, algorithm and the math it trained in
    settings = to_dict(config) | {"algorithm": plan.algorithm,
                                  "mixed_precision": runtime.device.mixed_precision}
    if dist.is_main:
        model = runtime.model

        def write(tmp: Path) -> None:
            models.save_adapter(model, "policy", tmp)
            if critic:  # a trunk critic is its head alone (it reads the policy's states)
                if not trunk:
                    models.save_adapter(model, "value", tmp)
                models.save_head(runtime.heads["value"], tmp / "value",
                                 meta={"role": "value", "version": plan.version,
                                       "critic": config.critic})

        manifest = {k: result[k] for k in ("version", "parent", "reward_version", "algorithm")}
        manifest |= {"kind": "policy", "config": settings, "metrics": stats,
                     "base_model": runtime.config.model}
        path = publish(runtime.workspace, "policy", plan.version, write, manifest,
                       recorded=runtime.data.get_version)
        runtime.data.add_version("policy", plan.version, status="published", path=str(path),
                                  parent=plan.parent, reward_version=plan.reward_version,
                                  base_model=str(runtime.config.model), config=settings,
                                  metrics=stats, job_id=out.job_id)
        result["path"] = str(path)
    dist.barrier()  # other ranks return once the version exists
    runtime.loaded["policy"] = plan.version
    if critic:
        runtime.loaded["value"] = (TRUNK, plan.version) if trunk else plan.version
    out.progress(1.0, f"published policy v{plan.version}")
    return result


# -- output ------------------------------------------------------------------------------------------------
class Output:
    """Metrics, progress and events: written by rank 0 only, to the job's reporter or the DB."""

    def __init__(self, data, reporter, dist):
        self.data, self.reporter, self.is_main = data, reporter, dist.is_main
        self.job_id = getattr(reporter, "job_id", None)
        last = data.last_metric_step("ppo") if self.is_main else 0
        self.step0 = (last or 0) + 1 if last is not None else 0  # steps run on across rounds

    def metrics(self, values: dict, *, step: int, version: int) -> None:
        if not self.is_main:
            return
        values = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self.reporter is not None:
            self.reporter.metrics("ppo", values, step=step, version=version)
        else:
            self.data.log_metrics("ppo", values, step=step, version=version)

    def progress(self, fraction: float, message: str) -> None:
        if self.is_main and self.reporter is not None:
            self.reporter.progress(fraction, message)

    def event(self, kind: str, **payload) -> None:
        if self.is_main:
            self.data.log_event(kind, None, job_id=self.job_id, **payload)
