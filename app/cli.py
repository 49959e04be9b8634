"""`rlhf`: thin commands over rlhf_core. Every command takes --workspace DIR
(default: $RLHF_WORKSPACE, else ./workspace) and has an example in its help.

Only the commands in CREATE_WORKSPACE create a missing workspace; the others refuse one. Bad
input (a flag, a file, a workspace, a busy port) ends in one line `rlhf CMD: error: ...` and
exit status 1; RLHF_DEBUG=1 shows the traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sqlite3
import sys
import threading
from pathlib import Path

from rlhf_core.config import EMBEDDED_MODEL, ModelLoadError, default_workspace
from rlhf_core.data.store import WorkspaceError
from rlhf_core.workspace import parse_settings

# `up` and `worker` start a loop on a workspace; `import-prompts` is how one is filled before;
# `simulate` and `sample` are self-contained runs. status, export, serve, train-reward, ppo and
# worker-token read what is there: on a typo'd --workspace they say so instead of creating one.
CREATE_WORKSPACE = ("up", "worker", "import-prompts", "simulate", "sample")


class CommandError(RuntimeError):
    """A command that could not do what was asked, for a reason its message states."""


def model_flags(p):
    """Every model and loop flag: for the commands that run (or configure) the whole loop."""
    policy_model_flags(p)
    reward_model_flag(p)
    batch_flags(p)
    p.add_argument("--min-ready", type=int, dest="min_ready",
                   help="unlabeled items the worker keeps ready (default 6)")
    p.add_argument("--auto", action="store_true", default=None,
                   help="automatic loop: retrain the reward model every N rankings, run a "
                        "policy round when promoted, sample from each new policy")
    p.add_argument("--retrain-every", type=int, dest="retrain_every",
                   help="with --auto: new rankings between reward trainings (default 20)")


def policy_model_flags(p):
    """The policy's base (every model command reads it) and --set for any other setting."""
    p.add_argument("--model", help=f"policy base: {EMBEDDED_MODEL} (default), a Hub id or a "
                                   "local directory")
    set_flag(p)


def reward_model_flag(p):
    """For the commands that load the reward model (`train-reward`, `ppo`; `sample` does not)."""
    p.add_argument("--reward-model", dest="reward_model",
                   help="a separate reward base (Hub id or directory); default: a reward adapter "
                        "on the policy's base")


def batch_flags(p):
    """How a labeling batch is sampled: what `sample` reads beside the models."""
    p.add_argument("--k", type=int, help="responses per prompt (2..8, default 4)")
    p.add_argument("--max-new-tokens", type=int, dest="max_new_tokens",
                   help="longest response in tokens (sampling.max_new_tokens)")
    p.add_argument("--overlap", type=int, help="annotators per item (>1 for agreement studies)")


def set_flag(p):
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   dest="settings", help="any config value, e.g. --set ppo.lr=2e-4 "
                   "--set loop.selection=uncertainty (repeatable; saved in the workspace)")


def overrides_from(a) -> dict:
    get = lambda n: getattr(a, n, None)  # noqa: E731
    return {"model": get("model"), "reward_model": get("reward_model"),
            "sampling.k": get("k"), "sampling.max_new_tokens": get("max_new_tokens"),
            "sampling.min_ready_items": get("min_ready"), "loop.overlap": get("overlap"),
            "loop.auto": get("auto"), "loop.retrain_every": get("retrain_every"),
            **parse_settings(get("settings") or [])}


def open_ws(a):
    from rlhf_core.workspace import open_workspace
    return open_workspace(a.workspace, create=a.command in CREATE_WORKSPACE, **overrides_from(a))


def serve_flags(p):
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(os.environ.get("RLHF_PORT", 7860)),
                   help="port of the UI (default: $RLHF_PORT or 7860)")
    p.add_argument("--auth", type=Path, dest="auth_file",
                   help="JSON or CSV of user,password,role (annotator|researcher): enables login")
    p.add_argument("--insecure-no-auth", action="store_true", dest="insecure_no_auth",
                   help="allow a --host beyond loopback without --auth (everybody who can reach "
                        "it may start jobs and switch the automatic loop on)")


