"""Headless Chromium ranks one item with the keyboard alone, through the real page."""
from __future__ import annotations

import json
import shutil

import pytest

from app.context import AppContext
from app.ui import launch
from rlhf_core.data.annotation import load_item
from rlhf_core.config import AppConfig
from tests.helpers import wait_until
from tests.test_handlers import XSS, seed_items
from tests.test_ui_server import free_port

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IMG_XSS = '<img src=x onerror="window.__xss = 1">'


@pytest.fixture
def page_and_ctx(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    ctx = AppContext.from_config(AppConfig(workspace=tmp_path / "ws"))
    seed_items(ctx.store, n=5, texts=[XSS, IMG_XSS, "${1+1} {{x}}", "plain\n  answer"])
    port = free_port()
    demo = launch(ctx, port=port, prevent_thread_lock=True, quiet=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.dialogs = []
        page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
        page.goto(f"http://127.0.0.1:{port}/")
        try:
            yield page, ctx
        finally:
            browser.close()
            demo.close()


def _ranking_value(page) -> str:
    return page.locator("#rl-ranking input, #rl-ranking textarea").first.input_value()


def test_rank_with_keyboard_only(page_and_ctx):
    page, ctx = page_and_ctx
    store = ctx.store
    page.locator("#rl-name input, #rl-name textarea").first.wait_for(timeout=30000)
    page.keyboard.type("ada")  # the name field has autofocus
    page.keyboard.press("Enter")
    page.get_by_text(XSS).first.wait_for(timeout=30000)  # shown as text...
    page.get_by_text(IMG_XSS).first.wait_for(timeout=20000)
    page.get_by_text("${1+1} {{x}}").first.wait_for(timeout=20000)
    page.wait_for_function("document.activeElement && document.activeElement.closest('#rl-ranking')",
                           timeout=20000)
    page.keyboard.type("bacd")
    page.keyboard.press("Enter")
    assert wait_until(lambda: store.scalar("SELECT COUNT(*) FROM rankings") == 1, 15)
    row = store.one("SELECT * FROM rankings")
    labels = {r["label"]: r["id"] for r in load_item(store, row["item_id"])["responses"]}
    assert row["annotator"] == "ada" and row["kind"] == "rank"
    assert json.loads(row["tiers"]) == [[labels[x]] for x in "BACD"]

    # Next item: a half-typed draft survives a page refresh.
    page.wait_for_function("document.querySelector('#rl-cards') && "
                           f"!document.querySelector('#rl-prompt').innerText.includes('item {row['item_id']}')",
                           timeout=30000)
    page.keyboard.type("cb")
    # The preview of "cb" itself: the edit events run one at a time (always_last), so "missing:
    # A, B, D" (the edit "c") can show while "cb" is still on its way, and a reload then would
    # restore "c". The same response carries the draft, which the page writes to its storage.
    page.get_by_text("missing: A, D").first.wait_for(timeout=30000)
    page.reload()
    page.wait_for_function("(() => { const e = document.querySelector('#rl-ranking input, "
                           "#rl-ranking textarea'); return e && e.value === 'cb'; })()",
                           timeout=30000)
    assert page.locator("#rl-name input, #rl-name textarea").first.is_hidden()  # name remembered

    page.keyboard.press("Alt+S")  # skip
    assert wait_until(lambda: store.scalar("SELECT COUNT(*) FROM rankings WHERE kind='skip'") == 1, 15)
    page.wait_for_timeout(300)
    page.keyboard.press("Alt+U")  # undo the skip: its item comes back
    assert wait_until(lambda: store.scalar("SELECT COUNT(*) FROM rankings WHERE kind='undo'") == 1, 15)

    # The mouse works too: card radios fill the ranking box, the Submit button records it.
    page.get_by_text("Undid your ranking").first.wait_for(timeout=30000)
    for label, rank in (("B", "1"), ("A", "2"), ("C", "2")):
        page.locator(f"#rl-rank-{label}").get_by_text(rank, exact=True).click()
        page.wait_for_timeout(150)
    page.wait_for_function("(() => { const e = document.querySelector('#rl-ranking input, "
                           "#rl-ranking textarea'); return e && e.value === 'B > A = C'; })()",
                           timeout=30000)
    page.screenshot(path="/tmp/ui.png", full_page=True)
    page.locator("#rl-submit").click()
    assert wait_until(lambda: store.scalar("SELECT COUNT(*) FROM active_rankings "
                                           "WHERE kind='rank'") == 2, 15)
    last = store.one("SELECT * FROM rankings ORDER BY id DESC LIMIT 1")
    labels = {r["label"]: r["id"] for r in load_item(store, last["item_id"])["responses"]}
    assert json.loads(last["tiers"]) == [[labels["B"]], [labels["A"], labels["C"]], [labels["D"]]]
    assert page.dialogs == [] and page.evaluate("window.__xss") is None  # nothing executed


_SHOWN_ITEM = ("(() => { const m = (document.querySelector('#rl-prompt')?.innerText || '')"
               ".match(/item (\\d+)/); return m ? Number(m[1]) : null; })()")


def _form(page) -> dict:
    return {"item": page.evaluate(_SHOWN_ITEM), "ranking": _ranking_value(page),
            "flag": page.locator("#rl-flag input").is_checked(),
            "all_bad": page.locator("#rl-allbad input").is_checked(),
            "preview": page.locator("#rl-preview").inner_text()}


def test_a_finished_items_draft_never_reaches_the_next_item(page_and_ctx):
    """Issue 11.1: rank with `dcba` + Alt+F + Enter at once, reload inside ~1.5 s. The edit
    events sent just before Enter were processed after the submission (with the next item in
    the session state) and saved `dcba` + flag as the next item's draft."""
    page, ctx = page_and_ctx
    store = ctx.store
    page.locator("#rl-name input, #rl-name textarea").first.wait_for(timeout=30000)
    page.keyboard.type("bea")
    page.keyboard.press("Enter")
    for attempt in range(3):
        page.wait_for_function(f"{_SHOWN_ITEM} !== null && document.activeElement && "
                               "document.activeElement.closest('#rl-ranking')", timeout=30000)
        item_id = page.evaluate(_SHOWN_ITEM)
        page.keyboard.type("dcba")
        page.keyboard.press("Alt+F")
        page.keyboard.press("Enter")
        assert wait_until(lambda: store.scalar("SELECT COUNT(*) FROM rankings") == attempt + 1, 15)
        page.wait_for_function(f"{_SHOWN_ITEM} !== null && {_SHOWN_ITEM} !== {item_id}",
                               timeout=30000)
        page.wait_for_timeout(1200)
        fresh = _form(page)  # the next item, on the same screen
        assert (fresh["ranking"], fresh["flag"], fresh["all_bad"]) == ("", False, False), fresh
        assert not fresh["preview"].startswith("✓"), fresh
        page.reload()
        page.wait_for_function(f"{_SHOWN_ITEM} !== null", timeout=30000)
        page.wait_for_timeout(300)
        reloaded = _form(page)
        assert reloaded["item"] == fresh["item"]
        assert (reloaded["ranking"], reloaded["flag"], reloaded["all_bad"]) == ("", False, False), (
            attempt, reloaded)
        assert not reloaded["preview"].startswith("✓"), reloaded
    page.keyboard.press("Enter")  # an empty form: refused, nothing recorded
    page.get_by_text("type a ranking").first.wait_for(timeout=15000)
    rows = store.rows("SELECT item_id, flagged, all_bad FROM rankings ORDER BY id")
    assert len(rows) == 3 and len({r["item_id"] for r in rows}) == 3
    assert all(r["flagged"] == 1 and r["all_bad"] == 0 for r in rows)


def test_not_saved_toast_shows_the_typed_text_as_text(page_and_ctx):
    """Issue 16.10: the refusal quotes the typed ranking; the toast renders HTML."""
    page, ctx = page_and_ctx
    page.locator("#rl-name input, #rl-name textarea").first.wait_for(timeout=30000)
    page.keyboard.type("cy")
    page.keyboard.press("Enter")
    page.wait_for_function(f"{_SHOWN_ITEM} !== null && document.activeElement && "
                           "document.activeElement.closest('#rl-ranking')", timeout=30000)
    typed = 'a(b(<img src=x onerror="window.__toast = 1"><b>bold</b>'
    page.keyboard.type(typed)
    page.keyboard.press("Enter")
    toast = page.locator("[data-testid=toast-body]").filter(has_text="Not saved").first
    toast.wait_for(timeout=15000)
    assert typed in toast.inner_text()
    assert toast.locator("img, b").count() == 0
    message = page.locator("#rl-message")
    page.wait_for_function("document.querySelector('#rl-message').innerText.includes('<b>bold')",
                           timeout=15000)
    assert message.locator("img, b:text('bold')").count() == 0
    assert page.evaluate("window.__toast") is None and ctx.store.counts()["rankings"] == 0
