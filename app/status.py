"""The status panel's logic as plain functions: versions, counts, jobs with progress bars,
and the researcher buttons that queue jobs. No Gradio here."""
from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

from app.context import AppContext
from app.handlers import esc, worker_command
from rlhf_core.data import jobs, workers

# Button label -> job kind the worker knows (rlhf_core.data.jobs.HANDLERS in the worker process).
JOB_BUTTONS = {"Sample batch": "sample_batch", "Train reward model": "train_reward",
               "Policy round": "ppo_round"}
ALGORITHMS = ("ppo", "grpo", "rloo", "dpo")  # a policy round's choices (config loop.algorithm)
_STATUS_COLOURS = {"queued": "#888", "running": "#2b7be4", "done": "#2e9e4f",
                   "failed": "#d33", "cancelled": "#aa8800"}


def status_markdown(status: dict) -> str:
    c = status["counts"]
    reward = status.get("reward_version")
    return (f"**Policy** v{status['policy_version']} · **reward model** "
            f"{'v' + str(reward) if reward is not None else 'none yet'}\n\n"
            f"| prompts | items ready | open to rank | rankings | skips | flagged | pairs | "
            f"annotators |\n|---|---|---|---|---|---|---|---|\n"
            f"| {c['prompts']} | {c['items_ready']} | {c['items_open']} | {c['rankings']} | "
            f"{c['skips']} | {c['flagged']} | {c['pairs']} | {c['annotators']} |")


# An absolute path inside a message: POSIX (not after a word, "." or ":", so URLs and "1/2" are
# left alone) or a Windows drive path.
_ABS_PATH = re.compile(r"(?<![\w.:/~-])(?:/[^\s'\"<>:,;()\[\]{}|]+)+|\b[A-Za-z]:\\[^\s'\"<>|]+")


def hide_paths(text: str, workspace: str | Path | None) -> str:
    """Absolute paths in a job message as the annotators may see them: relative to the workspace
    when inside it, else only the file's name (a server's layout is not everybody's business)."""
    root = str(Path(workspace)) if workspace else None

    def short(m: re.Match) -> str:
        path = m.group(0)
        if root and (path == root or path.startswith(root.rstrip("/\\") + "/")):
            return path[len(root):].lstrip("/") or "."
        return re.split(r"[/\\]", path.rstrip("/\\"))[-1] or path
    return _ABS_PATH.sub(short, text)


