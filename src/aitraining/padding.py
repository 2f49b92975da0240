"""Rows of token ids as one padded batch: the one place that pads, and the pad id every caller uses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def pad_id(tokenizer: Any) -> int:
    """The id that fills padding: the tokenizer's pad token, else its EOS, else 0. Padding is always masked out, so
    any real id does; `models.load.load_tokenizer` gives a tokenizer without a pad token its EOS."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def padded(rows: Sequence[Sequence[int]], pad: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), both (len(rows), longest row) int64: each row from the start (or, with `left`,
    up to the end, as generation wants its prompts), the rest `pad` with mask 0."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        at = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, at] = torch.tensor(list(row), dtype=torch.long)
        mask[i, at] = 1
    return ids, mask
