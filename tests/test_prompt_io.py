"""rlhf_core.prompt_io: every import format, every rejection with its line, the writers."""

import json
import re
from collections import Counter

import pytest

from rlhf_core.prompt_io import (
    MAX_PROMPT_CHARS,
    ImportRejected,
    bundled_prompts_path,
    prompt_key,
    read_prompts,
    read_prompts_with_stats,
    write_hf_dataset,
    write_jsonl,
)


def _jsonl(tmp_path, lines, name="p.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


# ---------------------------------------------------------------- bundled sample prompts


def test_bundled_prompts_load_and_are_varied():
    path = bundled_prompts_path()
    assert path.name == "prompts.jsonl" and path.is_file()
    records, stats = read_prompts_with_stats(path)
    assert stats["duplicates_in_file"] == 0
    assert len({prompt_key(r["text"]) for r in records}) >= 200
    categories = Counter(r["category"] for r in records)
    assert len(categories) >= 6
    assert {"safety-sensitive", "coding"} <= set(categories)
    assert min(categories.values()) >= len(records) / len(categories) / 2  # roughly even
    assert all(len(r["text"].split()) <= 60 for r in records)  # short, for a tiny model


# ---------------------------------------------------------------- formats


def test_jsonl_fields_aliases_and_duplicates(tmp_path):
    rows = [
        {"prompt": "  Say hi.  ", "category": "instruction", "id": 7, "lang": "en"},
        {"text": "Name a colour."},
        {"question": "Why is grass green?", "category": ""},
        {"prompt": "Say   hi."},  # same key after whitespace normalisation
    ]
    lines = [json.dumps(r).encode() for r in rows]
    path = _jsonl(tmp_path, lines[:2] + [b"", b"   "] + lines[2:])
    records, stats = read_prompts_with_stats(path)
    assert stats == {"read": 4, "duplicates_in_file": 1}
    assert records[0] == {"text": "Say hi.", "category": "instruction", "source_id": "7",
                          "meta": {"lang": "en"}}
    assert [r["text"] for r in records[1:]] == ["Name a colour.", "Why is grass green?"]
    assert records[2]["category"] is None and records[1]["source_id"] is None


def test_csv_with_bom_and_quoted_newline(tmp_path):
    path = tmp_path / "p.csv"
    text = 'prompt,category,id\n"Write a poem,\nplease",writing,a1\n\nWhat is 2+2?,math,\n'
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    records = read_prompts(path)
    assert records[0] == {"text": "Write a poem,\nplease", "category": "writing",
                          "source_id": "a1", "meta": {}}
    assert records[1]["text"] == "What is 2+2?" and records[1]["source_id"] is None


def test_csv_text_column_and_error_line(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("text\nfirst\n\n  \n", encoding="utf-8")
    with pytest.raises(ImportRejected) as info:
        read_prompts(path)
    assert info.value.line == 4 and "empty" in info.value.reason


def test_datasets_dir_from_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_list(
        [{"prompt": "One?", "id": "x", "score": 1.5}, {"prompt": "Two?", "id": "y", "score": 2.0}]
    ).save_to_disk(str(tmp_path / "ds"))
    records = read_prompts(tmp_path / "ds")
    assert [(r["text"], r["source_id"], r["meta"]) for r in records] == [
        ("One?", "x", {"score": 1.5}), ("Two?", "y", {"score": 2.0})]


def test_datasets_dir_from_dataset_dict_reads_all_splits(tmp_path):
    import datasets

    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"text": "Train one"}, {"text": "Train two"}]),
        "test": datasets.Dataset.from_list([{"text": "Test one"}]),
    }).save_to_disk(str(tmp_path / "dd"))
    assert {r["text"] for r in read_prompts(tmp_path / "dd")} == {
        "Train one", "Train two", "Test one"}


def test_datasets_messages_column_takes_first_user_turn(tmp_path):
    import datasets

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there?"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again"}]
    datasets.Dataset.from_list([{"messages": chat}]).save_to_disk(str(tmp_path / "chat"))
    assert [r["text"] for r in read_prompts(tmp_path / "chat")] == ["Hi there?"]


