"""Headless Chromium: rank two items, open the "My work" tab, see the stats, open a history row
with the keyboard, correct it, and see the old row superseded by the new one."""
from __future__ import annotations

from pathlib import Path

import pytest

from app.context import AppContext
from app.ui_me import build_me_tab
from rlhf_core.config import AppConfig
from rlhf_core.data import history
from tests.helpers import served, wait_until
from tests.test_browser import CHROMIUM, FLAGS
from tests.test_history import rank
from tests.test_handlers import seed_items

pytestmark = pytest.mark.browser
SHOTS = Path("/tmp/shots")
SHOWN_ITEM = ("(() => { const m = (document.querySelector('#rl-prompt')?.innerText || '')"
              ".match(/item (\\d+)/); return m ? Number(m[1]) : null; })()")


def ada_rankings(store) -> list[dict]:
    return history.history(store, "ada")["rows"]


def rank_in_page(page, store, text: str, n_after: int) -> None:
    """Type a ranking and Enter; return once it is saved and the next item is on screen (typing
    while the form reloads would land in the old form)."""
    page.wait_for_function(f"{SHOWN_ITEM} !== null && document.activeElement && "
                           "document.activeElement.closest('#rl-ranking')", timeout=20000)
    shown = page.evaluate(SHOWN_ITEM)
    page.keyboard.type(text)
    page.keyboard.press("Enter")
    assert wait_until(lambda: len(ada_rankings(store)) == n_after, 20)
    page.wait_for_function(f"{SHOWN_ITEM} !== {shown}", timeout=20000)


def test_my_work_tab_corrects_a_ranking(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    SHOTS.mkdir(exist_ok=True)
    ctx = AppContext.from_config(AppConfig(workspace=tmp_path / "ws"))
    seed_items(ctx.store, n=3, overlap=2)
    rank(ctx.store, "bob", "bacd", "b1")  # bob ranked the first item: agreement to show
    with served(ctx, extra_tabs=(build_me_tab,)) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url + "/")
        page.locator("#rl-name input, #rl-name textarea").first.wait_for(timeout=30000)
        page.keyboard.type("ada")
        page.keyboard.press("Enter")
        page.locator("#rl-cards .rl-card").first.wait_for(timeout=30000)
        rank_in_page(page, ctx.store, "abcd", 1)  # the item bob ranked B > A > C > D
        rank_in_page(page, ctx.store, "b a=c d", 2)
        first = ada_rankings(ctx.store)[-1]["id"]

        page.get_by_role("tab", name="My work").click()
        stats = page.locator("#me-stats")
        stats.get_by_text("Agreement with others: 83%").wait_for(timeout=20000)
        assert stats.locator(".me-tile .me-num").first.inner_text() == "2"  # rankings
        assert "1 today" in stats.locator(".me-tile").nth(3).inner_text()  # one with a tie
        rows = page.locator("#me-history tr.me-row")
        assert rows.count() == 2 and "B > A = C > D" in rows.first.inner_text()
        page.screenshot(path=str(SHOTS / "helper-A_me_desktop.png"), full_page=True)

        page.locator(f'#me-history button[data-rid="{first}"]').focus()
        page.keyboard.press("Enter")  # a row opens from the keyboard
        detail = page.locator("#me-detail")
        detail.locator(".rl-card").nth(3).wait_for(timeout=20000)
        fix = page.locator("#me-fix input, #me-fix textarea").first
        assert fix.input_value() == "A > B > C > D"
        page.wait_for_function(
            "document.activeElement && document.activeElement.closest('#me-fix')", timeout=20000)
        page.screenshot(path=str(SHOTS / "helper-A_me_open.png"), full_page=True)
        page.keyboard.press("Control+A")
        page.keyboard.type("dcba")
        page.locator("#me-preview").get_by_text("D > C > B > A").wait_for(timeout=10000)
        page.keyboard.press("Enter")

        old = page.locator(f'#me-history tr:has(button[data-rid="{first}"])')
        old.get_by_text("superseded: corrected by").wait_for(timeout=20000)
        newest = ada_rankings(ctx.store)[0]
        assert newest["supersedes"] == first and newest["ranking"] == "D > C > B > A"
        assert f"corrected by #{newest['id']}" in old.inner_text()
        assert "corrects" in rows.first.inner_text() and rows.count() == 3
        assert page.locator('#me-history tr[data-status="active"]').count() == 2
        assert detail.is_hidden()
        page.get_by_text(f"ranking #{newest['id']} replaces #{first}").wait_for(timeout=5000)
        page.screenshot(path=str(SHOTS / "helper-A_me_corrected.png"), full_page=True)
        page.set_viewport_size({"width": 390, "height": 844})
        page.locator(f'#me-history button[data-rid="{newest["id"]}"]').click()  # by touch
        detail.locator(".rl-card").nth(3).wait_for(timeout=20000)
        page.screenshot(path=str(SHOTS / "helper-A_me_phone.png"), full_page=True)
        browser.close()
