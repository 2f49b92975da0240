"""The teacher model in this process (transformers): its answers, with its distribution recorded as it writes them,
its distribution on given answers, and its final hidden states for a live source.

Note [Recorded targets]: for prompt-only rows the distribution is recorded by a logits processor placed
*before* any sampling warper, on the raw float32 logits of each step, so it is the same distribution a
separate scoring pass of prompt + response would give (tested), at no extra teacher pass. The tail samples
of a position depend only on the teacher prompt and the position (`sample_offsets`), never on batching, so
a recorded entry, a scored one and one made again after a resume hold the same ids.
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from aitraining.errors import UserError
from aitraining.models.generate import generate_answers, stop_ids
from aitraining.models.heads import decoder, output_head
from aitraining.models.load import load_causal_lm
from aitraining.padding import padded
from aitraining.signal import NonFiniteTeacher, TeacherTargets, VocabularyMap, teacher_targets_from_logits
from aitraining.teacher.cache import model_identity
from aitraining.teacher.settings import TeacherSettings, teacher_dtype
from aitraining.teacher.text import TeacherText

_GOLDEN = 0.6180339887498949


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


def targets_of(logits: torch.Tensor, settings: TeacherSettings, offsets: torch.Tensor,
               projection: VocabularyMap | None = None) -> TeacherTargets:
    """The cached signal of teacher logits under a run's settings (head k, m tail samples at T); with a
    `projection`, of the teacher's distribution over a student's other vocabulary (Note [Across vocabularies] in signal.py).
    Logits that are no distribution stop the run before anything of them is cached."""
    try:
        return teacher_targets_from_logits(
            logits if projection is None else projection.project(logits), settings.distill_top_k,
            samples=settings.distill_tail_samples, tau=settings.distill_temperature, offsets=offsets,
        )
    except NonFiniteTeacher as e:
        dtype = str(logits.dtype).removeprefix("torch.")
        advice = ("its weights hold values that are not finite, or overflow even in float32" if dtype == "float32"
                  else "a 16-bit teacher can overflow: run it in float32 with --mixed-precision no")
        raise UserError(f"--teacher-model: {e}, computed in {dtype}; {advice}") from None


class _Recorder:
    """Records the sparse distribution at each generation step from the raw logits, changing nothing (a logits
    processor of `generate`)."""

    def __init__(self, settings: TeacherSettings | None, vocab: int, prompts: Sequence[list[int]],
                 projection: VocabularyMap | None = None) -> None:
        self.settings, self.vocab, self.projection = settings, vocab, projection
        self.seeds = torch.tensor([prompt_seed(p) for p in prompts], dtype=torch.float64)  # hashed once, not per step
        self.steps: list[TeacherTargets] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.settings is not None:
            offsets = sample_offsets(self.seeds, len(self.steps))
            self.steps.append(targets_of(scores[:, : self.vocab], self.settings, offsets, self.projection).to("cpu"))
        if scores.shape[-1] > self.vocab:  # never emit a padded id: it is no token of either model
            scores = scores.clone()
            scores[:, self.vocab :] = float("-inf")
        return scores


class Engine(TeacherText):
    """The teacher model, loaded lazily (only if something is missing from the cache) and freed when done."""

    def __init__(self, settings: TeacherSettings, device: torch.device, tokenizer: Any = None, *,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(settings, tokenizer)
        self.device = device
        self.dtype = dtype or teacher_dtype(device, settings.mixed_precision)
        self.batch_size = settings.teacher_batch_size
        self._model: Any = None

    def identity(self) -> dict[str, Any]:
        """What identifies this teacher's outputs: its weights (path, files' sizes and times, or hub id) and the
        precision it runs in."""
        return {"teacher": model_identity(self.settings.teacher_model), "dtype": str(self.dtype)}

    @property
    def model(self) -> Any:
        if self._model is None:
            s = self.settings
            self._model = load_causal_lm(s.teacher_model, dtype=self.dtype, trust_remote_code=s.trust_remote_code,
                                         token=s.token, flag="--teacher-model", allow_pickle=s.allow_pickle_weights
                                         ).to(self.device)
            self._model.eval()
            self._model.requires_grad_(False)
        return self._model

    def free(self) -> None:
        self._model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def stop_ids(self) -> set[int]:
        return stop_ids(self.tokenizer, self.model)

    @torch.no_grad()
    def generate(self, prompts: Sequence[list[int]], *, record: bool = True) -> list[tuple[list[int], TeacherTargets | None]]:
        """Greedy (or sampled) responses for a batch of prompt ids, with their recorded targets (None when
        `record` is off: a live teacher needs none)."""
        s = self.settings
        recorder = _Recorder(s if record else None, self.vocab, prompts, self.projection)
        processors: list[Any] = [recorder]
        if s.teacher_do_sample:
            from transformers import TemperatureLogitsWarper, TopPLogitsWarper  # lazy: only a sampling teacher

            # Our own warpers, after the recorder: generate()'s built-in ones would run before it.
            processors += [TemperatureLogitsWarper(s.teacher_sampling_temperature), TopPLogitsWarper(s.teacher_top_p)]
        answers = generate_answers(self.model, prompts, max_new_tokens=s.distill_max_teacher_length,
                                   stop=self.stop_ids(), pad=self.pad_id, processors=processors,
                                   do_sample=s.teacher_do_sample)
        results: list[tuple[list[int], TeacherTargets | None]] = []
        for i, row in enumerate(answers):
            targets = None
            if record:
                targets = TeacherTargets.cat([recorder.steps[t].index(torch.tensor([i])) for t in range(len(row))])
            results.append((row, targets))
        return results

    @torch.no_grad()
    def hidden(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
        """The teacher's final hidden states at the positions that predict each response token: one forward
        pass over the batch of prompt + response, right-padded."""
        input_ids, mask = padded([a + b for a, b in pairs], self.pad_id)
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
                targets_of(head(h[s : s + rows])[:, : self.vocab], self.settings,
                           sample_offsets(seed, s, min(rows, len(response) - s)), self.projection)
                for s in range(0, len(response), rows)
            ]
            out.append(TeacherTargets.cat(parts).to("cpu"))
        return out