def test_jsonl_messages_without_user_turn_is_rejected(tmp_path):
    path = _jsonl(tmp_path, [b'{"messages": [{"role": "assistant", "content": "x"}]}'])
    with pytest.raises(ImportRejected, match="no user message"):
        read_prompts(path)


# ---------------------------------------------------------------- rejections


GOOD = b'{"prompt": "fine"}'


@pytest.mark.parametrize("bad, reason", [
    (b'{"prompt": "caf\xe9"}', "invalid UTF-8"),
    (b'{"prompt": "unterminated}', "invalid JSON"),
    (b'["a list"]', "got an array"),
    (b'"just a string"', "expected a JSON object"),
    (b'{"category": "x"}', "missing 'prompt'"),
    (b'{"prompt": ""}', "empty 'prompt'"),
    (b'{"prompt": " \\t\\n "}', "empty 'prompt'"),
    (b'{"prompt": 42}', "must be a string, got integer"),
    (b'{"prompt": null}', "must be a string, got null"),
    (b'{"prompt": "ok", "category": 3}', "'category' must be a string"),
    (json.dumps({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}).encode(), "longer than"),
])
def test_first_bad_record_is_rejected_with_its_line(tmp_path, bad, reason):
    path = _jsonl(tmp_path, [GOOD, b"", bad, GOOD, b"not json either"])
    with pytest.raises(ImportRejected) as info:
        read_prompts(path)
    assert info.value.line == 3
    assert reason in info.value.reason
    assert str(info.value).startswith("line 3: ")


def test_prompt_of_exactly_max_chars_is_accepted(tmp_path):
    path = _jsonl(tmp_path, [json.dumps({"prompt": "y" * MAX_PROMPT_CHARS}).encode()])
    assert len(read_prompts(path)[0]["text"]) == MAX_PROMPT_CHARS


@pytest.mark.parametrize("name, content", [
    ("empty.jsonl", b""), ("blank.jsonl", b"\n  \n"), ("empty.csv", b""), ("header.csv", b"prompt\n"),
])
def test_empty_file_is_rejected(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImportRejected, match="no prompts found") as info:
        read_prompts(tmp_path / name)
    assert info.value.line is None


def test_unknown_extension_missing_file_and_bad_csv_header(tmp_path):
    (tmp_path / "p.txt").write_text("hello")
    with pytest.raises(ImportRejected, match="unsupported file type '.txt'"):
        read_prompts(tmp_path / "p.txt")
    with pytest.raises(ImportRejected, match="no such file"):
        read_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "p.csv").write_text("question_text,answer\nA,B\n")
    with pytest.raises(ImportRejected, match="no 'prompt'") as info:
        read_prompts(tmp_path / "p.csv")
    assert info.value.line == 1


def test_plain_directory_is_rejected(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ImportRejected, match="save_to_disk"):
        read_prompts(tmp_path / "d")


# ---------------------------------------------------------------- keys and writers


def test_prompt_key_normalises_whitespace():
    assert prompt_key(" a  b\n c ") == prompt_key("a b c") != prompt_key("a b C")
    assert len(prompt_key("x")) == 64


ROWS = [{"prompt": "Hi\u2028there", "category": "writing", "id": "1"},
        {"prompt": "Ünïcode?", "category": None, "id": "2"}]


