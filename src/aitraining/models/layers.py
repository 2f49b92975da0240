"""The decoder layers of a Llama-like model: where they are, evenly spaced picks, and a config shrunk to a subset."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from aitraining.errors import UserError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

# Config entries that hold one value per decoder layer and must shrink with the layer stack. A name list
# rather than "every list of length L", because some configs hold lists of layer *indices* instead.
PER_LAYER_CONFIG_KEYS = frozenset({"layer_types", "no_rope_layers", "activation_sparsity_pattern"})


def decoder_layers(model: PreTrainedModel) -> tuple[str, torch.nn.ModuleList]:
    """Return the state-dict prefix and the module list of a Llama-like model's decoder layers."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserError(
            f"--num-layers: depth pruning supports Llama-like models (model.model.layers), not "
            f"{type(model).__name__}; pick a Llama, Qwen2, Mistral or Gemma style model"
        )
    return "model.layers", layers


def kept_layer_indices(total: int, num_layers: int) -> list[int]:
    """Return ``num_layers`` evenly spaced layer indices out of ``total``, first and last included.

    Raises:
        UserError: ``num_layers`` is outside ``1..total``.
    """
    if not 1 <= num_layers <= total:
        raise UserError(
            f"--num-layers: must be between 1 and {total} (the model's layer count), got {num_layers}"
        )
    if num_layers == 1:
        return [0]
    step = (total - 1) / (num_layers - 1)
    indices = [round(i * step) for i in range(num_layers)]
    # step >= 1 whenever num_layers <= total, so rounding never merges two picks.
    assert len(set(indices)) == num_layers, indices
    return indices


def keep_config_layers(config: PretrainedConfig, kept: Sequence[int], total: int) -> None:
    """Shrink ``config`` to the layers ``kept``: ``num_hidden_layers`` and every per-layer entry."""
    for key in PER_LAYER_CONFIG_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == total:
            setattr(config, key, type(value)(value[i] for i in kept))
    config.num_hidden_layers = len(kept)
