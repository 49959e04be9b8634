"""Headless Chromium: a prompt file uploaded through the Research tab, the header and every tab
on a 390 px phone, and the Dashboard's time axis whose labels never overlap."""
from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

import gradio as gr
import pandas as pd
import pytest

from app.context import AppContext
from app.launcher import free_port
from app.ui_dashboard import chart_spec, plot_value
from app.ui_prompts import MAX_UPLOAD_BYTES
from rlhf_core.config import AppConfig
from rlhf_core.data import annotation, jobs, workers
from tests.helpers import served
from tests.test_browser import CHROMIUM, FLAGS
from tests.test_handlers import seed_items

pytestmark = pytest.mark.browser
SHOTS = Path("/tmp/shots")
PHONE, DESKTOP = 390, 1280
TABS = ("Rank", "Status", "Dashboard", "Research")


@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    SHOTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def ctx(tmp_path):
    ctx = AppContext.from_config(AppConfig(workspace=tmp_path / "ws"))
    seed_items(ctx.store, n=4)
    for key in ("a", "b"):  # two rankings, so the Dashboard draws its chart
        item = annotation.next_item(ctx.store, "bob")
        annotation.submit_ranking(ctx.store, annotator="bob", item_id=item["id"],
                                  token=item["token"], submission_key=key,
                                  tiers=[[r["id"]] for r in item["responses"]])
    # the Status tab's rows: a worker running a job at 40%, another job queued
    workers.register(ctx.store, "gpu-worker-1", host="gpu-host", pid=4242, device="cuda:0")
    jobs.enqueue(ctx.store, "train_reward")
    running = jobs.claim(ctx.store, "gpu-worker-1")
    jobs.report_progress(ctx.store, running["id"], "gpu-worker-1", 0.4,
                         "epoch 2/5 · loss 0.61 · 812 pairs")
    jobs.enqueue(ctx.store, "ppo_round")
    return ctx


def start(browser, url: str, width: int, name: str = "ada-lovelace-long-name"):
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.goto(url)
    page.locator("#rl-name input, #rl-name textarea").first.wait_for(timeout=30000)
    page.keyboard.type(name)
    page.keyboard.press("Enter")
    page.locator("#rl-cards .rl-card").first.wait_for(timeout=30000)
    page.locator("#rl-progress", has_text="more available").wait_for(timeout=30000)
    return page


def open_tab(page, name: str) -> None:
    """Click a tab; on a narrow page Gradio moves the tabs that do not fit into "More tabs"."""
    tab = page.get_by_role("tab", name=name, exact=True)
    if tab.count():
        tab.click()
    else:
        page.get_by_label("More tabs").click()
        page.locator(".overflow-dropdown button", has_text=name).click()


def prompts(ctx) -> int:
    return ctx.store.scalar("SELECT COUNT(*) FROM prompts")


