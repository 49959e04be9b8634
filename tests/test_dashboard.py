"""Dashboard and researcher view: data functions on a real store, a real Gradio server with
both tabs, and the score_items job on a tiny model."""
from __future__ import annotations

import json
import urllib.request

import pytest

from app import dashboard_data as dd
from app.context import AppContext
from app.ui_dashboard import chart_spec
from rlhf_core.worker.run import run_one
from rlhf_core.config import AppConfig
from rlhf_core.data import annotation, jobs
from rlhf_core.data import scores as score_jobs
from rlhf_core.data.store import Store
from rlhf_core.evaluation import wilson_interval
from rlhf_core.worker.loop import loop_tick
from rlhf_core.workspace import set_auto
from tests.conftest import publish_fresh_reward

XSS = "<script>window.__xss=1</script> ${1+1}"


def _ranked(store, annotator, key, order, *, flagged=False, note=""):
    item = annotation.next_item(store, annotator)
    by_pos = {r["position"]: r["id"] for r in item["responses"]}
    tiers = [[by_pos[p] for p in tier if p in by_pos] for tier in order]
    annotation.submit_ranking(store, annotator=annotator, item_id=item["id"], token=item["token"],
                              submission_key=key, tiers=[t for t in tiers if t],
                              flagged=flagged, note=note)
    return item


def seed_dashboard(store, *, scores: bool = True) -> None:
    """Policy v1 and v2 trained from reward v1/v3 (v2 rejected), PPO curves, blind A/B items
    ranked by two annotators, a flagged item with a note, and reward scores of v3."""
    store.add_prompts([{"text": f"Explain idea {i} <b>briefly</b>"} for i in range(6)],
                      source="test", heldout_fraction=0.0)
    p = [r["id"] for r in store.rows("SELECT id FROM prompts ORDER BY id")]
    store.add_version("reward", 1, status="promoted", metrics={
        "heldout_accuracy": 0.62, "fresh_accuracy": 0.58, "heldout_ece": 0.08},
        counts={"train_pairs": 40, "heldout_pairs": 12})
    store.add_version("reward", 2, status="rejected", parent=1, reason="held-out 0.55 < 0.62",
                      metrics={"heldout_accuracy": 0.55, "fresh_accuracy": 0.52})
    store.add_version("reward", 3, status="promoted", parent=1, metrics={
        "heldout_accuracy": 0.71, "fresh_accuracy": 0.66, "heldout_ece": 0.05,
        "heldout_mean_p_chosen": 0.64, "heldout_observed_p_chosen": 0.7},
        counts={"train_pairs": 90, "heldout_pairs": 20, "fresh_pairs": 10})
    for v, rv in ((1, 1), (2, 3)):
        store.add_version("policy", v, status="published", parent=v - 1, reward_version=rv,
                          counts={"prompts": 16}, metrics={"reward_mean": 0.3 * v})
        for s in range(8):
            step = (v - 1) * 8 + s
            store.log_metrics("ppo", {"entropy": 2.0 - 0.1 * step, "pg_loss": 0.01},
                              step=step, version=v)
        store.log_metrics("ppo", {"reward_mean": 0.2 * v, "kl": 0.5 * v,
                                  "response_length": 20 + 5 * v}, step=(v - 1) * 8, version=v)
    resp = lambda text, v, n: {"text": text, "policy_version": v, "n_tokens": n,  # noqa: E731
                               "finish_reason": "stop"}
    items = [{"prompt_id": p[i], "kind": "ab", "selection": "ab:v2-vs-v0", "responses": [
        resp(f"Sure, idea {i} is simple", 2, 6), resp(f"Idea {i} means this", 2, 5),
        resp(XSS if i == 0 else f"the answer {i}", 0, 4), resp(f"no {i}", 0, 2)]}
        for i in range(3)]
    items += [{"prompt_id": p[i], "kind": "label", "selection": sel, "responses": [
        resp(f"label answer {i}", 2, 3), resp(f"other answer {i}", 2, 3)]}
        for i, sel in ((3, "uncertainty:gap=0.04"), (4, "random"), (5, "random"))]
    annotation.create_batch(store, policy_version=2, k=4, items=items, overlap=2)
    for who in ("alice", "bob"):
        for n in range(3):
            _ranked(store, who, f"{who}-ab{n}", [[0], [1], [2], [3]] if who == "alice" or n
                    else [[0], [2], [1], [3]])
    _ranked(store, "alice", "alice-l1", [[1], [0]], flagged=True, note=f"odd prompt {XSS}")
    if scores:
        ids = [r["id"] for r in store.rows("SELECT id FROM responses ORDER BY id")]
        score_jobs.save_scores(store, 3, {rid: 1.0 - 0.1 * (i % 4) for i, rid in enumerate(ids)})