def check_serving(a) -> None:
    """Before anything starts: a readable auth file, no login-less exposure beyond loopback
    unless asked for, and a free port (Gradio would fail after building the whole UI)."""
    from app.login_guard import is_loopback
    if a.auth_file is not None:
        from app.context import load_auth_file
        if not a.auth_file.is_file():
            raise CommandError(f"auth file {a.auth_file} does not exist")
        load_auth_file(a.auth_file)
    elif not is_loopback(a.host) and not a.insecure_no_auth:
        raise CommandError(f"refusing to serve on {a.host} without login: pass --auth FILE, or "
                           "--insecure-no-auth to let everybody who can reach it in")
    with socket.socket(socket.AF_INET6 if ":" in a.host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            s.bind((a.host, a.port))
        except OSError as exc:
            raise CommandError(f"cannot listen on {a.host}:{a.port} ({exc.strerror or exc}): "
                               "is another server running there? pick one with --port") from None


# -- commands -----------------------------------------------------------------------------
def cmd_up(a):
    """Worker in a child process, UI in this one; Ctrl-C, SIGTERM or SIGHUP stops both."""
    store, cfg = open_ws(a)
    from rlhf_core.workspace import seed_prompts_if_empty
    added = seed_prompts_if_empty(store, cfg)
    if added:
        print(f"workspace {cfg.workspace}: imported {added} sample prompts")
    from app.launcher import interrupt_on_signals, start_worker, stop_worker
    interrupt_on_signals()  # SIGTERM and SIGHUP close the UI as Ctrl-C does, then the worker
    worker = start_worker(cfg.workspace)
    try:
        cmd_serve(a, store=store, cfg=cfg)
    except KeyboardInterrupt:
        pass  # a signal before the UI's own wait loop took it
    finally:
        stop_worker(worker)


def cmd_serve(a, store=None, cfg=None):
    if store is None:
        store, cfg = open_ws(a)
    from app.context import AppContext
    from app.ui import launch
    ctx = AppContext.from_config(cfg, store=store, auth_file=a.auth_file)
    print(f"rlhf-loop UI on http://{a.host}:{a.port}  (workspace {cfg.workspace})", flush=True)
    launch(ctx, host=a.host, port=a.port, auth_file=a.auth_file,
           allow_no_auth=a.insecure_no_auth)


def cmd_worker(a):
    from rlhf_core.worker.run import run_remote_worker, run_worker
    check_models_resolve(a)
    from rlhf_core.worker.presence import stop_on_signals
    stop = threading.Event()
    stop_on_signals(stop)  # SIGTERM/SIGINT/SIGHUP: hand back the current job, then exit
    parent = os.environ.get("RLHF_PARENT_PID")  # set by `rlhf up`: exit when it is gone
    token = a.token or os.environ.get("RLHF_WORKER_TOKEN")
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()] if a.kinds else None
    try:
        if a.server:
            if not token:
                raise ValueError("--server needs a worker token: --token or $RLHF_WORKER_TOKEN "
                                 "(create one on the app host: rlhf worker-token create NAME)")
            run_remote_worker(a.server, token, Path(a.cache or Path(a.workspace) / "remote"),
                              stop=stop, cpu=a.cpu, nice=a.nice, threads=a.threads,
                              kinds=kinds, overrides=overrides_from(a), processes=a.processes)
        else:
            run_worker(Path(a.workspace), stop=stop, cpu=a.cpu, nice=a.nice, threads=a.threads,
                       overrides=overrides_from(a), kinds=kinds,
                       parent_pid=int(parent) if parent else None, processes=a.processes)
    except KeyboardInterrupt:
        stop.set()


def cmd_worker_token(a):
    from rlhf_core.data import tokens
    store, _ = open_ws(a)
    if a.action == "create":
        secret = tokens.create(store, a.name or "")
        print(f"worker token {a.name!r} (shown once; only its hash is stored):\n{secret}\n"
              f"on the GPU host: RLHF_WORKER_TOKEN={secret} rlhf worker --server URL")
    elif a.action == "revoke":
        if not tokens.revoke(store, a.name or ""):
            raise ValueError(f"no active worker token named {a.name!r}")
        print(f"revoked {a.name!r}: its next call is refused")
    else:
        for t in tokens.list_tokens(store):
            state = f"revoked {t['revoked_at']}" if t["revoked_at"] else "active"
            print(f"{t['name']:<24} {state:<34} created {t['created_at']} "
                  f"last used {t['last_used_at'] or '-'}")


