"""A policy round (PPO, or GRPO / RLOO with `--set loop.algorithm=grpo`) as a multi-process
(DDP) job under `accelerate launch`.

Several GPUs, one machine:
    accelerate launch --multi_gpu --num_processes 4 -m rlhf_core.policy.launch --workspace W
CPU processes (how the tests run it on this machine):
    accelerate launch --multi_gpu --num_processes 2 -m rlhf_core.policy.launch --cpu --workspace W
(`accelerate launch --cpu --num_processes 2` starts a single process unless mpirun is set up:
accelerate's CPU launcher does not spawn ranks itself; `--multi_gpu` uses torchrun, and our
`--cpu` makes each rank a gloo CPU process. `torchrun --nproc_per_node 2 -m
rlhf_core.policy.launch --cpu ...` works too.)

Each rank samples `prompts_per_round * rollouts_per_prompt / world_size` rollouts; statistics
and gates are computed over all ranks, gradients all-reduced; rank 0 alone writes metrics and
publishes the version. `minibatch_size` is the global minibatch (split over ranks). The round
uses the workspace's saved configuration (model, LoRA, reward model, ppo section), with
`--set SECTION.FIELD=VALUE` on top for this round, as every `rlhf` command takes it.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path

import torch

from rlhf_core.config import AppConfig


class AccelerateDist:
    """The round's collectives over an `accelerate.Accelerator` process group."""

    def __init__(self, accelerator):
        self.acc = accelerator
        self.world_size = accelerator.num_processes
        self.rank = accelerator.process_index
        self.is_main = accelerator.is_main_process

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's rows (rank order); dim 1 padded with 0 to the widest."""
        if t.dim() > 1:
            t = self.acc.pad_across_processes(t.contiguous(), dim=1, pad_index=0)
        return self.acc.gather(t.contiguous())

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(t.detach().clone(), reduction="sum")

    def all_reduce_grads(self, params) -> None:
        """Average the gradients over ranks: one flat all-reduce of the (small) LoRA grads."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.acc.reduce(flat, reduction="mean")
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def broadcast(self, obj):
        from accelerate.utils import broadcast_object_list
        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def barrier(self) -> None:
        self.acc.wait_for_everyone()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m rlhf_core.policy.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", required=True, type=Path)
    ap.add_argument("--cpu", action="store_true", help="CPU processes (gloo) even if cuda exists")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    dest="settings", help="a setting over the workspace's saved configuration "
                    "for this round only, e.g. --set ppo.epochs=2 (as every rlhf command)")
    ap.add_argument("--reward-fn", help="module:function replacing the reward model "
                    "(reward_fn(prompts, responses, response_ids) -> Tensor(B)); for tests")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--result-json", type=Path, help="rank 0 writes the round's result here")
    # started by a worker for a job it holds (rlhf_core.worker.handlers): every rank reads the
    # worker's snapshot; rank 0 alone reports and publishes, as that worker
    ap.add_argument("--snapshot", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--job-id", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--server", help=argparse.SUPPRESS)
    ap.add_argument("--algorithm", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def round_config(workspace: Path, settings: list[str]) -> AppConfig:
    """The workspace's saved configuration with `--set` values applied (not saved: every rank
    reads the same file, none writes it)."""
    from rlhf_core.data.store import Store
    from rlhf_core.workspace import DB_NAME, apply_overrides, parse_settings, read_config
    workspace = workspace.expanduser().resolve()
    if not (workspace / DB_NAME).exists():
        raise SystemExit(f"{workspace} is not a workspace (no {DB_NAME}): create it with rlhf up")
    store = Store(workspace / DB_NAME)
    try:
        cfg = apply_overrides(read_config(store), parse_settings(settings))
    finally:
        store.close()
    return dataclasses.replace(cfg, workspace=workspace)


def rank_data(args, is_main: bool):
    """(data, reporter, closer) of this rank for a job a worker holds (--snapshot)."""
    from rlhf_core.worker.run import Reporter
    from rlhf_core.worker.snapshot import SnapshotData
    snapshot = json.loads(args.snapshot.read_text())
    writer = None
    if is_main:
        if args.server:
            from rlhf_core.worker.remote import RemoteData
            writer = RemoteData(args.server, os.environ["RLHF_WORKER_TOKEN"], args.workspace,
                                worker=args.worker)
        else:
            from rlhf_core.data.store import Store
            from rlhf_core.worker.data import LocalData
            from rlhf_core.workspace import DB_NAME
            writer = LocalData(Store(args.workspace / DB_NAME), args.workspace)
    data = SnapshotData(snapshot, writer)
    reporter = Reporter(writer, args.job_id, args.worker) if writer is not None else None
    return data, reporter, (writer.close if hasattr(writer, "close") else lambda: None)


def free_tcp_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_launched(runtime, *, algorithm: str, config, reporter, processes: int) -> dict:
    """A worker's job as `accelerate launch` with `processes` ranks on this host: the worker
    writes the snapshot every rank reads, rank 0 reports progress and publishes as this
    worker, and the round's result comes back through a file."""
    import shutil
    import subprocess
    import tempfile

    from rlhf_core.worker.snapshot import take_snapshot, write_snapshot
    cfg = dataclasses.replace(runtime.config, ppo=config,
                              loop=dataclasses.replace(runtime.config.loop, algorithm=algorithm))
    data = runtime.data
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    with tempfile.TemporaryDirectory(dir=runtime.workspace, prefix=".round-") as tmp:
        snap = write_snapshot(Path(tmp) / "snapshot.json",
                              take_snapshot(data, cfg, with_pairs=algorithm == "dpo"))
        out = Path(tmp) / "result.json"
        cpu = runtime.device.device.type == "cpu"
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--dynamo_backend", "no",
               "--main_process_port", str(free_tcp_port()),
               *(["--mixed_precision", runtime.device.mixed_precision] if cpu else []),
               "-m", "rlhf_core.policy.launch", "--workspace", str(runtime.workspace),
               "--snapshot", str(snap), "--job-id", str(reporter.job_id),
               "--worker", reporter.worker, "--algorithm", algorithm,
               "--threads", str(max(1, torch.get_num_threads() // processes)),
               "--result-json", str(out), *(["--cpu"] if cpu else [])]
        env = dict(os.environ)
        if getattr(data, "server", None):  # a remote worker: rank 0 calls the app as it
            cmd += ["--server", data.server]
            env["RLHF_WORKER_TOKEN"] = data.token
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
            raise RuntimeError(f"the {processes}-process round failed (exit {proc.returncode}):"
                               f"\n{tail}")
        result = json.loads(out.read_text())
    result["processes"] = processes
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from accelerate import Accelerator

    from rlhf_core.policy.rounds import policy_round
    from rlhf_core.worker.runtime import Runtime

    accelerator = Accelerator(cpu=args.cpu)
    torch.set_num_threads(args.threads)
    args.workspace = args.workspace.expanduser().resolve()
    reporter = None
    if args.snapshot:  # a worker's job: nothing but rank 0 touches the app or the database
        data, reporter, close = rank_data(args, accelerator.is_main_process)
        app = dataclasses.replace(data.config(), workspace=args.workspace)
    else:
        from rlhf_core.data.store import Store
        from rlhf_core.workspace import DB_NAME
        app = round_config(args.workspace, args.settings)
        data = Store(app.workspace / DB_NAME)
        close = data.close
    runtime = Runtime(data, app, cpu=args.cpu)
    reward_fn = None
    if args.reward_fn:
        module, _, attr = args.reward_fn.partition(":")
        reward_fn = getattr(importlib.import_module(module), attr)
    result = policy_round(runtime, algorithm=args.algorithm or app.loop.algorithm,
                          config=app.ppo, reward_fn=reward_fn, reporter=reporter,
                          dist=AccelerateDist(accelerator))
    if accelerator.is_main_process:
        text = json.dumps(result, indent=2, default=str)
        if args.result_json:
            args.result_json.write_text(text)
        print(text)
    accelerator.wait_for_everyone()
    close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
