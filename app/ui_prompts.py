"""Adding prompts from the Research tab: a file upload or pasted lines, researchers only.

The same checks as `rlhf import-prompts` (rlhf_core.prompt_io) and the same all-or-nothing rule:
one bad line and nothing is added; the message lists the first MAX_LISTED bad lines so they can
all be fixed in one go. New prompts get the workspace's held-out split
(`reward.heldout_fraction`), as the CLI gives them, in one transaction (`store.add_prompts`).

Caps: an upload goes through Gradio's /gradio_api/upload, which `app.ui.launch` lets through
the 64 KB request cap (app/body_limit.py) up to MAX_UPLOAD_BYTES (and Gradio's own
`max_file_size`); this handler checks the size again, whatever the client did. Pasted text
rides in the event's request body, so it stays under the 64 KB cap (PASTE_MAX_CHARS).
"""
from __future__ import annotations

import os
from pathlib import Path

import gradio as gr

from app.context import AppContext
from app.handlers import esc
from app.ui_research import allowed
from rlhf_core.config import ConfigError
from rlhf_core.prompt_io import check_prompt_file
from rlhf_core.workspace import read_config

MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # ~10k prompts of 1 KB; bigger: `rlhf import-prompts`
PASTE_MAX_CHARS = 20_000  # at most 3 bytes each in UTF-8: 60 KB, under the 64 KB body cap
MAX_LISTED = 10  # bad lines named in the message
UPLOAD_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".txt": "lines"}
CSS = """
.rs-up { padding: 6px 10px; border-radius: 6px; }
.rs-up-ok { background: #c8efd4; color: #14532d; }
.rs-up-bad { background: #f8c9c9; color: #7f1d1d; }
.rs-up ul { margin: 4px 0 0 1.2em; padding: 0; list-style: disc; }
.rs-up li { word-break: break-word; }
"""


def _box(ok: bool, text: str, items: list[str] = ()) -> str:
    """`text` and `items` are escaped here (they may quote the uploaded file)."""
    lis = "".join(f"<li>{esc(i)}</li>" for i in items)
    return (f'<div class="rs-up rs-up-{"ok" if ok else "bad"}">{esc(text)}'
            + (f"<ul>{lis}</ul>" if lis else "") + "</div>")


def _mb(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MB"


def _read_upload(path: str) -> tuple[bytes, str, str]:
    """(raw bytes, kind, file name) of an uploaded file, or ValueError saying why not."""
    name = Path(path).name
    kind = UPLOAD_KINDS.get(Path(name).suffix.lower())
    if kind is None:
        raise ValueError(f"{name}: use a .jsonl, .json (JSON Lines), .csv (a 'prompt' column) "
                         "or .txt file (one prompt per line)")
    size = os.path.getsize(path)
    if size > MAX_UPLOAD_BYTES:
        raise ValueError(f"{name} is {_mb(size)}; at most {_mb(MAX_UPLOAD_BYTES)} can be uploaded "
                         "here: split it, or run `rlhf import-prompts FILE` on the server")
    with open(path, "rb") as f:
        return f.read(MAX_UPLOAD_BYTES + 1), kind, name


def _pasted(text: str) -> tuple[bytes, str]:
    """JSON Lines when the first non-blank line is a JSON object, else one prompt per line."""
    if len(text) > PASTE_MAX_CHARS:
        raise ValueError(f"{len(text):,} characters pasted; at most {PASTE_MAX_CHARS:,}: "
                         "upload a file for more")
    first = next(line for line in text.split("\n") if line.strip())
    return text.encode("utf-8", "surrogatepass"), (
        "jsonl" if first.lstrip().startswith("{") else "lines")


def add_prompts(ctx: AppContext, path: str | None, pasted: str | None, username,
                profile) -> dict:
    """Researchers only (checked here, whatever the page shows). {"upload_msg": html, and on
    success "upload_file": None, "upload_text": "" (the inputs cleared)}."""
    if not allowed(ctx, username, profile):
        return {"upload_msg": _box(False, "Only researchers may add prompts.")}
    pasted = pasted or ""
    if path and pasted.strip():
        return {"upload_msg": _box(False, "Give a file or pasted prompts, not both: clear one.")}
    if not path and not pasted.strip():
        return {"upload_msg": _box(False, "Choose a file or paste prompts first.")}
    try:
        raw, kind, name = _read_upload(path) if path else (*_pasted(pasted), "pasted text")
    except ValueError as exc:
        return {"upload_msg": _box(False, f"Nothing was added: {exc}")}
    records, stats, problems = check_prompt_file(raw, kind, max_problems=MAX_LISTED)
    if problems:
        bad = stats["bad"]
        head = (f"Nothing was added: {name} has {bad} bad line{'s' * (bad != 1)}"
                + (f" (the first {MAX_LISTED} below)" if bad > MAX_LISTED else "")
                + ". Fix them and add the file again.")
        return {"upload_msg": _box(False, head, [str(p) for p in problems])}
    try:
        fraction = read_config(ctx.store).reward.heldout_fraction
    except ConfigError as exc:
        return {"upload_msg": _box(False, f"Nothing was added: {exc}")}
    who = username or (profile or {}).get("name") or "anonymous"
    result = ctx.store.add_prompts(records, source=f"ui:{who}:{name}", heldout_fraction=fraction)
    text = (f"{name}: {result['added']} prompt{'s' * (result['added'] != 1)} added, "
            f"{result['duplicates']} already in the workspace (skipped), "
            f"{stats['duplicates_in_file']} duplicate{'s' * (stats['duplicates_in_file'] != 1)} "
            f"inside it (skipped). About {fraction:.0%} of new prompts are held out to measure "
            "the reward model (reward.heldout_fraction).")
    return {"upload_msg": _box(True, text), "upload_file": None, "upload_text": ""}


# -- the section (inside the Research tab's researcher-only body) --------------------------------
def build_prompt_upload(c: dict) -> None:
    gr.Markdown("#### Add prompts")
    with gr.Row():
        c["upload_file"] = gr.File(
            label=f"Prompt file: .jsonl, .json, .csv or .txt, at most {_mb(MAX_UPLOAD_BYTES)}",
            file_types=list(UPLOAD_KINDS), type="filepath", height=150, min_width=300,
            elem_id="rs-upload-file")
        c["upload_text"] = gr.Textbox(
            label="…or paste JSON Lines ({\"prompt\": …}) or one prompt per line", lines=5,
            max_lines=12, max_length=PASTE_MAX_CHARS, min_width=300, elem_id="rs-upload-text")
    with gr.Row():
        c["upload_btn"] = gr.Button("Add prompts", size="sm", scale=0, min_width=140,
                                    elem_id="rs-upload-btn")
        c["upload_msg"] = gr.HTML(css_template=CSS, elem_id="rs-upload-msg")


def wire_prompt_upload(ctx: AppContext, c: dict) -> None:
    names = ("upload_msg", "upload_file", "upload_text")

    def on_add(path, pasted, profile, request: gr.Request):
        username = getattr(request, "username", None)  # the login (None without auth)
        out = add_prompts(ctx, path, pasted, username, profile)
        return {c[k]: out[k] for k in names if k in out}

    c["upload_btn"].click(on_add, [c["upload_file"], c["upload_text"], c["profile"]],
                          [c[k] for k in names], api_visibility="private",
                          concurrency_limit=1)  # one import at a time: each is one transaction
