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
from dataclasses import dataclass, field
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
    place: str = ""  # where it came from, for messages: "d.jsonl line 7"

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


class BadRow(ValueError):
    """A row (or line) that cannot be used; the message says why. `rows_to_examples` names the file and place,
    and either stops the run or, with --skip-bad-rows, records it and goes on."""


@dataclass
class SkippedRow:
    """A row left out by --skip-bad-rows: the file, where in it ("line 7", "row 7") and why."""

    file: str
    place: str
    reason: str

    def __str__(self) -> str:
        return f"{self.place} {self.reason}"


@dataclass
class RawRows:
    """The raw rows of one split, each with its place in the file: "line N" of a JSON-lines or CSV file, "row N"
    of a JSON list, a parquet file or a datasets folder. `skipped` holds the lines that could not be read as a
    row at all (only with --skip-bad-rows; without it they stop the run)."""

    rows: list[dict[str, Any]]
    where: str
    places: list[str]
    skipped: list[SkippedRow] = field(default_factory=list)


SKIP_HINT = "; fix it, or pass --skip-bad-rows to leave such rows out"


def read_rows(
    data_path: str, split: str, *, required: bool = True, train_split: str = "train", skip_bad: bool = False
) -> RawRows | None:
    """Read the raw rows of one split, or None when an optional split is absent."""
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
        return _read_jsonl(path, skip_bad)
    if suffix == ".json":
        return _read_json(path, skip_bad)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise UserError(f"--data-path: '{path}' is not a readable parquet file ({_one_line(e)})") from None
        return RawRows(rows, path, _numbered(rows))
    raise UserError(f"--data-path: unsupported file type '{suffix}' of '{path}'; use .jsonl, .json, .csv or .parquet")


def _numbered(rows: Sequence[Any]) -> list[str]:
    return [f"row {i}" for i in range(1, len(rows) + 1)]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


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


