"""Rows on disk -> `Example`s -> token sequences.

Three row formats (the documented ones, plus chat):

- `{"text": ...}`: plain text. Fine-tuning trains on every token; with distillation the text is a *prompt*
  and the teacher writes the response.
- `{"prompt": ..., "response": ...}`: trains on the response tokens only.
- `{"messages": [{"role": ..., "content": ...}, ...]}`: the last assistant turn is the response, the turns
  before it are the prompt.

Templates: a prompt template shapes the user's message (`{input}` is replaced literally, never with
`str.format`, so braces in user text are safe), then the model's chat template wraps the conversation when
it has one (or the one chosen with `--chat-template`). With `--chat-template none` the template is the raw
prompt text. The response is tokenized on its own and appended, so the response tokens are the same ids
whatever the prompt looked like: that is what lets teacher and student be aligned on the response.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aitraining.errors import UserError
from aitraining.params import LLMTrainingParams

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

# Generic chat templates a user can pick by name for models without one.
BUILTIN_CHAT_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "zephyr": (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
}


@dataclass
class Example:
    """One training example before tokenization.

    `messages` is the conversation before the response (the last one is the user's turn); `response` is
    None when the teacher must write it. Plain-text rows (fine-tuning on all tokens) set `text` only.
    """

    messages: list[dict[str, str]] | None = None
    response: str | None = None
    text: str | None = None
    source_row: int = 0

    @property
    def is_text(self) -> bool:
        return self.text is not None and self.messages is None


@dataclass
class Tokenized:
    """A tokenized example: `input_ids`, of which positions >= `n_prompt` are trained on."""

    input_ids: list[int]
    n_prompt: int
    example_index: int

    @property
    def n_response(self) -> int:
        return len(self.input_ids) - self.n_prompt


# ------------------------------------------------------------------------------------------------- loading


def find_split_file(data_path: str, split: str, *, required: bool) -> str | None:
    """The file holding `split`: `data_path` itself when it is a file, else `{split}.*` inside the folder."""
    if os.path.isfile(data_path):
        return data_path
    for suffix in DATA_SUFFIXES:
        candidate = os.path.join(data_path, split + suffix)
        if os.path.isfile(candidate):
            return candidate
    if required:
        raise UserError(
            f"--data-path: no '{split}' split in folder '{data_path}': add {split}.jsonl (or .json/.csv/.parquet)"
            f" or set --train-split/--valid-split"
        )
    return None


def _is_datasets_folder(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in ("dataset_dict.json", "dataset_info.json", "state.json")
    )


def read_rows(
    data_path: str, split: str, *, required: bool = True, train_split: str = "train"
) -> tuple[list[dict[str, Any]], str] | None:
    """Read the raw rows of one split. Returns (rows, where) or None when an optional split is absent."""
    if not os.path.exists(data_path):
        raise UserError(
            f"--data-path: '{data_path}' does not exist; pass a .jsonl/.json/.csv/.parquet file or a data folder"
        )
    if _is_datasets_folder(data_path):
        return _read_datasets_folder(data_path, split, required=required, train_split=train_split)
    path = find_split_file(data_path, split, required=required)
    if path is None:
        return None
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix == ".json":
        rows = _read_json(path)
    elif suffix == ".csv":
        # utf-8-sig: spreadsheet programs start CSV files with a byte-order mark.
        rows = list(csv.DictReader(io.StringIO(_read_text(path), newline="")))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise UserError(f"--data-path: '{path}' is not a readable parquet file ({e})") from None
    else:
        raise UserError(f"--data-path: unsupported file type '{suffix}' of '{path}'; use .jsonl, .json, .csv or .parquet")
    return rows, path


def _read_text(path: str) -> str:
    """A data file's text: UTF-8, a leading byte-order mark dropped; anything else is the user's to fix, with the
    line that is not UTF-8 named (never a traceback)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"--data-path: {path} line {line} is not UTF-8 text (byte 0x{data[e.start]:02x}); "
                        "save the file as UTF-8") from None


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"--data-path: {path} line {lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise UserError(f"--data-path: {path} line {lineno} is not a JSON object; each line must be {{...}}")
        rows.append(row)
    return rows


def _read_json(path: str) -> list[dict[str, Any]]:
    content = _read_text(path)
    try:
        data = json.loads(content)
    except json.JSONDecodeError as e:
        # Many ".json" files are really JSON lines: then the JSON-lines reader names the bad line.
        first = content.lstrip().split("\n", 1)[0]
        if "\n" in content.strip() and first.startswith("{"):
            try:
                json.loads(first)
            except json.JSONDecodeError:
                pass
            else:
                return _read_jsonl(path)
        raise UserError(f"--data-path: {path} line {e.lineno} is not valid JSON ({e.msg})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]  # a single row, as in a one-line JSON-lines file
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"--data-path: {path} must hold a list of JSON objects (or be JSON lines)")
    return data


