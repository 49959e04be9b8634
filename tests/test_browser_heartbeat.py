"""Headless Chromium: the Rank tab's timer keeps the item on screen held, and a closed tab gives
it back within the short hold, not the 30-minute ttl (issue 11.3c)."""
from __future__ import annotations

import time

import pytest

from app.context import AppContext
from app.ui import launch
from rlhf_core.config import AppConfig, LoopConfig
from rlhf_core.data.annotation import next_item
from tests.helpers import wait_until
from tests.test_browser import CHROMIUM, FLAGS
from tests.test_handlers import seed_items
from tests.test_ui_server import free_port

pytestmark = pytest.mark.browser
HOLD_S = 10  # the smallest hold the settings allow


def test_an_open_tab_keeps_its_item_and_a_closed_one_gives_it_back(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    ctx = AppContext.from_config(AppConfig(workspace=tmp_path / "ws",
                                           loop=LoopConfig(assignment_hold_s=HOLD_S)))
    seed_items(ctx.store, n=1)
    port = free_port()
    demo = launch(ctx, port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#rl-name input, #rl-name textarea").first.wait_for(timeout=30000)
            page.keyboard.type("ada")
            page.keyboard.press("Enter")
            page.locator("#rl-cards .rl-card").first.wait_for(timeout=30000)
            served = time.time()

            def expires() -> float:
                return ctx.store.scalar("SELECT expires_at FROM assignments "
                                        "WHERE annotator = 'ada' AND status = 'open'")
            assert expires() <= served + HOLD_S + 1
            # past the first hold: the page's timer renewed it, nobody else may take it
            assert wait_until(lambda: expires() > served + HOLD_S + 1, 3 * HOLD_S)
            time.sleep(max(0.0, served + HOLD_S + 2 - time.time()))
            assert next_item(ctx.store, "bob") is None
            page.close()  # the tab goes away: no more heartbeats
            closed = time.time()
            got = []
            assert wait_until(lambda: got.append(next_item(ctx.store, "bob")) or got[-1],
                              HOLD_S + 10, interval=0.5)
            assert time.time() - closed <= HOLD_S + 10  # minutes at most, never the 30 min ttl
            browser.close()
    finally:
        demo.close()
