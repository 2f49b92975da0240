"""The student's forward pass and loss as one module, so that data-parallel wrappers see all of it.

`Objective.forward` runs the decoder body, keeps only the hidden states that predict a trained token,
and hands them to the chunked loss with the output head. Full-vocabulary logits therefore exist for one
chunk of trained positions at a time, never for the whole batch, and never for prompt or padding positions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aitraining.chunked import auto_chunk_size, chunked_token_loss_sums
from aitraining.models.heads import causal_lm, decoder, output_head
from aitraining.signal import Targets

HEAD_AND_LOSS = "aitraining::head_and_loss"  # the profiler's name for the output head and the loss


def target_positions(attention_mask: Tensor, n_prompt: Tensor) -> Tensor:
    """Bool (B, L): position t predicts token t+1, trained when t+1 is a response token and not padding.

    A sequence's trained tokens are [n_prompt, length); the positions predicting them are [n_prompt-1,
    length-1). For plain-text rows n_prompt is 0, so every token but the first is trained.
    """
    b, seq_len = attention_mask.shape
    pos = torch.arange(seq_len, device=attention_mask.device).expand(b, seq_len)
    lengths = attention_mask.sum(dim=1, keepdim=True)
    start = (n_prompt.view(-1, 1) - 1).clamp(min=0)
    return (pos >= start) & (pos < lengths - 1)


class Objective(nn.Module):
    """Wraps the student; forward returns the *summed* loss over trained positions (Note [Sum reduction] in chunked.py)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        temperature: float = 1.0,
        alpha: float = 0.0,
        kind: str = "forward_kl",
        beta: float = 0.5,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.temperature, self.alpha, self.kind, self.beta = temperature, alpha, kind, beta
        self.chunk_size = chunk_size

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        n_prompt: Tensor,
        teacher: Targets | None = None,
        weight: float = 1.0,
        labels_are_own: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns (loss_sum * weight, kd_sum, ce_sum, n_tokens) over the batch's trained positions.

        `labels_are_own`: the response tokens are the student's own samples (onpolicy.py): they are no labels,
        so only the distillation term is trained, with its weight alpha; ce_sum is then their likelihood under
        the student, not a label loss."""
        hidden = decoder(self.model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        sel = target_positions(attention_mask, n_prompt)
        labels = input_ids[:, 1:][sel[:, :-1]]
        hidden_sel = hidden[sel]
        if teacher is not None:
            teacher = teacher.to(hidden.device)
        with torch.profiler.record_function(HEAD_AND_LOSS):  # a named range in profiles (benchmarks/student_step.py)
            vocab = causal_lm(self.model).get_output_embeddings().weight.shape[0]
            loss, kd, ce = chunked_token_loss_sums(
                hidden_sel, output_head(self.model), labels, teacher if self.alpha > 0 else None,
                chunk_size=self.chunk_size or auto_chunk_size(vocab), temperature=self.temperature,
                alpha=1.0 if labels_are_own else self.alpha, kind=self.kind, beta=self.beta,
            )
        if labels_are_own:
            loss = loss * self.alpha
        return loss * weight, kd, ce, sel.sum()
