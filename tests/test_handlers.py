"""app.handlers / app.api / app.status on a real SQLite store (no Gradio server)."""
from __future__ import annotations

import json

import pytest

from app import api, handlers, status
from app.context import AppContext, load_auth_file
from rlhf_core.data import jobs
from rlhf_core.data.annotation import create_batch, withdraw_item
from rlhf_core.config import AppConfig, LoopConfig

XSS = "<script>alert(1)</script>"


def seed_items(store, n: int = 3, k: int = 4, texts=None, overlap: int = 1) -> list[int]:
    """n items of k responses each (the first response of every item is the XSS text)."""
    texts = texts or [XSS, "${1+1} {{x}}", "plain answer", "two\nlines  spaced", "e", "f"]
    added = store.add_prompts([{"text": f"test prompt {i} <b>x</b>"} for i in range(n)],
                              source="test")
    assert added["added"] == n
    prompt_ids = [r["id"] for r in store.rows("SELECT id FROM prompts ORDER BY id DESC LIMIT ?",
                                              [n])]
    create_batch(store, policy_version=0, k=k, overlap=overlap, items=[
        {"prompt_id": pid, "responses": [{"text": t, "n_tokens": 3, "finish_reason": "stop"}
                                         for t in texts[:k]]} for pid in prompt_ids])
    return [r["id"] for r in store.rows("SELECT id FROM items ORDER BY id")]


@pytest.fixture
def ctx(store, tmp_path):
    return AppContext.from_config(AppConfig(workspace=tmp_path / "ws"), store=store)


def test_waiting_message_when_nothing_is_ready(ctx):
    from rlhf_core.data import workers  # "sampling" only while a worker beats (test_workers.py)
    workers.register(ctx.store, "w", host="h", pid=1, scope="another host")
    out = handlers.start(ctx, "ada", None, {})
    assert out["waiting"] and out["item"] is None and "no job is running" in out["message"]
    jobs.enqueue(ctx.store, "sample_batch")
    jobs.claim(ctx.store, "w")  # the page says what the worker runs, nothing more
    out = handlers.start(ctx, "ada", None, {})
    assert "sampling the next batch (sample_batch)" in out["message"]
    seed_items(ctx.store, n=1)
    assert handlers.load_form(ctx, "ada", {})["item"] is not None  # the timer's next poll


def test_start_loads_an_item_with_escaped_cards(ctx):
    seed_items(ctx.store)
    out = handlers.start(ctx, "  ada  ", None, {})
    assert out["annotator"] == "ada" and out["item"] and out["k"] == 4
    assert XSS not in out["cards_html"] and "&lt;script&gt;alert(1)&lt;/script&gt;" in out["cards_html"]
    assert "${" not in out["cards_html"] and "{{" not in out["cards_html"]
    assert "<b>x</b>" not in out["prompt_html"]
    assert handlers.start(ctx, "", None, {})["annotator"] is None  # asks for a name
    assert handlers.start(ctx, "<img>", None, {})["annotator"] is None


def test_submit_keyboard_ranking_records_tiers_and_loads_next(ctx):
    seed_items(ctx.store)
    form = handlers.start(ctx, "ada", None, {})
    state = form["item"]
    labels = state["labels"]
    out = handlers.submit_form(ctx, "ada", state, {}, ranking="b a=c")  # D implied last
    assert out["level"] == "info" and out["item"]["id"] != state["id"]
    row = ctx.store.one("SELECT * FROM rankings WHERE annotator = 'ada'")
    import json
    assert json.loads(row["tiers"]) == [[labels["B"]], [labels["A"], labels["C"]], [labels["D"]]]
    assert row["submission_key"] == state["submission_key"] and row["time_spent_s"] >= 0
    # Double-click: the same form (same key) again is a no-op.
    again = handlers.submit_form(ctx, "ada", state, {}, ranking="b a=c")
    assert "already saved" in again["message"]
    assert ctx.store.scalar("SELECT COUNT(*) FROM rankings") == 1