def test_upload_a_prompt_file_through_the_page(ctx, browser, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"Uploaded question {i}?"}) + "\n"
                            for i in range(3)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n{"prompt": "ok too"}\nnot json\n')
    big = tmp_path / "big.jsonl"  # a 5 MB file must pass the app's 64 KB request cap
    big.write_text("".join(json.dumps({"prompt": f"{i} " + "word " * 200}) + "\n"
                           for i in range(5000)))
    assert big.stat().st_size > 5_000_000
    before = prompts(ctx)
    with served(ctx) as url:
        page = start(browser, url, DESKTOP)
        open_tab(page, "Research")
        drop = page.locator("#rs-upload-file")
        msg = page.locator("#rs-upload-msg")

        drop.locator("input[type=file]").set_input_files(str(bad))
        drop.get_by_text("bad.jsonl").first.wait_for(timeout=30000)  # uploaded
        page.locator("#rs-upload-btn").click()
        msg.get_by_text("Nothing was added: bad.jsonl has 2 bad lines").wait_for(timeout=30000)
        assert "line 2: 'prompt' must be a string" in msg.inner_text()
        assert "line 4: invalid JSON" in msg.inner_text()
        assert prompts(ctx) == before
        page.screenshot(path=str(SHOTS / "helper-D_upload_bad_1280.png"), full_page=True)

        drop.get_by_label("Clear").first.click()  # the bad file stays until cleared
        # the component re-renders empty: a file set before that lands on the old input and is
        # lost (seen once in a full-suite run on a loaded 2-core VM)
        drop.get_by_text("bad.jsonl").first.wait_for(state="detached", timeout=30000)
        drop.locator("input[type=file]").wait_for(state="attached", timeout=30000)
        drop.locator("input[type=file]").set_input_files(str(good))
        drop.get_by_text("good.jsonl").first.wait_for(timeout=30000)
        page.locator("#rs-upload-btn").click()
        msg.get_by_text("good.jsonl: 3 prompts added").wait_for(timeout=30000)
        assert prompts(ctx) == before + 3
        page.screenshot(path=str(SHOTS / "helper-D_upload_ok_1280.png"), full_page=True)

        drop.locator("input[type=file]").set_input_files(str(big))  # cleared after success
        drop.get_by_text("big.jsonl").first.wait_for(timeout=60000)
        page.locator("#rs-upload-btn").click()
        msg.get_by_text("big.jsonl: 5000 prompts added").wait_for(timeout=60000)
        assert prompts(ctx) == before + 5003

        page.locator("#rs-upload-text textarea").fill("pasted one\npasted two")
        page.locator("#rs-upload-btn").click()
        msg.get_by_text("pasted text: 2 prompts added").wait_for(timeout=30000)
        assert prompts(ctx) == before + 5005

        # over the cap: the page says so and sends nothing. Done last: in one loaded full-suite
        # run the upload right after this refusal never showed in the file box (not reproduced
        # in 5 runs alone; see the closing note of issue 15)
        huge = tmp_path / "huge.jsonl"
        huge.write_bytes(b"x" * (MAX_UPLOAD_BYTES + 1))
        drop.locator("input[type=file]").set_input_files(str(huge))
        page.get_by_text("exceed the maximum allowed size of 10.0 Mb").first.wait_for(
            timeout=30000)
        assert prompts(ctx) == before + 5005


# -- the phone -----------------------------------------------------------------------------------
HEADER = """() => {
  const header = document.querySelector('#rl-header');
  const box = e => { const r = e.getBoundingClientRect();
                     return {x: r.left, y: r.top, r: r.right, b: r.bottom}; };
  const title = header.querySelector('#rl-title h3');
  return {height: header.getBoundingClientRect().height,
          title_lines: title.getBoundingClientRect().height
                       / parseFloat(getComputedStyle(title).lineHeight),
          boxes: [...header.children]
            .filter(e => e.offsetParent !== null && e.getBoundingClientRect().height > 0)
            .map(e => box(e.querySelector('h3, button, p') || e))};
}"""


def overlaps(a: dict, b: dict) -> bool:
    return a["x"] < b["r"] - 1 and b["x"] < a["r"] - 1 and a["y"] < b["b"] - 1 and b["y"] < a["b"] - 1


def lines(boxes: list[dict]) -> int:
    """Rows of boxes: a box starting below the bottom of every box so far opens a row."""
    rows, bottom = 0, -1.0
    for box in sorted(boxes, key=lambda b: b["y"]):
        if box["y"] >= bottom - 1:
            rows += 1
        bottom = max(bottom, box["b"])
    return rows


