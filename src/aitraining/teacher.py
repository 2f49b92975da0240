"""The teacher runs once: it writes missing responses and records its distribution into an on-disk cache.

Two files in the project folder carry everything the student later needs from the teacher:

- `teacher_outputs.jsonl`: responses the teacher wrote for prompt-only rows, one line per prompt, appended
  as they are made (a rerun or resume generates only what is missing).
- `teacher_cache/<settings-hash>/`: for every response token, the teacher's sparse distribution (Note [Teacher
  signal] in losses.py): the top-k ids and log-probabilities at T = 1, the tail's mass, and ids sampled from
  the tail at the distillation temperature with their log-probabilities. One fixed-size record per token in a flat binary file read
  through a memory map, so epochs stream it from disk and never run the teacher again. A different teacher,
  temperature, k or sample count gets its own folder: no cache is ever overwritten or reused stale.

The student reads the teacher through a source with one method, `targets(items)`: `CachedTeacher` (the
default) or `LiveTeacher` (`--teacher-source live`: the teacher stays in memory and gives its exact
full-vocabulary distribution at every step; the exact reference, slower).

Note [Recorded targets]: for prompt-only rows the distribution is recorded by a logits processor placed
*before* any sampling warper, on the raw float32 logits of each step, so it is the same distribution a
separate scoring pass of prompt + response would give (tested), at no extra teacher pass. The tail samples
of a position depend only on the teacher prompt and the position (`sample_offsets`), never on batching, so
a recorded entry, a scored one and one made again after a resume hold the same ids.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor

from aitraining.data import Example, encode_prompt, encode_response, resolve_chat_template
from aitraining.errors import UserError
from aitraining.losses import (
    CrossTargets,
    DenseTargets,
    NonFiniteTeacher,
    TeacherTargets,
    VocabularyMap,
    teacher_targets_from_logits,
)
from aitraining.models import decoder, generate_answers, output_head, stop_ids
from aitraining.params import LLMTrainingParams, digest

log = logging.getLogger(__name__)

CACHE_FORMAT = 2
OUTPUTS_FILE = "teacher_outputs.jsonl"
CACHE_DIR = "teacher_cache"
_GOLDEN = 0.6180339887498949


def model_identity(name: str) -> dict[str, Any]:
    """What identifies a teacher's weights: its path and its files' sizes and times, or the hub id."""
    path = os.path.abspath(os.path.expanduser(name))
    if not os.path.exists(path):
        return {"id": name}
    files = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in sorted(os.listdir(path))]
    # Nanosecond times: weights rewritten in place within the same second must not look unchanged.
    stats = [(os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files if os.path.isfile(f)]
    return {"path": path, "files": stats}


def prompt_seed(prompt_ids: Sequence[int]) -> float:
    """A number in [0, 1) fixed by the teacher prompt: where its golden-ratio sequence of offsets starts."""
    return int(hashlib.sha256(np.asarray(prompt_ids, dtype=np.int64).tobytes()).hexdigest()[:12], 16) / 16**12


def sample_offsets(seed: float | torch.Tensor, start: int, n: int = 1) -> torch.Tensor:
    """The systematic sampler's offsets of response positions start..start+n-1 after a prompt (`prompt_seed`).

    A fixed function of the prompt and the position, so that recording during generation, scoring, and redoing
    an entry after a resume all draw the same tail ids. With a (B,) tensor of seeds: the offsets of B prompts at
    one position, (B,)."""
    if isinstance(seed, torch.Tensor):
        return torch.frac(seed.double() + start * _GOLDEN).float()
    steps = torch.arange(start, start + n, dtype=torch.float64)
    return torch.frac(seed + steps * _GOLDEN).float()


# --------------------------------------------------------------------------------------------- the cache


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
            _cut_torn_line(index_path)  # so that the next entry starts on a line of its own
        for rec in _jsonl_records(index_path):
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


# ------------------------------------------------------------------------------------- what the run needs


@dataclass
class TeacherItem:
    """What the student needs of one example: the response ids, where the teacher targets are, and the
    teacher's own prompt (for a live teacher)."""

    response_ids: list[int]
    target_key: str
    teacher_prompt: list[int]
    ended: bool = True  # the teacher ended the answer itself (its last id is a stop token), not the length limit