# -- data functions ---------------------------------------------------------------------------
def test_empty_store_gives_empty_frames_and_notes(store):
    out = dd.dashboard_data(store)
    assert out["rankings"].empty and out["ppo_kl"].empty and out["ab_table"].empty
    assert out["notes"]["ppo"] == "No policy rounds yet."
    assert all(out["notes"].values())
    assert dd.recent_items(store)["items"] == []
    assert dd.loop_settings(store)["auto"] is False


def test_dashboard_data_on_a_seeded_store(store):
    seed_dashboard(store)
    out = dd.dashboard_data(store, bootstrap_rounds=10)
    assert not any(out["notes"].values())
    assert set(out["rankings"]["series"]) >= {"rankings standing (total)"}
    assert out["rankings"]["value"].max() == 7  # 6 A/B rankings + the flagged label item
    acc = out["reward_acc"]
    assert sorted(acc[acc.series == "held-out accuracy"]["value"]) == [0.55, 0.62, 0.71]
    assert list(out["reward_table"]["version"]) == ["v3", "v2", "v1"]
    assert out["reward_table"]["reason"][1] == "held-out 0.55 < 0.62"
    assert list(out["ppo_kl"]["value"]) == [0.5, 1.0] and len(out["ppo_entropy"]) == 16
    (row,) = out["ab_table"].to_dict("records")
    assert row["version"] == "v2" and row["pairs"] == 24 and row["losses"] == 1
    assert list(out["leaderboard"]["version"]) == ["v2", "v0"]
    drift = out["drift"]
    assert drift[(drift.series == "KL from reference")]["value"].tolist() == [0.0, 1.0]
    assert dd.version_order(drift) == ["v0", "v2"]
    assert "**3** items" in out["agreement_md"]
    from app.ui_dashboard import dashboard_updates
    upd = dashboard_updates(out)
    assert upd["ab_plot"]["visible"] and spec_of(upd, "ab_plot")["layer"][0]["encoding"][
        "x"]["scale"]["domain"] == ["v2"]
    assert spec_of(upd, "ppo_kl")["layer"][0]["encoding"]["x"]["axis"]["values"] == [0, 8]
    assert upd["note_ppo"]["visible"] is False
    assert dashboard_updates(dd.dashboard_data(Store(store.path.parent / "empty.db")))[
        "note_ppo"]["value"] == "*No policy rounds yet.*"
    assert dd.fingerprint(store) == dd.fingerprint(store)


def test_recent_items_scores_and_reward_agreement(store):
    seed_dashboard(store)
    rec = dd.recent_items(store)
    assert rec["reward_version"] == 3 and len(rec["items"]) == 7
    flagged = rec["items"][0]
    assert flagged["flagged"] and XSS in flagged["note"] and flagged["selection"] == "uncertainty:gap=0.04"
    # annotator: position 1 > position 0; scores 1.0 (pos 0) > 0.9 (pos 1): the reward model
    # disagrees. Letters are the ones the annotator saw on the Rank page, not positions.
    shown = {r["id"]: r["label"] for r in annotation.load_item(store, flagged["item_id"])["responses"]}
    assert [r["position"] for r in flagged["responses"]] == [1, 0]
    assert [r["label"] for r in flagged["responses"]] == [shown[r["id"]] for r in
                                                          flagged["responses"]]
    assert (flagged["agree"], flagged["pairs"]) == (0, 1)
    ab = rec["items"][-1]  # alice's first A/B item, ranked A > B > C > D like the scores
    assert ab["kind"] == "ab" and (ab["agree"], ab["pairs"]) == (6, 6)
    assert dd.recent_items(store, flagged_only=True)["items"][0]["id"] == flagged["id"]
    assert dd.recent_items(store, reward_version=1)["items"][0]["pairs"] == 0  # unscored
    assert ("reward v2 · rejected", "reward:2") in dd.version_choices(store)