def _read_datasets_folder(
    path: str, split: str, *, required: bool, train_split: str
) -> tuple[list[dict[str, Any]], str] | None:
    import datasets

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            if not required:
                return None
            raise UserError(
                f"--data-path: datasets folder '{path}' has no split '{split}' (it has {', '.join(loaded)});"
                " set --train-split/--valid-split"
            )
        loaded = loaded[split]
    elif not required:
        return None  # a single Dataset is the training split only
    elif split != train_split:
        raise UserError(
            f"--valid-split: datasets folder '{path}' holds a single Dataset, which is the training split; "
            "save a DatasetDict with both splits, or use split files"
        )
    return loaded.to_list(), path


# ----------------------------------------------------------------------------------------------- examples


def rows_to_examples(rows: Sequence[dict[str, Any]], params: LLMTrainingParams, where: str) -> list[Example]:
    """Map raw rows to examples; the first row decides the format, every row must follow it."""
    if not rows:
        raise UserError(f"--data-path: {where} holds no rows; add at least one example")
    first = rows[0]
    pc, rc, tc = params.prompt_text_column, params.response_column, params.text_column
    if "messages" in first:
        kind = "messages"
    elif pc in first:
        kind = "pair"
    elif tc in first:
        kind = "text"
    else:
        raise UserError(
            f"--data-path: {where} row 1 has columns {sorted(first)}, expected '{tc}' (--text-column), "
            f"'{pc}'+'{rc}' (--prompt-text-column/--response-column) or 'messages'"
        )
    if kind == "pair" and rc not in first and not params.use_distillation:
        raise UserError(
            f"--data-path: {where} has a '{pc}' column but no '{rc}' column (--response-column); fine-tuning needs"
            " responses (or add --use-distillation to let the teacher write them)"
        )
    examples: list[Example] = []
    for i, row in enumerate(rows, 1):
        ex = _row_to_example(row, kind, params, where, i)
        ex.source_row = i
        examples.append(ex)
    return examples


def _need_str(row: dict[str, Any], col: str, where: str, i: int, flag_name: str) -> str:
    if col not in row or row[col] is None:
        raise UserError(f"--data-path: {where} row {i} has no '{col}' column ({flag_name}); every row needs it")
    value = row[col]
    if not isinstance(value, str):
        raise UserError(f"--data-path: {where} row {i} column '{col}' must be a string, got {type(value).__name__}")
    return value


def _row_to_example(row: dict[str, Any], kind: str, params: LLMTrainingParams, where: str, i: int) -> Example:
    if kind == "text":
        text = _need_str(row, params.text_column, where, i, "--text-column")
        if not text.strip():
            raise UserError(f"--data-path: {where} row {i} has an empty '{params.text_column}'")
        if params.use_distillation:
            return Example(messages=[{"role": "user", "content": text}])
        return Example(text=text)
    if kind == "pair":
        prompt = _need_str(row, params.prompt_text_column, where, i, "--prompt-text-column")
        response = row.get(params.response_column)
        if response is None and not params.use_distillation:
            raise UserError(f"--data-path: {where} row {i} has no '{params.response_column}' (--response-column)")
        if response is not None and not isinstance(response, str):
            raise UserError(f"--data-path: {where} row {i} column '{params.response_column}' must be a string")
        return Example(messages=[{"role": "user", "content": prompt}], response=response)
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"--data-path: {where} row {i} 'messages' must be a non-empty list of {{role, content}}")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"--data-path: {where} row {i} has a message without string 'role' and 'content'")
    last_assistant = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if params.use_distillation and messages[-1]["role"] == "user":
        last_assistant = None  # the conversation waits for an answer: the teacher writes it
    if last_assistant is None:
        if not params.use_distillation:
            raise UserError(f"--data-path: {where} row {i} has no assistant turn to train on")
        history, response = messages, None
    else:
        history, response = messages[:last_assistant], messages[last_assistant]["content"]
    if not history or history[-1]["role"] != "user":
        raise UserError(f"--data-path: {where} row {i}: the turn before the response must be the user's")
    return Example(messages=[dict(m) for m in history], response=response)


MIN_ROWS_TO_HOLD_OUT = 20


def held_out_rows(n_rows: int, share: float, seed: int) -> list[int]:
    """Which rows (sorted indices) are held out for evaluation when no validation split is given: round(share x
    n), at least one, drawn with the run's seed; none below MIN_ROWS_TO_HOLD_OUT rows or with share 0."""
    if share <= 0 or n_rows < MIN_ROWS_TO_HOLD_OUT:
        return []
    import random

    n = min(max(1, round(share * n_rows)), n_rows - 1)
    return sorted(random.Random(seed).sample(range(n_rows), n))


