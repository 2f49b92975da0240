"""A model rebuilt from a (copied, edited) config with its tensors copied in: how GGUF weights become a plain model
and how depth pruning drops layers."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


@contextlib.contextmanager
def _skip_weight_init() -> Iterator[None]:
    """Skip random initialization of a model whose every weight is about to be overwritten.

    Random init of a large model costs seconds to minutes; where transformers keeps this helper elsewhere, the
    fallback is just the slow path, not a wrong result, because callers copy every tensor afterwards.
    """
    try:
        from transformers.initialization import no_init_weights  # lazy: transformers' model code: seconds to import
    except ImportError:
        yield
        return
    with no_init_weights():
        yield


def plain_config(config: PretrainedConfig) -> PretrainedConfig:
    """Deep-copy a config and drop the quantization marker, so the copy builds a plain float model."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return config


def rebuild(
    model: PreTrainedModel, config: PretrainedConfig, rename: Callable[[str], str | None]
) -> PreTrainedModel:
    """Build a fresh model of ``model``'s class from ``config`` and copy tensors into it.

    Args:
        model: The source model.
        config: The config for the new model (already copied and edited by the caller).
        rename: Maps a source tensor name to its name in the new model, or ``None`` to drop it.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with _skip_weight_init(), torch.device(device):
        fresh = type(model)._from_config(config, dtype=model.dtype)

    state = {}
    for key, tensor in model.state_dict().items():
        new_key = rename(key)
        if new_key is not None:
            state[new_key] = tensor
    fresh.load_state_dict(state, strict=True)
    # Non-persistent buffers (rotary frequencies, masks) are not in the state dict; copy them too so the
    # result never depends on how the model class initializes them.
    fresh_buffers = dict(fresh.named_buffers())
    with torch.no_grad():
        for key, buffer in model.named_buffers():
            new_key = rename(key)
            if (
                new_key is not None
                and new_key in fresh_buffers
                and fresh_buffers[new_key].shape == buffer.shape
            ):
                fresh_buffers[new_key].copy_(buffer)
    # Skipping init also skipped weight tying; tie now that both sides hold the loaded values.
    fresh.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        fresh.generation_config = copy.deepcopy(model.generation_config)
    fresh.train(model.training)
    return fresh