def test_research_html_escapes_and_version_page(store):
    from app import ui_research
    seed_dashboard(store)
    html = ui_research.items_html(dd.recent_items(store))
    assert "<script>" not in html and "&lt;script&gt;" in html and "${" not in html
    assert "uncertainty:gap=0.04" in html and "disagrees" in html
    page = ui_research.version_html(store, "policy:2")
    assert "reward v3" in page and "KL from reference" in page
    page = ui_research.version_html(store, "reward:2")
    assert "rejected" in page and "held-out 0.55 &lt; 0.62" in page
    assert "does not exist" in ui_research.version_html(store, "policy:9")


def test_researcher_only_gate(tmp_path, store):
    from app import ui_research
    ctx = AppContext.from_config(AppConfig(workspace=tmp_path), store=store)
    assert ui_research.allowed(ctx, None, {"name": "anyone"})  # loopback, no roles set
    ctx.users = {"ann": {"password": "x", "role": "annotator"},
                 "res": {"password": "y", "role": "researcher"}}
    assert not ui_research.allowed(ctx, "ann", {})
    assert ui_research.allowed(ctx, "res", {})
    out = ui_research.toggle_auto(ctx, True, "ann", {})
    assert "only researchers" in out["loop_msg"] and dd.loop_settings(store)["auto"] is False
    ui_research.toggle_auto(ctx, True, "res", {})
    assert dd.loop_settings(store)["auto"] is True


def test_loop_queues_scoring_once_per_new_rankings(store):
    seed_dashboard(store, scores=False)
    set_auto(store, False)
    assert score_jobs.unscored_count(store, 3) == 14
    queued = loop_tick(store)
    kinds = [jobs.get_job(store, j)["kind"] for j in queued]
    assert kinds.count("score_items") == 1
    with store.write() as db:
        db.execute("UPDATE jobs SET status = 'failed'")
    assert "score_items" not in [jobs.get_job(store, j)["kind"] for j in loop_tick(store)]


def spec_of(updates: dict, name: str) -> dict:
    """The Vega-Lite spec a dashboard_updates entry sends to its gr.Plot."""
    return json.loads(updates[name]["value"].plot)


def test_reward_accuracy_every_version_with_wilson_intervals(store):
    """Issue 11.8: v2 was in the table but not in the plot, and accuracy had no interval."""
    store.add_version("reward", 1, status="promoted", metrics={
        "heldout_accuracy": 0.5, "heldout_strict_pairs": 24.0})  # a count read back as a float
    store.add_version("reward", 2, status="promoted", parent=1, metrics={
        "heldout_accuracy": 0.5, "heldout_strict_pairs": 24, "fresh_accuracy": 0.7,
        "fresh_strict_pairs": 10})
    store.add_version("reward", 3, status="rejected", parent=2,
                      metrics={"heldout_strict_pairs": 0}, counts={"train_pairs": 30})
    out = dd.reward_frames(store)
    table, acc = out["reward_table"], out["reward_acc"]
    assert list(table["version"]) == ["v3", "v2", "v1"]
    assert {"held-out 95%", "held-out pairs", "fresh 95%", "fresh pairs"} <= set(table.columns)
    held = acc[acc.series == "held-out accuracy"].reset_index(drop=True)
    assert list(held["version"]) == ["v1", "v2", "v3"]  # every version of the table
    assert (held["lo"][0], held["hi"][0]) == pytest.approx(wilson_interval(12, 24))
    assert table["held-out 95%"][2] == "0.314 – 0.686" and table["held-out pairs"][2] == "24"
    fresh = acc[acc.series.str.startswith("fresh")]
    assert list(fresh["version"]) == ["v2"] and fresh["n"].tolist() == [10]
    assert held["value"].isna()[2] and held["note"][2] == "no held-out pairs"
    spec = chart_spec("reward_acc", acc)
    assert spec["layer"][0]["mark"]["type"] == "rule"  # the error bars: lo..hi
    assert spec["layer"][0]["encoding"]["y"]["field"] == "lo"
    assert spec["layer"][0]["encoding"]["y2"]["field"] == "hi"
    assert spec["layer"][0]["encoding"]["x"]["scale"]["domain"] == ["v1", "v2", "v3"]