class _Recorder(LogitsProcessor):
    """Records the sparse distribution at each generation step from the raw logits, changing nothing."""

    def __init__(self, params: LLMTrainingParams | None, vocab: int, prompts: Sequence[list[int]],
                 projection: VocabularyMap | None = None) -> None:
        self.params, self.vocab, self.projection = params, vocab, projection
        self.seeds = torch.tensor([prompt_seed(p) for p in prompts], dtype=torch.float64)  # hashed once, not per step
        self.steps: list[TeacherTargets] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.params is not None:
            offsets = sample_offsets(self.seeds, len(self.steps))
            self.steps.append(targets_of(scores[:, : self.vocab], self.params, offsets, self.projection).to("cpu"))
        if scores.shape[-1] > self.vocab:  # never emit a padded id: it is no token of either model
            scores = scores.clone()
            scores[:, self.vocab :] = float("-inf")
        return scores


def targets_of(logits: torch.Tensor, params: LLMTrainingParams, offsets: torch.Tensor,
               projection: VocabularyMap | None = None) -> TeacherTargets:
    """The cached signal of teacher logits under a run's settings (head k, m tail samples at T); with a
    `projection`, of the teacher's distribution over a student's other vocabulary (Note [Across vocabularies]).
    Logits that are no distribution stop the run before anything of them is cached."""
    try:
        return teacher_targets_from_logits(
            logits if projection is None else projection.project(logits), params.distill_top_k,
            samples=params.distill_tail_samples, tau=params.distill_temperature,
            offsets=offsets,
        )
    except NonFiniteTeacher as e:
        dtype = str(logits.dtype).removeprefix("torch.")
        advice = ("its weights hold values that are not finite, or overflow even in float32" if dtype == "float32"
                  else "a 16-bit teacher can overflow: run it in float32 with --mixed-precision no")
        raise UserError(f"--teacher-model: {e}, computed in {dtype}; {advice}") from None


def teacher_dtype(device: torch.device, mixed_precision: str | None = None) -> torch.dtype:
    """bfloat16 where the hardware has it (a GPU with bf16, or a CPU run that asked for bf16), else float32.

    The teacher only runs forward, so bfloat16 costs it no optimizer precision; its log-probabilities are
    taken in float32 from the bfloat16 logits.
    """
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if mixed_precision == "bf16":
        return torch.bfloat16
    return torch.float32