def cmd_import_prompts(a):
    from rlhf_core.prompt_io import ImportRejected, check_prompt_path
    store, cfg = open_ws(a)
    try:  # every line checked: all the bad ones are named at once, and nothing is added
        records, stats, problems = check_prompt_path(a.file, max_problems=10)
    except ImportRejected as exc:
        raise CommandError(f"import rejected, nothing was added: {a.file}: {exc}") from None
    if problems:
        more = stats["bad"] - len(problems)
        raise CommandError(f"import rejected, nothing was added: {a.file}: " + "; ".join(
            [str(p) for p in problems] + ([f"... and {more} more bad records"] if more else [])))
    result = store.add_prompts(records, source=str(a.file),
                               heldout_fraction=cfg.reward.heldout_fraction)
    print(f"{result['added']} prompts added, {result['duplicates']} already present, "
          f"{stats['duplicates_in_file']} duplicates inside the file")


def cmd_export(a):
    from rlhf_core.data import annotation
    from rlhf_core.prompt_io import write_hf_dataset, write_jsonl
    out = Path(a.out)
    beside = out.with_name((out.stem if a.format == "jsonl" else out.name) + ".rankings.jsonl")
    # One rule for both formats, checked for both targets before anything is written.
    taken = [str(t) for t in (out, beside)
             if t.exists() and not (t.is_dir() and not any(t.iterdir()))]
    if taken and not a.overwrite:
        raise CommandError(f"{' and '.join(taken)} already exist{'s' * (len(taken) == 1)}: "
                           "pass --overwrite to replace, or choose another OUT")
    store, _ = open_ws(a)
    pairs = annotation.export_pairs(store, include_ties=a.include_ties)
    rankings = annotation.export_rankings(store)
    out.parent.mkdir(parents=True, exist_ok=True)
    write = write_jsonl if a.format == "jsonl" else write_hf_dataset
    n = write(out, pairs, overwrite=a.overwrite)
    write_jsonl(beside, rankings, overwrite=a.overwrite)
    print(f"exported {n} pairs to {out} and {len(rankings)} rankings beside it")


def cmd_export_policy(a):
    from rlhf_core.policy.export import export_policy
    store, cfg = open_ws(a)
    res = export_policy(store, cfg, Path(a.out), version=a.version, merge=a.merge,
                        overwrite=a.overwrite)
    form = "merged model" if res["merged"] else f"LoRA adapter for {res['base_model']}"
    print(f"exported policy v{res['version']} to {res['out']} ({form}, with a model card)")


def cmd_status(a):
    store, _ = open_ws(a)
    status = store.status()
    if a.json:
        print(json.dumps(status, indent=2, default=str))
        return
    c = status["counts"]
    print(f"workspace {status['workspace']}\npolicy v{status['policy_version']}  reward "
          f"{'v%s' % status['reward_version'] if status['reward_version'] else '-'}")
    print("  ".join(f"{k}={v}" for k, v in c.items()))
    for j in status["jobs"][:10]:
        print(f"  job {j['id']:>4} {j['kind']:<13} {j['status']:<9} {j['progress']:>4.0%} "
              f"{j['message'] or j['error'] or ''}")


def _run_job_here(a, kind: str, params: dict):
    """Queue a job and run it in this process with a tqdm bar (no separate worker needed)."""
    from tqdm import tqdm

    from rlhf_core.data import jobs
    from rlhf_core.worker.run import lower_priority, run_one, worker_name
    from rlhf_core.worker.runtime import Runtime
    from rlhf_core.workspace import seed_prompts_if_empty
    check_models_resolve(a)
    store, cfg = open_ws(a)
    seed_prompts_if_empty(store, cfg)
    lower_priority(0, cfg.torch_threads)
    job_id = jobs.enqueue(store, kind, params, requested_by="cli")
    if a.queue_only:
        print(f"queued job {job_id} ({kind}); a running worker will take it")
        return
    runtime = Runtime(store, cfg, cpu=getattr(a, "cpu", False))
    bar = tqdm(total=100, desc=kind, unit="%")
    done = threading.Event()

    def follow():
        last = None
        while not done.wait(0.5):
            row = jobs.get_job(store, job_id)
            if row and row["status"] == "running" and (row["progress"], row["message"]) != last:
                last = (row["progress"], row["message"])
                bar.n = int(row["progress"] * 100)
                bar.set_postfix_str((row["message"] or "")[:60], refresh=False)
                bar.refresh()
    t = threading.Thread(target=follow, daemon=True)
    t.start()
    quiet = QuietJobFailure()  # the one-line error below says it; RLHF_DEBUG=1 for the traceback
    logging.getLogger("rlhf_core.worker.run").addFilter(quiet)
    row = run_one(runtime, worker_name(), kinds=[kind])
    done.set()
    bar.n = 100 if row and row["status"] == "done" else bar.n
    bar.close()
    if row is None or row["status"] != "done":
        hint = " (RLHF_DEBUG=1 shows the traceback)" if quiet.dropped else ""
        raise CommandError(f"job {job_id} ({kind}) failed: {row and row['error']}{hint}")
    print(json.dumps(row["result"], indent=2, default=str))