def test_write_jsonl_round_trips_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old contents\n")
    with pytest.raises(FileExistsError, match="overwrite"):  # the same rule as the hf format
        write_jsonl(path, iter(ROWS))
    assert path.read_text() == "old contents\n"
    assert write_jsonl(path, iter(ROWS), overwrite=True) == 2
    assert [json.loads(line) for line in path.read_text("utf-8").split("\n") if line] == ROWS
    assert [r["text"] for r in read_prompts(path)] == ["Hi\u2028there", "Ünïcode?"]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_write_jsonl_failure_keeps_old_file_and_no_temp(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("old\n")
    with pytest.raises(TypeError):
        write_jsonl(path, [{"ok": 1}, {"bad": object()}], overwrite=True)
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_write_hf_dataset_round_trips_and_guards_existing(tmp_path):
    target = tmp_path / "export"
    target.mkdir()  # an empty directory may be replaced
    assert write_hf_dataset(target, ROWS) == 2
    records = read_prompts(target)
    assert [(r["text"], r["category"], r["source_id"]) for r in records] == [
        ("Hi\u2028there", "writing", "1"), ("Ünïcode?", None, "2")]
    with pytest.raises(FileExistsError, match="overwrite"):
        write_hf_dataset(target, ROWS[:1])
    write_hf_dataset(target, ROWS[:1], overwrite=True)
    assert [r["text"] for r in read_prompts(target)] == ["Hi\u2028there"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


# ---------------------------------------------------------------- hostile files (issue 16.8)


@pytest.mark.parametrize("escape, code", [
    ("\\u0000", "U+0000 (NUL)"), ("\\u0007", "U+0007 (BEL)"), ("\\u001b[31m", "U+001B (ESC)"),
    ("\\u007f", "U+007F (DEL)"), ("\\u009b", "U+009B"), ("\\f", "U+000C (FF)"),
])
def test_jsonl_control_characters_are_refused_with_their_line(tmp_path, escape, code):
    bad = b'{"prompt": "say ' + escape.encode() + b'hi"}'
    path = _jsonl(tmp_path, [GOOD, GOOD.replace(b"fine", b"also fine"), bad])
    with pytest.raises(ImportRejected, match=f"control character {re.escape(code)} at "
                                             "character 5") as info:
        read_prompts(path)
    assert info.value.line == 3


def test_tab_newline_carriage_return_and_u2028_stay_allowed(tmp_path):
    path = _jsonl(tmp_path, [b'{"prompt": "a\\tb\\nc\\r\\nd\\u2028e", "category": "x\\ty"}'])
    assert read_prompts(path)[0]["text"] == "a\tb\nc\r\nd\u2028e"


@pytest.mark.parametrize("row, field", [
    (b"ok\x00\x07,writing", "'prompt'"), (b"\x1b[2Jclear,writing", "'prompt'"),
    (b"fine,bad\x07", "'category'"),
])
def test_csv_control_characters_are_refused_with_their_line(tmp_path, row, field):
    path = tmp_path / "p.csv"
    path.write_bytes(b'prompt,category\n"multi\nline",writing\nfine too,x\n' + row + b"\n")
    with pytest.raises(ImportRejected, match=f"{field} contains the control character") as info:
        read_prompts(path)
    assert info.value.line == 5  # the physical line: the quoted cell above spans two


def test_jsonl_deep_nesting_is_refused_with_its_line(tmp_path):
    deep = b"[" * 100_000 + b"]" * 100_000
    for bad in (deep, b'{"prompt": "x", "extra": ' + deep + b"}"):
        path = _jsonl(tmp_path, [GOOD, bad])
        with pytest.raises(ImportRejected, match="nested too deeply") as info:
            read_prompts(path)
        assert info.value.line == 2


@pytest.mark.parametrize("bad, message", [
    (b'{"prompt": "half \\ud83d of an emoji"}', "'prompt' contains a lone surrogate U+D83D"),
    (b'{"prompt": "x", "category": "\\udc00"}', "'category' contains a lone surrogate"),
    (b'{"prompt": "x", "id": "a\\ud800"}', "'id' contains a lone surrogate"),
    (b'{"prompt": "x", "source": ["\\ud800"]}', "field 'source' contains a lone surrogate"),
    (b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "'messages' contains a lone"),
])
def test_lone_surrogates_are_refused_with_their_line(tmp_path, bad, message):
    path = _jsonl(tmp_path, [GOOD, b"", bad])
    with pytest.raises(ImportRejected, match=re.escape(message)) as info:
        read_prompts(path)
    assert info.value.line == 3


def test_a_pair_of_surrogate_escapes_is_one_character(tmp_path):
    path = _jsonl(tmp_path, [b'{"prompt": "ok \\ud83d\\ude00"}'])
    assert read_prompts(path)[0]["text"] == "ok \U0001F600"


def test_a_bad_line_imports_nothing(tmp_path, store):
    """All or nothing: the store sees the file only once every line is valid."""
    path = _jsonl(tmp_path, [GOOD] * 3 + [b'{"prompt": "bell \\u0007"}'] + [b'{"prompt": "z"}'])
    with pytest.raises(ImportRejected, match="line 4"):
        store.add_prompts(read_prompts(path), source="t")
    assert store.scalar("SELECT COUNT(*) FROM prompts") == 0
