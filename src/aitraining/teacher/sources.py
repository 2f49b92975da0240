"""The two teacher sources of a run: the cache (the default: the teacher runs once and its targets are read from
disk at every step) and the live teacher (kept in memory, its exact distribution computed at every step)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from aitraining.data.examples import Example
from aitraining.errors import UserError
from aitraining.models.heads import output_head
from aitraining.signal import CrossTargets, DenseTargets, TeacherTargets
from aitraining.teacher.cache import TargetCache, cache_folder, cache_meta
from aitraining.teacher.engine import Engine
from aitraining.teacher.path import DistillPath
from aitraining.teacher.phase import TeacherItem, teacher_phase
from aitraining.teacher.server import ServerEngine
from aitraining.teacher.settings import TeacherSettings


class CachedSource:
    """The default source: the teacher answers and scores once (`teacher_phase`), and every step reads the
    targets from the cache. On the cross-vocabulary path each student token reads the teacher row that predicts the
    same text (`align.ResponseAligner`: the items' `teacher_rows`), whose distribution was projected onto the
    student's vocabulary before it was cached (Note [Across vocabularies] in signal.py)."""

    def __init__(self, engine: Engine | ServerEngine, settings: TeacherSettings, project_dir: str, path: DistillPath
                 ) -> None:
        self.engine, self.settings, self.project_dir, self.path = engine, settings, project_dir, path
        self.meta = cache_meta(engine.identity(), settings, engine.vocab, engine.projection)
        self.folder = cache_folder(project_dir, self.meta)
        self.cache: TargetCache | None = None

    def prepare(self, examples: Sequence[Example], *, is_main: bool = True, wait: Callable[[], None] = lambda: None,
                show_progress: bool = True) -> list[TeacherItem | None]:
        # Only the main process writes (and may cut a torn tail off) the cache; the others open it when it is done.
        writing = TargetCache(self.folder, self.meta) if is_main and self.path.needs_targets else None
        items = teacher_phase(self.engine, self.settings, examples, self.project_dir, writing, is_main=is_main,
                              wait=wait, show_progress=show_progress)
        self.engine.free()
        wait()
        if not self.path.needs_targets:  # the answers are all the sequence path needs
            return items
        self.cache = writing or TargetCache(self.folder, self.meta, readonly=True)
        missing = [it.target_key for it in items if it is not None and it.target_key not in self.cache]
        if missing:
            raise RuntimeError(f"{len(missing)} teacher targets are missing from {self.folder}")
        return items

    def targets(self, items: Sequence[Any]) -> TeacherTargets | CrossTargets:
        if self.cache is None:
            raise RuntimeError("the cached teacher has no targets before prepare() on a path that needs them")
        if self.path.mode != "cross-vocabulary":
            return TeacherTargets.cat([self.cache.get(it.target_key, len(it.input_ids) - it.n_prompt) for it in items])
        parts = []
        for it in items:
            rows = torch.tensor(it.teacher_rows[: len(it.input_ids) - it.n_prompt], dtype=torch.long)
            teacher = self.cache.get(it.target_key)
            parts.append(CrossTargets(teacher.index(rows.clamp(min=0)), rows >= 0))
        return CrossTargets.cat(parts)

    def scorer(self) -> LiveSource:
        """The same teacher live, for items the cache cannot hold (the student's own answers); it loads on first use."""
        if not isinstance(self.engine, Engine):
            raise UserError("scoring the student's own answers needs the teacher's exact distribution, which a server "
                            "does not give; use --teacher-source cache or live")
        return LiveSource(self.engine, self.settings, self.project_dir)

    def facts(self) -> dict[str, Any]:
        if self.cache is None:
            return {}
        return {"teacher_cache_tokens": self.cache.n_tokens, "teacher_cache_bytes_per_token": self.cache.bytes_per_token}

    def free(self) -> None:
        self.engine.free()


class LiveSource:
    """The teacher kept in memory: at every step it reads the batch's responses and gives its exact
    full-vocabulary distribution (as hidden states plus its head; the loss makes the logits chunk by chunk)."""

    def __init__(self, engine: Engine, settings: TeacherSettings, project_dir: str) -> None:
        self.engine, self.settings, self.project_dir = engine, settings, project_dir

    def prepare(self, examples: Sequence[Example], *, is_main: bool = True, wait: Callable[[], None] = lambda: None,
                show_progress: bool = True) -> list[TeacherItem | None]:
        """The teacher's answers to prompt-only rows; nothing is cached, the teacher stays loaded."""
        return teacher_phase(self.engine, self.settings, examples, self.project_dir, None, is_main=is_main, wait=wait,
                             show_progress=show_progress)

    def targets(self, items: Sequence[Any]) -> DenseTargets:
        pairs = [(it.teacher_prompt, it.input_ids[it.n_prompt :]) for it in items]
        return DenseTargets(torch.cat(self.engine.hidden(pairs)), output_head(self.engine.model), self.engine.vocab)

    def scorer(self) -> LiveSource:
        return self

    def facts(self) -> dict[str, Any]:
        return {}

    def free(self) -> None:
        self.engine.free()