class QuietJobFailure(logging.Filter):
    """Drops the worker's job-failure log (a traceback) in a one-shot command, unless
    RLHF_DEBUG is set: the command ends with the job's error in one line."""
    dropped = False

    def filter(self, record: logging.LogRecord) -> bool:
        if os.environ.get("RLHF_DEBUG") or not str(record.msg).startswith("job %s (%s) failed"):
            return True
        self.dropped = True
        return False


def check_models_resolve(a) -> None:
    """A process about to load the model: a --model / --reward-model Hub id must resolve before
    it is saved (the workspace check covers its shape, directories and the embedded model)."""
    from rlhf_core.workspace import check_model_source
    for source in (getattr(a, "model", None), getattr(a, "reward_model", None)):
        if source:
            check_model_source(source, hub=True)


def cmd_sample(a):
    params = {"prompts_per_batch": a.prompts} if a.prompts else {}
    _run_job_here(a, "sample_batch", params)


def cmd_train_reward(a):
    _run_job_here(a, "train_reward", {})


def cmd_ppo(a):
    _run_job_here(a, "ppo_round", {"algorithm": a.algorithm} if a.algorithm else {})


def cmd_config(a):
    from rlhf_core.config_help import format_table, settings_table, with_values
    rows = settings_table()
    try:
        _, cfg = open_ws(a)  # an existing workspace: its values beside the defaults
        rows = with_values(rows, cfg)
    except WorkspaceError:
        pass
    print(json.dumps(rows, indent=2) if a.json else format_table(rows))


