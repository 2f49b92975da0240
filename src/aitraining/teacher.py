"""The teacher runs once: it writes missing responses and records its distribution into an on-disk cache.

Two files in the project folder carry everything the student later needs from the teacher:

- `teacher_outputs.jsonl`: responses the teacher wrote for prompt-only rows, one line per prompt, appended
  as they are made (a rerun or resume generates only what is missing).
- `teacher_cache/<settings-hash>/`: for every response token, the teacher's top-k token ids and their
  log-probabilities at the distillation temperature, plus the log of the remaining mass (the tail bucket).
  Stored as flat binary arrays read through memory maps, so epochs stream them from disk and never run the
  teacher again. A different teacher, temperature or k gets its own folder: no cache is ever overwritten.

Note (why top-k from generation is exact): for prompt-only rows the distribution is recorded by a logits
processor placed *before* any sampling warper, on the raw float32 logits of each step, so it is the same
distribution a separate scoring pass of prompt + response would give (tested), at no extra teacher pass.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from aitraining.data import Example, encode, encode_response, render_prompt, resolve_chat_template
from aitraining.errors import UserError
from aitraining.losses import TeacherTargets, teacher_targets_from_logits
from aitraining.objective import decoder, output_head
from aitraining.params import LLMTrainingParams

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
OUTPUTS_FILE = "teacher_outputs.jsonl"
CACHE_DIR = "teacher_cache"


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:24]


def model_identity(name: str) -> dict[str, Any]:
    """What identifies a teacher's weights: its path and its files' sizes and times, or the hub id."""
    path = os.path.abspath(os.path.expanduser(name))
    if not os.path.exists(path):
        return {"id": name}
    files = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in sorted(os.listdir(path))]
    stats = [(os.path.basename(f), os.path.getsize(f), int(os.path.getmtime(f))) for f in files if os.path.isfile(f)]
    return {"path": path, "files": stats}


# --------------------------------------------------------------------------------------------- the cache


class TargetCache:
    """Append-only store of sparse teacher targets, keyed by (teacher prompt, response ids).

    Layout: `ids.i32` (tokens x k), `logp.f32` (tokens x k), `tail.f32` (tokens), and `index.jsonl` whose
    lines are written only after their data is on disk; on open, data beyond the last indexed entry (a run
    killed mid-write) is cut off, which is what makes generation and scoring resumable.
    """

    def __init__(self, folder: str, meta: dict[str, Any], *, readonly: bool = False) -> None:
        self.folder = folder
        self.k = int(meta["k"])
        os.makedirs(folder, exist_ok=True)
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.exists(meta_path):
            with open(meta_path, "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2, sort_keys=True)
        self.entries: dict[str, tuple[int, int]] = {}
        self.n_tokens = 0
        index_path = os.path.join(folder, "index.jsonl")
        if not readonly:
            _cut_torn_line(index_path)  # so that the next entry starts on a line of its own
        for rec in _jsonl_records(index_path):
            self.entries[rec["key"]] = (rec["start"], rec["length"])
            self.n_tokens = max(self.n_tokens, rec["start"] + rec["length"])
        for name, width in (("ids.i32", self.k * 4), ("logp.f32", self.k * 4), ("tail.f32", 4)):
            if readonly:
                break
            path = os.path.join(folder, name)
            with open(path, "ab") as f:
                f.truncate(self.n_tokens * width)
        self._maps: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def add(self, key: str, targets: TeacherTargets) -> None:
        n = len(targets)
        with open(os.path.join(self.folder, "ids.i32"), "ab") as f:
            f.write(targets.ids.to(torch.int32).cpu().numpy().tobytes())
        with open(os.path.join(self.folder, "logp.f32"), "ab") as f:
            f.write(targets.logp.float().cpu().numpy().tobytes())
        with open(os.path.join(self.folder, "tail.f32"), "ab") as f:
            f.write(targets.tail_logp.float().cpu().numpy().tobytes())
        with open(os.path.join(self.folder, "index.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "start": self.n_tokens, "length": n}) + "\n")
        self.entries[key] = (self.n_tokens, n)
        self.n_tokens += n
        self._maps = None

    def _memmaps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._maps is None:
            n, k = self.n_tokens, self.k
            mode = "r"
            self._maps = (
                np.memmap(os.path.join(self.folder, "ids.i32"), np.int32, mode, shape=(n, k)),
                np.memmap(os.path.join(self.folder, "logp.f32"), np.float32, mode, shape=(n, k)),
                np.memmap(os.path.join(self.folder, "tail.f32"), np.float32, mode, shape=(n,)),
            )
        return self._maps

    def get(self, key: str, n: int | None = None) -> TeacherTargets:
        """Targets of the first `n` response tokens of an entry (all when None)."""
        start, length = self.entries[key]
        n = length if n is None else min(n, length)
        ids, logp, tail = self._memmaps()
        return TeacherTargets(
            ids=torch.from_numpy(np.array(ids[start : start + n], dtype=np.int64)),
            logp=torch.from_numpy(np.array(logp[start : start + n])),
            tail_logp=torch.from_numpy(np.array(tail[start : start + n])),
        )


# ------------------------------------------------------------------------------------- what the run needs


@dataclass
class TeacherItem:
    """What the student needs of one example: the response ids and where the teacher targets are."""

    response_ids: list[int]
    target_key: str


class _Recorder(LogitsProcessor):
    """Records the sparse distribution at each generation step from the raw logits, changing nothing."""

    def __init__(self, k: int, temperature: float, vocab: int) -> None:
        self.k, self.temperature, self.vocab = k, temperature, vocab
        self.steps: list[TeacherTargets] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        targets = teacher_targets_from_logits(scores[:, : self.vocab], self.k, self.temperature)
        self.steps.append(targets.to("cpu"))
        if scores.shape[-1] > self.vocab:  # never emit a padded id: it is no token of either model
            scores = scores.clone()
            scores[:, self.vocab :] = float("-inf")
        return scores


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
        # A caller that already loaded the teacher's tokenizer (to check vocabularies) hands it over.
        self.tokenizer = tokenizer or models.load_tokenizer(
            params.teacher_model or "",
            trust_remote_code=params.trust_remote_code,
            token=params.token,
            flag="--teacher-model",
        )
        self.tokenizer.padding_side = "left"
        # Note (padded vocabularies): embedding matrices are often padded past the tokenizer (152064 rows for
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
        assert ex.messages is not None
        text, special = render_prompt(self.tokenizer, ex.messages, self.params.effective_teacher_template, self.chat_template)
        return encode(self.tokenizer, text, add_special_tokens=special)

    @torch.no_grad()
    def generate(self, prompts: Sequence[list[int]]) -> list[tuple[list[int], TeacherTargets]]:
        """Greedy (or sampled) responses for a batch of prompt ids, with their recorded targets."""
        p = self.params
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = max(len(x) for x in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, ids in enumerate(prompts):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            mask[i, width - len(ids) :] = 1
        recorder = _Recorder(p.distill_top_k, p.distill_temperature, self.vocab)
        processors: list[LogitsProcessor] = [recorder]
        if p.teacher_do_sample:
            from transformers import TemperatureLogitsWarper, TopPLogitsWarper

            # Our own warpers, after the recorder: generate()'s built-in ones would run before it.
            processors += [TemperatureLogitsWarper(p.teacher_sampling_temperature), TopPLogitsWarper(p.teacher_top_p)]
        stop = self.stop_ids()
        config = GenerationConfig(
            max_new_tokens=p.distill_max_teacher_length,
            do_sample=p.teacher_do_sample,
            eos_token_id=sorted(stop),
            pad_token_id=pad,
        )
        # generate() fills every field left unset from the model's own generation config (a shipped
        # repetition_penalty, temperature, top_k...), and its processors run before ours: the recorder would
        # then store a distorted distribution. So the model's config is blanked for the call.
        model = self.model
        shipped = model.generation_config
        model.generation_config = GenerationConfig(eos_token_id=sorted(stop), pad_token_id=pad,
                                                   bos_token_id=shipped.bos_token_id)
        try:
            out = model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                generation_config=config,
                logits_processor=LogitsProcessorList(processors),
            )
        finally:
            model.generation_config = shipped
        generated = out[:, width:].cpu()
        results = []
        for i in range(len(prompts)):
            row = generated[i].tolist()
            length = next((j + 1 for j, t in enumerate(row) if t in stop), len(row))
            steps = [recorder.steps[s].index(torch.tensor([i])) for s in range(length)]
            results.append((row[:length], TeacherTargets.cat(steps)))
        return results

    def stop_ids(self) -> set[int]:
        """Tokens that end a response: the tokenizer's EOS and the model's own (Gemma ends turns with
        <end_of_turn>, which is not its tokenizer's EOS)."""
        stop = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        shipped = self.model.generation_config.eos_token_id
        stop |= set(shipped if isinstance(shipped, list) else [] if shipped is None else [shipped])
        return stop

    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[TeacherTargets]:
        """Targets on each response token given its prompt: one forward pass per batch."""
        model = self.model
        width = max(len(a) + len(b) for a, b in pairs)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(pairs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for i, (a, b) in enumerate(pairs):
            input_ids[i, : len(a) + len(b)] = torch.tensor(a + b)
            mask[i, : len(a) + len(b)] = 1
        hidden = decoder(model)(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        head = output_head(model)
        out = []
        for i, (a, b) in enumerate(pairs):
            h = hidden[i, len(a) - 1 : len(a) + len(b) - 1]
            parts = [
                teacher_targets_from_logits(
                    head(h[s : s + 512])[:, : self.vocab].float(), self.params.distill_top_k, self.params.distill_temperature
                )
                for s in range(0, len(b), 512)
            ]
            out.append(TeacherTargets.cat(parts).to("cpu"))
        return out


def check_same_vocabulary(student_tokenizer: Any, teacher_tokenizer: Any) -> None:
    """Teacher and student must map every token string to the same id (padded embedding rows aside)."""
    from aitraining import models

    if models.compare_vocabularies(student_tokenizer, teacher_tokenizer) != "same":
        raise UserError(
            "--teacher-model has a different tokenizer than --model: distillation needs the same vocabulary "
            "for now (cross-tokenizer distillation is a planned option); pick a teacher of the same family"
        )


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
) -> tuple[list[TeacherItem | None], TargetCache]:
    """Make sure every example has a response and cached teacher targets; returns one item per example.

    Only the main process runs the teacher; the others wait, then read what it wrote. Items are None for
    examples that yield no response token.
    """
    teacher = Teacher(params, device, teacher_tokenizer)
    check_same_vocabulary(student_tokenizer, teacher.tokenizer)
    identity = model_identity(params.teacher_model or "")
    dtype = str(teacher_dtype(device, params.mixed_precision))
    gen_settings = {
        "teacher": identity,
        "dtype": dtype,
        "max_new": params.distill_max_teacher_length,
        "sample": params.teacher_do_sample,
        "temperature": params.teacher_sampling_temperature if params.teacher_do_sample else None,
        "top_p": params.teacher_top_p if params.teacher_do_sample else None,
        "seed": params.seed if params.teacher_do_sample else None,
    }
    meta = {
        "format": CACHE_FORMAT,
        "teacher": identity,
        "teacher_model": params.teacher_model,
        "dtype": dtype,
        "k": params.distill_top_k,
        "temperature": params.distill_temperature,
    }
    cache_folder = os.path.join(project_dir, CACHE_DIR, _hash(meta))
    # Only the main process writes (and may cut a torn tail off) the cache; the others open it when it is done.
    cache = TargetCache(cache_folder, meta) if is_main else None
    outputs_path = os.path.join(project_dir, OUTPUTS_FILE)

    prompt_ids = [teacher.prompt_ids(ex) for ex in examples]
    gen_keys = [_hash({**gen_settings, "prompt": ids}) for ids in prompt_ids]
    if is_main:
        _cut_torn_line(outputs_path)
        outputs = _read_outputs(outputs_path)
        # One generation per distinct prompt: repeated rows share the answer (and its cache entry).
        missing = list({gen_keys[i]: i for i, ex in reversed(list(enumerate(examples)))
                        if ex.response is None and gen_keys[i] not in outputs}.values())
        if missing:
            torch.manual_seed(params.seed)
            order = sorted(missing, key=lambda i: len(prompt_ids[i]))
            bar = tqdm(total=len(missing), desc="teacher: writing responses", unit="prompt", disable=not show_progress)
            with open(outputs_path, "a", encoding="utf-8") as f:
                for batch in _batches(order, params.teacher_batch_size):
                    results = teacher.generate([prompt_ids[i] for i in batch])
                    for i, (resp_ids, targets) in zip(batch, results, strict=True):
                        key = _target_key(prompt_ids[i], resp_ids[: params.distill_max_teacher_length])
                        assert cache is not None
                        if key not in cache:
                            cache.add(key, targets)
                        rec = {
                            "key": gen_keys[i],
                            "row": examples[i].source_row,
                            "prompt": examples[i].messages[-1]["content"] if examples[i].messages else "",
                            "response": teacher.tokenizer.decode(resp_ids, skip_special_tokens=True),
                            "response_ids": resp_ids,
                            "finished": bool(resp_ids) and resp_ids[-1] in teacher.stop_ids(),
                        }
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        f.flush()
                    bar.update(len(batch))
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
        else:
            resp = encode_response(student_tokenizer, ex.response, add_eos=params.add_eos_token)
        resp = resp[: params.distill_max_teacher_length]
        if not resp:
            items.append(None)
            continue
        key = _target_key(prompt_ids[i], resp)
        items.append(TeacherItem(resp, key))
        if cache is not None and key not in cache and key not in scheduled:
            scheduled.add(key)  # repeated rows are scored once
            to_score.append(i)

    if cache is not None and to_score:
        order = sorted(to_score, key=lambda i: len(prompt_ids[i]) + len(items[i].response_ids))  # type: ignore[union-attr]
        bar = tqdm(total=len(order), desc="teacher: scoring responses", unit="row", disable=not show_progress)
        for batch in _batches(order, params.teacher_batch_size):
            pairs = [(prompt_ids[i], items[i].response_ids) for i in batch]  # type: ignore[union-attr]
            for i, targets in zip(batch, teacher.score(pairs), strict=True):
                cache.add(items[i].target_key, targets)  # type: ignore[union-attr]
            bar.update(len(batch))
        bar.close()
    teacher.free()
    wait()
    if cache is None:
        cache = TargetCache(cache_folder, meta, readonly=True)
    missing_targets = [it.target_key for it in items if it is not None and it.target_key not in cache]
    if missing_targets:
        raise RuntimeError(f"{len(missing_targets)} teacher targets are missing from {cache_folder}")
    return items, cache


def _target_key(prompt_ids: list[int], response_ids: list[int]) -> str:
    return _hash({"prompt": prompt_ids, "response": response_ids})
