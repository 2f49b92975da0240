"""On-policy distillation: on a share of the training steps the student writes the answers itself and the
teacher, kept loaded, gives its exact distribution at every token the student wrote.

Why: trained only on the teacher's answers (off-policy), the student never sees its own mistakes. At inference
it conditions on what it wrote, and a small student drifts into text the teacher never wrote: it loops ("a new
adventure, a new adventure, ..."), and nothing in training told it how the teacher would go on from there.
Scoring the student's own answers teaches exactly that (Agarwal et al., "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", ICLR 2024: their lambda is `--distill-on-policy`).

What a step on its own answers trains, per token the student wrote: alpha * T^2 * D(teacher_T || student_T),
the same distillation term as on the data's answers. There is no label term on those tokens (the student's own
token is no label), so `--distill-alpha` keeps its documented meaning: the weight of the distillation loss.

Only up to the first repeat. A small student's answer that starts repeating itself rarely stops: the rest is
the loop. Asked how such text goes on, the teacher mostly continues it (measured on an 8-layer student's greedy
answers to 100 held-out prompts, BENCHMARKS.md: past an answer's first repeated token trigram the teacher's top
token is the student's 80 % of the time, against 38 % where the repeat begins), so scoring the rest teaches the
loop. Each answer is scored up to and including the token that completes its first repeated trigram: the teacher
still says, at the place where the loop begins, what it would have written instead.

Reproducible: which steps are on-policy and what the student samples depend only on --seed, the step and the
micro-batch, never on the global random state, so a run resumed from a checkpoint writes the same answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from aitraining.batches import Item
from aitraining.models.generate import generate_answers, stop_ids
from aitraining.models.heads import causal_lm
from aitraining.padding import pad_id
from aitraining.signal import Targets
from aitraining.teacher import TeacherSource


class _RealTokensOnly:
    """Note [Padded vocabularies] (teacher/text.py): embedding rows past the tokenizer are no tokens; an untrained
    student would otherwise sample them."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.vocab :] = -float("inf")
        return scores


LOOP_NGRAM = 3


def first_repeat_end(answer: Sequence[int], n: int = LOOP_NGRAM) -> int | None:
    """The end (exclusive) of the first n-gram of `answer` that was seen earlier in it; None if none repeats."""
    seen: set[tuple[int, ...]] = set()
    for end in range(n, len(answer) + 1):
        gram = tuple(answer[end - n : end])
        if gram in seen:
            return end
        seen.add(gram)  # added after the check: an n-gram overlapping itself ("a a a a") is a repeat too
    return None


def until_first_repeat(answer: list[int], n: int = LOOP_NGRAM) -> list[int]:
    """`answer` up to and including the token that completes its first repeated n-gram."""
    end = first_repeat_end(answer, n)
    return answer if end is None else answer[:end]


class OnPolicy:
    """The student's own answers and the live teacher's targets on them, for the steps that are on-policy."""

    def __init__(self, scorer: TeacherSource, tokenizer: Any, *, share: float, seed: int, max_new_tokens: int,
                 block_size: int) -> None:
        self.scorer = scorer  # the teacher live (`TeacherSource.scorer`): it scores whatever the student wrote
        self.share, self.seed = share, seed
        self.max_new_tokens, self.block_size = max_new_tokens, block_size
        self.pad = pad_id(tokenizer)
        self.tokenizer = tokenizer
        self.vocab = len(tokenizer)

    def chosen(self, step: int) -> bool:
        """Whether optimizer step `step` (0-based) trains on the student's own answers: a coin of weight
        `share`, seeded by the run's seed and the step alone."""
        if self.share >= 1.0:
            return True
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return bool(torch.rand((), generator=g).item() < self.share)

    @torch.no_grad()
    def answer(self, student: Any, items: Sequence[Any], *, step: int, micro: int) -> list[Any]:
        """The items with the student's own sampled answers (at T = 1, from its full distribution) in place of
        the data's: same prompts, the teacher's prompt kept for scoring."""
        prompts = [list(it.input_ids[: it.n_prompt]) for it in items]
        room = min(self.max_new_tokens, self.block_size - max(len(p) for p in prompts))
        student = causal_lm(student)  # a LoRA student generates through its base model, adapters in place
        was_training = student.training
        student.eval()
        try:
            with torch.random.fork_rng(devices=[]):  # the training's own random state stays untouched
                torch.manual_seed((self.seed * 1_000_003 + step) * 64 + micro)
                answers = generate_answers(student, prompts, max_new_tokens=max(room, 1),
                                           stop=stop_ids(self.tokenizer, student), pad=self.pad,
                                           processors=[_RealTokensOnly(self.vocab)], do_sample=True)
        finally:
            student.train(was_training)
        return [Item(p + until_first_repeat(a), len(p), None, it.teacher_prompt)
                for p, a, it in zip(prompts, answers, items, strict=True)]

    def targets(self, items: Sequence[Any]) -> Targets:
        return self.scorer.targets(items)
