"""What a multi-process policy round reads, taken once by the worker that holds the job.

`accelerate launch` starts N processes for one round; only rank 0 talks to the app (or the
database), so every rank reads from a snapshot the worker wrote before launching: the settings,
the current policy and reward versions (with the local paths of their files), the next version
number, the train prompts and (for DPO) the people's pairs. Rank 0's writes (progress, metrics,
the new version) go to the worker's own data interface; other ranks write nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

from rlhf_core.config import AppConfig, from_dict, to_dict

SNAPSHOT_VERBS = ("config", "current_version", "get_version", "next_version_number",
                  "prompts_of_split", "last_metric_step", "training_pairs")


def take_snapshot(data, config: AppConfig, *, with_pairs: bool = False) -> dict:
    versions = {}
    for kind in ("policy", "reward"):
        row = data.current_version(kind)
        versions[kind] = row
    return {"config": to_dict(config), "versions": versions,
            "next_policy_version": data.next_version_number("policy"),
            "train_prompts": data.prompts_of_split("train"),
            "last_ppo_step": data.last_metric_step("ppo"),
            "training_pairs": data.training_pairs() if with_pairs else []}


def write_snapshot(path: Path, snapshot: dict) -> Path:
    Path(path).write_text(json.dumps(snapshot, default=str))
    return Path(path)


class SnapshotData:
    """The data interface of one rank: reads from the snapshot, writes through `writer`
    (rank 0: the worker's LocalData or RemoteData) or nowhere (other ranks)."""

    def __init__(self, snapshot: dict, writer=None):
        self.snap, self.writer = snapshot, writer

    def config(self) -> AppConfig:
        return from_dict(AppConfig, self.snap["config"])

    def current_version(self, kind: str) -> dict | None:
        return self.snap["versions"].get(kind)

    def get_version(self, kind: str, version: int) -> dict | None:
        row = self.snap["versions"].get(kind)
        if row is not None and row["version"] == version:
            return row
        # a version the snapshot does not hold: rank 0 asks (the publish checks for its own)
        return self.writer.get_version(kind, version) if self.writer is not None else None

    def next_version_number(self, kind: str) -> int:
        if kind != "policy":
            raise ValueError("a policy round's snapshot numbers policy versions only")
        return self.snap["next_policy_version"]

    def prompts_of_split(self, split: str, limit: int | None = None) -> list[dict]:
        if split != "train":
            raise ValueError("a policy round's snapshot holds the train prompts only")
        rows = self.snap["train_prompts"]
        return rows[:limit] if limit else rows

    def last_metric_step(self, kind: str) -> int | None:
        return self.snap["last_ppo_step"] if kind == "ppo" else None

    def training_pairs(self) -> list[dict]:
        return self.snap["training_pairs"]

    def __getattr__(self, verb: str):
        """Writes (progress, metrics, events, the new version): rank 0's writer, else dropped."""
        if verb.startswith("_"):
            raise AttributeError(verb)
        if self.writer is not None:
            return getattr(self.writer, verb)
        return lambda *args, **kwargs: None
