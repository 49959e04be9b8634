"""Adding prompts from the Research tab (app.ui_prompts): the handler on a real SQLite file, and
the upload route's caps on a real server (a 5 MB file passes, one over the cap does not)."""
from __future__ import annotations

import http.client
import json
import uuid
from urllib.parse import urlsplit

import pytest

from app.context import AppContext
from app.ui_prompts import MAX_LISTED, MAX_UPLOAD_BYTES, PASTE_MAX_CHARS, add_prompts
from rlhf_core.preferences import split_for_prompt
from rlhf_core.prompt_io import prompt_key
from rlhf_core.workspace import open_workspace
from tests.helpers import served

RESEARCHER = {"name": "rae"}  # no auth: every visitor is a researcher


@pytest.fixture
def ctx(tmp_path):
    store, cfg = open_workspace(tmp_path / "ws", **{"reward.heldout_fraction": 0.5})
    yield AppContext.from_config(cfg, store=store)
    store.close()


def count(ctx) -> int:
    return ctx.store.scalar("SELECT COUNT(*) FROM prompts")


def jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_a_good_file_adds_every_prompt_with_the_workspace_split(ctx, tmp_path):
    rows = [{"prompt": f"Question number {i}?", "category": "qa"} for i in range(40)]
    out = add_prompts(ctx, jsonl(tmp_path / "good.jsonl", rows), None, None, RESEARCHER)
    assert "good.jsonl: 40 prompts added, 0 already in the workspace" in out["upload_msg"]
    assert "rs-up-ok" in out["upload_msg"]
    assert out["upload_file"] is None and out["upload_text"] == ""  # the inputs are cleared
    stored = ctx.store.rows("SELECT key, split, category, source FROM prompts")
    assert len(stored) == 40 and {r["category"] for r in stored} == {"qa"}
    # the CLI's rule: the workspace's reward.heldout_fraction (0.5 here, not the default 0.2)
    assert all(r["split"] == split_for_prompt(r["key"], 0.5) for r in stored)
    assert 10 < sum(r["split"] == "heldout" for r in stored) < 30
    assert {r["source"] for r in stored} == {"ui:rae:good.jsonl"}


def test_csv_txt_and_pasted_lines(ctx, tmp_path):
    (tmp_path / "p.csv").write_text('prompt,category\n"Why, though?",x\nAnd then?,\n')
    assert "2 prompts added" in add_prompts(ctx, str(tmp_path / "p.csv"), "", None,
                                            RESEARCHER)["upload_msg"]
    (tmp_path / "p.txt").write_text("first line prompt\n\n  second line prompt  \n")
    assert "2 prompts added" in add_prompts(ctx, str(tmp_path / "p.txt"), None, None,
                                            RESEARCHER)["upload_msg"]
    out = add_prompts(ctx, None, "one pasted\ntwo pasted\n", None, RESEARCHER)
    assert "pasted text: 2 prompts added" in out["upload_msg"]
    out = add_prompts(ctx, None, '{"prompt": "as json"}\n{"text": "also json"}', None,
                      RESEARCHER)
    assert "2 prompts added" in out["upload_msg"]
    texts = {r["text"] for r in ctx.store.rows("SELECT text FROM prompts")}
    assert {"Why, though?", "second line prompt", "two pasted", "as json"} <= texts


def test_bad_lines_add_nothing_and_are_named(ctx, tmp_path):
    rows = [{"prompt": f"fine {i}"} for i in range(14)]
    rows[2] = '{"prompt": "unterminated'
    rows[6] = {"prompt": "bell \u0007 rings"}
    rows[11] = {"question_text": "no prompt field"}
    out = add_prompts(ctx, jsonl(tmp_path / "bad.jsonl", rows), None, None, RESEARCHER)
    msg = out["upload_msg"]
    assert "rs-up-bad" in msg and "Nothing was added: bad.jsonl has 3 bad lines" in msg
    assert "line 3: invalid JSON" in msg and "line 7:" in msg and "U+0007" in msg
    assert "line 12: missing &#x27;prompt&#x27;" in msg
    assert "upload_file" not in out  # the file stays chosen, to be fixed and sent again
    assert count(ctx) == 0


def test_many_bad_lines_are_listed_up_to_the_cap(ctx, tmp_path):
    rows = ["not json"] * 25 + [{"prompt": "fine"}]
    msg = add_prompts(ctx, jsonl(tmp_path / "worse.jsonl", rows), None, None,
                      RESEARCHER)["upload_msg"]
    assert f"25 bad lines (the first {MAX_LISTED} below)" in msg
    assert msg.count("<li>") == MAX_LISTED and "line 10:" in msg and "line 11:" not in msg
    assert count(ctx) == 0


