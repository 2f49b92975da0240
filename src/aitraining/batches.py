"""The student's token sequences and how they are batched: an `Item` per example (its prompt and response ids and
where its teacher signal is), micro-batches of an epoch, passes of rows of similar length, padded tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from aitraining.data.examples import Example
from aitraining.data.templates import encode, encode_prompt, encode_response
from aitraining.padding import padded

CPU_FORWARD_TOKENS = 128  # see forward_cost_in_tokens


@dataclass(frozen=True)
class StudentSettings:
    """The student, how it reads its rows and its LoRA adapter: the flags named as the parameters (the defaults are
    the documented ones; `LLMTrainingParams.settings(StudentSettings)` gives a run's)."""

    model: str
    student_prompt_template: str = "{input}"
    chat_template: str | None = None
    block_size: int = 1024
    add_eos_token: bool = True
    trust_remote_code: bool = False
    token: str | None = None
    allow_pickle_weights: bool = False
    peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str = "all-linear"


@dataclass
class Item:
    """A student sequence, of which positions >= n_prompt are trained, and where its teacher signal is."""

    input_ids: list[int]
    n_prompt: int
    target_key: str | None = None
    teacher_prompt: list[int] | None = None
    teacher_rows: list[int] | None = None  # per response token, its teacher row (another vocabulary; -1: none)

    @property
    def n_response(self) -> int:
        return len(self.input_ids) - self.n_prompt


def build_sequence(prompt_ids: list[int], response_ids: list[int], *, block_size: int) -> Item | None:
    """Prompt + response cut to `block_size` (the response's end is cut); None if no response token fits."""
    room = block_size - len(prompt_ids)
    if room < 1 or not response_ids:
        return None
    return Item(prompt_ids + response_ids[:room], len(prompt_ids))


def sft_items(examples: Sequence[Example], tokenizer: Any, *, template: str, chat_template: str | None,
              block_size: int, add_eos: bool) -> list[Item | None]:
    """The student's sequence of each example for plain fine-tuning (None where nothing trainable fits): a text
    row trains on every token, a prompt/response row on the response."""
    out: list[Item | None] = []
    for ex in examples:
        if ex.is_text:
            ids = encode(tokenizer, ex.text or "", add_special_tokens=True)
            if add_eos and tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
            out.append(Item(ids[:block_size], 0) if len(ids) > 1 else None)
        else:
            assert ex.messages is not None and ex.response is not None
            out.append(build_sequence(encode_prompt(tokenizer, ex, template, chat_template),
                                      encode_response(tokenizer, ex.response, add_eos=add_eos), block_size=block_size))
    return out


def student_prompts(examples: Sequence[Example], tokenizer: Any, template: str, chat_template: str | None
                    ) -> list[list[int] | None]:
    """Each example's prompt as the student sees it (its own template and chat template), None for a text row."""
    return [None if ex.messages is None else encode_prompt(tokenizer, ex, template, chat_template) for ex in examples]


def taught_items(source: Any, examples: Sequence[Example], tokenizer: Any, *, template: str,
                 chat_template: str | None, block_size: int, aligner: Any = None,
                 **prepare: Any) -> list[Item | None]:
    """The student's sequence of each example (None where none fits) with the teacher's answer and where its
    targets are: the teacher source prepares them (`TeacherSource.prepare`, which gets `prepare`).

    A row whose prompt alone fills --block-size trains nothing: the teacher neither answers nor scores it (one
    such row of 1,414 tokens among 64 took two thirds of the teacher's time in benchmarks/vs_trl.py)."""
    prompts = student_prompts(examples, tokenizer, template, chat_template)
    fits = [i for i, p in enumerate(prompts) if p is not None and len(p) < block_size]
    fitting = source.prepare([examples[i] for i in fits], **prepare)
    teacher_items: list[Any] = [None] * len(examples)
    for i, t in zip(fits, fitting, strict=True):
        teacher_items[i] = t
    return student_items(prompts, teacher_items, block_size=block_size, aligner=aligner)


def student_items(prompts: Sequence[list[int] | None], teacher_items: Sequence[Any], *, block_size: int,
                  aligner: Any = None) -> list[Item | None]:
    """The student's sequence of each example: its prompt (`student_prompts`) + the response ids the teacher
    scored, or, for a teacher with another tokenizer (`aligner`: an `align.ResponseAligner`), the answer's text
    in the student's tokens with the teacher row of each."""
    items: list[Item | None] = []
    for prompt, t in zip(prompts, teacher_items, strict=True):
        if t is None or prompt is None:
            items.append(None)
            continue
        response, rows = t.response_ids, None
        if aligner is not None:
            aligned = aligner(t.response_ids, t.ended)
            response, rows = aligned.student_ids, aligned.teacher_rows
        seq = build_sequence(prompt, response, block_size=block_size)
        if seq is None:
            items.append(None)
            continue
        kept = None if rows is None else rows[: seq.n_response]
        items.append(Item(seq.input_ids, seq.n_prompt, t.target_key, t.teacher_prompt, kept))
    return items


def collate(items: Sequence[Item], pad_id: int) -> dict[str, torch.Tensor]:
    ids, mask = padded([it.input_ids for it in items], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "n_prompt": torch.tensor([it.n_prompt for it in items])}


def epoch_micro_batches(n_items: int, batch_size: int, seed: int, epoch: int, rank: int, world: int
                        ) -> list[list[int]]:
    """This process's micro-batches of one epoch: a seeded shuffle, cut into global batches of
    batch_size x world rows, of which this rank takes its slice (possibly empty at the very end)."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n_items, generator=g).tolist()
    return [order[start + rank * batch_size : start + (rank + 1) * batch_size]
            for start in range(0, n_items, batch_size * world)]


def windows(micro: list[list[int]], accumulation: int) -> list[list[list[int]]]:
    return [micro[i : i + accumulation] for i in range(0, len(micro), accumulation)]


def length_groups(lengths: Sequence[int], per_forward: int | None) -> list[list[int]]:
    """The rows of one micro-batch (their indices) cut into groups of similar length, each run as its own forward
    and backward: the same gradient (Note [One reduction] in loop.py: the loss is a sum over tokens) with less padding.

    The rows sorted by length are split into consecutive groups that minimize the tokens computed: each group's
    rows times its longest, plus `per_forward` tokens for every extra forward pass (what a pass costs beyond its
    tokens). None keeps the micro-batch whole."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    if per_forward is None or len(order) < 2:
        return [order]
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[j]: the cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lengths[order[j - 1]] + per_forward
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def forward_cost_in_tokens(device: torch.device, world: int) -> int | None:
    """What one more forward and backward pass costs, in tokens, for `length_groups`; None: one pass per
    micro-batch. Only a single process on a CPU splits micro-batches: there an extra pass cost 50-130 tokens'
    worth for the 56.6M-parameter benchmark student (rows of 64-256 tokens; BENCHMARKS.md, "Again on a machine
    without bfloat16"); on a GPU small passes waste the device, unmeasured here; and under FSDP or ZeRO-3 every
    forward gathers weights across processes, so every rank must run as many."""
    return CPU_FORWARD_TOKENS if device.type == "cpu" and world == 1 else None
