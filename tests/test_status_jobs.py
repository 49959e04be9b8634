"""Issue 15.4: Status tab jobs show elapsed time, an estimate from past jobs of that kind, and a
Cancel for researchers."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from app import status
from app.context import AppContext
from rlhf_core.config import AppConfig
from rlhf_core.data import jobs


@pytest.fixture
def ctx(store, tmp_path):
    return AppContext.from_config(AppConfig(workspace=tmp_path / "ws"), store=store)


def _past_job(store, kind: str, seconds: float) -> None:
    job_id = jobs.enqueue(store, kind)
    jobs.claim(store, "w")
    jobs.finish(store, job_id, result={}, worker="w")
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with store.write() as db:  # a known run time
        db.execute("UPDATE jobs SET started_at = ?, finished_at = ? WHERE id = ?",
                   [start.isoformat(), (start + timedelta(seconds=seconds)).isoformat(), job_id])


def test_timing_text():
    now = datetime(2026, 1, 1, 0, 2, 5, tzinfo=timezone.utc)
    running = {"status": "running", "started_at": "2026-01-01T00:00:00+00:00"}
    assert status.job_timing(running, 190, now) == "running 2 min 05 s · usually ~3 min 10 s"
    assert "no past run" in status.job_timing(running, None, now)
    done = {"status": "done", "started_at": "2026-01-01T00:00:00+00:00",
            "finished_at": "2026-01-01T00:00:40+00:00"}
    assert status.job_timing(done, 190, now) == "took 40 s"
    assert status.job_timing({"status": "queued"}, 60, now) == "queued · usually ~60 s"


def test_status_view_estimates_from_past_jobs_and_lists_cancellable(ctx):
    for seconds in (100, 120, 400):
        _past_job(ctx.store, "train_reward", seconds)
    queued = jobs.enqueue(ctx.store, "train_reward")
    view = status.status_view(ctx, None)
    assert "usually ~2 min 00 s" in view["jobs_html"]  # the median of 100, 120, 400 s
    assert "took 6 min 40 s" in view["jobs_html"]
    assert view["cancel_choices"] == [(f"#{queued} train_reward (queued)", queued)]


def test_only_researchers_cancel(ctx):
    ctx.users = {"ann": {"password": "x", "role": "annotator"},
                 "res": {"password": "y", "role": "researcher"}}
    queued = jobs.enqueue(ctx.store, "ppo_round")
    out = status.cancel_job(ctx, "ann", queued)
    assert not out["ok"] and jobs.get_job(ctx.store, queued)["status"] == "queued"
    out = status.cancel_job(ctx, "res", queued)
    assert out["ok"] and jobs.get_job(ctx.store, queued)["status"] == "cancelled"
    assert out["cancel_choices"] == [] and "cancelled" in out["jobs_html"]
    assert not status.cancel_job(ctx, "res", queued)["ok"]  # not cancellable twice
    assert not status.cancel_job(ctx, "res", None)["ok"]
    running = jobs.enqueue(ctx.store, "sample_batch")
    jobs.claim(ctx.store, "w")
    assert status.cancel_job(ctx, "res", running)["ok"]  # stops at its next progress report
    with pytest.raises(jobs.JobCancelled):
        jobs.report_progress(ctx.store, running, "w", 0.5, "sampling")


def test_policy_round_takes_its_algorithm(ctx):
    out = status.start_job(ctx, "ada", "ppo_round", "grpo")
    assert out["ok"] and "(ppo_round, grpo) is queued" in out["message"]
    assert jobs.get_job(ctx.store, out["job_id"])["params"] == {"algorithm": "grpo"}
    again = status.start_job(ctx, "ada", "ppo_round", "dpo")  # one policy round at a time
    assert again["job_id"] == out["job_id"] and "already queued" in again["message"]
    bad = status.start_job(ctx, "ada", "ppo_round", "a2c")
    assert not bad["ok"] and "unknown algorithm" in bad["message"]
    assert len(jobs.list_jobs(ctx.store)) == 1  # the refusal queued nothing
    plain = status.start_job(ctx, "ada", "train_reward", "grpo")  # ignored for other kinds
    assert jobs.get_job(ctx.store, plain["job_id"])["params"] == {}