def load_examples(params: LLMTrainingParams) -> tuple[list[Example], list[Example]]:
    """Training and validation examples: the validation split, or without one the rows `held_out_rows` picks
    (before --max-samples caps the training rows)."""
    loaded = read_rows(params.data_path or "", params.train_split, required=True, train_split=params.train_split)
    assert loaded is not None
    rows, where = loaded
    held = set() if params.valid_split else set(held_out_rows(len(rows), params.holdout_share, params.seed))
    if held:  # every row is checked (its errors name its line), then split
        every = rows_to_examples(rows, params, where)
        train = [ex for i, ex in enumerate(every) if i not in held][: params.max_samples]
        return train, [ex for i, ex in enumerate(every) if i in held]
    if params.max_samples is not None:
        rows = rows[: params.max_samples]
    train = rows_to_examples(rows, params, where)
    valid: list[Example] = []
    if params.valid_split:
        if os.path.isfile(params.data_path or ""):
            raise UserError("--valid-split needs --data-path to be a folder holding the split files")
        got = read_rows(params.data_path or "", params.valid_split, required=True, train_split=params.train_split)
        assert got is not None
        valid = rows_to_examples(got[0], params, got[1])
    return train, valid


# ---------------------------------------------------------------------------------------------- templates


def apply_template(template: str, text: str) -> str:
    """Put `text` where `{input}` is. Literal replacement: braces in `text` are never interpreted."""
    return template.replace("{input}", text)


def resolve_chat_template(tokenizer: Any, choice: str | None, *, flag_name: str = "--chat-template") -> str | None:
    """The Jinja chat template to use, or None for raw text."""
    if choice in (None, "auto"):
        return getattr(tokenizer, "chat_template", None) or None
    if choice == "none":
        return None
    if choice == "tokenizer":
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise UserError(f"{flag_name} tokenizer: the model's tokenizer has no chat template; use chatml, zephyr or none")
        return template
    return BUILTIN_CHAT_TEMPLATES[choice]


def render_prompt(
    tokenizer: Any, messages: Sequence[dict[str, str]], template: str, chat_template: str | None
) -> tuple[str, bool]:
    """The prompt text a model sees, and whether the tokenizer should add its special tokens (BOS).

    The template applies to the last user turn. A chat template renders BOS itself, so then no special
    tokens are added; raw text gets the tokenizer's usual ones.
    """
    msgs = [dict(m) for m in messages]
    msgs[-1]["content"] = apply_template(template, msgs[-1]["content"])
    if chat_template is not None:
        text = tokenizer.apply_chat_template(msgs, chat_template=chat_template, tokenize=False, add_generation_prompt=True)
        return text, False
    return "\n\n".join(m["content"] for m in msgs), True


def encode(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def encode_response(tokenizer: Any, response: str, *, add_eos: bool) -> list[int]:
    ids = encode(tokenizer, response, add_special_tokens=False)
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def build_sequence(
    prompt_ids: list[int], response_ids: list[int], *, block_size: int, example_index: int
) -> Tokenized | None:
    """Prompt + response cut to `block_size` (the response's end is cut); None if no response token fits."""
    room = block_size - len(prompt_ids)
    if room < 1 or not response_ids:
        return None
    return Tokenized(prompt_ids + response_ids[:room], len(prompt_ids), example_index)


def tokenize_for_sft(
    examples: Iterable[Example], tokenizer: Any, params: LLMTrainingParams, chat_template: str | None
) -> tuple[list[Tokenized], int]:
    """Student sequences for plain fine-tuning. Returns (sequences, number of examples dropped)."""
    out: list[Tokenized] = []
    dropped = 0
    for i, ex in enumerate(examples):
        if ex.is_text:
            ids = encode(tokenizer, ex.text or "", add_special_tokens=True)
            if params.add_eos_token and tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
            seq: Tokenized | None = Tokenized(ids[: params.block_size], 0, i) if len(ids) > 1 else None
        else:
            assert ex.messages is not None and ex.response is not None
            prompt, special = render_prompt(tokenizer, ex.messages, params.student_prompt_template, chat_template)
            seq = build_sequence(
                encode(tokenizer, prompt, add_special_tokens=special),
                encode_response(tokenizer, ex.response, add_eos=params.add_eos_token),
                block_size=params.block_size,
                example_index=i,
            )
        if seq is None:
            dropped += 1
        else:
            out.append(seq)
    return out, dropped
