"""Bad data never reaches the user as a traceback: every loader fuzzed with hypothesis.

Each property writes what a user might hand us (random bytes, invalid UTF-8, a byte-order mark, truncated lines,
wrong types per column, nested junk, empty strings, NUL bytes, lone surrogates) and checks the one contract:
either examples come back, and every one of them tokenizes, or a `UserError` names the file and the line (or
row) at fault, on one line. With --skip-bad-rows exactly the bad rows are left out and recorded with their place.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aitraining.batches import sft_items
from aitraining.data.examples import DataSettings, read_examples
from aitraining.data.templates import render_prompt, resolve_chat_template
from aitraining.errors import UserError
from aitraining.params import LLMTrainingParams

FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values of every type, nested; strings with NULs, control characters and non-ASCII text.
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=8)
columns = st.sampled_from(["text", "prompt", "response", "messages", "role", "content", "other", ""])
rows = st.dictionaries(columns, json_values, max_size=4)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                           "content": st.text(max_size=30)}), max_size=3)
plausible_rows = rows | st.fixed_dictionaries({"messages": messages}) | st.fixed_dictionaries(
    {"prompt": st.text(max_size=30), "response": st.text(max_size=30) | st.integers()}) | st.fixed_dictionaries(
    {"text": st.text(max_size=30)})


def line_of(row: dict[str, Any], damage: int) -> bytes:
    """One JSON-lines line, intact (0) or damaged: truncated, a raw invalid UTF-8 byte, a NUL byte, a lone surrogate
    escape, a BOM inside the file, or a JSON value that is not an object."""
    good = json.dumps(row).encode()
    return [good, good[: max(1, len(good) // 2)], good[:1] + b"\xff" + good[1:], good[:1] + b"\x00" + good[1:],
            b'{"text": "a \\ud800 b"}', b"\xef\xbb\xbf" + good, b"[1, 2]", b'"just a string"'][damage]


def params(path: Path, **kw: Any) -> LLMTrainingParams:
    return LLMTrainingParams(model="m", data_path=str(path), project_name=str(path.parent / "p"), **kw)


@pytest.fixture(scope="module")
def tokenizer(smol_tokenizer_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_tokenizer_dir)


def load(path: Path, tokenizer: Any, **kw: Any) -> Any:
    """read_examples, then every example through the student's tokenization, as a run does. Returns the loaded
    examples, or the UserError's message after checking that it names the file and is one line."""
    p = params(path, **kw)
    try:
        loaded = read_examples(p.settings(DataSettings))
    except UserError as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith("--data-path: ") and path.name in msg, msg
        return msg
    template = resolve_chat_template(tokenizer, None)
    if p.use_distillation:
        for ex in loaded.train + loaded.valid:
            render_prompt(tokenizer, ex.messages or [], p.effective_teacher_template, template)
    else:
        sft_items(loaded.train + loaded.valid, tokenizer, template=p.student_prompt_template, chat_template=template,
                  block_size=p.block_size, add_eos=p.add_eos_token)
    return loaded


def names_a_place(msg: str) -> bool:
    return bool(re.search(r" (line|row) \d+", msg)) or "holds no rows" in msg or "every row was left out" in msg


@FUZZ
@given(data=st.binary(max_size=600), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]),
       distill=st.booleans())
def test_random_bytes_in_any_format(tokenizer: Any, data: bytes, suffix: str, distill: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(data)
        kw = {"use_distillation": True, "teacher_model": "t"} if distill else {}
        load(path, tokenizer, **kw)


@FUZZ
@given(lines=st.lists(st.tuples(plausible_rows, st.integers(0, 7)), min_size=1, max_size=12), bom=st.booleans(),
       distill=st.booleans())
def test_jsonl_lines_of_any_shape_name_their_line(tokenizer: Any, lines: list[tuple[dict[str, Any], int]], bom: bool,
                                                  distill: bool) -> None:
    body = b"\n".join(line_of(row, damage) for row, damage in lines)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body)
        kw = {"use_distillation": True, "teacher_model": "t"} if distill else {}
        got = load(path, tokenizer, **kw)
        if isinstance(got, str):
            assert names_a_place(got), got
        skipping = load(path, tokenizer, skip_bad_rows=True, **kw)
        if isinstance(skipping, str):
            assert names_a_place(skipping), skipping
        else:
            n = len(skipping.train) + len(skipping.valid) + len(skipping.skipped)
            assert n == sum(1 for row, damage in lines if line_of(row, damage).strip()), "every line is kept or skipped"
            assert all(re.fullmatch(r"line \d+", s.place) for s in skipping.skipped)


