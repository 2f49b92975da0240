"""Tests for aitraining.data (and the student's sequences, aitraining.batches): file formats and folder layouts,
row formats, templates and tokenization.

Tokenization tests use the real SmolLM2-135M-Instruct tokenizer (chat template, eos `<|im_end|>`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from aitraining.batches import Item, build_sequence, sft_items
from aitraining.data.examples import DataSettings, Example, read_examples, rows_to_examples
from aitraining.data.files import read_rows
from aitraining.data.templates import (
    BUILTIN_CHAT_TEMPLATES,
    apply_template,
    encode,
    encode_response,
    render_prompt,
    resolve_chat_template,
)
from aitraining.errors import UserError
from aitraining.params import LLMTrainingParams

PAIRS = [
    {"prompt": "What is AI?", "response": "Artificial intelligence."},
    {"prompt": "2+2?", "response": "4"},
    {"prompt": "Capital of France?", "response": "Paris"},
]


def params(data_path: str | Path = "data.jsonl", **kw: Any) -> LLMTrainingParams:
    return LLMTrainingParams(model="student", data_path=str(data_path), **kw)


def data(data_path: str | Path = "data.jsonl", **kw: Any) -> DataSettings:
    """The data settings of a run with these parameters."""
    return params(data_path, **kw).settings(DataSettings)


def load_examples(p: LLMTrainingParams) -> tuple[list[Example], list[Example]]:
    """(training, held-out) examples of a run with these parameters."""
    loaded = read_examples(p.settings(DataSettings))
    return loaded.train, loaded.valid


def tokenize(examples: list[Example], tok: Any, p: LLMTrainingParams, chat_template: str | None) -> list[Item | None]:
    """The student's sequence of each example for plain fine-tuning, as a run with these parameters makes it (None
    where the example is dropped)."""
    return sft_items(examples, tok, template=p.student_prompt_template, chat_template=chat_template,
                     block_size=p.block_size, add_eos=p.add_eos_token)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict[str, Any]], encoding: str = "utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return path


def pairs_of(examples: list[Example]) -> list[tuple[str, str | None]]:
    return [(ex.messages[-1]["content"], ex.response) for ex in examples]  # type: ignore[index]


EXPECTED_PAIRS = [(r["prompt"], r["response"]) for r in PAIRS]


@pytest.fixture(scope="module")
def tok(smol_tokenizer_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_tokenizer_dir)


# ------------------------------------------------------------------------------------------ file formats


def test_jsonl_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    train, valid = load_examples(params(path))
    assert pairs_of(train) == EXPECTED_PAIRS
    assert valid == []
    assert [ex.source_row for ex in train] == [1, 2, 3]


def test_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(PAIRS[0]) + "\n\n   \n" + json.dumps(PAIRS[1]) + "\n", encoding="utf-8")
    train, _ = load_examples(params(path))
    assert pairs_of(train) == EXPECTED_PAIRS[:2]


def test_json_list_file(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(PAIRS), encoding="utf-8")
    train, _ = load_examples(params(path))
    assert pairs_of(train) == EXPECTED_PAIRS


def test_json_object_holding_one_list(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": PAIRS, "version": 1}), encoding="utf-8")
    train, _ = load_examples(params(path))
    assert pairs_of(train) == EXPECTED_PAIRS


def test_json_file_that_is_json_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.json", PAIRS)
    train, _ = load_examples(params(path))
    assert pairs_of(train) == EXPECTED_PAIRS


def test_json_file_not_a_list_of_objects(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([1, 2, 3]), encoding="utf-8")
    with pytest.raises(UserError, match=r"must hold a list of JSON objects"):
        load_examples(params(path))


def test_json_file_with_a_single_json_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.json", PAIRS[:1])
    train, _ = load_examples(params(path))
    assert pairs_of(train) == EXPECTED_PAIRS[:1]


def test_csv_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", PAIRS)
    train, _ = load_examples(params(path))
    assert pairs_of(train) == EXPECTED_PAIRS


def test_csv_with_quoted_newlines_and_commas(tmp_path: Path) -> None:
    rows = [{"prompt": "a, b\nc", "response": 'say "hi"'}]
    path = write_csv(tmp_path / "d.csv", rows)
    train, _ = load_examples(params(path))
    assert pairs_of(train) == [("a, b\nc", 'say "hi"')]


def test_csv_with_byte_order_mark(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [{"text": "hello"}], encoding="utf-8-sig")
    train, _ = load_examples(params(path))
    assert train[0].text == "hello"


def test_parquet_file(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", PAIRS)
    train, _ = load_examples(params(path))
    assert pairs_of(train) == EXPECTED_PAIRS


def test_damaged_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(UserError, match=r"^--data-path: .*d\.parquet' is not a readable parquet file"):
        load_examples(params(path))


def test_suffix_is_case_insensitive(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "D.JSONL", PAIRS)
    train, _ = load_examples(params(path))
    assert len(train) == 3


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("hello\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"unsupported file type '\.txt'"):
        load_examples(params(path))


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        load_examples(params(tmp_path / "missing.jsonl"))
    msg = str(e.value)
    assert msg.startswith("--data-path: ") and "missing.jsonl" in msg and "does not exist" in msg
    assert "\n" not in msg


# ------------------------------------------------------------------------------------------ folders


def test_folder_with_train_and_valid_split_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", PAIRS)
    write_csv(tmp_path / "valid.csv", PAIRS[:1])
    train, valid = load_examples(params(tmp_path, valid_split="valid"))
    assert pairs_of(train) == EXPECTED_PAIRS
    assert pairs_of(valid) == EXPECTED_PAIRS[:1]


def test_folder_without_valid_split_gives_no_validation(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", PAIRS)
    write_jsonl(tmp_path / "valid.jsonl", PAIRS[:1])
    train, valid = load_examples(params(tmp_path))
    assert len(train) == 3 and valid == []


def test_folder_with_custom_split_names(tmp_path: Path) -> None:
    write_parquet(tmp_path / "mytrain.parquet", PAIRS)
    write_jsonl(tmp_path / "dev.jsonl", PAIRS[1:])
    train, valid = load_examples(params(tmp_path, train_split="mytrain", valid_split="dev"))
    assert pairs_of(train) == EXPECTED_PAIRS
    assert pairs_of(valid) == EXPECTED_PAIRS[1:]


def test_folder_missing_train_split(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "other.jsonl", PAIRS)
    with pytest.raises(UserError) as e:
        load_examples(params(tmp_path))
    msg = str(e.value)
    assert "no 'train' split" in msg and "train.jsonl" in msg and "--train-split" in msg


def test_folder_missing_valid_split(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", PAIRS)
    with pytest.raises(UserError, match=r"no 'validation' split"):
        load_examples(params(tmp_path, valid_split="validation"))


def test_read_rows_optional_split(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    assert read_rows(str(tmp_path), "valid", required=False) is None
    got = read_rows(str(tmp_path), "train", required=False)
    assert got is not None and got.rows == PAIRS and got.where == str(path)
    assert got.places == [f"line {i}" for i in range(1, len(PAIRS) + 1)] and got.skipped == []


def test_valid_split_needs_a_folder(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    with pytest.raises(UserError, match=r"^--valid-split needs --data-path to be a folder"):
        load_examples(params(path, valid_split="valid"))


def test_datasets_dataset_dict_folder(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(PAIRS), "validation": datasets.Dataset.from_list(PAIRS[:2])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    train, valid = load_examples(params(tmp_path / "dd", valid_split="validation"))
    assert pairs_of(train) == EXPECTED_PAIRS
    assert pairs_of(valid) == EXPECTED_PAIRS[:2]
    with pytest.raises(UserError) as e:
        load_examples(params(tmp_path / "dd", valid_split="test"))
    assert "no split 'test'" in str(e.value) and "train, validation" in str(e.value)


def test_datasets_single_dataset_folder(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "ds"))
    train, valid = load_examples(params(tmp_path / "ds"))
    assert pairs_of(train) == EXPECTED_PAIRS
    assert valid == []


def test_single_dataset_folder_with_valid_split_is_an_error(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(UserError):
        load_examples(params(tmp_path / "ds", valid_split="validation"))


# ------------------------------------------------------------------------------------------ rows / errors


@pytest.mark.parametrize("n", [1, 2, 3, 10])
def test_max_samples(tmp_path: Path, n: int) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", PAIRS)
    train, _ = load_examples(params(path, max_samples=n))
    assert pairs_of(train) == EXPECTED_PAIRS[:n]


def test_max_samples_skips_later_bad_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [*PAIRS[:2], {"nothing": 1}])
    train, _ = load_examples(params(path, max_samples=2))
    assert len(train) == 2


def test_malformed_json_line_reports_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps(PAIRS[1]) + '\n{"prompt": "x", \n', encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_examples(params(path))
    msg = str(e.value)
    assert msg.startswith("--data-path: ") and "line 3 is not valid JSON" in msg
    assert "\n" not in msg


def test_non_object_json_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"line 2 is not a JSON object"):
        load_examples(params(path))


def test_malformed_line_in_json_lines_file_named_json(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps(PAIRS[1]) + '\n{"prompt": "x", \n', encoding="utf-8")
    with pytest.raises(UserError, match=r"line 3 "):
        load_examples(params(path))


def test_missing_columns_in_first_row_name_columns_and_flags(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError) as e:
        load_examples(params(path))
    msg = str(e.value)
    for part in (
        "line 1",
        "['answer', 'question']",
        "'text'",
        "--text-column",
        "'prompt'",
        "--prompt-text-column",
        "--response-column",
        "messages",
    ):
        assert part in msg, part


def test_custom_column_names(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    train, _ = load_examples(params(path, prompt_text_column="question", response_column="answer"))
    assert pairs_of(train) == [("q", "a")]
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "hello"}])
    train, _ = load_examples(params(path, text_column="body"))
    assert train[0].text == "hello"


def test_missing_column_in_a_later_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [PAIRS[0], {"response": "r"}])
    with pytest.raises(UserError) as e:
        load_examples(params(path))
    msg = str(e.value)
    assert "line 2" in msg and "'prompt'" in msg and "--prompt-text-column" in msg


def test_missing_text_in_a_later_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"txt": "b"}])
    with pytest.raises(UserError) as e:
        load_examples(params(path))
    assert "line 2 has no 'text' column (--text-column)" in str(e.value)


def test_prompt_without_response_column_needs_distillation(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p"}])
    with pytest.raises(UserError) as e:
        load_examples(params(path))
    msg = str(e.value)
    assert "'response'" in msg and "--response-column" in msg and "--use-distillation" in msg
    train, _ = load_examples(params(path, use_distillation=True, teacher_model="t"))
    assert pairs_of(train) == [("p", None)]


def test_missing_response_in_a_later_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [PAIRS[0], {"prompt": "p"}])
    with pytest.raises(UserError, match=r"line 2 has no 'response' \(--response-column\)"):
        load_examples(params(path))


def test_non_string_values(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": 3}])
    with pytest.raises(UserError, match=r"line 1 column 'response' must be a string"):
        load_examples(params(path))
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": ["a"]}])
    with pytest.raises(UserError, match=r"line 1 column 'text' must be a string, got list"):
        load_examples(params(path))


def test_empty_text_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": "   "}])
    with pytest.raises(UserError, match=r"line 2 has an empty 'text'"):
        load_examples(params(path))


@pytest.mark.parametrize(
    ("name", "content"),
    [("d.jsonl", ""), ("d.jsonl", "\n\n  \n"), ("d.json", "[]"), ("d.csv", ""), ("d.csv", "prompt,response\n")],
)
def test_empty_file_is_an_error(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_examples(params(path))
    msg = str(e.value)
    assert msg.startswith("--data-path: ") and name in msg
    assert "\n" not in msg


def test_empty_json_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text("", encoding="utf-8")
    with pytest.raises(UserError, match=r"^--data-path: "):
        load_examples(params(path))


# ------------------------------------------------------------------------------------------ row formats


def test_text_rows_for_fine_tuning_are_plain_text() -> None:
    [ex] = rows_to_examples([{"text": "What is ML?"}], data(), "d.jsonl")
    assert ex.is_text and ex.text == "What is ML?" and ex.messages is None and ex.response is None


def test_text_rows_are_prompts_with_distillation() -> None:
    rows = [{"text": "What is machine learning?"}, {"text": "Explain how neural networks work."}]
    examples = rows_to_examples(rows, data(use_distillation=True, teacher_model="t"), "d.jsonl")
    assert [ex.messages for ex in examples] == [[{"role": "user", "content": r["text"]}] for r in rows]
    assert all(ex.response is None and not ex.is_text for ex in examples)


def test_pair_rows_with_distillation_keep_given_responses() -> None:
    [ex] = rows_to_examples(
        [{"prompt": "What is AI?", "response": "..."}], data(use_distillation=True, teacher_model="t"), "d"
    )
    assert ex.messages == [{"role": "user", "content": "What is AI?"}] and ex.response == "..."


def test_messages_last_assistant_turn_is_the_response() -> None:
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    }
    [ex] = rows_to_examples([row], data(), "d.jsonl")
    assert ex.response == "4"
    assert ex.messages == row["messages"][:4]
    assert ex.messages[0] == {"role": "system", "content": "Be brief."}
    # the example holds copies: editing them does not touch the rows
    ex.messages[-1]["content"] = "changed"
    assert row["messages"][3]["content"] == "2+2?"


def test_messages_without_assistant_turn() -> None:
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]}
    with pytest.raises(UserError, match=r"row 1 has no assistant turn"):
        rows_to_examples([row], data(), "d.jsonl")
    [ex] = rows_to_examples([row], data(use_distillation=True, teacher_model="t"), "d.jsonl")
    assert ex.response is None and ex.messages == row["messages"]


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hello",
        [{"role": "user"}],
        [{"role": "user", "content": 3}],
        ["user: hi"],
        [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}],
        [{"role": "assistant", "content": "A"}],
    ],
)
def test_malformed_messages(messages: Any) -> None:
    with pytest.raises(UserError, match=r"^--data-path: d\.jsonl row 1"):
        rows_to_examples([{"messages": messages}], data(), "d.jsonl")


def test_rows_must_follow_the_first_rows_format() -> None:
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, {"text": "t"}]
    with pytest.raises(UserError, match=r"row 2 'messages'"):
        rows_to_examples(rows, data(), "d.jsonl")


# ------------------------------------------------------------------------------------------ templates


@pytest.mark.parametrize(
    "text",
    ["plain", "has {input} inside", "format {0} index", "empty {} braces", "{name} and {{double}}", "%s %(x)s", "}{"],
)
def test_apply_template_is_literal(text: str) -> None:
    assert apply_template("Q: {input}\nA:", text) == f"Q: {text}\nA:"
    assert apply_template("{input}", text) == text


def test_apply_template_keeps_other_braces_in_template() -> None:
    assert apply_template('{"q": "{input}", "n": {0}}', "x") == '{"q": "x", "n": {0}}'
    assert apply_template("{input} / {input}", "ab") == "ab / ab"


def test_render_prompt_with_tokenizer_chat_template(tok: Any) -> None:
    msgs = [{"role": "user", "content": "What is {input}? {0} {}"}]
    text, special = render_prompt(tok, msgs, "Q: {input}\nAns", tok.chat_template)
    assert special is False
    assert "<|im_start|>user\nQ: What is {input}? {0} {}\nAns<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert msgs == [{"role": "user", "content": "What is {input}? {0} {}"}]  # input not modified


def test_render_prompt_keeps_the_system_turn(tok: Any) -> None:
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    text, _ = render_prompt(tok, msgs, "[{input}]", tok.chat_template)
    assert (
        text
        == "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n[Hi]<|im_end|>\n<|im_start|>assistant\n"
    )


def test_render_prompt_template_applies_to_last_user_turn_only(tok: Any) -> None:
    msgs = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": "second"},
    ]
    text, _ = render_prompt(tok, msgs, "T:{input}", tok.chat_template)
    assert "user\nfirst<|im_end|>" in text and "user\nT:second<|im_end|>" in text


def test_render_prompt_without_chat_template_is_raw_templated_text(tok: Any) -> None:
    msgs = [{"role": "user", "content": "a {0} b"}]
    assert render_prompt(tok, msgs, "Q: {input}\nAns", None) == ("Q: a {0} b\nAns", True)
    assert render_prompt(tok, msgs, "{input}", None) == ("a {0} b", True)


def test_render_prompt_builtin_chatml(tok: Any) -> None:
    text, special = render_prompt(tok, [{"role": "user", "content": "x"}], "{input}", BUILTIN_CHAT_TEMPLATES["chatml"])
    assert text == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n" and special is False


def test_resolve_chat_template(tok: Any) -> None:
    assert resolve_chat_template(tok, None) == tok.chat_template
    assert resolve_chat_template(tok, "auto") == tok.chat_template
    assert resolve_chat_template(tok, "tokenizer") == tok.chat_template
    assert resolve_chat_template(tok, "none") is None
    assert resolve_chat_template(tok, "zephyr") == BUILTIN_CHAT_TEMPLATES["zephyr"]

    class NoTemplate:
        chat_template = None

    assert resolve_chat_template(NoTemplate(), "auto") is None
    with pytest.raises(UserError, match=r"^--chat-template tokenizer: .*no chat template"):
        resolve_chat_template(NoTemplate(), "tokenizer")


# ------------------------------------------------------------------------------------------ tokenization


def _pair(prompt: str, response: str) -> Example:
    return Example(messages=[{"role": "user", "content": prompt}], response=response)


def test_tokenizer_fixture_is_smollm(tok: Any) -> None:
    assert tok.eos_token == "<|im_end|>"
    assert tok.chat_template


def test_prompt_response_trains_on_response_only(tok: Any) -> None:
    p = params()
    ex = _pair("What is AI?", "Artificial intelligence.")
    [seq] = tokenize([ex], tok, p, tok.chat_template)  # one item per example, at its index (0)
    assert seq is not None  # not dropped
    prompt_text, special = render_prompt(tok, ex.messages, p.student_prompt_template, tok.chat_template)  # type: ignore[arg-type]
    prompt_ids = encode(tok, prompt_text, add_special_tokens=special)
    assert seq.n_prompt == len(prompt_ids)
    assert seq.input_ids[: seq.n_prompt] == prompt_ids
    assert tok.decode(seq.input_ids[seq.n_prompt :]) == "Artificial intelligence.<|im_end|>"
    assert seq.input_ids[-1] == tok.eos_token_id
    assert seq.n_response == len(seq.input_ids) - seq.n_prompt


def test_no_add_eos_token_removes_eos(tok: Any) -> None:
    p = params(add_eos_token=False)
    [seq] = tokenize([_pair("Q", "Paris")], tok, p, tok.chat_template)
    assert tok.decode(seq.input_ids[seq.n_prompt :]) == "Paris"
    assert tok.eos_token_id not in seq.input_ids[seq.n_prompt :]


def test_text_rows_train_on_everything(tok: Any) -> None:
    [seq] = tokenize([Example(text="hello world")], tok, params(), tok.chat_template)
    assert seq.n_prompt == 0
    assert seq.input_ids == encode(tok, "hello world", add_special_tokens=True) + [tok.eos_token_id]
    assert tok.decode(seq.input_ids) == "hello world<|im_end|>"
    [seq] = tokenize([Example(text="hello world")], tok, params(add_eos_token=False), None)
    assert tok.decode(seq.input_ids) == "hello world"


def test_text_row_truncated_to_block_size(tok: Any) -> None:
    text = " ".join(["word"] * 50)
    [seq] = tokenize([Example(text=text)], tok, params(block_size=8), None)
    assert seq.input_ids == encode(tok, text, add_special_tokens=True)[:8]


def test_block_size_cuts_the_end_of_the_response(tok: Any) -> None:
    response = "one two three four five six seven eight nine ten"
    ex = _pair("Count.", response)
    [full] = tokenize([ex], tok, params(), tok.chat_template)
    block = full.n_prompt + 3
    [cut] = tokenize([ex], tok, params(block_size=block), tok.chat_template)
    assert cut is not None  # not dropped
    assert len(cut.input_ids) == block
    assert cut.n_prompt == full.n_prompt
    assert cut.input_ids == full.input_ids[:block]
    assert cut.input_ids[-1] != tok.eos_token_id
    assert cut.input_ids[cut.n_prompt :] == encode_response(tok, response, add_eos=True)[:3]


def test_rows_whose_prompt_leaves_no_room_are_dropped(tok: Any) -> None:
    long_prompt = " ".join(["word"] * 40)
    examples = [_pair("Hi", "Hello"), _pair(long_prompt, "x"), _pair("Yo", "Hey")]
    items = tokenize(examples, tok, params(block_size=16), None)
    assert items.count(None) == 1  # dropped
    assert [i for i, s in enumerate(items) if s is not None] == [0, 2]  # the examples kept
    assert all(len(s.input_ids) <= 16 for s in items if s is not None)
    # with the chat template, even the short prompts (system turn included) exceed 16 tokens
    items = tokenize(examples, tok, params(block_size=16), tok.chat_template)
    assert items == [None, None, None]  # no sequence, 3 dropped


def test_prompt_filling_block_exactly_is_dropped(tok: Any) -> None:
    prompt_ids = [5] * 8
    assert build_sequence(prompt_ids, [1, 2], block_size=8) is None
    seq = build_sequence(prompt_ids, [1, 2], block_size=9)
    assert seq is not None and seq.input_ids == [5] * 8 + [1] and seq.n_prompt == 8
    assert build_sequence(prompt_ids, [], block_size=100) is None


@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "raw"])
@pytest.mark.parametrize(
    ("template", "response"),
    [
        ("{input}", " Paris is the capital."),
        ("{input}", "  two leading spaces"),
        ("{input}", "\nstarts with a newline"),
        ("Q: {input}\nAns", "wer: 42"),
        ("Q: {input}\nAns", " 42"),
        ("Answer this: {input} ->", "> 42"),
    ],
)
def test_response_ids_do_not_depend_on_the_prompt(tok: Any, chat: bool, template: str, response: str) -> None:
    """The alignment property: response tokens are encode_response(response), whatever precedes them."""
    chat_template = tok.chat_template if chat else None
    p = params(student_prompt_template=template)
    ex = _pair("What is the capital of France?", response)
    [seq] = tokenize([ex], tok, p, chat_template)
    expected = encode_response(tok, response, add_eos=True)
    assert seq.input_ids[seq.n_prompt :] == expected
    prompt_text, special = render_prompt(tok, ex.messages, template, chat_template)  # type: ignore[arg-type]
    assert seq.input_ids[: seq.n_prompt] == encode(tok, prompt_text, add_special_tokens=special)
    assert tok.decode(seq.input_ids) == prompt_text + response + "<|im_end|>"


def test_mid_word_template_differs_from_joint_tokenization(tok: Any) -> None:
    """Sanity check that the alignment test above is not vacuous: "Ans" + "wer" joined would tokenize as "Answer"."""
    prompt_text, special = render_prompt(tok, [{"role": "user", "content": "hi"}], "Q: {input}\nAns", None)
    joint = encode(tok, prompt_text + "wer: 42", add_special_tokens=special)
    split = encode(tok, prompt_text, add_special_tokens=special) + encode_response(tok, "wer: 42", add_eos=False)
    assert joint != split
    [seq] = tokenize(
        [_pair("hi", "wer: 42")], tok, params(student_prompt_template="Q: {input}\nAns", add_eos_token=False), None
    )
    assert seq.input_ids == split


def test_messages_rows_tokenize_with_history(tok: Any, tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4"},
                ]
            }
        ],
    )
    p = params(path)
    train, _ = load_examples(p)
    [seq] = tokenize(train, tok, p, tok.chat_template)
    prompt = tok.decode(seq.input_ids[: seq.n_prompt])
    assert (
        prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(seq.input_ids[seq.n_prompt :]) == "4<|im_end|>"


def test_encode_response_eos(tok: Any) -> None:
    assert encode_response(tok, "Paris", add_eos=True) == encode(tok, "Paris", add_special_tokens=False) + [
        tok.eos_token_id
    ]
    assert encode_response(tok, "Paris", add_eos=False) == encode(tok, "Paris", add_special_tokens=False)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path: Path, suffix: str) -> None:
    """A file of random bytes (or one bad byte on line 3) is the user's to fix: a one-line error naming the file
    and the line, never a UnicodeDecodeError traceback."""
    path = tmp_path / f"d{suffix}"
    good = json.dumps(PAIRS[0]) + "\n"
    path.write_bytes((good * 2).encode() + b'{"prompt": "caf\xe9", "response": "x"}\n')
    with pytest.raises(UserError, match=rf"{path.name} line 3 is not UTF-8 text \(byte 0xe9\)"):
        load_examples(params(path))
    path.write_bytes(bytes(range(128, 256)) * 20)
    with pytest.raises(UserError, match=r"line 1 is not UTF-8 text"):
        load_examples(params(path))


def test_jsonl_with_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in PAIRS).encode())
    train, _ = load_examples(params(path))
    assert pairs_of(train) == EXPECTED_PAIRS