def test_bad_ranking_is_refused_and_kept(ctx):
    seed_items(ctx.store)
    state = handlers.start(ctx, "ada", None, {})["item"]
    for text in ("ba", "bbac", "zz", "", "[[1]]"):
        out = handlers.submit_form(ctx, "ada", state, {}, ranking=text, note="n")
        assert out["level"] == "warning" and "ranking" not in out and "item" not in out
        assert out["drafts"].get(str(state["id"]), {}).get("note") == "n" or text == ""
    assert ctx.store.scalar("SELECT COUNT(*) FROM rankings") == 0


def test_skip_flag_all_bad_and_note(ctx):
    seed_items(ctx.store)
    state = handlers.start(ctx, "ada", None, {})["item"]
    handlers.submit_form(ctx, "ada", state, {}, skip=True)
    state = handlers.load_form(ctx, "ada", {})["item"]
    handlers.submit_form(ctx, "ada", state, {}, ranking="", all_bad=True, flag=True,
                         note=" repetitive ")
    rows = ctx.store.rows("SELECT kind, all_bad, flagged, note, tiers FROM rankings ORDER BY id")
    assert rows[0]["kind"] == "skip" and rows[0]["tiers"] is None
    assert rows[1]["all_bad"] == 1 and rows[1]["flagged"] == 1 and rows[1]["note"] == "repetitive"
    assert ctx.store.counts()["pairs"] == 0  # all-bad rankings stay out of training pairs


def test_stale_form_is_refused_with_choices_kept(ctx):
    seed_items(ctx.store)
    state = handlers.start(ctx, "ada", None, {})["item"]
    withdraw_item(ctx.store, state["id"])
    out = handlers.submit_form(ctx, "ada", state, {}, ranking="bacd", note="keep me", flag=True)
    assert out["stale"] and "withdrawn" in out["message"]
    assert "ranking" not in out and "note" not in out  # the screen keeps what was typed
    assert out["drafts"][str(state["id"])] == {"ranking": "bacd", "note": "keep me",
                                               "flag": True, "all_bad": False}
    assert handlers.load_form(ctx, "ada", out["drafts"])["item"]["id"] != state["id"]


def test_draft_survives_reload_and_undo_restores_ranking(ctx):
    seed_items(ctx.store)
    state = handlers.start(ctx, "ada", None, {})["item"]
    edit = handlers.draft_changed(ctx, "ada", state, {}, "ba", "", False, False)
    assert "missing" in edit["preview"] and "ranks" not in edit
    edit = handlers.draft_changed(ctx, "ada", state, edit["drafts"], "b a=c", "", False, False)
    assert edit["ranks"] == ["2", "1", "2", "3"]
    reloaded = handlers.start(ctx, "ada", None, edit["drafts"])  # a page refresh
    assert reloaded["item"]["id"] == state["id"] and reloaded["ranking"] == "b a=c"
    assert reloaded["item"]["submission_key"] != state["submission_key"]
    handlers.submit_form(ctx, "ada", reloaded["item"], edit["drafts"], ranking="b a=c")
    assert handlers.draft_changed(ctx, "ada", state, {}, "abcd", "", 0, 0) == {}  # stale form
    undone = handlers.undo_form(ctx, "ada", None, {})
    assert undone["item"]["id"] == state["id"] and undone["ranking"] == "B > A = C > D"
    assert ctx.store.counts()["rankings"] == 0
    assert handlers.undo_form(ctx, "ada", undone["item"], {})["level"] == "warning"