def _report(rankings: int, lo=900.0, hi=1100.0) -> dict:
    rate = {"version": 1, "rate": 0.6, "lo": 0.4, "hi": 0.77, "n": 4 * rankings,
            "wins": 2 * rankings, "ties": 0, "losses": 2 * rankings, "rankings": rankings}
    return {"baseline": 0, "win_rates": [rate], "leaderboard": [
        {"version": 1, "rating": 1070.4, "lo": lo, "hi": hi, "n": 4 * rankings,
         "rankings": rankings},
        {"version": 0, "rating": 1000.0, "lo": 1000.0, "hi": 1000.0, "n": 4 * rankings,
         "rankings": rankings}]}


def test_ab_intervals_say_not_enough_data_below_the_minimum_rankings():
    """Issue 11.8: after one A/B ranking the leaderboard showed the interval "618 - 618"."""
    few = dd.ab_frames(_report(1, lo=618.2, hi=618.2))
    board, table, plot = few["leaderboard"], few["ab_table"], few["ab_plot"]
    assert board["95% interval"].tolist() == ["not enough data yet (1 of 10 A/B rankings)",
                                              "anchor (1000 by definition)"]
    assert table["95% interval"][0] == "not enough data yet (1 of 10 A/B rankings)"
    assert board["rankings"].tolist() == [1, 1] and table["rankings"][0] == 1
    assert plot["value"][0] == 0.6 and plot["lo"].isna().all()  # the point, no bar
    assert "not enough data yet" in " ".join(chart_spec("ab_plot", plot)["title"]["subtitle"])
    enough = dd.ab_frames(_report(dd.MIN_AB_RANKINGS))
    assert enough["leaderboard"]["95% interval"][0] == "900 – 1100"
    assert enough["ab_table"]["95% interval"][0] == "0.400 – 0.770"
    assert enough["ab_plot"][["lo", "hi"]].values.tolist() == [[0.4, 0.77]]


def test_ppo_plots_fit_the_data_with_an_interval_per_round(store):
    """Issue 11.8: per-step PPO plots showed one dot per round on a -1..1 axis."""
    store.log_metrics("ppo", {"reward_mean": 0.12, "reward_std": 0.8, "n_sequences": 64,
                              "kl": 0.8}, step=0, version=1)
    for s in range(8):
        store.log_metrics("ppo", {"entropy": 1.9 - 0.01 * s}, step=s, version=1)
    frames = dd.ppo_frames(store)
    half = 1.96 * 0.8 / 8
    row = frames["reward_mean"].iloc[0]
    assert (row["lo"], row["hi"]) == pytest.approx((0.12 - half, 0.12 + half))
    assert frames["kl"]["lo"].isna().all()  # no spread logged: no bar, and the chart says so
    one = chart_spec("ppo_reward_mean", frames["reward_mean"])
    y = one["layer"][0]["encoding"]["y"]["scale"]["domain"]
    assert y[0] < 0.12 - half and y[1] > 0.12 + half and y[1] - y[0] < 0.5  # not -1..1
    assert one["layer"][0]["encoding"]["x"]["axis"]["values"] == [0]
    assert "one round so far: not enough data yet for a trend" in one["title"]["subtitle"]
    assert "no spread recorded" in " ".join(chart_spec("ppo_kl", frames["kl"])["title"][
        "subtitle"])
    store.log_metrics("ppo", {"reward_mean": 0.3, "reward_std": 0.8, "n_sequences": 64},
                      step=8, version=2)
    two = chart_spec("ppo_reward_mean", dd.ppo_frames(store)["reward_mean"])
    assert two["title"]["subtitle"] == [("logged once per round (bars: 95% interval of the "
                                         "mean over the round's rollouts)")]
    entropy = chart_spec("ppo_entropy", frames["entropy"])
    assert entropy["layer"][0]["encoding"]["x"]["scale"]["domain"] == [0.0, 7.0]
    assert entropy["layer"][0]["encoding"]["y"]["scale"]["domain"] == pytest.approx(
        [1.83 - 0.0056, 1.9 + 0.0056])


