"""How a run learns from its teacher: position by position over a shared vocabulary, across vocabularies, or from
its answers as text only; chosen from the two tokenizers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aitraining.align import match_tokenizers
from aitraining.errors import UserError


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


def choose_path(student_tokenizer: Any, teacher_tokenizer: Any, *, mode: str = "logits", source: str = "cache"
                ) -> DistillPath:
    """Same tokenizer, another tokenizer, or text only; decided from the tokenizers themselves
    (`align.match_tokenizers`), never from model names. `mode`: --distill-mode; `source`: --teacher-source."""
    verdict = match_tokenizers(student_tokenizer, teacher_tokenizer)
    tokenizers = f"tokenizers: {verdict.reason}"
    if mode == "sequence":
        return DistillPath("sequence", f"--distill-mode sequence; {tokenizers}", verdict.same)
    if verdict.same:
        return DistillPath("same-vocabulary", tokenizers, True)
    if source == "live":
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