def test_an_old_forms_edits_and_submission_never_land_on_the_next_item(ctx):
    """Issue 11.1: `item` is server-side state and moves on when a submission is recorded; an
    edit or a second Enter sent from the old form is processed with the next item in it."""
    seed_items(ctx.store)
    form = handlers.start(ctx, "ada", None, {})
    old = form["item"]
    assert form["form_item"] == str(old["id"])
    done = handlers.submit_form(ctx, "ada", old, {}, ranking="dcba", flag=True,
                                form_item=form["form_item"])
    new = done["item"]
    assert new["id"] != old["id"] and done["form_item"] == str(new["id"])
    # The edits typed just before Enter, processed after it: dropped, nothing saved for `new`.
    assert handlers.draft_changed(ctx, "ada", new, done["drafts"], "dcba", "", True, False,
                                  str(old["id"])) == {}
    # A second Enter from the old form: refused, nothing recorded, the form left as it is.
    again = handlers.submit_form(ctx, "ada", new, done["drafts"], ranking="dcba", flag=True,
                                 form_item=str(old["id"]))
    assert again["level"] == "warning" and again["stale"]
    assert f"item {old['id']}" in again["message"] and "ranking" not in again
    assert "item" not in again and "drafts" not in again
    assert ctx.store.scalar("SELECT COUNT(*) FROM rankings") == 1
    # A reload finds no draft for the new item.
    reloaded = handlers.start(ctx, "ada", None, done["drafts"])
    assert reloaded["item"]["id"] == new["id"]
    assert (reloaded["ranking"], reloaded["flag"], reloaded["all_bad"]) == ("", False, False)
    # The form of the current item still edits and submits.
    edit = handlers.draft_changed(ctx, "ada", new, {}, "ab", "", False, False, str(new["id"]))
    assert edit["drafts"] == {str(new["id"]): {"ranking": "ab", "note": "", "flag": False,
                                               "all_bad": False}}


def test_typed_text_in_messages_is_shown_as_text(ctx):
    """Issue 16.10: a refusal quotes the ranking; the toast (HTML) and markdown get it as text."""
    seed_items(ctx.store)
    state = handlers.start(ctx, "ada", None, {})["item"]
    typed = "a(b(<img src=x onerror=alert(1)>*x*"
    out = handlers.submit_form(ctx, "ada", state, {}, ranking=typed)
    assert out["level"] == "warning" and typed in out["toast"]  # escaped by ui._updates
    assert "<img" not in out["message"] and "&lt;img src=x onerror=alert\\(1\\)&gt;" in out["message"]
    assert "<img" not in handlers.preview(typed, state)
    assert handlers.md_escape("*b* [x](y) <i>") == "\\*b\\* \\[x\\]\\(y\\) &lt;i&gt;"


def test_radios_and_text_round_trip(ctx):
    state = {"id": 1, "labels": {"A": 10, "B": 11, "C": 12, "D": 13}}
    assert handlers.text_from_ranks(["2", "1", "2", None], state) == "B > A = C"
    assert handlers.ranks_from_text("B > A = C", state) == ["2", "1", "2", "3"]
    assert handlers.tiers_from_text("[[11], [\"a\", 12], [13]]", state) == [[11], [10, 12], [13]]
    with pytest.raises(handlers.Refused):
        handlers.tiers_from_text("[oops", state)


def test_api_overlap_and_no_repeat(tmp_path, store):
    ctx = AppContext.from_config(AppConfig(workspace=tmp_path, loop=LoopConfig()), store=store)
    seed_items(store, n=2)
    a, b = api.get_item(ctx, "ada")["item"], api.get_item(ctx, "bob")["item"]
    assert a["id"] != b["id"] and "policy_version" not in a["responses"][0]
    assert api.get_item(ctx, "ada")["item"]["id"] == a["id"]  # same item until ranked
    ok = api.submit(ctx, "ada", a["id"], a["token"], "k-1", "abcd")
    assert ok["ok"] and not ok["duplicate"]
    assert api.submit(ctx, "ada", a["id"], a["token"], "k-1", "abcd")["duplicate"]
    assert api.get_item(ctx, "ada")["item"] is None  # never the same item twice
    wrong = api.submit(ctx, "ada", b["id"], b["token"], "k-2", "abcd")
    assert not wrong["ok"] and wrong["stale"]
    assert not api.submit(ctx, "bob", b["id"], b["token"], "k-3", "[[1]]")["ok"]
    assert api.undo(ctx, "ada", "u-1")["ok"] and not api.undo(ctx, "bob", "u-2")["ok"]
    assert api.status(ctx)["counts"]["rankings"] == 0 and "workspace" not in api.status(ctx)


