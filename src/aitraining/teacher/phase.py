"""The teacher phase: the teacher answers the prompt-only rows (teacher_outputs.jsonl) and its distribution on every
answer token goes into the cache, once; a rerun or a resumed run does only what is missing.

It runs with any engine that can write and score (`Engine`: the model in this process): what an engine gives is
stored the same way, under keys made of the teacher's identity, its settings and the token ids, so the training
loop never knows which engine made it. Only the main process runs the engine; the others wait, then read.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from aitraining.data.examples import Example
from aitraining.params import digest
from aitraining.signal import TeacherTargets
from aitraining.teacher.cache import OUTPUTS_FILE, TargetCache, cut_torn_line, jsonl_records
from aitraining.teacher.settings import TeacherSettings


@dataclass
class TeacherItem:
    """What the student needs of one example: the response ids, where the teacher targets are, and the
    teacher's own prompt (for a live teacher)."""

    response_ids: list[int]
    target_key: str
    teacher_prompt: list[int]
    ended: bool = True  # the teacher ended the answer itself (its last id is a stop token), not the length limit


class Writer(Protocol):
    """What the phase needs of an engine."""

    tokenizer: Any
    batch_size: int  # prompts per call of `generate` and pairs per call of `score`

    def identity(self) -> dict[str, Any]: ...
    def prompt_ids(self, ex: Example) -> list[int]: ...
    def response_ids(self, text: str, *, add_eos: bool) -> list[int]: ...
    def stop_ids(self) -> set[int]: ...
    def generate(self, prompts: Sequence[list[int]], *, record: bool = True
                 ) -> Iterable[tuple[list[int], TeacherTargets | None]]: ...
    def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> Iterable[TeacherTargets]: ...


def teacher_phase(engine: Writer, settings: TeacherSettings, examples: Sequence[Example], project_dir: str,
                  cache: TargetCache | None, *, is_main: bool = True, wait: Callable[[], None] = lambda: None,
                  show_progress: bool = True) -> list[TeacherItem | None]:
    """Every example's response (the teacher's own for prompt-only rows) as a `TeacherItem`, None for one that
    yields no response token; with a `cache` (the main process of a cached source), the teacher's targets on every
    response are in it afterwards: recorded while it wrote its answers, scored for the given ones."""
    prompt_ids = [engine.prompt_ids(ex) for ex in examples]
    generation = {
        **engine.identity(),
        "max_new": settings.distill_max_teacher_length,
        "sample": settings.teacher_do_sample,
        "temperature": settings.teacher_sampling_temperature if settings.teacher_do_sample else None,
        "top_p": settings.teacher_top_p if settings.teacher_do_sample else None,
        "seed": settings.seed if settings.teacher_do_sample else None,
    }
    gen_keys = [digest({**generation, "prompt": ids}) for ids in prompt_ids]
    outputs_path = os.path.join(project_dir, OUTPUTS_FILE)
    if is_main:
        _write_answers(engine, settings, examples, prompt_ids, gen_keys, outputs_path, cache, show_progress)
    wait()
    items, to_score = _items(engine, settings, examples, prompt_ids, gen_keys, outputs_path, cache)
    if cache is not None and to_score:
        _score(engine, settings, examples, items, prompt_ids, to_score, cache, show_progress)
    return items


def _write_answers(engine: Writer, settings: TeacherSettings, examples: Sequence[Example], prompt_ids: list[list[int]],
                   gen_keys: list[str], outputs_path: str, cache: TargetCache | None, show_progress: bool) -> None:
    """The teacher's answers to the prompt-only rows it has not answered yet, appended to the outputs file as they
    come (with their recorded targets into the cache)."""
    cut_torn_line(outputs_path)
    outputs = read_outputs(outputs_path)
    # One generation per distinct prompt: repeated rows share the answer (and its cache entry).
    wanted = list({gen_keys[i]: i for i, ex in reversed(list(enumerate(examples))) if ex.response is None}.values())
    batches = same_batches(wanted, lambda i: len(prompt_ids[i]), engine.batch_size,
                           lambda i: gen_keys[i] not in outputs)
    if not batches:
        return
    missing = sum(gen_keys[i] not in outputs for i in wanted)
    with tqdm(total=missing, desc="teacher: writing responses", unit="prompt", disable=not show_progress) as bar:
        rate = _TokenRate(bar)
        stop = engine.stop_ids()
        with open(outputs_path, "a", encoding="utf-8") as f:
            for b, batch in batches:
                torch.manual_seed(settings.seed + b)  # a sampling teacher draws the same whatever ran before
                results = engine.generate([prompt_ids[i] for i in batch], record=cache is not None)
                for i, (resp_ids, targets) in zip(batch, results, strict=True):
                    if gen_keys[i] in outputs:
                        continue  # written before a kill; its batch ran again only to stay the same batch
                    key = target_key(prompt_ids[i], resp_ids[: settings.distill_max_teacher_length])
                    if cache is not None and targets is not None and key not in cache:
                        cache.add(key, targets)
                    rec = {
                        "key": gen_keys[i],
                        "row": examples[i].source_row,
                        "prompt": examples[i].prompt_text if examples[i].messages else "",
                        "response": engine.tokenizer.decode(resp_ids, skip_special_tokens=True),
                        "response_ids": resp_ids,
                        "finished": bool(resp_ids) and resp_ids[-1] in stop,
                    }
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    f.flush()
                    bar.update(1)
                    rate.add(len(resp_ids))


