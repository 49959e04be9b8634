"""Headless Chromium on the Arena tab: type a prompt, the worker (run here, in-process, with a
tiny random model) answers it, the cards appear, the keyboard ranks them, the ranking is stored."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.context import AppContext
from rlhf_core.data import jobs
from rlhf_core.data.annotation import load_item
from rlhf_core.data.arena import KIND
from tests.helpers import served, wait_until
from tests.test_browser import CHROMIUM, FLAGS, IMG_XSS

pytestmark = pytest.mark.browser
SHOTS = Path("/tmp/shots")
PROMPT = f"write a short poem about the sea {IMG_XSS}"


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    import torch

    from rlhf_core.worker.runtime import Runtime
    from rlhf_core.workspace import open_workspace
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    store, cfg = open_workspace(tmp_path / "ws", model=str(tiny_model_dir),
                                **{"sampling.max_new_tokens": 8, "sampling.k": 3,
                                   "sampling.seed": 5})
    yield store, cfg, Runtime(store, cfg, cpu=True)
    store.close()
    torch.set_num_threads(threads)


def test_ask_wait_rank_with_the_keyboard(workspace):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    from rlhf_core.worker.run import run_one
    store, cfg, runtime = workspace
    SHOTS.mkdir(exist_ok=True)
    ctx = AppContext.from_config(cfg, store=store)
    with served(ctx) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(url + "/")
        page.locator("#rl-name input, #rl-name textarea").first.wait_for(timeout=30000)
        page.keyboard.type("ada")  # the Rank tab asks for the name first
        page.keyboard.press("Enter")
        page.locator("#rl-progress", has_text="ada").wait_for(timeout=30000)
        page.get_by_role("tab", name="Arena").click()
        box = page.locator("#ar-prompt textarea, #ar-prompt input").first
        box.wait_for(timeout=20000)
        box.click()
        page.keyboard.type(PROMPT)
        page.keyboard.press("Enter")
        page.locator("#ar-status", has_text="is queued").wait_for(timeout=20000)
        page.locator("#ar-shown-prompt", has_text=IMG_XSS).wait_for(timeout=10000)  # as text
        assert wait_until(lambda: box.input_value() == "", 10)  # the box empties
        page.screenshot(path=str(SHOTS / "helper-C_arena_waiting.png"), full_page=True)

        row = run_one(runtime, "test-worker")  # the worker, here: the tiny model answers
        assert row["kind"] == KIND and row["status"] == "done", row["error"]
        cards = page.locator("#ar-cards .rl-card")
        cards.first.wait_for(timeout=20000)  # the page's poll found the answers
        item = load_item(store, row["result"]["item_id"])
        assert cards.count() == len(item["responses"]) >= 2
        page.wait_for_function("document.activeElement && "
                               "document.activeElement.closest('#ar-ranking')", timeout=20000)
        page.screenshot(path=str(SHOTS / "helper-C_arena_desktop.png"), full_page=True)
        page.set_viewport_size({"width": 390, "height": 844})
        page.screenshot(path=str(SHOTS / "helper-C_arena_phone.png"), full_page=True)
        page.set_viewport_size({"width": 1280, "height": 1000})

        labels = [r["label"] for r in item["responses"]]
        typed = "".join(reversed(labels)).lower()
        page.locator("#ar-ranking input, #ar-ranking textarea").first.focus()
        page.keyboard.type(typed)
        page.locator("#ar-preview", has_text="✓").wait_for(timeout=10000)
        page.keyboard.press("Enter")
        assert wait_until(lambda: store.scalar("SELECT COUNT(*) FROM rankings") == 1, 15)
        page.locator("#ar-status", has_text="Ranking saved").wait_for(timeout=15000)
        page.locator("#ar-ranking").wait_for(state="hidden", timeout=10000)
        page.wait_for_function("document.activeElement && "  # ready for the next prompt
                               "document.activeElement.closest('#ar-prompt')", timeout=10000)
        page.screenshot(path=str(SHOTS / "helper-C_arena_saved.png"), full_page=True)
        assert page.evaluate("window.__xss") is None and dialogs == []
        browser.close()
    ranking = store.one("SELECT * FROM rankings")
    by_label = {r["label"]: r["id"] for r in item["responses"]}
    assert ranking["annotator"] == "ada" and ranking["item_id"] == item["id"]
    assert json.loads(ranking["tiers"]) == [[by_label[x]] for x in typed.upper()]
    n = len(labels)
    assert store.scalar("SELECT COUNT(*) FROM active_pairs WHERE ranking_id = ?",
                        [ranking["id"]]) == n * (n - 1) // 2
    assert jobs.get_job(store, row["id"])["requested_by"] == "ada"
