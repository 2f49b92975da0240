"""Rows -> `Example`s, in three row formats (the documented ones, plus chat), and which rows are held out.

- `{"text": ...}`: plain text. Fine-tuning trains on every token; with distillation the text is a *prompt*
  and the teacher writes the response.
- `{"prompt": ..., "response": ...}`: trains on the response tokens only.
- `{"messages": [{"role": ..., "content": ...}, ...]}`: the last assistant turn is the response, the turns
  before it are the prompt.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aitraining.data.files import SKIP_HINT, BadRow, SkippedRow, numbered, read_rows
from aitraining.errors import UserError


@dataclass(frozen=True)
class DataSettings:
    """Where the rows are and how they read: the data flags (named as the parameters; the defaults are the
    documented ones). `use_distillation`: rows may lack a response (the teacher writes it) and text rows are
    prompts."""
    data_path: str
    train_split: str = "train"
    valid_split: str | None = None
    holdout_share: float = 0.05
    text_column: str = "text"
    prompt_text_column: str = "prompt"
    response_column: str = "response"
    max_samples: int | None = None
    skip_bad_rows: bool = False
    seed: int = 42
    use_distillation: bool = False


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


    @property
    def prompt_text(self) -> str:
        """The user's text (its last message), for tables and samples."""
        return (self.messages or [{"content": self.text or ""}])[-1].get("content", "")


def _kind(row: dict[str, Any], settings: DataSettings) -> str | None:
    if "messages" in row:
        return "messages"
    if settings.prompt_text_column in row:
        return "pair"
    if settings.text_column in row:
        return "text"
    return None


def rows_to_examples(
    rows: Sequence[dict[str, Any]], settings: DataSettings, where: str, places: Sequence[str] | None = None,
    skipped: list[SkippedRow] | None = None,
) -> list[Example]:
    """Map raw rows to examples; the first row decides the format, every row must follow it. A row that cannot
    be used stops the run with its place named, or, when `skipped` is given (--skip-bad-rows), is recorded there
    and left out."""
    if not rows:
        raise UserError(f"--data-path: {where} holds no rows; add at least one example")
    places = list(places) if places is not None else numbered(rows)
    pc, rc, tc = settings.prompt_text_column, settings.response_column, settings.text_column
    first = next((j for j, row in enumerate(rows) if _kind(row, settings)), None) if skipped is not None else 0
    kind = _kind(rows[first], settings) if first is not None else None
    if kind is None:
        raise UserError(
            f"--data-path: {where} {places[0]} has columns {sorted(map(str, rows[0]))}, expected '{tc}' "
            f"(--text-column), '{pc}'+'{rc}' (--prompt-text-column/--response-column) or 'messages'"
        )
    if kind == "pair" and rc not in rows[first] and not settings.use_distillation:
        raise UserError(
            f"--data-path: {where} {places[first]} has a '{pc}' column but no '{rc}' column (--response-column); "
            "fine-tuning needs responses (or add --use-distillation to let the teacher write them)"
        )
    examples: list[Example] = []
    for i, (row, place) in enumerate(zip(rows, places, strict=True), 1):
        try:
            ex = _row_to_example(row, kind, settings)
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


def _row_to_example(row: dict[str, Any], kind: str, settings: DataSettings) -> Example:
    if kind == "text":
        text = _need_str(row, settings.text_column, "--text-column")
        if not text.strip():
            raise BadRow(f"has an empty '{settings.text_column}'")
        if settings.use_distillation:
            return Example(messages=[{"role": "user", "content": text}])
        return Example(text=text)
    if kind == "pair":
        prompt = _need_str(row, settings.prompt_text_column, "--prompt-text-column")
        response = row.get(settings.response_column)
        if response is None and not settings.use_distillation:
            raise BadRow(f"has no '{settings.response_column}' (--response-column)")
        if response is not None:
            response = _text(response, f"column '{settings.response_column}'")
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
    if settings.use_distillation and messages[-1]["role"] == "user":
        last_assistant = None  # the conversation waits for an answer: the teacher writes it
    if last_assistant is None:
        if not settings.use_distillation:
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
    n = min(max(1, round(share * n_rows)), n_rows - 1)
    return sorted(random.Random(seed).sample(range(n_rows), n))


@dataclass
class Loaded:
    """A run's examples: training, held out (the validation split or the rows drawn by `held_out_rows`), and the
    rows left out by --skip-bad-rows."""
    train: list[Example]
    valid: list[Example]
    skipped: list[SkippedRow]


def read_examples(settings: DataSettings) -> Loaded:
    """Training and validation examples: the validation split, or without one the rows `held_out_rows` picks
    (before --max-samples caps the training rows)."""
    skipping = settings.skip_bad_rows
    raw = read_rows(settings.data_path, settings.train_split, required=True, train_split=settings.train_split,
                    skip_bad=skipping)
    assert raw is not None
    skipped = raw.skipped
    if not raw.rows:
        _nothing_left(raw.where, skipped)
    sink = skipped if skipping else None
    if not settings.valid_split and len(raw.rows) >= MIN_ROWS_TO_HOLD_OUT and settings.holdout_share > 0:
        # every row is checked (its errors name its line), then split
        every = rows_to_examples(raw.rows, settings, raw.where, raw.places, sink)
        held = set(held_out_rows(len(every), settings.holdout_share, settings.seed))
        train = [ex for i, ex in enumerate(every) if i not in held][: settings.max_samples]
        valid = [ex for i, ex in enumerate(every) if i in held]
    else:
        rows, places = raw.rows[: settings.max_samples], raw.places[: settings.max_samples]
        train = rows_to_examples(rows, settings, raw.where, places, sink)
        valid = []
    if settings.valid_split:
        if os.path.isfile(settings.data_path):
            raise UserError("--valid-split needs --data-path to be a folder holding the split files")
        got = read_rows(settings.data_path, settings.valid_split, required=True, train_split=settings.train_split,
                        skip_bad=skipping)
        assert got is not None
        skipped += got.skipped
        if not got.rows:
            _nothing_left(got.where, skipped)
        valid = rows_to_examples(got.rows, settings, got.where, got.places, sink)
        if not valid:
            _nothing_left(got.where, skipped)
    if not train:
        _nothing_left(raw.where, skipped)
    skipped.sort(key=lambda s: (s.file != raw.where, int(s.place.rsplit(" ", 1)[-1])))  # in file order
    return Loaded(train, valid, skipped)


def skipped_summary(skipped: Sequence[SkippedRow], n_kept: int) -> str:
    """What --skip-bad-rows left out, for the console: how many, the commonest reasons, the first."""
    reasons = Counter(s.reason.split(" (")[0] for s in skipped)
    return (f"--skip-bad-rows: left out {len(skipped)} of {len(skipped) + n_kept} rows "
            f"({', '.join(f'{n} {why}' for why, n in reasons.most_common(3))}); the first: {skipped[0]}")


def _nothing_left(where: str, skipped: list[SkippedRow]) -> None:
    if not skipped:
        raise UserError(f"--data-path: {where} holds no rows; add at least one example")
    raise UserError(f"--data-path: {where}: every row was left out by --skip-bad-rows ({len(skipped)}; the first: "
                    f"{skipped[0]})")
