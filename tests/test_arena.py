"""The arena: an annotator's own prompt, answered by the current policy, ranked by them alone.

The verb on a real SQLite file; the job run for real by the worker's handler with a tiny random
model; the item's answers ranked through the normal `submit_ranking`; the remote path over HTTP.
"""
from __future__ import annotations

import json

import pytest

from app import arena as arena_ui
from app.context import AppContext
from rlhf_core.config import AppConfig
from rlhf_core.data import annotation, jobs, tokens, workers
from rlhf_core.data.annotation import Refused, StaleForm
from rlhf_core.data.arena import KIND, MAX_QUEUED, add_arena_item, arena_state, request_arena
from rlhf_core.prompt_io import MAX_PROMPT_CHARS

ANSWERS = [{"text": t, "n_tokens": 2, "finish_reason": "stop", "policy_version": 0}
           for t in ("first answer", "second answer", "third answer")]


def counts(store) -> tuple:
    return tuple(store.scalar(f"SELECT COUNT(*) FROM {t}")
                 for t in ("prompts", "jobs", "items", "assignments", "events"))


def answered(store, annotator: str = "ada", text: str = "what is a reward model?",
             worker: str = "w") -> int:
    """Request, claim and answer an arena prompt without a model; returns the item id."""
    job_id = request_arena(store, annotator, text)["job_id"]
    assert jobs.claim(store, worker)["id"] == job_id
    item_id = add_arena_item(store, job_id, worker, ANSWERS, policy_version=0)
    jobs.finish(store, job_id, result={"item_id": item_id}, worker=worker)
    return item_id


@pytest.mark.parametrize("text,why", [
    ("", "the prompt is empty"), ("   \n\t ", "the prompt is empty"),
    (None, "the prompt must be a string"), (42, "must be a string, got integer"),
    ("ring \x07 the bell", r"the prompt contains the control character U\+0007 \(BEL\)"),
    ("x" * (MAX_PROMPT_CHARS + 1), f"longer than {MAX_PROMPT_CHARS}"),
    ("lone \ud800 surrogate", "lone surrogate")])
def test_a_refused_prompt_writes_nothing(store, text, why):
    before = counts(store)
    with pytest.raises(Refused, match=why):
        request_arena(store, "ada", text)
    assert counts(store) == before


def test_a_new_prompt_is_added_for_training_and_an_identical_one_is_reused(store):
    store.add_prompts([{"text": "hello world"}], source="test")
    known = store.one("SELECT id FROM prompts")["id"]
    out = request_arena(store, "ada", "  hello   world \n")  # the same text, spaced otherwise
    assert out["prompt_id"] == known and out["reused"]
    assert store.scalar("SELECT COUNT(*) FROM prompts") == 1
    job = jobs.get_job(store, out["job_id"])
    assert job["kind"] == KIND and job["status"] == "queued" and job["requested_by"] == "ada"
    assert job["params"] == {"prompt_id": known, "annotator": "ada"}

    new = request_arena(store, "bob", "  Why is the sky blue?  ")
    assert not new["reused"] and new["prompt_id"] != known
    row = store.one("SELECT text, source, split FROM prompts WHERE id = ?", [new["prompt_id"]])
    assert row == {"text": "Why is the sky blue?", "source": "arena", "split": "train"}


def test_one_request_in_flight_per_annotator_and_a_capped_queue(store):
    first = request_arena(store, "ada", "first question")["job_id"]
    before = counts(store)
    with pytest.raises(Refused, match=f"request #{first} is still queued"):
        request_arena(store, "ada", "second question")
    assert counts(store) == before  # the second prompt was not even added
    jobs.claim(store, "w")
    with pytest.raises(Refused, match="still running"):
        request_arena(store, "ada", "second question")
    jobs.finish(store, first, result={}, worker="w")
    request_arena(store, "ada", "second question")  # its answer came: ask again
    for i in range(MAX_QUEUED - 1):
        request_arena(store, f"user{i}", f"question {i}")
    with pytest.raises(Refused, match="arena requests are waiting"):
        request_arena(store, "zoe", "one too many")


def test_arena_jobs_are_claimed_before_queued_routine_jobs(store):
    routine = [jobs.enqueue(store, k) for k in ("score_items", "sample_batch", "train_reward")]
    job_id = request_arena(store, "ada", "a question")["job_id"]
    order = [j["id"] for j in jobs.current_jobs(store)]
    assert order == [job_id, routine[1], routine[2], routine[0]]  # what the Arena tab shows
    # a worker that only samples batches answers arena requests too
    assert jobs.claim(store, "sampler", kinds=["sample_batch"])["id"] == job_id
    assert jobs.claim(store, "sampler", kinds=["sample_batch"])["id"] == routine[1]
    assert jobs.claim(store, "trainer", kinds=["train_reward"])["id"] == routine[2]