@FUZZ
@given(items=st.lists(plausible_rows | json_values, min_size=1, max_size=8), suffix=st.sampled_from([".json", ".csv", ".parquet"]))
def test_lists_tables_and_frames_of_any_types(tokenizer: Any, items: list[Any], suffix: str) -> None:
    """The same rows as a JSON list, a CSV table (every cell as text) and a parquet file (when pyarrow can hold
    the column types at all: mixed types are the user's file failing to write, not ours to read)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        if suffix == ".json":
            path.write_text(json.dumps(items))
        elif suffix == ".csv":
            import csv

            dicts = [r for r in items if isinstance(r, dict)] or [{"text": ""}]
            cols = sorted({k for r in dicts for k in r})
            with open(path, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(cols)
                for r in dicts:
                    w.writerow(["" if r.get(c) is None else str(r.get(c)) for c in cols])
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            dicts = [r for r in items if isinstance(r, dict)] or [{}]
            try:
                pq.write_table(pa.Table.from_pylist(dicts), path)
            except (pa.ArrowException, ValueError, TypeError, OverflowError):
                return
        for skip in (False, True):
            got = load(path, tokenizer, skip_bad_rows=skip)
            if isinstance(got, str):
                assert path.name in got


def test_skip_bad_rows_keeps_exactly_the_good_ones(tmp_path: Path, tokenizer: Any) -> None:
    good = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(6)]
    lines = [json.dumps(good[0]), "{not json", json.dumps(good[1]), "", json.dumps({"prompt": 3, "response": "x"}),
             json.dumps(good[2]), '{"prompt": "a", "response": "\\ud83d"}', json.dumps(good[3]), "[1]",
             json.dumps(good[4]), json.dumps(good[5])]
    path = tmp_path / "d.jsonl"
    path.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n")
    msg = load(path, tokenizer)
    assert isinstance(msg, str) and " line 2 is not valid JSON" in msg and "--skip-bad-rows" in msg
    got = load(path, tokenizer, skip_bad_rows=True)
    assert [ex.response for ex in got.train] == [g["response"] for g in good]
    assert [(s.place, s.reason.split(" (")[0]) for s in got.skipped] == [
        ("line 2", "is not valid JSON"), ("line 5", "column 'prompt' must be a string, got int"),
        ("line 7", "column 'response' holds a lone surrogate"), ("line 9", "is not a JSON object; each line must be {...}"),
        ("line 12", "is not UTF-8 text")]


def test_every_row_bad_is_one_message(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\x00\x01\x02\n{\n")
    msg = load(path, tokenizer, skip_bad_rows=True)
    assert isinstance(msg, str) and "every row was left out by --skip-bad-rows (2; the first: line 1" in msg


def test_a_huge_line_and_a_huge_csv_cell_are_data(tmp_path: Path, tokenizer: Any) -> None:
    big = "word " * 60_000  # 300 KB in one line / one cell (the csv module's default limit is 128 KB)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": big, "response": "ok"}) + "\n", encoding="utf-8")
    assert len(load(path, tokenizer, block_size=64).train) == 1
    path = tmp_path / "d.csv"
    path.write_text(f'prompt,response\n"{big}",ok\n', encoding="utf-8")
    assert len(load(path, tokenizer, block_size=64).train) == 1


def test_deeply_nested_json_is_named_not_a_recursion_error(tmp_path: Path, tokenizer: Any) -> None:
    for name, text in (("d.jsonl", '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n"), ("d.json", "[" * 100_000)):
        path = tmp_path / name
        path.write_text(text)
        msg = load(path, tokenizer)
        assert isinstance(msg, str) and "not valid JSON" in msg, msg


def test_a_damaged_datasets_folder_is_named(tmp_path: Path, tokenizer: Any) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{junk")
    (folder / "state.json").write_bytes(b"\xff\x00")
    msg = load(folder, tokenizer)
    assert isinstance(msg, str) and "is not a readable datasets folder" in msg, msg


def test_a_chat_template_that_refuses_a_conversation_names_the_row(tokenizer: Any) -> None:
    """Many chat templates raise on roles they do not expect (raise_exception): a one-line error naming the row."""
    refuses = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}"
               "{% endif %}{{ m['content'] }}{% endfor %}")
    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    with pytest.raises(UserError, match=r"^--data-path: d\.jsonl line 3: the chat template refuses this conversation "
                                        r"\(roles: system, user\): no system turns; fix the row"):
        render_prompt(tokenizer, turns, "{input}", refuses, place="d.jsonl line 3")


def test_format_strings_in_prompts_and_templates_stay_text(tokenizer: Any) -> None:
    hostile = "{input.__class__} {0} {} {input!r} %s {{x}}"
    text, _ = render_prompt(tokenizer, [{"role": "user", "content": hostile}], "Q: {input} | {0} {}", None)
    assert text == f"Q: {hostile} | {{0}} {{}}"
