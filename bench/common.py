"""Shared helpers of the benchmark suite: model cache, device, results files, machine info."""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"


def cache_dir() -> Path:
    """Where the embedded model is converted once (shared by every benchmark and bench_reward)."""
    return Path(os.environ.get("RLHF_BENCH_CACHE", str(Path(tempfile.gettempdir()) / "rlhf-bench")))


def embedded_model_dir() -> str:
    from rlhf_core.models import resolve_model_source
    return resolve_model_source("embedded", cache_dir())


def device_settings():
    """accelerate's choice: cuda + bf16 when present, else CPU float32 (rlhf_core.models)."""
    from rlhf_core.models import device_settings as ds
    return ds()


def set_threads() -> int:
    import torch
    n = int(os.environ.get("RLHF_BENCH_THREADS", os.cpu_count() or 2))
    torch.set_num_threads(n)
    return n


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    cpu_id = {}  # a VM's model name can hide the generation ("AMD EPYC"): family/model say it
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name":
                cpu = value
            elif key in ("cpu family", "model", "stepping", "cpu MHz") and key not in cpu_id:
                cpu_id[key] = value
            elif key == "flags":
                cpu_id["bf16"] = any(f in value.split() for f in ("avx512_bf16", "amx_bf16"))
                break
    except OSError:
        pass
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_id": cpu_id, "cores": os.cpu_count(), "ram_gb": mem, "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version(),
            "packages": package_versions()}


def package_versions(extra: tuple[str, ...] = ()) -> dict:
    """Versions of what a result depends on, None where not installed: our side's packages,
    plus `extra` (a TRL side adds ("trl", "datasets") and records its own venv's)."""
    import importlib.metadata as md
    out = {}
    for name in ("torch", "transformers", "peft", "accelerate", "gradio", "sqlite-utils", *extra):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


_PEAK_BEFORE_RESET = 0.0  # the running peak as it was at the last reset_peak_rss


def peak_rss_mb() -> float:
    """This process's peak resident set since it started (ru_maxrss is KiB on Linux; a
    reset_peak_rss also resets it, so the peak before the last reset is kept here)."""
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, _PEAK_BEFORE_RESET)


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: writing 5 to /proc/self/clear_refs resets VmHWM).
    ru_maxrss only grows, so a phase's `peak_rss_mb` also holds every earlier phase's peak
    (loading the models included); `window_peak_rss_mb` after this reads the phase's own.
    The kernel resets ru_maxrss with it: `peak_rss_mb` keeps the earlier peak itself."""
    global _PEAK_BEFORE_RESET
    _PEAK_BEFORE_RESET = peak_rss_mb()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def window_peak_rss_mb() -> float | None:
    """VmHWM: the peak resident set since the last `reset_peak_rss` (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(xs):
    return statistics.median(xs) if xs else None


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0
        return False


def write_result(name: str, result: dict) -> Path:
    """bench/results/<name>.json, or `name` itself when it is a path ending in .json; written
    whole or not at all."""
    path = Path(name) if name.endswith(".json") else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


# Shared by the sampling and PPO benchmarks: the same prompts on both sides of a comparison.
PROMPTS = [
    "Give me three tips for keeping a small vegetable garden healthy.",
    "Explain what a rainbow is to a ten-year-old.",
    "Write a short friendly reminder to water the office plants.",
    "What should I pack for a weekend hiking trip?",
    "Describe the taste of a fresh lemon in two sentences.",
    "How do I make a simple cup of tea?",
    "Suggest a name for a cat that loves boxes.",
    "Why do leaves change color in autumn?",
    "List some easy ways to save water at home.",
    "Write a haiku about a quiet library.",
    "What is a good way to start learning to draw?",
    "Explain why the sky looks blue.",
    "Give a one-paragraph summary of how bread rises.",
    "How can I remember people's names better?",
    "Describe a sunrise over the sea.",
    "What are the benefits of taking short walks?",
    "Write two sentences inviting a neighbour to a picnic.",
    "How does a bicycle stay upright when it moves?",
    "Give me a simple recipe for pancakes.",
    "What is the difference between weather and climate?",
    "Suggest three board games for a family evening.",
    "Explain what a volcano is in simple words.",
    "Write a short thank-you note to a teacher.",
    "How can I fall asleep more easily?",
    "Describe the sound of rain on a roof.",
    "What should a beginner know about running?",
    "Why do cats purr?",
    "Give a tip for keeping a tidy desk.",
    "Write a limerick about a sleepy dog.",
    "What makes a good first sentence in a story?",
    "How do bees make honey?",
    "List three ways to be kind to a stranger.",
]
assert len(PROMPTS) == 32  # B2 runs the default round: 32 prompts x 2 rollouts
