"""The teacher's two append-only files in the project folder, and what names them.

- `teacher_outputs.jsonl`: responses the teacher wrote for prompt-only rows, one line per prompt, appended as
  they are made (a rerun or resume generates only what is missing).
- `teacher_cache/<settings-hash>/`: for every response token, the teacher's sparse distribution (Note [Teacher
  signal] in signal.py): the top-k ids and log-probabilities at T = 1, the tail's mass, and ids sampled from the
  tail at the distillation temperature with their log-probabilities. One fixed-size record per token in a flat
  binary file read through a memory map, so epochs stream it from disk and never run the teacher again. A
  different teacher, temperature, k or sample count gets its own folder: no cache is ever overwritten or reused
  stale.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from aitraining.params import digest
from aitraining.signal import TeacherTargets, VocabularyMap
from aitraining.teacher.settings import TeacherSettings

CACHE_FORMAT = 2
OUTPUTS_FILE = "teacher_outputs.jsonl"
CACHE_DIR = "teacher_cache"


def model_identity(name: str) -> dict[str, Any]:
    """What identifies a teacher's weights: its path and its files' sizes and times, or the hub id."""
    path = os.path.abspath(os.path.expanduser(name))
    if not os.path.exists(path):
        return {"id": name}
    files = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in sorted(os.listdir(path))]
    # Nanosecond times: weights rewritten in place within the same second must not look unchanged.
    stats = [(os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files if os.path.isfile(f)]
    return {"path": path, "files": stats}


def record_dtype(k: int, m: int) -> np.dtype:
    """One cached token: k + m ids (int32), their log-probs at T = 1 (float16: a log-prob of -20 to within 0.008),
    m sample counts (uint8), and the tail's log-mass at T = 1 and log-norm at tau (float32): 6 (k + m) + m + 8
    bytes, whatever the vocabulary."""
    return np.dtype([("ids", "<i4", (k + m,)), ("logp", "<f2", (k + m,)), ("counts", "u1", (m,)), ("tail", "<f4", (2,))])


class TargetCache:
    """Append-only store of sparse teacher targets, keyed by (teacher prompt, response ids).

    Layout: `targets.bin` (one `record_dtype` record per token) and `index.jsonl`, whose lines are written only
    after their data is on disk; on open, data beyond the last indexed entry (a run killed mid-write) is cut
    off, which is what makes generation and scoring resumable.
    """

    def __init__(self, folder: str, meta: dict[str, Any], *, readonly: bool = False) -> None:
        self.folder = folder
        self.k, self.m, self.tau = int(meta["k"]), int(meta.get("samples", 0)), float(meta.get("tau", 1.0))
        self.dtype = record_dtype(self.k, self.m)
        os.makedirs(folder, exist_ok=True)
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.exists(meta_path):
            with open(meta_path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
            os.replace(meta_path + ".tmp", meta_path)
        self.entries: dict[str, tuple[int, int]] = {}
        self.n_tokens = 0
        index_path = os.path.join(folder, "index.jsonl")
        self.data_path = os.path.join(folder, "targets.bin")
        if not readonly:
            cut_torn_line(index_path)  # so that the next entry starts on a line of its own
        for rec in jsonl_records(index_path):
            self.entries[rec["key"]] = (rec["start"], rec["length"])
            self.n_tokens = max(self.n_tokens, rec["start"] + rec["length"])
        if not readonly:
            with open(self.data_path, "ab") as f:
                f.truncate(self.n_tokens * self.dtype.itemsize)
        self._map: np.ndarray | None = None

    @property
    def bytes_per_token(self) -> int:
        return self.dtype.itemsize

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def add(self, key: str, targets: TeacherTargets) -> None:
        if (targets.k, targets.m) != (self.k, self.m):
            raise ValueError(f"targets with k={targets.k}, m={targets.m} do not fit a cache of k={self.k}, m={self.m}")
        n = len(targets)
        rec = np.zeros(n, dtype=self.dtype)
        rec["ids"] = targets.ids.cpu().numpy()
        rec["logp"] = torch.cat([targets.logp, targets.sample_logp], -1).float().cpu().numpy()
        rec["counts"] = targets.counts.cpu().numpy()
        rec["tail"] = torch.stack([targets.tail_logp, targets.tail_lognorm], -1).float().cpu().numpy()
        with open(self.data_path, "ab") as f:
            f.write(rec.tobytes())
        with open(os.path.join(self.folder, "index.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "start": self.n_tokens, "length": n}) + "\n")
        self.entries[key] = (self.n_tokens, n)
        self.n_tokens += n
        self._map = None

    def get(self, key: str, n: int | None = None) -> TeacherTargets:
        """Targets of the first `n` response tokens of an entry (all when None)."""
        start, length = self.entries[key]
        n = length if n is None else min(n, length)
        if self._map is None:
            self._map = np.memmap(self.data_path, self.dtype, "r", shape=(self.n_tokens,))
        rec = self._map[start : start + n]

        def field(name: str, dtype: type, width: int) -> torch.Tensor:  # a copy, contiguous, in a torch dtype
            return torch.from_numpy(np.ascontiguousarray(rec[name], dtype=dtype).reshape(n, width))

        tail = field("tail", np.float32, 2)
        logp = field("logp", np.float32, self.k + self.m)
        return TeacherTargets(
            ids=field("ids", np.int64, self.k + self.m), logp=logp[:, : self.k].contiguous(),
            sample_logp=logp[:, self.k :].contiguous(), counts=field("counts", np.float32, self.m),
            tail_logp=tail[:, 0].contiguous(), tail_lognorm=tail[:, 1].contiguous(), tau=self.tau,
        )


def cache_meta(identity: dict[str, Any], settings: TeacherSettings, vocab: int, projection: VocabularyMap | None = None
               ) -> dict[str, Any]:
    """What a cache's content depends on: its folder is named by the hash of this, so a changed teacher,
    precision, k, sample count, temperature or (across vocabularies) student vocabulary never reads another's
    targets. ``identity``: the teacher's weights and precision (`Engine.identity`); ``vocab``: the teacher's
    vocabulary size (a k beyond the distribution's width keeps all of it)."""
    student = {}
    if projection is not None:  # the map's content, not the student's name: only what it reads as matters
        piece = projection.first_piece.cpu().numpy().astype("<i8")
        student = {"student_vocabulary": [projection.student_size, hashlib.sha256(piece.tobytes()).hexdigest()]}
    return {
        **student,
        **identity,
        "format": CACHE_FORMAT,
        "teacher_model": settings.teacher_model,
        "k": min(settings.distill_top_k, projection.student_size if projection is not None else vocab),
        "samples": settings.distill_tail_samples,
        "tau": settings.distill_temperature,
    }


def cache_folder(project_dir: str, meta: dict[str, Any]) -> str:
    return os.path.join(project_dir, CACHE_DIR, digest(meta))


def cut_torn_line(path: str) -> None:
    """Drop a last line without its newline (a run killed mid-write), so that appends start on a fresh line."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            f.truncate(end)


def jsonl_records(path: str) -> Iterator[dict[str, Any]]:
    """The records of an append-only JSON-lines file; a torn line (a run killed mid-write) is skipped, so
    what it described is made again."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
