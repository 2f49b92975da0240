"""Rows on disk: a .jsonl/.json/.csv/.parquet file, a folder of split files or a datasets folder, each row with
its place in the file ("line 7", "row 7") so that a bad one is named, or left out with --skip-bad-rows."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from aitraining.errors import UserError, one_line

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


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
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise UserError(f"--data-path: '{path}' is not a readable parquet file ({one_line(e)})") from None
        return RawRows(rows, path, numbered(rows))
    raise UserError(f"--data-path: unsupported file type '{suffix}' of '{path}'; use .jsonl, .json, .csv or .parquet")


def numbered(rows: Sequence[Any]) -> list[str]:
    return [f"row {i}" for i in range(1, len(rows) + 1)]


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
    for place, row in zip(numbered(data), data, strict=True):
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
        raise UserError(f"--data-path: {path} line {reader.line_num} is not valid CSV ({one_line(e)})") from None
    return out


def _read_datasets_folder(path: str, split: str, *, required: bool, train_split: str) -> RawRows | None:
    import datasets  # lazy: only a datasets folder needs it, and it takes seconds to import

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises many types for a damaged folder
        raise UserError(f"--data-path: '{path}' is not a readable datasets folder ({one_line(e)}); save it "
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
    return RawRows(rows, path, numbered(rows))
