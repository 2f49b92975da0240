"""What the student learned, measured on response tokens: label loss, and against the teacher's cached
distribution, the KL divergence and how often the student's top token is the teacher's top token."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from aitraining.losses import TeacherTargets, bucket_log_probs, divergence, teacher_bucket_log_probs
from aitraining.objective import decoder, output_head, target_positions


@torch.no_grad()
def response_metrics(
    model: nn.Module,
    batches: Iterable[tuple[dict[str, Tensor], TeacherTargets | None]],
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """Mean CE on response tokens; with teacher targets also KL(teacher || student) at `temperature`
    over the teacher's top-k + tail buckets, and top-1 agreement with the teacher.

    `batches` yields (tensors with input_ids, attention_mask, n_prompt; teacher targets or None).
    """
    was_training = model.training
    model.eval()
    head = output_head(model)
    body = decoder(model)
    ce_sum = kl_sum = agree = 0.0
    n = n_teacher = 0
    for tensors, teacher in batches:
        device = next(model.parameters()).device
        ids = tensors["input_ids"].to(device)
        mask = tensors["attention_mask"].to(device)
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
        sel = target_positions(mask, tensors["n_prompt"].to(device))
        labels = ids[:, 1:][sel[:, :-1]]
        h = hidden[sel]
        for s in range(0, h.shape[0], chunk_size):
            logits = head(h[s : s + chunk_size]).float()
            ce_sum += torch.nn.functional.cross_entropy(logits, labels[s : s + chunk_size], reduction="sum").item()
            if teacher is not None:
                t = teacher.index(slice(s, s + chunk_size)).to(device)
                kl_sum += divergence(bucket_log_probs(logits, t.ids, temperature), teacher_bucket_log_probs(t)).sum().item()
                agree += (logits.argmax(-1) == t.ids[:, 0]).sum().item()
                n_teacher += logits.shape[0]
        n += h.shape[0]
    if was_training:
        model.train()
    out: dict[str, Any] = {"n_tokens": n, "ce": ce_sum / max(n, 1), "perplexity": math.exp(min(ce_sum / max(n, 1), 50))}
    if n_teacher:
        out["kl_to_teacher"] = kl_sum / n_teacher
        out["top1_agreement"] = agree / n_teacher
    return out
