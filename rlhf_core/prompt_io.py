"""Prompt import/export: JSON Lines, CSV and `datasets` directories, validated whole.

An upload is parsed as data only. The whole file is checked before anything is returned, so a
bad line 9000 never leaves half a file in the database. `datasets` is imported lazily (only
for dataset directories) and torch never, so the UI process can use this module.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.resources
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from rlhf_core.durable import write_dir, write_file

MAX_PROMPT_CHARS = 8000
PROMPT_FIELDS = ("prompt", "text", "question")  # first one present wins
CHAT_FIELDS = ("messages", "conversations")  # chat lists: first user turn is the prompt
RESERVED = ("category", "id")


class ImportRejected(ValueError):
    """A prompt file that cannot be imported; `.line` is 1-based (or None for the whole file)."""

    def __init__(self, reason: str, line: int | None = None):
        self.line = line
        self.reason = reason
        super().__init__(reason if line is None else f"line {line}: {reason}")


# ---------------------------------------------------------------- reading


def read_prompts(path) -> list[dict]:
    """Validated, de-duplicated records `{text, category, source_id, meta}` from `path`."""
    return read_prompts_with_stats(path)[0]


def read_prompts_with_stats(path) -> tuple[list[dict], dict]:
    """Like `read_prompts`, plus `{"read": valid records in file, "duplicates_in_file": m}`.

    Duplicates (same `prompt_key`) keep their first occurrence; the first bad record raises.
    """
    records, stats, problems = _collect(_iter_objects(Path(path)), keep=1, scan_all=False)
    if problems:
        raise problems[0]
    del stats["bad"]
    return records, stats


def check_prompt_path(path, *, max_problems: int = 10):
    """`check_prompt_file` for a file or dataset directory on disk (the CLI's import): every
    record checked, `(records, stats, problems)`; a missing path or an unsupported file type
    raises ImportRejected at once."""
    return _collect(_iter_objects(Path(path)), keep=max_problems, scan_all=True)


def check_prompt_file(raw: bytes, kind: str, *, max_problems: int = 10):
    """An uploaded or pasted file checked whole, so a person can fix every line in one go:
    `(records, stats, problems)`, stats as `read_prompts_with_stats`'s plus "bad" (records
    refused), problems the first `max_problems` ImportRejected in line order. Any problem means
    nothing may be imported. `kind`: "jsonl", "csv" or "lines" (one prompt per non-blank line).
    Invalid UTF-8 or a broken CSV quote ends the check there (nothing after it can be read)."""
    parse = {"jsonl": _iter_jsonl, "csv": _iter_csv, "lines": _iter_lines}[kind]

    def objects():
        text = _decode(raw)
        if not text.strip():
            raise ImportRejected("no prompts found")
        yield from parse(text)

    return _collect(objects(), keep=max_problems, scan_all=True)


def _collect(objects: Iterator[tuple[int, Any]], *, keep: int, scan_all: bool):
    """Validate and de-duplicate `objects`; stop at the first problem unless `scan_all`."""
    records, seen, read, bad, problems = [], set(), 0, 0, []
    try:
        for line, obj in objects:
            try:
                if isinstance(obj, ImportRejected):  # a line its parser could not read
                    raise obj
                record = _to_record(obj, line)
            except ImportRejected as exc:
                bad += 1
                problems += [exc] if len(problems) < keep else []
                if scan_all:
                    continue
                break
            read += 1
            key = prompt_key(record["text"])
            if key not in seen:
                seen.add(key)
                records.append(record)
    except ImportRejected as exc:  # the file as a whole, or a parser that cannot go on
        bad += 1
        problems += [exc] if len(problems) < keep else []
    if not records and not problems:
        problems.append(ImportRejected("no prompts found"))
    return records, {"read": read, "duplicates_in_file": read - len(records), "bad": bad}, problems


def _iter_objects(path: Path) -> Iterator[tuple[int, Any]]:
    """(line or row number, raw record) pairs, chosen by the kind of `path`."""
    if path.is_dir():
        return _iter_hf_dataset(path)
    if not path.is_file():
        raise ImportRejected(f"no such file: {path}")
    suffix = path.suffix.lower()
    parsers = {".jsonl": _iter_jsonl, ".json": _iter_jsonl, ".csv": _iter_csv}
    if suffix in parsers:
        text = _decode(path.read_bytes())
        if not text.strip():
            raise ImportRejected("no prompts found")
        return parsers[suffix](text)
    raise ImportRejected(
        f"unsupported file type {suffix or '(none)'!r}: use .jsonl, .json (JSON Lines), .csv "
        "or a directory written by datasets' save_to_disk"
    )


def _decode(raw: bytes) -> str:
    """UTF-8 (optional BOM); an invalid byte is reported with its line number."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ImportRejected(f"invalid UTF-8 (byte {raw[exc.start]:#04x})", line) from None


def _iter_jsonl(text: str) -> Iterator[tuple[int, Any]]:
    """A line that is not a JSON object comes as an ImportRejected: the next lines are still read."""
    # split on "\n" only: str.splitlines() would also break on U+2028 inside JSON strings
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            obj = ImportRejected(f"invalid JSON ({exc.msg} at column {exc.colno})", number)
        except RecursionError:  # e.g. 100,000 nested arrays
            obj = ImportRejected("invalid JSON (nested too deeply)", number)
        if isinstance(obj, list):
            obj = ImportRejected("expected one JSON object per line (JSON Lines), got an array",
                                 number)
        yield number, obj


def _iter_lines(text: str) -> Iterator[tuple[int, Any]]:
    """Plain text (a pasted list, a .txt upload): every non-blank line is one prompt."""
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield number, {"prompt": line}


def _iter_csv(text: str) -> Iterator[tuple[int, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [name.strip() for name in next(reader, [])]
        if not any(name in header for name in PROMPT_FIELDS):
            raise ImportRejected("CSV header has no 'prompt' (or 'text') column", 1)
        start = reader.line_num + 1
        for cells in reader:
            if cells:  # blank lines read as []
                # a short row leaves the trailing columns empty; extra cells are dropped
                cells += [""] * (len(header) - len(cells))
                yield start, dict(zip(header, cells))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise ImportRejected(f"invalid CSV ({exc})", reader.line_num or 1) from None


def _iter_hf_dataset(path: Path) -> Iterator[tuple[int, Any]]:
    """Rows of a saved Dataset, or of every split of a DatasetDict, numbered 1.. across splits."""
    import datasets  # lazy: heavy, and only dataset directories need it

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ImportRejected(f"not a directory saved with datasets' save_to_disk ({exc})") from None
    splits = loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded]
    number = 0
    for split in splits:
        for row in split:
            number += 1
            yield number, row


# ---------------------------------------------------------------- validation


def _to_record(obj: Any, line: int) -> dict:
    """One raw record -> `{text, category, source_id, meta}`, or ImportRejected naming `line`."""
    if not isinstance(obj, dict):
        raise ImportRejected(f"expected a JSON object, got {_type_name(obj)}", line)
    field, text = _pick_prompt(obj, line)
    if not isinstance(text, str):
        raise ImportRejected(f"{field!r} must be a string, got {_type_name(text)}", line)
    _check_chars(text, field, line)
    text = text.strip()
    if not text:
        raise ImportRejected(f"empty {field!r}", line)
    if len(text) > MAX_PROMPT_CHARS:
        raise ImportRejected(
            f"{field!r} is {len(text)} characters, longer than {MAX_PROMPT_CHARS}", line
        )
    category = obj.get("category")
    if category is not None and not isinstance(category, str):
        raise ImportRejected(f"'category' must be a string, got {_type_name(category)}", line)
    source_id = obj.get("id")
    if source_id is not None and not isinstance(source_id, (str, int)):
        raise ImportRejected(f"'id' must be a string or integer, got {_type_name(source_id)}", line)
    for name, value in (("category", category), ("id", source_id)):
        if isinstance(value, str):
            _check_chars(value, name, line)
    meta = {k: v for k, v in obj.items()
            if k not in (field, *RESERVED) and isinstance(k, str) and _json_ok(k, v, line)}
    return {
        "text": text,
        "category": (category or "").strip() or None,
        "source_id": None if source_id is None or source_id == "" else str(source_id),
        "meta": meta,
    }


def check_prompt_text(text: Any) -> str:
    """One prompt typed by a person (the arena), under a file line's rules: a string without
    control characters or lone surrogates, not empty once stripped, at most MAX_PROMPT_CHARS.
    Returns it stripped; ImportRejected (no line number) says why not."""
    return _to_record({"prompt": text}, None)["text"]


def _pick_prompt(obj: dict, line: int) -> tuple[str, Any]:
    """(field name, raw prompt): a prompt/text/question field, else a chat's first user turn."""
    for field in PROMPT_FIELDS:
        if field in obj:
            return field, obj[field]
    for field in CHAT_FIELDS:
        if field in obj:
            return field, _first_user_message(obj[field], field, line)
    raise ImportRejected("missing 'prompt'", line)


def _first_user_message(messages: Any, field: str, line: int) -> Any:
    """Content of the first user turn; OpenAI-style role/content or ShareGPT from/value."""
    if not isinstance(messages, list):
        raise ImportRejected(f"{field!r} must be a list of chat messages", line)
    for message in messages:
        if not isinstance(message, dict):
            continue
        if (message.get("role") or message.get("from")) in ("user", "human"):
            content = message.get("content", message.get("value"))
            if isinstance(content, list):  # multimodal parts: keep the text ones
                content = "\n".join(p.get("text") or "" for p in content if isinstance(p, dict))
            return content
    raise ImportRejected(f"no user message in {field!r}", line)


def _type_name(value: Any) -> str:
    names = {type(None): "null", bool: "boolean", int: "integer", float: "number",
             list: "list", dict: "object", str: "string"}
    return names.get(type(value), type(value).__name__)


def _json_ok(key: str, value: Any, line: int) -> bool:
    """Whether an extra field is JSON data to keep in `meta` (anything else is left out); one
    that cannot be stored as UTF-8 (a lone surrogate from a "\\ud800" escape) is refused."""
    try:
        encoded = json.dumps({key: value}, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return False
    if _SURROGATE.search(encoded):
        raise ImportRejected(f"field {key!r} contains a lone surrogate: not valid Unicode", line)
    return True


# C0 and C1 control characters and DEL, except tab, newline and carriage return.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_CONTROL_NAMES = {0x00: "NUL", 0x07: "BEL", 0x08: "BS", 0x0B: "VT", 0x0C: "FF", 0x1B: "ESC",
                  0x7F: "DEL"}


def _check_chars(value: str, field: str, line: int) -> None:
    """Refuse text a terminal or a database would misread: controls, and lone surrogates (a
    JSON "\\ud800" escape decodes to one, and it cannot be written as UTF-8)."""
    found = _SURROGATE.search(value)
    if found:
        raise ImportRejected(f"{field!r} contains a lone surrogate U+{ord(found.group()):04X} at "
                             f"character {found.start() + 1}: not valid Unicode", line)
    found = _CONTROL.search(value)
    if found:
        code = ord(found.group())
        name = f" ({_CONTROL_NAMES[code]})" if code in _CONTROL_NAMES else ""
        raise ImportRejected(f"{field!r} contains the control character U+{code:04X}{name} at "
                             f"character {found.start() + 1}; only tab, newline and carriage "
                             "return are allowed", line)


# ---------------------------------------------------------------- keys and bundled data


def prompt_key(text: str) -> str:
    """sha256 hex of the whitespace-normalised text: the de-duplication key in the DB."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def bundled_prompts_path() -> Path:
    """The shipped sample prompts (data/prompts.jsonl, packaged as `rlhf_data`)."""
    resource = importlib.resources.files("rlhf_data").joinpath("prompts.jsonl")
    # wheels install unzipped, so this is a real file for editable and regular installs
    return Path(os.fspath(resource))


# ---------------------------------------------------------------- writing


def write_jsonl(path, rows: Iterable[dict], *, overwrite: bool = False) -> int:
    """Write `rows` as JSON Lines durably (rlhf_core.durable). An existing file raises
    TargetExists unless `overwrite` (the same rule as write_hf_dataset)."""
    count = 0

    def write(out) -> None:
        nonlocal count
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1

    write_file(Path(path), write, overwrite=overwrite)
    return count


def write_hf_dataset(path, rows: list[dict], *, overwrite: bool = False) -> int:
    """`Dataset.from_list(rows).save_to_disk` written durably into `path`. An existing
    non-empty `path` raises TargetExists unless `overwrite`."""
    import datasets  # lazy: heavy

    rows = list(rows)
    write_dir(Path(path), lambda tmp: datasets.Dataset.from_list(rows).save_to_disk(str(tmp)),
              overwrite=overwrite)
    return len(rows)
