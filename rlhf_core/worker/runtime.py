"""The worker's model pool: one base model, many LoRA adapters, loaded lazily.

Adapter names: `policy` (the current policy, trainable by PPO), `policy@vN`
(an older version, for A/B sampling), `value` (critic) and `reward`; the
reference is the base with adapters disabled (`reference()` context).
Heads for `value` and `reward` live in `self.heads`.
A separate reward base (`config.reward_model`) is loaded as its own
sequence-classification model in `self.reward_base`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from pathlib import Path

from rlhf_core import models
from rlhf_core.checkpoints import version_dir
from rlhf_core.config import AppConfig
from rlhf_core.data.store import Store
from rlhf_core.worker.data import LocalData

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, data, config: AppConfig, *, cpu: bool = False, processes: int = 1):
        # the worker's data interface; a Store is served locally (tests, benches, the CLI)
        self.data = LocalData(data, config.workspace) if isinstance(data, Store) else data
        self.config = config
        self.processes = processes  # > 1: policy rounds run as `accelerate launch` (launch.py)
        self.workspace = Path(config.workspace)
        self.device = models.device_settings(cpu=cpu, mixed_precision=config.mixed_precision)
        self.lock = threading.RLock()  # one job uses the models at a time
        self._tokenizer = None
        self._model = None
        self.heads: dict[str, models.ScalarHead] = {}
        self.loaded: dict[str, int] = {}  # adapter name -> version loaded into it
        self.reward_base = None
        # (reward version, max_length, response id) -> score: reward evaluations reuse them
        self.reward_score_cache: dict[tuple[int, int, int], float] = {}
        self.eval_samples_cache: dict = {}  # held-out samples per version (labeling/heldout.py)
        self.eval_kl_cache: dict = {}  # and the judged version's KL from the reference

    def refresh_config(self, config: AppConfig) -> None:
        """Take the workspace's current settings (once per claimed job). Loaded weights stay:
        a changed base model, reward base or LoRA shape needs a worker restart."""
        for name in ("model", "reward_model", "lora", "system_prompt", "mixed_precision"):
            if getattr(config, name) != getattr(self.config, name):
                log.warning("setting %r changed; restart the worker to use it", name)
                config = dataclasses.replace(config, **{name: getattr(self.config, name)})
        self.config = dataclasses.replace(config, workspace=self.config.workspace,
                                          torch_threads=self.config.torch_threads)

    # -- base ------------------------------------------------------------------
    @property
    def base_source(self) -> str:
        return models.resolve_model_source(self.config.model, self.workspace)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = models.load_tokenizer(self.base_source,
                                                    system_prompt=self.config.system_prompt)
        return self._tokenizer

    @property
    def model(self):
        """The PeftModel over the base; created with a fresh (identity) `policy` adapter."""
        if self._model is None:
            base = models.load_causal_lm(self.base_source, self.tokenizer,
                                         dtype=self.device.dtype, device=self.device.device)
            self._model = models.with_adapters(base, self.config.lora, ["policy"])
            models.store_frozen_linears(self._model, self.device)
            self.loaded["policy"] = 0
            self._model.eval()
        return self._model

    @property
    def hidden_size(self) -> int:
        return models.hidden_size(self.model)

    @contextlib.contextmanager
    def reference(self):
        """The frozen reference: the base with every adapter disabled."""
        with self.model.disable_adapter():
            yield self.model

    # -- adapters ------------------------------------------------------------------
    def ensure_fresh_adapter(self, name: str, layers: list[int] | None = None) -> str:
        """Add an untrained adapter called `name` if it does not exist yet (on the decoder
        `layers` only, if given); one on other layers is replaced."""
        model = self.model
        if (name in model.peft_config
                and models.adapter_layers(model, name) != models.covered_layers(model, layers)):
            model.delete_adapter(name)
        if name not in model.peft_config:
            model.add_adapter(name, models.lora_config(self.config.lora, layers))
            self.loaded[name] = 0
        return name

    def load_adapter_dir(self, name: str, adapter_dir: Path, *, version: int,
                         trainable: bool = False) -> str:
        models.load_adapter(self.model, name, adapter_dir, trainable=trainable)
        self.loaded[name] = version
        return name

    def use_policy(self, version: int | None = None) -> str | None:
        """Activate the adapter of policy `version` (default: current). None means the
        base model (v0): the caller must run under `reference()` then."""
        if version is None:
            cur = self.data.current_version("policy")
            version = cur["version"] if cur else 0
        if version == 0:
            return None
        cur = self.data.current_version("policy")
        name = "policy" if cur and cur["version"] == version else f"policy@v{version}"
        if self.loaded.get(name) != version:
            row = self.data.get_version("policy", version)
            if row is None or not row.get("path"):
                raise models.ModelLoadError(f"policy version {version} is not published")
            self.load_adapter_dir(name, Path(row["path"]) / "policy", version=version)
        self.model.set_adapter(name)
        return name

    @contextlib.contextmanager
    def policy(self, version: int | None = None):
        """Context in which `self.model` computes as policy `version`."""
        name = self.use_policy(version)
        if name is None:
            with self.reference() as m:
                yield m
        else:
            yield self.model

    def policy_dir(self, version: int) -> Path:
        return version_dir(self.workspace, "policy", version)

    def reward_dir(self, version: int) -> Path:
        return version_dir(self.workspace, "reward", version)
