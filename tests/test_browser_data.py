"""Headless Chromium on the Data tab: search, filter flagged, resolve one flag, relabel another
and see the queue shrink; mark a disagreement reviewed. User text is displayed, never run."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from app.context import AppContext
from rlhf_core.config import AppConfig
from rlhf_core.data.annotation import next_item, submit_ranking
from rlhf_core.preferences import parse_ranking_text
from tests.helpers import served
from tests.test_browser import CHROMIUM, FLAGS, IMG_XSS
from tests.test_handlers import XSS, seed_items

pytestmark = pytest.mark.browser
SHOTS = Path("/tmp/shots")
NOTE = "sure_not <i>x</i>"


def seed(store) -> list[int]:
    """3 items, 2 annotators each. ada flags items 1 and 2 (item 1 with NOTE); bob reverses
    ada's order on item 1, swaps A and B on item 2, agrees on item 3."""
    items = seed_items(store, n=3, overlap=2, texts=[XSS, IMG_XSS, "plain answer", "d\nlines"])
    keys = itertools.count()
    for who, plan in (("ada", [("abcd", True, NOTE), ("abcd", True, None), ("abcd", False, None)]),
                      ("bob", [("dcba", False, None), ("bacd", False, None),
                               ("abcd", False, None)])):
        for text, flagged, note in plan:
            item = next_item(store, who)
            ids = {r["label"]: r["id"] for r in item["responses"]}
            tiers = [[ids[x] for x in t] for t in parse_ranking_text(text, list(ids))]
            submit_ranking(store, annotator=who, item_id=item["id"], token=item["token"],
                           submission_key=f"k{next(keys)}", tiers=tiers, flagged=flagged,
                           note=note, time_spent_s=12.0)
    return items


def pick(page, elem_id: str, option: str) -> None:
    """Choose `option` in a Gradio dropdown."""
    page.locator(f"#{elem_id} input").first.click()
    page.get_by_role("option", name=option, exact=True).first.click()


def test_search_filter_resolve_relabel(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    ctx = AppContext.from_config(AppConfig(workspace=tmp_path / "ws"))
    items = seed(ctx.store)
    SHOTS.mkdir(exist_ok=True)
    with served(ctx) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(url + "/")
        page.get_by_role("tab", name="Data").click()
        count = page.locator("#dt-page")
        count.get_by_text("6 ranking(s)").wait_for(timeout=30000)
        results = page.locator("#dt-results")
        results.get_by_text("test prompt 0 <b>x</b>").first.wait_for(timeout=10000)  # as text
        page.locator("#dt-text input").fill("SURE_NOT")  # case-insensitive; _ is literal
        page.locator("#dt-text input").press("Enter")
        count.get_by_text("1 ranking(s)").wait_for(timeout=20000)
        results.get_by_text(NOTE).wait_for(timeout=10000)
        assert results.locator("i, script, img").count() == 0
        page.locator("#dt-text input").fill("")
        page.locator("#dt-text input").press("Enter")
        count.get_by_text("6 ranking(s)").wait_for(timeout=20000)
        pick(page, "dt-flagged", "flagged")
        count.get_by_text("2 ranking(s)").wait_for(timeout=20000)

        flags = page.locator("#dt-flags-count")
        flags.get_by_text("2 flagged ranking(s)").wait_for(timeout=10000)
        page.locator("#dt-disagree-count").get_by_text("3 item(s)").wait_for(timeout=10000)
        for html_id in ("#dt-flags", "#dt-disagreements"):  # responses: shown, never run
            page.locator(html_id).get_by_text(XSS).first.wait_for(timeout=10000)
            page.locator(html_id).get_by_text(IMG_XSS).first.wait_for(timeout=10000)
            assert page.locator(f"{html_id} img, {html_id} script, {html_id} b").count() == 0
        page.screenshot(path=str(SHOTS / "helper-B_data_desktop.png"), full_page=True)
        page.locator("#dt-resolve").click()  # the oldest flag is picked: ada's item 1
        page.locator("#dt-flag-msg").get_by_text("kept").wait_for(timeout=20000)
        flags.get_by_text("1 flagged ranking(s)").wait_for(timeout=20000)
        page.locator("#dt-relabel").click()
        page.locator("#dt-flag-msg").get_by_text("superseded").wait_for(timeout=20000)
        flags.get_by_text("0 flagged ranking(s)").wait_for(timeout=20000)
        page.get_by_text("No flagged ranking waits for review.").wait_for(timeout=10000)
        count.get_by_text("1 ranking(s)").wait_for(timeout=20000)  # the relabelled one is gone
        disagree = page.locator("#dt-disagree-count")  # item 2 has one ranking left
        disagree.get_by_text("2 item(s)").wait_for(timeout=20000)

        page.locator("#dt-reviewed").click()  # the most disputed item: item 1 (6 of 6)
        page.locator("#dt-item-msg").get_by_text(f"item #{items[0]} marked reviewed").wait_for(
            timeout=20000)
        disagree.get_by_text("1 item(s)").wait_for(timeout=20000)
        page.screenshot(path=str(SHOTS / "helper-B_data_desktop_after.png"), full_page=True)
        page.set_viewport_size({"width": 390, "height": 900})
        page.locator("#dt-flags").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "helper-B_data_phone.png"), full_page=True)
        assert page.evaluate("window.__xss") is None and dialogs == []
        browser.close()
    actions = ctx.store.rows("SELECT action, ranking_id, item_id FROM reviews ORDER BY id")
    assert [a["action"] for a in actions] == ["resolve", "relabel", "reviewed"]
    assert actions[1]["item_id"] == items[1]
    assert next_item(ctx.store, "cy")["id"] == items[1]  # the relabelled item is served again