def _span(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 90:
        return f"{seconds} s"
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds < 3600 else \
        f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def job_timing(j: dict, estimate_s: float | None, now: datetime | None = None) -> str:
    """"running 2 min 05 s · usually ~3 min 10 s (past jobs of this kind)", "took 40 s"."""
    now = now or datetime.now(timezone.utc)
    started = _when(j.get("started_at"))
    usual = f"usually ~{_span(estimate_s)}" if estimate_s else "no past run to estimate from"
    if j["status"] == "queued":
        return f"queued · {usual}"
    if started is None:
        return ""
    if j["status"] == "running":
        return f"running {_span((now - started).total_seconds())} · {usual}"
    finished = _when(j.get("finished_at"))
    return f"took {_span((finished - started).total_seconds())}" if finished else ""


def _when(text) -> datetime | None:
    if not text:
        return None
    t = datetime.fromisoformat(str(text))
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def jobs_html(job_rows: list[dict], workspace: str | Path | None = None,
              full_paths: bool = False, estimates: dict | None = None,
              now: datetime | None = None) -> str:
    """Every job as a row with an HTML progress bar (messages escaped: they may quote errors),
    its elapsed time and the usual run time of its kind (`estimates`: kind -> seconds).
    Absolute paths in messages are shortened (hide_paths) unless `full_paths` (researchers)."""
    if not job_rows:
        return '<div class="rl-jobs rl-empty">No jobs yet.</div>'
    rows = []
    for j in job_rows:
        pct = int(round(100 * float(j.get("progress") or 0)))
        colour = _STATUS_COLOURS.get(j["status"], "#888")
        detail = str(j.get("error") or j.get("message") or "")
        detail = detail if full_paths else hide_paths(detail, workspace)
        timing = job_timing(j, (estimates or {}).get(j["kind"]), now)
        detail = " · ".join(x for x in (timing, detail) if x)
        rows.append(
            f'<div class="rl-job" data-status="{esc(j["status"])}">'
            f'<span class="rl-job-name">#{j["id"]} {esc(j["kind"])}</span>'
            f'<span class="rl-job-status" style="color:{colour}">{esc(j["status"])}</span>'
            f'<span class="rl-bar"><span style="width:{pct}%;background:{colour}"></span></span>'
            f'<span class="rl-pct">{pct}%</span>'
            f'<span class="rl-job-msg">{esc(detail)[:300]}</span></div>')
    return f'<div class="rl-jobs">{"".join(rows)}</div>'


_WORKER_COLOURS = {"idle": "#2e9e4f", "running": "#2b7be4", "stopped": "#888", "dead": "#d33"}


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def workers_html(rows: list[dict], command: str, full: bool = False) -> str:
    """The workers registry: state, last heartbeat, current job; names, hosts and pids only for
    researchers (`full`). Without a worker that beats, says so and how to start one."""
    live = [w for w in rows if w["status"] in workers.LIVE and w["age_s"] <= workers.STALE_S]
    out = [] if live else [f'<div class="rl-no-worker"><b>No worker is running</b>; start one '
                           f'with <code>{esc(command)}</code></div>']
    for i, w in enumerate(rows, 1):
        state = w["status"]
        if state in workers.LIVE and w["age_s"] > workers.STALE_S:
            state = "silent"  # not reaped yet: no claim to being alive
        job = (f'#{w["job_id"]} {esc(w["job_kind"] or "?")} '
               f'{int(round(100 * float(w["job_progress"] or 0)))}%' if w["job_id"] else "")
        who = (f'{esc(w["name"])} · pid {w["pid"]} · {esc(w["device"] or "starting")}'
               if full else f"worker {i}")
        kinds = ", ".join(w["kinds"]) if w["kinds"] else "all kinds"
        out.append(
            f'<div class="rl-worker" data-status="{esc(state)}">'
            f'<span class="rl-worker-name">{who}</span>'
            f'<span style="color:{_WORKER_COLOURS.get(state, "#aa8800")}">{esc(state)}</span>'
            f'<span>heartbeat {_ago(w["age_s"])}</span><span>{job or "no job"}</span>'
            f'<span class="rl-job-msg">{esc(kinds)}'
            f'{" · " + esc(w["reason"]) if w.get("reason") and full else ""}</span></div>')
    return f'<div class="rl-workers">{"".join(out)}</div>'


def status_view(ctx: AppContext, viewer: str | None = None) -> dict:
    """The panel for `viewer`: a researcher sees job messages with their full paths."""
    try:
        workers.reap(ctx.store)  # a dead worker's job is shown released, not still "running"
        status = ctx.store.status()
        rows = jobs.list_jobs(ctx.store, limit=30)
        return {"workers_html": workers_html(workers.list_workers(ctx.store, limit=10),
                                             worker_command(ctx, viewer),
                                             full=ctx.is_researcher(viewer)),
                "status_md": status_markdown(status),
                "jobs_html": jobs_html(rows, ctx.workspace,
                                       full_paths=ctx.is_researcher(viewer),
                                       estimates={k: jobs.typical_duration_s(ctx.store, k)
                                                  for k in {j["kind"] for j in rows}}),
                "cancel_choices": [(f"#{j['id']} {j['kind']} ({j['status']})", j["id"])
                                   for j in rows if j["status"] in ("queued", "running")]}
    except Exception as exc:  # a locked or migrating DB must not break the page
        return {"status_md": f"status unavailable: {esc(exc)}"}


def cancel_job(ctx: AppContext, annotator: str | None, job_id) -> dict:
    """Cancel a queued job now, a running one at its next progress report (researchers only)."""
    if not ctx.is_researcher(annotator):
        return {"ok": False, "message": "only researchers may cancel jobs"}
    try:
        job_id = int(job_id)
    except (TypeError, ValueError):
        return {"ok": False, "message": "pick a queued or running job to cancel"}
    if not jobs.cancel(ctx.store, job_id):
        return {"ok": False, "message": f"job #{job_id} is neither queued nor running"}
    ctx.store.log_event("job_cancel_requested", annotator, job_id=job_id)
    return {"ok": True, "message": f"job #{job_id}: cancelled (a running job stops at its next "
                                   "progress report)", **status_view(ctx, annotator)}


def start_job(ctx: AppContext, annotator: str | None, kind: str,
              algorithm: str | None = None) -> dict:
    """Queue a job (researchers only); an already queued/running job of that kind is reused.
    A policy round takes `algorithm` (ppo / grpo / rloo / dpo; default: `loop.algorithm`)."""
    if kind not in JOB_BUTTONS.values():
        return {"ok": False, "message": f"unknown job kind {kind!r}"}
    if not ctx.is_researcher(annotator):
        return {"ok": False, "message": "only researchers may start jobs"}
    params = {}
    if kind == "ppo_round" and algorithm:
        if algorithm not in ALGORITHMS:
            return {"ok": False, "message": f"unknown algorithm {algorithm!r}: one of "
                                            + ", ".join(ALGORITHMS)}
        params["algorithm"] = algorithm
    job_id = jobs.enqueue(ctx.store, kind, params, requested_by=annotator, unique=True)
    job = jobs.get_job(ctx.store, job_id) or {}
    got = (job.get("params") or {}).get("algorithm") if kind == "ppo_round" else None
    what = f"{kind}, {got}" if got else kind
    message = f"job #{job_id} ({what}) is queued"
    if params.get("algorithm") and got != params["algorithm"]:
        message = (f"job #{job_id} ({what}) was already queued or running: cancel it to start "
                   f"a {params['algorithm']} round")
    return {"ok": True, "job_id": job_id, "message": message, **status_view(ctx, annotator)}