def test_the_arena_item_is_held_for_the_asker_alone(store):
    item_id = answered(store)
    assert annotation.next_item(store, "bob") is None  # never served to anyone else...
    assert annotation.next_item(store, "ada") is None  # ...nor on the asker's Rank tab
    assert store.open_item_count() == 0  # outside the pool, the counts and the loop's buffer
    assert annotation.annotator_progress(store, "bob") == {"done": 0, "available": 0, "held": 0}
    assert store.batch_count(0) == 0  # not the policy's labeling batch (loop rule 4)
    item = arena_state(store, "ada")["item"]
    assert item["id"] == item_id and item["assignment"] == "open" and item["status"] == "ready"
    loaded = annotation.load_item(store, item_id)
    assert loaded["kind"] == "arena" and len(loaded["responses"]) == 3
    ids = [r["id"] for r in loaded["responses"]]
    with pytest.raises(StaleForm, match="not assigned to you"):
        annotation.submit_ranking(store, annotator="bob", item_id=item_id, token=None,
                                  submission_key="bob-1", tiers=[[i] for i in ids])
    assert arena_state(store, "bob") is None


def test_rank_tab_undo_passes_arena_items_by_and_a_new_request_replaces_an_unranked_one(store):
    store.add_prompts([{"text": "pool prompt"}], source="test")
    annotation.create_batch(store, policy_version=0, k=2, items=[
        {"prompt_id": store.scalar("SELECT id FROM prompts"), "responses": ANSWERS[:2]}])
    served = annotation.next_item(store, "ada")
    annotation.submit_ranking(store, annotator="ada", item_id=served["id"], token=served["token"],
                              submission_key="k1", tiers=[[r["id"]] for r in served["responses"]])
    first = answered(store, text="first")
    ids = [r["id"] for r in annotation.load_item(store, first)["responses"]]
    annotation.submit_ranking(store, annotator="ada", item_id=first, token=None,
                              submission_key="k2", tiers=[[i] for i in ids])
    second = answered(store, text="second")  # left unranked
    undone = annotation.undo_last(store, "ada", submission_key="u1")
    assert undone["item_id"] == served["id"]  # the Rank tab's last item, not the arena's
    assert annotation.assignment_status(store, first, "ada") == "done"
    assert annotation.assignment_status(store, second, "ada") == "open"  # still held
    assert annotation.next_item(store, "ada")["id"] == served["id"]
    request_arena(store, "ada", "third")
    status = {r["id"]: r["status"] for r in store.rows("SELECT id, status FROM items")}
    assert status[second] == "withdrawn" and status[first] == "ready"


def test_only_the_worker_holding_the_job_writes_its_answer_once(store):
    job_id = request_arena(store, "ada", "a question")["job_id"]
    with pytest.raises(jobs.JobCancelled):
        add_arena_item(store, job_id, "w", ANSWERS, policy_version=0)  # not claimed yet
    jobs.claim(store, "w")
    with pytest.raises(jobs.JobCancelled):
        add_arena_item(store, job_id, "intruder", ANSWERS, policy_version=0)
    with pytest.raises(ValueError, match="2 to 8 responses"):
        add_arena_item(store, job_id, "w", ANSWERS[:1], policy_version=0)
    item_id = add_arena_item(store, job_id, "w", ANSWERS, policy_version=0)
    assert add_arena_item(store, job_id, "w", ANSWERS, policy_version=0) == item_id  # re-run
    assert store.scalar("SELECT COUNT(*) FROM items") == 1


# -- the Arena tab's logic (app/arena.py) --------------------------------------------------
@pytest.fixture
def ctx(store, tmp_path):
    return AppContext.from_config(AppConfig(workspace=tmp_path / "ws"), store=store)


def test_the_tab_says_what_the_worker_does_then_shows_the_cards(ctx):
    store = ctx.store
    assert arena_ui.view(ctx, "ada")["status"] == arena_ui.INTRO
    routine = jobs.enqueue(store, "sample_batch")
    jobs.claim(store, "w")
    out = arena_ui.ask(ctx, "ada", "say <b>hi</b>")
    assert out["asked"] == "" and out["timer"] and not out["form"]
    assert "no worker is running" in out["status"]
    assert "say &lt;b&gt;hi&lt;/b&gt;" in out["prompt_html"]  # shown as text
    workers.register(store, "w", host="h", pid=1, scope="another host")
    out = arena_ui.view(ctx, "ada")
    assert (f"is queued**, behind the running job #{routine} sample_batch (running"
            in out["status"])
    request_arena(store, "bob", "bob's question")
    assert "and 1 request queued before yours" in arena_ui.view(ctx, "bob")["status"]
    again = arena_ui.ask(ctx, "ada", "another")
    assert again["level"] == "warning" and "still queued" in again["status"]
    jobs.finish(store, routine, result={}, worker="w")
    assert "next: the worker takes it before any other job" in arena_ui.view(ctx, "ada")["status"]
    job = jobs.claim(store, "w")
    assert "answering your prompt" in arena_ui.view(ctx, "ada")["status"]
    add_arena_item(store, job["id"], "w", ANSWERS, policy_version=0)
    jobs.finish(store, job["id"], result={}, worker="w")
    out = arena_ui.view(ctx, "ada")
    assert out["form"] and not out["timer"] and out["cards_html"].count('class="rl-card"') == 3
    refused = arena_ui.submit(ctx, "ada", out["item"], "zz")
    assert refused["level"] == "warning" and "Not saved" in refused["status"]
    done = arena_ui.submit(ctx, "ada", out["item"], "cab")
    assert "3 preference pairs" in done["status"] and not done["form"]
    row = store.one("SELECT * FROM rankings")
    labels = out["item"]["labels"]
    assert json.loads(row["tiers"]) == [[labels["C"]], [labels["A"]], [labels["B"]]]