class Teacher:
    """Loads the teacher lazily (only if something is missing from the cache) and frees it when done."""

    def __init__(self, params: LLMTrainingParams, device: torch.device, tokenizer: Any = None) -> None:
        from aitraining import models

        self.params = params
        self.device = device
        # A student with another vocabulary: the recorded and scored distributions are projected onto it.
        self.projection: VocabularyMap | None = None
        # A caller that already loaded the teacher's tokenizer (to check vocabularies) hands it over.
        self.tokenizer = tokenizer or models.load_tokenizer(
            params.teacher_model or "",
            trust_remote_code=params.trust_remote_code,
            token=params.token,
            flag="--teacher-model",
        )
        self.tokenizer.padding_side = "left"
        # Note [Padded vocabularies]: embedding matrices are often padded past the tokenizer (152064 rows for
        # 151936 tokens). Padded ids are no tokens: the teacher's distribution is taken over the real
        # vocabulary only, so a top-k id always exists in the student too.
        self.vocab = len(self.tokenizer)
        choice = "none" if params.chat_template == "none" else "auto"
        self.chat_template = resolve_chat_template(self.tokenizer, choice)
        self._model: Any = None

    @property
    def model(self) -> Any:
        if self._model is None:
            from aitraining import models

            self._model = models.load_causal_lm(
                self.params.teacher_model or "",
                dtype=teacher_dtype(self.device, self.params.mixed_precision),
                trust_remote_code=self.params.trust_remote_code,
                token=self.params.token,
                flag="--teacher-model",
                allow_pickle=self.params.allow_pickle_weights,
            ).to(self.device)
            self._model.eval()
            self._model.requires_grad_(False)
        return self._model

    def free(self) -> None:
        self._model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def prompt_ids(self, ex: Example) -> list[int]:
        return encode_prompt(self.tokenizer, ex, self.params.effective_teacher_template, self.chat_template)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @torch.no_grad()
    def generate(self, prompts: Sequence[list[int]], *, record: bool = True) -> list[tuple[list[int], TeacherTargets | None]]:
        """Greedy (or sampled) responses for a batch of prompt ids, with their recorded targets (None when
        `record` is off: a live teacher needs none)."""
        p = self.params
        recorder = _Recorder(p if record else None, self.vocab, prompts, self.projection)
        processors: list[LogitsProcessor] = [recorder]
        if p.teacher_do_sample:
            from transformers import TemperatureLogitsWarper, TopPLogitsWarper

            # Our own warpers, after the recorder: generate()'s built-in ones would run before it.
            processors += [TemperatureLogitsWarper(p.teacher_sampling_temperature), TopPLogitsWarper(p.teacher_top_p)]
        answers = generate_answers(self.model, prompts, max_new_tokens=p.distill_max_teacher_length,
                                  stop=self.stop_ids(), pad=self.pad_id, processors=processors,
                                  do_sample=p.teacher_do_sample)
        results: list[tuple[list[int], TeacherTargets | None]] = []
        for i, row in enumerate(answers):
            targets = None
            if record:
                targets = TeacherTargets.cat([recorder.steps[s].index(torch.tensor([i])) for s in range(len(row))])
            results.append((row, targets))
        return results

    def stop_ids(self) -> set[int]:
        return stop_ids(self.tokenizer, self.model)

    @torch.no_grad()
    def hidden(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
        """The teacher's final hidden states at the positions that predict each response token: one forward
        pass over the batch of prompt + response, right-padded."""
        width = max(len(a) + len(b) for a, b in pairs)
        input_ids = torch.full((len(pairs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for i, (a, b) in enumerate(pairs):
            input_ids[i, : len(a) + len(b)] = torch.tensor(a + b)
            mask[i, : len(a) + len(b)] = 1
        hidden = decoder(self.model)(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        return [hidden[i, len(a) - 1 : len(a) + len(b) - 1] for i, (a, b) in enumerate(pairs)]

    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[TeacherTargets]:
        """Targets on each response token given its prompt: one forward pass per batch, the vocabulary
        projection a bounded number of positions at a time."""
        head = output_head(self.model)
        width = max(self.vocab, self.projection.student_size if self.projection is not None else 0)
        rows = max(16, min(512, 2**25 // max(width, 1)))  # about 128 MiB of float32 logits per chunk
        out = []
        for (prompt, response), h in zip(pairs, self.hidden(pairs), strict=True):
            seed = prompt_seed(prompt)
            parts = [
                targets_of(head(h[s : s + rows])[:, : self.vocab], self.params,
                           sample_offsets(seed, s, min(rows, len(response) - s)), self.projection)
                for s in range(0, len(response), rows)
            ]
            out.append(TeacherTargets.cat(parts).to("cpu"))
        return out


# ------------------------------------------------------------------------------------ the teacher sources


class TeacherSource(Protocol):
    """Where the student's teacher signal comes from, for a batch of items (train.Item: `input_ids`,
    `n_prompt`, `target_key`, `teacher_prompt`), aligned with the student's trained positions."""

    def targets(self, items: Sequence[Any]) -> TeacherTargets | DenseTargets: ...


class CachedTeacher:
    """The default source: the targets the teacher wrote to the cache once."""

    def __init__(self, cache: TargetCache) -> None:
        self.cache = cache

    def targets(self, items: Sequence[Any]) -> TeacherTargets:
        return TeacherTargets.cat([self.cache.get(it.target_key, len(it.input_ids) - it.n_prompt) for it in items])


class LiveTeacher:
    """The teacher kept in memory: at every step it reads the batch's responses and gives its exact
    full-vocabulary distribution (as hidden states plus its head; the loss makes the logits chunk by chunk)."""

    def __init__(self, teacher: Teacher) -> None:
        self.teacher = teacher

    def targets(self, items: Sequence[Any]) -> DenseTargets:
        pairs = [(it.teacher_prompt, it.input_ids[it.n_prompt :]) for it in items]
        head = output_head(self.teacher.model)
        return DenseTargets(torch.cat(self.teacher.hidden(pairs)), head, self.teacher.vocab)


class CrossCachedTeacher:
    """The cache of a teacher with another vocabulary, read at the student's positions: each student token
    takes the teacher row that predicts the same text (`align.ResponseAligner`); the rows hold the teacher's
    distribution already projected onto the student's vocabulary (Note [Across vocabularies] in losses.py)."""

    def __init__(self, cache: TargetCache) -> None:
        self.cache = cache

    def targets(self, items: Sequence[Any]) -> CrossTargets:
        parts = []
        for it in items:
            rows = torch.tensor(it.teacher_rows[: len(it.input_ids) - it.n_prompt], dtype=torch.long)
            teacher = self.cache.get(it.target_key)
            parts.append(CrossTargets(teacher.index(rows.clamp(min=0)), rows >= 0))
        return CrossTargets.cat(parts)


@dataclass(frozen=True)
class DistillPath:
    """How this run learns from its teacher, and why (said at the start, kept in the model card)."""

    mode: str  # "same-vocabulary", "cross-vocabulary" or "sequence"
    reason: str
    same_tokenizer: bool

    @property
    def needs_targets(self) -> bool:
        return self.mode != "sequence"

    def describe(self) -> str:
        what = {
            "same-vocabulary": "logit-level distillation, position by position over the shared vocabulary",
            "cross-vocabulary": "logit-level distillation across vocabularies: the teacher's answers are re-tokenized "
                                "for the student and aligned by characters; the teacher's distribution is carried "
                                "over to the student's vocabulary (each teacher token read as the student token its "
                                "text starts with) and compared where both predict the same text",
            "sequence": "sequence-level distillation: the student learns the teacher's answers as text (no logits)",
        }[self.mode]
        return f"{what} ({self.reason})"


def choose_path(params: LLMTrainingParams, student_tokenizer: Any, teacher_tokenizer: Any) -> DistillPath:
    """Same tokenizer, another tokenizer, or text only; decided from the tokenizers themselves
    (`align.match_tokenizers`), never from model names."""
    from aitraining.align import match_tokenizers

    verdict = match_tokenizers(student_tokenizer, teacher_tokenizer)
    tokenizers = f"tokenizers: {verdict.reason}"
    if params.distill_mode == "sequence":
        return DistillPath("sequence", f"--distill-mode sequence; {tokenizers}", verdict.same)
    if verdict.same:
        return DistillPath("same-vocabulary", tokenizers, True)
    if params.teacher_source == "live":
        raise UserError(
            f"--teacher-source live needs a teacher with the student's tokenizer, and these differ ({verdict.reason}); "
            "drop --teacher-source live (the cached teacher works across tokenizers) or add --distill-mode sequence"
        )
    for name, tok in (("--model", student_tokenizer), ("--teacher-model", teacher_tokenizer)):
        if not getattr(tok, "is_fast", False):
            raise UserError(
                f"{name}: its tokenizer is a slow one ({type(tok).__name__}) and cannot give character offsets, which "
                "distilling across tokenizers needs; save a tokenizer.json beside the model or add --distill-mode sequence"
            )
    return DistillPath("cross-vocabulary", tokenizers, False)


def _cut_torn_line(path: str) -> None:
    """Drop a last line without its newline (a run killed mid-write), so that appends start on a fresh line."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            f.truncate(end)


def _jsonl_records(path: str) -> Iterator[dict[str, Any]]:
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


def _read_outputs(path: str) -> dict[str, dict[str, Any]]:
    return {rec["key"]: rec for rec in _jsonl_records(path)}


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def cache_meta(params: LLMTrainingParams, device: torch.device, vocab: int, projection: VocabularyMap | None = None
               ) -> dict[str, Any]:
    """What a cache's content depends on: its folder is named by the hash of this, so a changed teacher,
    precision, k, sample count, temperature or (across vocabularies) student vocabulary never reads another's
    targets. ``vocab``: the teacher's vocabulary size (a k beyond the distribution's width keeps all of it)."""
    student = {}
    if projection is not None:  # the map's content, not the student's name: only what it reads as matters
        piece = projection.first_piece.cpu().numpy().astype("<i8")
        student = {"student_vocabulary": [projection.student_size, hashlib.sha256(piece.tobytes()).hexdigest()]}
    return {
        **student,
        "format": CACHE_FORMAT,
        "teacher": model_identity(params.teacher_model or ""),
        "teacher_model": params.teacher_model,
        "dtype": str(teacher_dtype(device, params.mixed_precision)),
        "k": min(params.distill_top_k, projection.student_size if projection is not None else vocab),
        "samples": params.distill_tail_samples,
        "tau": params.distill_temperature,
    }


def prepare_teacher(
    params: LLMTrainingParams,
    examples: Sequence[Example],
    student_tokenizer: Any,
    project_dir: str,
    device: torch.device,
    *,
    is_main: bool = True,
    wait: Callable[[], None] = lambda: None,
    show_progress: bool = True,
    teacher_tokenizer: Any = None,
    path: DistillPath | None = None,
    vocab: VocabularyMap | None = None,
) -> tuple[list[TeacherItem | None], CachedTeacher | CrossCachedTeacher | LiveTeacher | None]:
    """Make sure every example has a response and (for the cache source) cached teacher targets; returns one
    item per example and the teacher source (None on the sequence path: the answers are all it needs; a
    `CrossCachedTeacher` with `vocab` on the cross-vocabulary path).

    Only the main process runs the teacher for generation and scoring; the others wait, then read what it
    wrote. A live source keeps the teacher loaded (on every process). Items are None for examples that yield
    no response token.
    """
    teacher = Teacher(params, device, teacher_tokenizer)
    path = path or choose_path(params, student_tokenizer, teacher.tokenizer)
    if path.mode == "cross-vocabulary" and vocab is None:
        raise ValueError("prepare_teacher: the cross-vocabulary path needs the vocabulary map")
    teacher.projection = vocab if path.mode == "cross-vocabulary" else None
    live = params.teacher_source == "live" and path.needs_targets
    gen_settings = {
        "teacher": model_identity(params.teacher_model or ""),
        "dtype": str(teacher_dtype(device, params.mixed_precision)),
        "max_new": params.distill_max_teacher_length,
        "sample": params.teacher_do_sample,
        "temperature": params.teacher_sampling_temperature if params.teacher_do_sample else None,
        "top_p": params.teacher_top_p if params.teacher_do_sample else None,
        "seed": params.seed if params.teacher_do_sample else None,
    }
    meta = cache_meta(params, device, teacher.vocab, teacher.projection)
    cache_folder = os.path.join(project_dir, CACHE_DIR, digest(meta))
    # Only the main process writes (and may cut a torn tail off) the cache; the others open it when it is done.
    cache = TargetCache(cache_folder, meta) if is_main and not live and path.needs_targets else None
    outputs_path = os.path.join(project_dir, OUTPUTS_FILE)

    prompt_ids = [teacher.prompt_ids(ex) for ex in examples]
    gen_keys = [digest({**gen_settings, "prompt": ids}) for ids in prompt_ids]
    if is_main:
        _cut_torn_line(outputs_path)
        outputs = _read_outputs(outputs_path)
        # One generation per distinct prompt: repeated rows share the answer (and its cache entry).
        wanted = list({gen_keys[i]: i for i, ex in reversed(list(enumerate(examples))) if ex.response is None}.values())
        batches = _same_batches(wanted, lambda i: len(prompt_ids[i]), params.teacher_batch_size,
                                lambda i: gen_keys[i] not in outputs)
        if batches:
            missing = sum(gen_keys[i] not in outputs for i in wanted)
            bar = tqdm(total=missing, desc="teacher: writing responses", unit="prompt", disable=not show_progress)
            stop = teacher.stop_ids()
            with open(outputs_path, "a", encoding="utf-8") as f:
                for b, batch in batches:
                    torch.manual_seed(params.seed + b)  # a sampling teacher draws the same whatever ran before
                    results = teacher.generate([prompt_ids[i] for i in batch], record=cache is not None)
                    for i, (resp_ids, targets) in zip(batch, results, strict=True):
                        if gen_keys[i] in outputs:
                            continue  # written before a kill; its batch ran again only to stay the same batch
                        key = _target_key(prompt_ids[i], resp_ids[: params.distill_max_teacher_length])
                        if cache is not None and targets is not None and key not in cache:
                            cache.add(key, targets)
                        rec = {
                            "key": gen_keys[i],
                            "row": examples[i].source_row,
                            "prompt": examples[i].messages[-1]["content"] if examples[i].messages else "",
                            "response": teacher.tokenizer.decode(resp_ids, skip_special_tokens=True),
                            "response_ids": resp_ids,
                            "finished": bool(resp_ids) and resp_ids[-1] in stop,
                        }
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        f.flush()
                        bar.update(1)
            bar.close()
    wait()
    outputs = _read_outputs(outputs_path)

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
            resp = encode_response(teacher.tokenizer, ex.response, add_eos=params.add_eos_token)
            ended = params.add_eos_token and teacher.tokenizer.eos_token_id is not None
        ended = ended and len(resp) <= params.distill_max_teacher_length
        resp = resp[: params.distill_max_teacher_length]
        if not resp:
            items.append(None)
            continue
        key = _target_key(prompt_ids[i], resp)
        items.append(TeacherItem(resp, key, prompt_ids[i], ended))
        if cache is not None and key not in cache and key not in scheduled:
            scheduled.add(key)  # repeated rows are scored once
            to_score.append(i)

    if live:
        return items, LiveTeacher(teacher)
    if not path.needs_targets:
        teacher.free()
        wait()
        return items, None
    if cache is not None and to_score:
        # Batches cut from every row the teacher scores (the given responses), cached or not (`_same_batches`).
        pending = set(to_score)
        scoring = dict({it.target_key: (i, it) for i, (ex, it) in enumerate(zip(examples, items, strict=True))
                        if it is not None and (ex.response is not None or i in pending)}.values())  # row -> item
        batches = _same_batches(list(scoring), lambda i: len(prompt_ids[i]) + len(scoring[i].response_ids),
                                params.teacher_batch_size, lambda i: scoring[i].target_key not in cache)
        bar = tqdm(total=len(to_score), desc="teacher: scoring responses", unit="row", disable=not show_progress)
        for _, batch in batches:
            pairs = [(prompt_ids[i], scoring[i].response_ids) for i in batch]
            for i, targets in zip(batch, teacher.score(pairs), strict=True):
                if scoring[i].target_key not in cache:
                    cache.add(scoring[i].target_key, targets)
                    bar.update(1)
        bar.close()
    teacher.free()
    wait()
    if cache is None:
        cache = TargetCache(cache_folder, meta, readonly=True)
    missing_targets = [it.target_key for it in items if it is not None and it.target_key not in cache]
    if missing_targets:
        raise RuntimeError(f"{len(missing_targets)} teacher targets are missing from {cache_folder}")
    if path.mode == "cross-vocabulary":
        assert vocab is not None
        return items, CrossCachedTeacher(cache)
    return items, CachedTeacher(cache)


def _same_batches(rows: list[int], length: Callable[[int], int], size: int, missing: Callable[[int], bool]
                  ) -> list[tuple[int, list[int]]]:
    """(index, rows) of the teacher's batches that hold a row still missing. The batches are cut from every row,
    done or not, sorted by length: a rerun after a kill runs the same batches as an uninterrupted run, so the
    same padding and the same float rounding give the same responses and targets, bit for bit (a batch that was
    half written runs whole again; its rows already on disk are not written twice)."""
    batches = list(_batches(sorted(rows, key=length), size))
    return [(b, batch) for b, batch in enumerate(batches) if any(missing(i) for i in batch)]


def _target_key(prompt_ids: list[int], response_ids: list[int]) -> str:
    return digest({"prompt": prompt_ids, "response": response_ids})
