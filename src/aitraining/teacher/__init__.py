"""The teacher as a plug-in: `open_source(settings, ...)` returns a `TeacherSource`, and the training loop, the
evaluation and the baseline comparison reach the teacher only through it.

    settings.py   TeacherSettings: the teacher flags
    path.py       DistillPath: same vocabulary, across vocabularies, or text only (from the two tokenizers)
    engine.py     the teacher model in this process: writes answers (recording its distribution) and scores them
    phase.py      the teacher phase: answers and targets, once, resumable, whatever engine made them
    cache.py      the files it leaves: teacher_outputs.jsonl and teacher_cache/<settings-hash>/
    server.py     the teacher behind an OpenAI-compatible server: writes and scores like the engine, into the cache
    sources.py    the sources: the cache (default) and the live teacher

A source is used in this order: `prepare(examples)` once (the teacher answers prompt-only rows and, for the cache,
its targets are stored), then `targets(items)` at every step, `free()` when done. `scorer()` gives a source that
can score any items on demand (the student's own answers, on-policy); `facts()` what the run record keeps of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol

import torch

from aitraining.data.examples import Example
from aitraining.signal import Targets, VocabularyMap
from aitraining.teacher.cache import OUTPUTS_FILE
from aitraining.teacher.engine import Engine
from aitraining.teacher.path import DistillPath, choose_path
from aitraining.teacher.phase import TeacherItem
from aitraining.teacher.server import ServerEngine
from aitraining.teacher.settings import TeacherSettings
from aitraining.teacher.sources import CachedSource, LiveSource

__all__ = ["OUTPUTS_FILE", "DistillPath", "TeacherItem", "TeacherSettings", "TeacherSource", "choose_path",
           "open_source"]


class TeacherSource(Protocol):
    """Where the student's teacher signal comes from (see the module)."""

    def prepare(self, examples: Sequence[Example], *, is_main: bool = True, wait: Callable[[], None] = lambda: None,
                show_progress: bool = True) -> list[TeacherItem | None]:
        """One item per example (the teacher's answer to a prompt-only row, the given response otherwise; None
        where no response token is left); made once and kept on disk, so a rerun does only what is missing. Only
        the main process runs the teacher; the others `wait`, then read what it wrote."""
        ...

    def targets(self, items: Sequence[Any]) -> Targets:
        """The teacher at the items' trained positions (`batches.Item`: `input_ids`, `n_prompt`, `target_key`,
        `teacher_prompt`, `teacher_rows`), row by row, in the order the loss takes them."""
        ...

    def scorer(self) -> TeacherSource:
        """A source whose `targets` score any items, also ones it never prepared (the student's own answers)."""
        ...

    def facts(self) -> dict[str, Any]:
        """Figures of the source for the run record (the cache's size)."""
        ...

    def free(self) -> None:
        """Release the teacher's memory (it loads again if asked for more)."""
        ...


def open_source(settings: TeacherSettings, *, project_dir: str, device: torch.device, path: DistillPath,
                tokenizer: Any = None, vocab: VocabularyMap | None = None, exact: bool = False) -> TeacherSource:
    """The teacher source that --teacher-source names: the cache (default), the live teacher, or the cache filled by a
    server (teacher/server.py). Its files go to
    `project_dir`. `tokenizer`: the teacher's, if the caller loaded it already; `vocab`: the map onto the
    student's vocabulary, which the cross-vocabulary path needs. `exact`: the judge's reference, the teacher live
    in float32 whatever the run trains in."""
    if settings.teacher_source == "server" and not exact:
        # A server gives its top-k log-probs, no draws from the rest: the rest is one bucket.
        settings = replace(settings, distill_tail_samples=0)
        engine: Engine | ServerEngine = ServerEngine(settings, tokenizer)
    else:
        engine = Engine(settings, device, tokenizer, dtype=torch.float32 if exact else None)
    if path.mode == "cross-vocabulary":
        if vocab is None:
            raise ValueError("open_source: the cross-vocabulary path needs the vocabulary map")
        engine.projection = vocab
    if isinstance(engine, Engine) and (exact or (settings.teacher_source == "live" and path.needs_targets)):
        return LiveSource(engine, settings, project_dir)
    return CachedSource(engine, settings, project_dir, path)