def check_header(page, width: int) -> None:
    header = page.evaluate(HEADER)
    boxes = header["boxes"]
    assert len(boxes) == 3, boxes  # title, progress, change name
    # no column of broken words: the title on one line, the header a few lines tall at most
    assert header["title_lines"] < 1.5 and header["height"] < 100, header
    assert lines(boxes) <= 2, boxes
    assert not any(overlaps(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), boxes
    assert all(0 <= b["x"] and b["r"] <= width + 1 for b in boxes), boxes


def no_sideways_scroll(page, width: int) -> None:
    assert page.evaluate("document.documentElement.scrollWidth") <= width + 1


@pytest.mark.parametrize("width", [PHONE, DESKTOP])
def test_header_and_every_tab_fit(ctx, browser, width):
    with served(ctx) as url:
        page = start(browser, url, width)
        check_header(page, width)
        for tab in TABS:
            open_tab(page, tab)
            if tab == "Dashboard":
                page.locator("#rl-plot-rankings svg.marks").wait_for(timeout=30000)
            if tab == "Research":
                page.locator("#rs-upload-btn").wait_for(timeout=30000)
            page.wait_for_timeout(500)  # let the layout settle before the picture
            no_sideways_scroll(page, width)
            page.screenshot(path=str(SHOTS / f"helper-D_{tab.lower()}_{width}.png"),
                            full_page=True)
        check_header(page, width)


# -- the time axis -------------------------------------------------------------------------------
def rankings(span_s: int, bucket_s: int, start: str, seed: int) -> pd.DataFrame:
    """A Dashboard rankings frame (app.dashboard_data.rankings_frame's columns) over span_s."""
    rng, total, rows = random.Random(seed), 0, []
    for t in pd.date_range(start, periods=span_s // bucket_s + 1, freq=f"{bucket_s}s"):
        new = rng.randint(0, 9)
        total += new
        rows += [{"time": t, "value": float(total), "series": "rankings standing (total)"},
                 {"time": t, "value": float(new), "series": "new rankings per bucket"}]
    return pd.DataFrame(rows)


SPANS = {"minutes": (25 * 60, 60, "2026-11-30 08:03"),
         "hours": (16 * 3600, 300, "2026-11-29 17:10"),  # crosses midnight
         "two_days": (50 * 3600, 900, "2026-11-28 09:00"),
         "days": (9 * 86400, 3600, "2026-11-21 13:00"),
         "months": (400 * 86400, 86400, "2025-10-25 00:00")}
AXIS_LABELS = """(id) => {
  const axis = [...document.querySelectorAll(`#${id} g.role-axis`)]
    .find(g => (g.getAttribute('aria-label') || '').startsWith('X-axis'));
  if (!axis) return null;
  return [...axis.querySelectorAll('g.role-axis-label text')]
    .filter(t => (t.getAttribute('opacity') ?? '1') !== '0' && t.textContent)
    .map(t => { const r = t.getBoundingClientRect();
                return {text: t.textContent, x: r.left, r: r.right, y: r.top, b: r.bottom}; });
}"""


def test_time_axis_labels_never_overlap(browser):
    with gr.Blocks() as demo:
        for name, (span, bucket, start_at) in SPANS.items():
            frame = rankings(span, bucket, start_at, seed=len(name))
            gr.Plot(plot_value(chart_spec("rankings", frame)), elem_id=f"chart-{name}")
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        for width in (PHONE, DESKTOP):
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            for name in SPANS:
                page.wait_for_function(f"({AXIS_LABELS})('chart-{name}')?.length > 0",
                                       timeout=30000)
                labels = sorted(page.evaluate(AXIS_LABELS, f"chart-{name}"),
                                key=lambda t: t["x"])
                texts = [t["text"] for t in labels]
                assert len(labels) >= 2, (name, width, texts)
                # a tick finer than its label ("08:00" twice in a row) reads as a repeat
                assert all(a != b for a, b in itertools.pairwise(texts)), (name, width, texts)
                assert all(re.fullmatch(r"\d\d:\d\d|[A-Z][a-z]{2} \d\d(\d\d)?", t)
                           for t in texts), (name, width, texts)  # a time or a date
                if SPANS[name][0] >= 86400:  # over a day: some label says which day
                    assert any(not t[0].isdigit() for t in texts), (name, width, texts)
                gaps = [b["x"] - a["r"] for a, b in itertools.pairwise(labels)]
                assert min(gaps) >= 2, (name, width, texts, gaps)
                plot = page.locator(f"#chart-{name}").bounding_box()
                assert plot["x"] - 1 <= labels[0]["x"] and labels[-1]["r"] <= plot["x"] + \
                    plot["width"] + 1, (name, width, texts)
            page.screenshot(path=str(SHOTS / f"helper-D_time_axis_{width}.png"), full_page=True)
            page.close()
    finally:
        demo.close()