def test_roles_and_jobs(tmp_path, store):
    auth = tmp_path / "users.csv"
    auth.write_text("user,password,role\nres,pw1,researcher\nann,pw2,annotator\n")
    ctx = AppContext.from_config(AppConfig(workspace=tmp_path), store=store, auth_file=auth)
    assert ctx.check_password("res", "pw1") and not ctx.check_password("res", "x")
    assert not ctx.check_password("nobody", "pw1")
    assert not status.start_job(ctx, "ann", "ppo_round")["ok"]
    first = status.start_job(ctx, "res", "ppo_round")
    assert first["ok"] and status.start_job(ctx, "res", "ppo_round")["job_id"] == first["job_id"]
    assert not status.start_job(ctx, "res", "rm -rf")["ok"]
    assert 'data-status="queued"' in status.status_view(ctx)["jobs_html"]
    # With auth on, the login name wins over a typed one.
    assert handlers.identify(ctx, "someone-else", "ann") == "ann"
    with pytest.raises(handlers.Refused):
        handlers.identify(ctx, "ann", None)
    assert api.queue_job(ctx, "res", "sample_batch", username="ann")["ok"] is False


def test_page_events_act_as_the_login(tmp_path, store):
    """Issue 16.3: with auth, the session state's name never decides who acts."""
    auth = tmp_path / "users.csv"
    auth.write_text("user,password,role\nres,pw1,researcher\nann,pw2,annotator\n")
    ctx = AppContext.from_config(AppConfig(workspace=tmp_path), store=store, auth_file=auth)
    assert handlers.session_user(ctx, None, "ann") == "ann"  # a new page: the login
    assert handlers.session_user(ctx, "ann", "ann") == "ann"
    for state, login in (("res", "ann"), ("ann", "res"), ("ann", None), (None, "mallory")):
        with pytest.raises(handlers.Refused):
            handlers.session_user(ctx, state, login)
    assert handlers.session_user(ctx, "res", "res", roles=("researcher",)) == "res"
    with pytest.raises(handlers.Refused, match="researcher"):
        handlers.session_user(ctx, "ann", "ann", roles=("researcher",))
    open_ctx = AppContext.from_config(AppConfig(workspace=tmp_path), store=store)
    assert handlers.session_user(open_ctx, "ada", None) == "ada"  # no auth: the typed name


def test_auth_file_formats(tmp_path):
    j = tmp_path / "u.json"
    j.write_text('{"ada": {"password": "p", "role": "researcher"}, "bob": "q"}')
    assert load_auth_file(j) == {"ada": {"password": "p", "role": "researcher"},
                                 "bob": {"password": "q", "role": "annotator"}}
    j.write_text('[{"user": "ada", "password": "p", "role": "boss"}]')
    with pytest.raises(ValueError, match="role"):
        load_auth_file(j)


def test_jobs_html_escapes_messages():
    html = status.jobs_html([{"id": 1, "kind": "ppo_round", "status": "failed", "progress": 0.5,
                              "message": None, "error": "<img src=x onerror=alert(1)>"}])
    assert "<img" not in html and "width:50%" in html


def test_hostile_ranking_text_gets_a_message_not_an_error():
    """Deeply nested JSON (a RecursionError) and overlong text are refused with one line."""
    state = {"id": 1, "labels": {"A": 10, "B": 11}}
    for text in ("[" * 5000, "a" * 5000, "[[" + "1," * 3000 + "1]]"):
        with pytest.raises(handlers.Refused) as exc:
            handlers.tiers_from_text(text, state)
        assert "\n" not in str(exc.value) and len(str(exc.value)) < 200


def test_drafts_stay_small_enough_for_the_request_cap():
    from app.body_limit import MAX_BODY_BYTES
    drafts = None
    for i in range(handlers.MAX_DRAFTS + 5):
        drafts = handlers.save_draft(drafts, {"id": i}, ranking="ab" * 900, note="n" * 50_000)
    assert len(drafts) == handlers.MAX_DRAFTS
    assert len(json.dumps(drafts)) < MAX_BODY_BYTES / 2
