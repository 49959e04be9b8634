"""Headless Chromium: responses and guidelines render as markdown, and no HTML of theirs runs."""
from __future__ import annotations

import pytest

from app.context import AppContext
from app.ui import launch
from rlhf_core.config import AppConfig
from rlhf_core.data.guidelines import DEFAULT_RUBRIC, set_guidelines
from tests.test_browser import CHROMIUM, FLAGS, IMG_XSS
from tests.test_handlers import XSS, seed_items
from tests.test_ui_server import free_port

pytestmark = pytest.mark.browser
MD = "**bold claim** and `x = 1`\n\n- first\n- second\n\n```\nprint('hi')\n```"
GUIDE_XSS = '<script>window.__guide = 1</script>'


def test_markdown_cards_raw_toggle_and_guidelines(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    ctx = AppContext.from_config(AppConfig(workspace=tmp_path / "ws"))
    seed_items(ctx.store, n=2, texts=[MD, XSS, IMG_XSS, "![pic](http://127.0.0.1:9/x.png) plain"])
    set_guidelines(ctx.store, f"Prefer **honest** answers.\n\n{GUIDE_XSS}\n\n{IMG_XSS}", "")
    port = free_port()
    demo = launch(ctx, port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            dialogs = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#rl-name input, #rl-name textarea").first.wait_for(timeout=30000)
            page.keyboard.type("ada")
            page.keyboard.press("Enter")
            cards = page.locator("#rl-cards")
            cards.locator("strong", has_text="bold claim").wait_for(timeout=30000)
            page.get_by_text(DEFAULT_RUBRIC).first.wait_for(timeout=20000)
            assert cards.locator("li").count() == 2
            font = cards.locator(".rl-md pre code").first.evaluate(
                "e => getComputedStyle(e).fontFamily")
            assert "mono" in font.lower() or "courier" in font.lower(), font
            cards.locator(".rl-md", has_text=XSS).wait_for(timeout=10000)  # shown as text
            cards.locator(".rl-md", has_text=IMG_XSS).wait_for(timeout=10000)
            assert cards.locator("img, script, iframe").count() == 0
            cards.locator(".rl-md p", has_text="![pic](http://127.0.0.1:9/x.png) plain").wait_for(
                timeout=5000)  # an image is shown as its source text
            assert page.locator(".rl-raw").first.is_hidden()
            page.screenshot(path="/tmp/md_cards.png", full_page=True)

            page.locator("#rl-raw input").check()  # the raw-text toggle
            page.locator(".rl-raw", has_text="**bold claim**").wait_for(timeout=10000)
            assert cards.locator(".rl-md").first.is_hidden()
            page.screenshot(path="/tmp/md_raw.png", full_page=True)
            page.locator("#rl-raw input").uncheck()
            cards.locator("strong", has_text="bold claim").wait_for(timeout=10000)

            page.get_by_text("Guidelines", exact=True).first.click()  # open the accordion
            guide = page.locator("#rl-guidelines")
            guide.locator("strong", has_text="honest").wait_for(timeout=10000)
            guide.get_by_text(GUIDE_XSS).wait_for(timeout=10000)  # displayed, not run
            assert guide.locator("img, script").count() == 0
            page.screenshot(path="/tmp/md_guidelines.png", full_page=True)
            assert page.evaluate("window.__xss") is None
            assert page.evaluate("window.__guide") is None and dialogs == []
            browser.close()
    finally:
        demo.close()