def test_oversize_uploads_and_pastes_are_refused(ctx, tmp_path):
    big = tmp_path / "big.jsonl"
    line = json.dumps({"prompt": "x" * 1000}) + "\n"
    big.write_text(line * (MAX_UPLOAD_BYTES // len(line) + 1))
    assert big.stat().st_size > MAX_UPLOAD_BYTES
    msg = add_prompts(ctx, str(big), None, None, RESEARCHER)["upload_msg"]
    assert "Nothing was added: big.jsonl is 10.0 MB; at most 10.0 MB" in msg
    msg = add_prompts(ctx, None, "y\n" * (PASTE_MAX_CHARS // 2 + 1), None, RESEARCHER)[
        "upload_msg"]
    assert f"at most {PASTE_MAX_CHARS:,}" in msg
    assert count(ctx) == 0


def test_other_refusals_write_nothing(ctx, tmp_path):
    (tmp_path / "p.xlsx").write_bytes(b"PK\x03\x04")
    assert "use a .jsonl" in add_prompts(ctx, str(tmp_path / "p.xlsx"), None, None,
                                         RESEARCHER)["upload_msg"]
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    assert "not both" in add_prompts(ctx, path, "b", None, RESEARCHER)["upload_msg"]
    assert "Choose a file" in add_prompts(ctx, None, "  \n", None, RESEARCHER)["upload_msg"]
    (tmp_path / "e.jsonl").write_text("\n\n")
    assert "no prompts found" in add_prompts(ctx, str(tmp_path / "e.jsonl"), None, None,
                                             RESEARCHER)["upload_msg"]
    (tmp_path / "u.txt").write_bytes(b"ok\n\xff\xfe\n")
    assert "line 2: invalid UTF-8" in add_prompts(ctx, str(tmp_path / "u.txt"), None, None,
                                                  RESEARCHER)["upload_msg"]
    assert count(ctx) == 0


def test_a_non_researcher_is_refused_and_nothing_is_written(ctx, tmp_path):
    auth = tmp_path / "users.csv"
    auth.write_text("user,password,role\nres,pw1,researcher\nann,pw2,annotator\n")
    with_auth = AppContext.from_config(ctx.config, store=ctx.store, auth_file=auth)
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": "from an annotator"}])
    for username in ("ann", None):  # an annotator's login; no login at all
        # the profile's name is ignored with auth: the login decides
        out = add_prompts(with_auth, path, None, username, {"name": "res"})
        assert "Only researchers may add prompts" in out["upload_msg"]
    assert count(ctx) == 0
    assert "1 prompt added" in add_prompts(with_auth, path, None, "res", {})["upload_msg"]
    assert ctx.store.scalar("SELECT source FROM prompts") == "ui:res:p.jsonl"


def test_duplicates_are_reported(ctx, tmp_path):
    first = jsonl(tmp_path / "a.jsonl", [{"prompt": t} for t in ("alpha", "beta", "gamma")])
    add_prompts(ctx, first, None, None, RESEARCHER)
    again = jsonl(tmp_path / "b.jsonl", [{"prompt": t} for t in
                                         ("alpha", "beta  ", "delta", "delta", " delta")])
    msg = add_prompts(ctx, again, None, None, RESEARCHER)["upload_msg"]
    assert "b.jsonl: 1 prompt added, 2 already in the workspace (skipped), 2 duplicates " \
           "inside it (skipped)" in msg
    assert count(ctx) == 4
    assert ctx.store.scalar("SELECT COUNT(*) FROM prompts WHERE key = ?",
                            [prompt_key("delta")]) == 1


# -- the upload route of a real server -----------------------------------------------------------
def upload(url: str, size: int, name: str = "p.jsonl") -> tuple[int, str]:
    """POST one file of `size` bytes to Gradio's upload route, as its page does. A server that
    refuses before reading the body may close the connection mid-send: its reply still counts."""
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"'
            "\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    line = b'{"prompt": "' + b"p" * 200 + b'"}\n'
    body = head + (line * (size // len(line) + 1))[:size] + f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=60)
    try:
        conn.putrequest("POST", "/gradio_api/upload")
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        try:
            for i in range(0, len(body), 1 << 16):
                conn.send(body[i:i + (1 << 16)])
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused early; read the reply
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_the_upload_route_takes_5_mb_and_refuses_over_the_cap(ctx):
    with served(ctx) as url:
        status, text = upload(url, 5 * 1024 * 1024)
        assert status == 200, text
        assert json.loads(text)[0].endswith("p.jsonl")
        # just over the cap: Gradio's own max_file_size refuses it (the body cap has room)
        status, text = upload(url, MAX_UPLOAD_BYTES + 1)
        assert status == 413 and "maximum allowed size" in text, text
        # far over: the body cap refuses it before Gradio reads it
        status, text = upload(url, MAX_UPLOAD_BYTES + 200 * 1024)
        assert status == 413 and "request body too large" in text, text
        # every other route keeps the 64 KB cap
        conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=30)
        conn.request("POST", "/gradio_api/queue/join", body=b"x" * 60_000 + b"y" * 10_000,
                     headers={"Content-Type": "application/json"})
        assert conn.getresponse().status == 413
        conn.close()