def _json_row(text: str) -> dict[str, Any]:
    """One JSON-lines line as a row, or BadRow saying what is wrong with it."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRow(f"is not valid JSON ({e.msg})") from None
    except RecursionError:
        raise BadRow("is not valid JSON (nested too deeply)") from None
    if not isinstance(row, dict):
        raise BadRow("is not a JSON object; each line must be {...}")
    return row


def _read_jsonl(path: str, skip_bad: bool) -> RawRows:
    """Line by line, so that one damaged line (not UTF-8, not JSON, not an object) is named, or skipped."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    out = RawRows([], path, [])
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        try:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadRow(f"is not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None
            if not line.strip():
                continue
            out.rows.append(_json_row(line))
            out.places.append(f"line {lineno}")
        except BadRow as e:
            if not skip_bad:
                raise UserError(f"--data-path: {path} line {lineno} {e}{SKIP_HINT}") from None
            out.skipped.append(SkippedRow(path, f"line {lineno}", str(e)))
    return out


def _read_json(path: str, skip_bad: bool) -> RawRows:
    content = _read_text(path)
    try:
        data = json.loads(content)
    except RecursionError:
        raise UserError(f"--data-path: {path} is not valid JSON (nested too deeply)") from None
    except json.JSONDecodeError as e:
        # Many ".json" files are really JSON lines: then the JSON-lines reader names the bad line.
        first = content.lstrip().split("\n", 1)[0]
        if "\n" in content.strip() and first.startswith("{"):
            try:
                json.loads(first)
            except (json.JSONDecodeError, RecursionError):
                pass
            else:
                return _read_jsonl(path, skip_bad)
        raise UserError(f"--data-path: {path} line {e.lineno} is not valid JSON ({e.msg})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]  # a single row, as in a one-line JSON-lines file
    if not isinstance(data, list):
        raise UserError(f"--data-path: {path} must hold a list of JSON objects (or be JSON lines)")
    out = RawRows([], path, [])
    for place, row in zip(_numbered(data), data, strict=True):
        if isinstance(row, dict):
            out.rows.append(row)
            out.places.append(place)
        elif skip_bad:
            out.skipped.append(SkippedRow(path, place, "is not a JSON object"))
        else:
            raise UserError(f"--data-path: {path} {place} is not a JSON object; the file must hold a list of "
                            f"JSON objects{SKIP_HINT}")
    return out


def _read_csv(path: str) -> RawRows:
    """A header line, then one row per record (a quoted field may span lines: a row's place is the line it
    starts on). A malformed file stops at the line the parser gave up on."""
    # utf-8-sig: spreadsheet programs start CSV files with a byte-order mark.
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    csv.field_size_limit(2**31 - 1)  # a long text in one cell is data, not an error
    out = RawRows([], path, [])
    start = 2
    try:
        for row in reader:
            out.rows.append(row)
            out.places.append(f"line {start}")
            start = reader.line_num + 1
    except csv.Error as e:
        raise UserError(f"--data-path: {path} line {reader.line_num} is not valid CSV ({_one_line(e)})") from None
    return out


def _read_datasets_folder(path: str, split: str, *, required: bool, train_split: str) -> RawRows | None:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises many types for a damaged folder
        raise UserError(f"--data-path: '{path}' is not a readable datasets folder ({_one_line(e)}); save it "
                        "again with Dataset.save_to_disk, or export it as JSON lines") from None
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
    rows = loaded.to_list()
    return RawRows(rows, path, _numbered(rows))


# ----------------------------------------------------------------------------------------------- examples


def _kind(row: dict[str, Any], params: LLMTrainingParams) -> str | None:
    if "messages" in row:
        return "messages"
    if params.prompt_text_column in row:
        return "pair"
    if params.text_column in row:
        return "text"
    return None


def rows_to_examples(
    rows: Sequence[dict[str, Any]], params: LLMTrainingParams, where: str, places: Sequence[str] | None = None,
    skipped: list[SkippedRow] | None = None,
) -> list[Example]:
    """Map raw rows to examples; the first row decides the format, every row must follow it. A row that cannot
    be used stops the run with its place named, or, when `skipped` is given (--skip-bad-rows), is recorded there
    and left out."""
    if not rows:
        raise UserError(f"--data-path: {where} holds no rows; add at least one example")
    places = list(places) if places is not None else _numbered(rows)
    pc, rc, tc = params.prompt_text_column, params.response_column, params.text_column
    first = next((j for j, row in enumerate(rows) if _kind(row, params)), None) if skipped is not None else 0
    kind = _kind(rows[first], params) if first is not None else None
    if kind is None:
        raise UserError(
            f"--data-path: {where} {places[0]} has columns {sorted(map(str, rows[0]))}, expected '{tc}' "
            f"(--text-column), '{pc}'+'{rc}' (--prompt-text-column/--response-column) or 'messages'"
        )
    if kind == "pair" and rc not in rows[first] and not params.use_distillation:
        raise UserError(
            f"--data-path: {where} {places[first]} has a '{pc}' column but no '{rc}' column (--response-column); "
            "fine-tuning needs responses (or add --use-distillation to let the teacher write them)"
        )
    examples: list[Example] = []
    for i, (row, place) in enumerate(zip(rows, places, strict=True), 1):
        try:
            ex = _row_to_example(row, kind, params)
        except BadRow as e:
            if skipped is None:
                raise UserError(f"--data-path: {where} {place} {e}{SKIP_HINT}") from None
            skipped.append(SkippedRow(where, place, str(e)))
            continue
        ex.source_row, ex.place = i, f"{where} {place}"
        examples.append(ex)
    return examples


def _need_str(row: dict[str, Any], col: str, flag_name: str) -> str:
    if col not in row or row[col] is None:
        raise BadRow(f"has no '{col}' column ({flag_name}); every row needs it")
    return _text(row[col], f"column '{col}'")


def _text(value: Any, what: str) -> str:
    """A string that can be tokenized: text, not another JSON type, and no lone surrogates (which JSON's
    \\ud800 escapes can produce and no tokenizer can encode)."""
    if not isinstance(value, str):
        raise BadRow(f"{what} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRow(f"{what} holds a lone surrogate (\\u{ord(value[e.start]):04x}), which is not text") from None
    return value


def _row_to_example(row: dict[str, Any], kind: str, params: LLMTrainingParams) -> Example:
    if kind == "text":
        text = _need_str(row, params.text_column, "--text-column")
        if not text.strip():
            raise BadRow(f"has an empty '{params.text_column}'")
        if params.use_distillation:
            return Example(messages=[{"role": "user", "content": text}])
        return Example(text=text)
    if kind == "pair":
        prompt = _need_str(row, params.prompt_text_column, "--prompt-text-column")
        response = row.get(params.response_column)
        if response is None and not params.use_distillation:
            raise BadRow(f"has no '{params.response_column}' (--response-column)")
        if response is not None:
            response = _text(response, f"column '{params.response_column}'")
        return Example(messages=[{"role": "user", "content": prompt}], response=response)
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRow("'messages' must be a non-empty list of {role, content}")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRow("has a message without string 'role' and 'content'")
        _text(m["role"], "a message's 'role'")
        _text(m["content"], "a message's 'content'")
    last_assistant = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if params.use_distillation and messages[-1]["role"] == "user":
        last_assistant = None  # the conversation waits for an answer: the teacher writes it
    if last_assistant is None:
        if not params.use_distillation:
            raise BadRow("has no assistant turn to train on")
        history, response = messages, None
    else:
        history, response = messages[:last_assistant], messages[last_assistant]["content"]
    if not history or history[-1]["role"] != "user":
        raise BadRow("has a response that does not follow a user turn")
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


@dataclass
class Loaded:
    """A run's examples: training, held out (the validation split or the rows drawn by `held_out_rows`), and the
    rows left out by --skip-bad-rows."""

    train: list[Example]
    valid: list[Example]
    skipped: list[SkippedRow]


def read_examples(params: LLMTrainingParams) -> Loaded:
    """Training and validation examples: the validation split, or without one the rows `held_out_rows` picks
    (before --max-samples caps the training rows)."""
    skipping = params.skip_bad_rows
    raw = read_rows(params.data_path or "", params.train_split, required=True, train_split=params.train_split,
                    skip_bad=skipping)
    assert raw is not None
    skipped = raw.skipped
    if not raw.rows:
        _nothing_left(raw.where, skipped)
    sink = skipped if skipping else None
    if not params.valid_split and len(raw.rows) >= MIN_ROWS_TO_HOLD_OUT and params.holdout_share > 0:
        # every row is checked (its errors name its line), then split
        every = rows_to_examples(raw.rows, params, raw.where, raw.places, sink)
        held = set(held_out_rows(len(every), params.holdout_share, params.seed))
        train = [ex for i, ex in enumerate(every) if i not in held][: params.max_samples]
        valid = [ex for i, ex in enumerate(every) if i in held]
    else:
        rows, places = raw.rows[: params.max_samples], raw.places[: params.max_samples]
        train = rows_to_examples(rows, params, raw.where, places, sink)
        valid = []
    if params.valid_split:
        if os.path.isfile(params.data_path or ""):
            raise UserError("--valid-split needs --data-path to be a folder holding the split files")
        got = read_rows(params.data_path or "", params.valid_split, required=True, train_split=params.train_split,
                        skip_bad=skipping)
        assert got is not None
        skipped += got.skipped
        if not got.rows:
            _nothing_left(got.where, skipped)
        valid = rows_to_examples(got.rows, params, got.where, got.places, sink)
        if not valid:
            _nothing_left(got.where, skipped)
    if not train:
        _nothing_left(raw.where, skipped)
    skipped.sort(key=lambda s: (s.file != raw.where, int(s.place.rsplit(" ", 1)[-1])))  # in file order
    return Loaded(train, valid, skipped)


def skipped_summary(skipped: Sequence[SkippedRow], n_kept: int) -> str:
    """What --skip-bad-rows left out, for the console: how many, the commonest reasons, the first."""
    from collections import Counter

    reasons = Counter(s.reason.split(" (")[0] for s in skipped)
    return (f"--skip-bad-rows: left out {len(skipped)} of {len(skipped) + n_kept} rows "
            f"({', '.join(f'{n} {why}' for why, n in reasons.most_common(3))}); the first: {skipped[0]}")


def _nothing_left(where: str, skipped: list[SkippedRow]) -> None:
    if not skipped:
        raise UserError(f"--data-path: {where} holds no rows; add at least one example")
    raise UserError(f"--data-path: {where}: every row was left out by --skip-bad-rows ({len(skipped)}; the first: "
                    f"{skipped[0]})")


def load_examples(params: LLMTrainingParams) -> tuple[list[Example], list[Example]]:
    """(training, held-out) examples; see `read_examples`."""
    loaded = read_examples(params)
    return loaded.train, loaded.valid


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
    tokenizer: Any, messages: Sequence[dict[str, str]], template: str, chat_template: str | None, *, place: str = ""
) -> tuple[str, bool]:
    """The prompt text a model sees, and whether the tokenizer should add its special tokens (BOS).

    The template applies to the last user turn. A chat template renders BOS itself, so then no special
    tokens are added; raw text gets the tokenizer's usual ones. A chat template that refuses a conversation
    (many raise on roles they do not expect) is the data's problem, named by `place`.
    """
    msgs = [dict(m) for m in messages]
    msgs[-1]["content"] = apply_template(template, msgs[-1]["content"])
    if chat_template is not None:
        try:
            text = tokenizer.apply_chat_template(msgs, chat_template=chat_template, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as e:  # jinja2's TemplateError, or whatever the template's own code raises
            roles = ", ".join(m.get("role", "?") for m in msgs)
            raise UserError(f"--data-path: {place or 'a row'}: the chat template refuses this conversation (roles: "
                            f"{roles}): {_one_line(e)}; fix the row, or choose another with --chat-template") from None
        return text, False
    return "\n\n".join(m["content"] for m in msgs), True


def encode_prompt(tokenizer: Any, ex: Example, template: str, chat_template: str | None) -> list[int]:
    """A message row's prompt ids as a model sees them: `render_prompt`, then its tokenizer."""
    assert ex.messages is not None
    prompt, special = render_prompt(tokenizer, ex.messages, template, chat_template, place=ex.place)
    return encode(tokenizer, prompt, add_special_tokens=special)


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
            seq = build_sequence(
                encode_prompt(tokenizer, ex, params.student_prompt_template, chat_template),
                encode_response(tokenizer, ex.response, add_eos=params.add_eos_token),
                block_size=params.block_size,
                example_index=i,
            )
        if seq is None:
            dropped += 1
        else:
            out.append(seq)
    return out, dropped