# -- a real server ------------------------------------------------------------------------------
def test_server_serves_dashboard_and_research_tabs(tmp_path):
    from app.ui import launch
    from tests.test_ui_server import client, free_port
    ctx = AppContext.from_config(AppConfig(workspace=tmp_path / "ws"))
    seed_dashboard(ctx.store)
    port = free_port()
    demo = launch(ctx, port=port, prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        page = urllib.request.urlopen(url + "config", timeout=10).read().decode()
        assert "Dashboard" in page and "Research" in page
        status = client(url).predict(api_name="/status")
        assert status["reward_version"] == 3
    finally:
        demo.close()


# -- the worker job on a tiny model ---------------------------------------------------------------
def test_score_items_job_on_a_tiny_model(tmp_path, tiny_model_dir):
    from rlhf_core.worker.runtime import Runtime
    from rlhf_core.workspace import open_workspace
    store, cfg = open_workspace(tmp_path / "ws", model=str(tiny_model_dir))
    seed_dashboard(store, scores=False)
    runtime = Runtime(store, cfg, cpu=True)
    publish_fresh_reward(runtime, 4, parent=3)  # untrained, promoted: enough to score
    job_id = jobs.enqueue(store, "score_items", {"limit": 10})
    done = run_one(runtime, "test-worker", kinds=["score_items"])
    assert done["id"] == job_id and done["status"] == "done", done.get("error")
    assert done["result"] == {"version": 4, "scored": 10, "remaining": 4}
    jobs.enqueue(store, "score_items", {})  # the rest, newest items were scored first
    assert run_one(runtime, "test-worker")["result"]["remaining"] == 0
    rows = store.rows("SELECT score FROM response_scores WHERE reward_version = 4")
    assert len(rows) == 14 and len({r["score"] for r in rows}) > 1
    assert dd.recent_items(store)["items"][0]["pairs"] == 1


@pytest.mark.browser
def test_dashboard_renders_every_figure_in_a_browser(tmp_path):
    """Headless Chromium opens the Dashboard: every figure draws, at the width of its box (a
    Vega spec without Gradio's sizing collapsed to a sliver), with no page or console error."""
    from app.ui import launch
    from tests.test_browser import CHROMIUM, FLAGS
    from tests.test_ui_server import free_port
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    ctx = AppContext.from_config(AppConfig(workspace=tmp_path / "ws"))
    seed_dashboard(ctx.store)
    ctx.store.add_version("reward", 4, status="rejected", parent=3, metrics={
        "heldout_accuracy": 0.6, "heldout_strict_pairs": 40})
    port = free_port()
    demo = launch(ctx, port=port, prevent_thread_lock=True, quiet=True)
    errors: list[str] = []
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_role("tab", name="Dashboard").click()
            drawn = ".rl-chart canvas, .rl-chart svg.marks"  # the rankings chart is SVG
            figures = page.locator(drawn)
            page.wait_for_function(f"document.querySelectorAll('{drawn}').length >= 9",
                                   timeout=60000)
            # a chart re-rendered by the refresh timer is 0 px wide for a moment: wait until
            # every figure is laid out (a figure never sized fails on the timeout)
            page.wait_for_function(
                f"[...document.querySelectorAll('{drawn}')].every(e => {{ const r = "
                "e.getBoundingClientRect(); return r.width > 300 && r.height > 150; })",
                timeout=30000)
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            for i in range(figures.count()):
                box = figures.nth(i).bounding_box()
                assert box["width"] > 300 and box["height"] > 150, (i, box)
            browser.close()
    finally:
        demo.close()
    assert errors == []


def test_research_view_letters_cards_as_the_annotator_saw_them(store):
    """The Rank page shuffles an item's cards; the Research tab must letter a ranking with the
    letters the annotator typed, not the stored positions."""
    from tests.test_handlers import seed_items
    ids = seed_items(store, n=6, k=4)
    item = next(annotation.load_item(store, i) for i in ids
                if [r["position"] for r in annotation.load_item(store, i)["responses"]]
                != [0, 1, 2, 3])  # an item whose cards are shown out of stored order
    held = annotation.next_item(store, "ada")
    while held["id"] != item["id"]:  # skip up to that item
        annotation.submit_ranking(store, annotator="ada", item_id=held["id"],
                                  token=held["token"], submission_key=f"skip-{held['id']}",
                                  skip=True)
        held = annotation.next_item(store, "ada")
    typed = [[r["id"]] for r in held["responses"]]  # "abcd" as shown on the page
    annotation.submit_ranking(store, annotator="ada", item_id=held["id"], token=held["token"],
                              submission_key="k", tiers=typed)
    shown = next(i for i in dd.recent_items(store)["items"] if i["item_id"] == item["id"])
    assert [r["label"] for r in shown["responses"]] == ["A", "B", "C", "D"]
    assert [r["position"] for r in shown["responses"]] != [0, 1, 2, 3]