def cmd_simulate(a):
    from app.launcher import start_app
    from app.simulate import main as simulate_main
    simulate_main(a, start_app)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf", description="Rank LLM responses in a browser while "
                                "a reward model and the policy learn from them.")
    sub = p.add_subparsers(dest="command", required=True)
    specs = [
        ("up", cmd_up, "start the worker and the ranking UI (the demo command)",
         "rlhf up --workspace ws", [model_flags, serve_flags]),
        ("serve", cmd_serve, "start only the ranking UI (a worker runs elsewhere)",
         "rlhf serve --port 7860 --auth users.json", [model_flags, serve_flags]),
        ("worker", cmd_worker, "start only the worker that samples and trains",
         "rlhf worker --workspace ws   |   rlhf worker --server https://app.example "
         "--kinds ppo_round,train_reward", [model_flags, _worker_flags]),
        ("worker-token", cmd_worker_token, "create, list or revoke remote workers' tokens",
         "rlhf worker-token create gpu-1", [_token_args]),
        ("import-prompts", cmd_import_prompts, "import prompts from JSONL, CSV or a datasets dir",
         "rlhf import-prompts prompts.jsonl", [_file_arg]),
        ("export", cmd_export, "export preference pairs (TRL prompt/chosen/rejected) and rankings",
         "rlhf export pairs.jsonl --format jsonl", [_export_args]),
        ("export-policy", cmd_export_policy, "export a trained policy as a Hugging Face model "
         "(LoRA adapter, or --merge for a standalone model) with a model card",
         "rlhf export-policy my-policy --merge", [_export_policy_args]),
        ("status", cmd_status, "counts, versions and jobs", "rlhf status --json", [_json_flag]),
        ("config", cmd_config, "every setting: type, default, allowed values, help (and the "
         "workspace's value when it exists); change one with --set SECTION.FIELD=VALUE",
         "rlhf config --workspace ws", [_json_flag]),
        ("sample", cmd_sample, "sample a labeling batch now, with a progress bar",
         "rlhf sample --prompts 8 --k 4", [policy_model_flags, batch_flags, _job_flags,
                                           _prompts_flag]),
        ("train-reward", cmd_train_reward, "train a reward model version now",
         "rlhf train-reward --set reward.epochs=3",
         [policy_model_flags, reward_model_flag, _job_flags]),
        ("ppo", cmd_ppo, "run one policy round now (the workspace's loop.algorithm, RLOO by "
         "default, or --algorithm ppo | grpo | rloo | dpo)",
         "rlhf ppo --algorithm ppo --set ppo.kl_coef=0.1",
         [policy_model_flags, reward_model_flag, _job_flags, _algorithm_flag]),
        ("simulate", cmd_simulate, "scripted annotators drive the running app over HTTP",
         "rlhf simulate --oracle shorter --rounds 5", [_simulate_args]),
    ]
    for name, fn, help_, example, adders in specs:
        sp = sub.add_parser(name, help=help_, description=help_, epilog=f"example: {example}",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("--workspace", default=str(default_workspace()),
                        help="workspace folder (default: $RLHF_WORKSPACE or ./workspace); "
                             + ("created if missing" if name in CREATE_WORKSPACE
                                else "must exist"))
        for add in adders:
            add(sp)
        sp.set_defaults(func=fn)
    return p


def _algorithm_flag(p):
    p.add_argument("--algorithm", choices=("ppo", "grpo", "rloo", "dpo"),
                   help="this round's algorithm (default: the workspace's loop.algorithm)")


def _worker_flags(p):
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")
    p.add_argument("--nice", type=int, default=10, help="priority drop (default 10)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--kinds", help="only these job kinds, comma-separated (e.g. sample_batch "
                                   "for a sampler beside a trainer; a sample_batch worker also "
                                   "answers Arena prompts); default: all")
    p.add_argument("--processes", type=int, default=1,
                   help="run policy rounds as `accelerate launch` with this many processes (one "
                        "per GPU) on this host; rank 0 alone talks to the app (default 1)")
    p.add_argument("--server", help="the app's URL: work remotely through its worker API "
                                    "(no shared disk; the workspace is not opened)")
    p.add_argument("--token", help="the worker token for --server (or $RLHF_WORKER_TOKEN)")
    p.add_argument("--cache", help="with --server: where versions are kept (default "
                                   "WORKSPACE/remote)")


def _token_args(p):
    p.add_argument("action", choices=["create", "list", "revoke"], help="create, list or revoke")
    p.add_argument("name", nargs="?", help="the worker's name (create, revoke)")


def _job_flags(p):
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even if a GPU is present")
    p.add_argument("--queue-only", action="store_true",
                   help="only queue the job for a running worker")


def _prompts_flag(p):
    p.add_argument("--prompts", type=int, help="prompts in the batch")


def _file_arg(p):
    p.add_argument("file", type=Path, help="JSONL, CSV, or a datasets save_to_disk directory")


def _export_args(p):
    p.add_argument("out", help="output file (jsonl) or directory (hf)")
    p.add_argument("--format", choices=["jsonl", "hf"], default="jsonl",
                   help="jsonl (default) or hf (a datasets save_to_disk directory)")
    p.add_argument("--include-ties", action="store_true", help="also export tie pairs (label 0.5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")


def _export_policy_args(p):
    p.add_argument("out", help="output directory")
    p.add_argument("--version", type=int, help="policy version (default: the current one)")
    p.add_argument("--merge", action="store_true",
                   help="fold the adapter into the base weights: a model that loads without peft")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")


def _json_flag(p):
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _simulate_args(p):
    from app.simulate import add_arguments
    add_arguments(p)


# Commands whose process holds models: run with jemalloc where present (app/allocator.py).
MODEL_COMMANDS = ("worker", "sample", "train-reward", "ppo", "export-policy")


def main(argv=None):
    logging.basicConfig(level=os.environ.get("RLHF_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "gradio_client", "urllib3"):  # one line per HTTP call otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    if argv is None and args.command in MODEL_COMMANDS:  # a real command line, models ahead
        from app.allocator import reexec_with_jemalloc
        reexec_with_jemalloc(sys.argv[1:])
    try:
        if hasattr(args, "host"):
            check_serving(args)
        args.func(args)
    except USER_ERRORS as exc:  # bad input: a clear message, no traceback
        if os.environ.get("RLHF_DEBUG"):
            raise
        sys.exit(f"rlhf {args.command}: error: {error_line(exc)}")


# Errors about what the user gave: flags, files, the workspace, the machine (a busy port, a
# full disk). A TargetExists export is a FileExistsError (OSError).
USER_ERRORS = (ValueError, ModelLoadError, WorkspaceError, CommandError, OSError,
               sqlite3.DatabaseError)


def error_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, sqlite3.DatabaseError):
        return f"the workspace database cannot be used: {text}"
    return text


if __name__ == "__main__":
    main()