def _items(engine: Writer, settings: TeacherSettings, examples: Sequence[Example], prompt_ids: list[list[int]],
           gen_keys: list[str], outputs_path: str, cache: TargetCache | None
           ) -> tuple[list[TeacherItem | None], list[int]]:
    """Each example's item, and the rows whose given response the cache still lacks (each distinct one once)."""
    outputs = read_outputs(outputs_path)
    items: list[TeacherItem | None] = []
    to_score: list[int] = []
    scheduled: set[str] = set()
    for i, ex in enumerate(examples):
        if ex.response is None:
            rec = outputs.get(gen_keys[i])
            if rec is None:
                raise RuntimeError(f"teacher output for row {ex.source_row} is missing from {outputs_path}")
            resp = list(rec["response_ids"])
            ended = bool(rec.get("finished", True))
        else:
            # In the teacher's tokens: the same as the student's on the same-vocabulary path.
            resp = engine.response_ids(ex.response, add_eos=settings.add_eos_token)
            ended = settings.add_eos_token and engine.tokenizer.eos_token_id is not None
        ended = ended and len(resp) <= settings.distill_max_teacher_length
        resp = resp[: settings.distill_max_teacher_length]
        if not resp:
            items.append(None)
            continue
        key = target_key(prompt_ids[i], resp)
        items.append(TeacherItem(resp, key, prompt_ids[i], ended))
        if cache is not None and key not in cache and key not in scheduled:
            scheduled.add(key)  # repeated rows are scored once
            to_score.append(i)
    return items, to_score


def _score(engine: Writer, settings: TeacherSettings, examples: Sequence[Example], items: list[TeacherItem | None],
           prompt_ids: list[list[int]], to_score: list[int], cache: TargetCache, show_progress: bool) -> None:
    """The teacher's targets on the given responses the cache lacks. The batches are cut from every row the
    teacher scores (the given responses), cached or not (`same_batches`)."""
    pending = set(to_score)
    scoring = dict({it.target_key: (i, it) for i, (ex, it) in enumerate(zip(examples, items, strict=True))
                    if it is not None and (ex.response is not None or i in pending)}.values())  # row -> item
    batches = same_batches(list(scoring), lambda i: len(prompt_ids[i]) + len(scoring[i].response_ids),
                           engine.batch_size, lambda i: scoring[i].target_key not in cache)
    with tqdm(total=len(to_score), desc="teacher: scoring responses", unit="row", disable=not show_progress) as bar:
        rate = _TokenRate(bar)
        for _, batch in batches:
            pairs = [(prompt_ids[i], scoring[i].response_ids) for i in batch]
            for i, targets in zip(batch, engine.score(pairs), strict=True):
                if scoring[i].target_key not in cache:
                    cache.add(scoring[i].target_key, targets)
                    bar.update(1)
                    rate.add(len(targets))


class _TokenRate:
    """Answer tokens per second beside a progress bar's rows per second."""

    def __init__(self, bar: Any) -> None:
        self.bar, self.tokens, self.started = bar, 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.bar.set_postfix_str(f"{self.tokens / max(time.perf_counter() - self.started, 1e-9):.1f} tokens/s",
                                 refresh=False)


def read_outputs(path: str) -> dict[str, dict[str, Any]]:
    return {rec["key"]: rec for rec in jsonl_records(path)}


def same_batches(rows: list[int], length: Callable[[int], int], size: int, missing: Callable[[int], bool]
                 ) -> list[tuple[int, list[int]]]:
    """(index, rows) of the teacher's batches that hold a row still missing. The batches are cut from every row,
    done or not, sorted by length: a rerun after a kill runs the same batches as an uninterrupted run, so the
    same padding and the same float rounding give the same responses and targets, bit for bit (a batch that was
    half written runs whole again; its rows already on disk are not written twice)."""
    order = sorted(rows, key=length)
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    return [(b, batch) for b, batch in enumerate(batches) if any(missing(i) for i in batch)]


def target_key(prompt_ids: list[int], response_ids: list[int]) -> str:
    return digest({"prompt": prompt_ids, "response": response_ids})