def test_a_failed_request_says_why(ctx):
    request_arena(ctx.store, "ada", "a question")
    job = jobs.claim(ctx.store, "w")
    jobs.finish(ctx.store, job["id"], error="ValueError: all 4 samples came out the same")
    out = arena_ui.view(ctx, "ada")
    assert "could not answer" in out["status"] and "came out the same" in out["status"]
    assert not out["timer"]
    arena_ui.ask(ctx, "ada", "a question")  # asking again is allowed


# -- the real job: the worker's handler with a tiny random model -----------------------------
@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    import torch

    from rlhf_core.worker.runtime import Runtime
    from rlhf_core.workspace import open_workspace
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    store, cfg = open_workspace(tmp_path / "ws", model=str(tiny_model_dir),
                                **{"sampling.max_new_tokens": 8, "sampling.k": 3})
    yield store, cfg, Runtime(store, cfg, cpu=True)
    store.close()
    torch.set_num_threads(threads)


def test_the_worker_answers_first_and_the_ranking_trains_the_reward_model(workspace):
    from rlhf_core.worker.run import run_one
    store, cfg, runtime = workspace
    store.add_prompts([{"text": "pool prompt"}], source="test")
    routine = jobs.enqueue(store, "sample_batch", {"seed": 1})
    job_id = request_arena(store, "ada", "write a short poem about the sea", seed=3)["job_id"]
    row = run_one(runtime, "w")
    assert row["id"] == job_id and row["status"] == "done", row["error"]
    assert jobs.get_job(store, routine)["status"] == "queued"  # it waited
    res = row["result"]
    assert res["policy_version"] == 0 and 2 <= res["responses"] <= 3
    item = annotation.load_item(store, res["item_id"])
    assert item["kind"] == "arena" and item["selection"] == "arena"
    assert item["prompt"] == "write a short poem about the sea"
    assert len(item["responses"]) == res["responses"]
    assert all(r["policy_version"] == 0 and r["finish_reason"] in {"stop", "length"}
               for r in item["responses"])
    assert annotation.next_item(store, "bob") is None
    ctx = AppContext.from_config(cfg, store=store)
    out = arena_ui.view(ctx, "ada")
    letters = "".join(out["item"]["labels"]).lower()[::-1]  # worst label first, say
    done = arena_ui.submit(ctx, "ada", out["item"], letters)
    assert "Ranking saved" in done["status"], done
    pairs = [p for p in store_training_pairs(store) if p["prompt"] == item["prompt"]]
    n = len(item["responses"])
    assert len(pairs) == n * (n - 1) // 2 and all(p["label"] == 1.0 for p in pairs)


def store_training_pairs(store):
    from rlhf_core.worker.data import LocalData
    return LocalData(store).training_pairs()  # exactly what the reward model reads


# -- the remote path: the same verb over the worker API ---------------------------------------
def test_a_remote_worker_writes_the_answer_only_for_its_own_job(store, tmp_path):
    from tests.test_remote_worker import ApiServer, remote
    job_id = request_arena(store, "ada", "a remote question")["job_id"]
    a_token, b_token = tokens.create(store, "a"), tokens.create(store, "b")
    with ApiServer(store, tmp_path / "ws") as srv:
        a, b = remote(srv.url, a_token, tmp_path / "a"), remote(srv.url, b_token, tmp_path / "b")
        job = a.claim("whoever", ["sample_batch"])
        assert job["id"] == job_id and job["worker"] == "a/w"
        with pytest.raises(jobs.JobCancelled):  # b names a's worker: the token decides
            b.add_arena_item(job_id, "a/w", ANSWERS, policy_version=0)
        item_id = a.add_arena_item(job_id, "anything", ANSWERS, policy_version=0)
        assert b.prompts_by_ids([job["params"]["prompt_id"]])[0]["text"] == "a remote question"
    assert arena_state(store, "ada")["item"]["id"] == item_id
    assert annotation.assignment_status(store, item_id, "ada") == "open"
