"""A model as the loss sees it: the decoder body, and the output head given as tensors."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from aitraining.chunked import LinearHead


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def output_head(model: nn.Module) -> LinearHead | Callable[[Tensor], Tensor]:
    """The output head as tensors: hidden (n, H) -> logits (n, V), with final-logit soft-capping where the
    model has it (Gemma). Given as tensors, the loss takes its gradients chunk by chunk (chunked.py)."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    cap = getattr(lm.config, "final_logit_softcapping", None) or None
    if isinstance(head, nn.Linear):
        return LinearHead(head.weight, head.bias, cap)

    # A wrapped head (e.g. LoRA on lm_head): a plain callable, for which the loss checkpoints chunks instead.
    def wrapped(h: Tensor) -> Tensor:
        z = head(h)
        return z if not cap else torch.tanh(z / cap) * cap

    return wrapped


def decoder(model: nn.Module) -> nn.Module:
    return causal_lm(model).get_decoder()
