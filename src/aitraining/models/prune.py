"""Depth pruning: a student made of some of a model's decoder layers, saved as a model folder to distill into."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from aitraining.errors import UserError
from aitraining.models.choose import CALIBRATION_PROMPTS, LayerChoice, calibration_prompts, choose_layers
from aitraining.models.folders import clear_stale_weights, output_folder
from aitraining.models.layers import decoder_layers, keep_config_layers, kept_layer_indices
from aitraining.models.load import load_tokenizer_and_model
from aitraining.models.rebuild import plain_config, rebuild

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


def depth_prune(model: PreTrainedModel, num_layers: int, *, kept: Sequence[int] | None = None) -> PreTrainedModel:
    """Keep ``num_layers`` decoder layers of a Llama-like model: those in ``kept`` (see `choose_layers`), or
    by default evenly spaced, ``round(linspace(0, L - 1, num_layers))``, first and last included.

    The result is a new model built from a copied config with ``num_hidden_layers=num_layers`` and per-layer
    config lists sliced to match; because it is built fresh, attention modules get ``layer_idx`` values
    0..n-1 and the KV cache works. The input model is not modified.

    Raises:
        UserError: ``num_layers`` is out of range, or the model has no ``model.model.layers``.
    """
    prefix, layers = decoder_layers(model)
    total = len(layers)
    even = kept_layer_indices(total, num_layers)
    kept = even if kept is None else sorted(kept)
    if len(set(kept)) != num_layers or not all(0 <= i < total for i in kept):
        raise ValueError(f"kept layers {kept}: need {num_layers} distinct indices in 0..{total - 1}")
    new_index = {old: new for new, old in enumerate(kept)}

    config = plain_config(model.config)
    keep_config_layers(config, kept, total)

    layer_prefix = prefix + "."

    def rename(key: str) -> str | None:
        if not key.startswith(layer_prefix):
            return key
        index, _, rest = key[len(layer_prefix) :].partition(".")
        if int(index) not in new_index:
            return None
        return f"{layer_prefix}{new_index[int(index)]}.{rest}"

    pruned = rebuild(model, config, rename)
    for new, module in enumerate(decoder_layers(pruned)[1]):
        # Built fresh these are already right; set them anyway in case a model class derives them oddly.
        for submodule in module.modules():
            if hasattr(submodule, "layer_idx"):
                submodule.layer_idx = new
    log.info("depth pruning kept layers %s of %d", kept, total)
    return pruned


def _layer_list(text: str, num_layers: int, total: int) -> list[int]:
    """``--layers 0,1,8,...``: the layers to keep, checked against ``--num-layers`` and the model's depth."""
    try:
        kept = [int(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--layers: expected measured, even or comma-separated layer indices, got '{text}'") from None
    if len(kept) != num_layers or len(set(kept)) != num_layers or not all(0 <= i < total for i in kept):
        raise UserError(f"--layers: need {num_layers} different indices (--num-layers) in 0..{total - 1}, got '{text}'")
    return sorted(kept)


def _pruned_readme(model_name: str, kept: list[int], total: int, choice: LayerChoice | None,
                   calibration_data: str | None = None) -> str:
    """Model card for a depth-pruned student."""
    even = kept == kept_layer_indices(total, len(kept))
    source = f" from `{calibration_data}`" if calibration_data else ""
    how = ("evenly spaced with the first and last kept" if choice is None and even else
           "as given to `aitraining prune --layers`" if choice is None else
           f"chosen by measurement: KL(original || pruned) {choice.kl:.2f} per token on the original's answers "
           f"to {choice.prompts} calibration prompts{source} ({choice.tokens} tokens), where evenly spaced layers "
           f"give {choice.even_kl:.2f}")
    return (
        "# Depth-pruned student model\n\n"
        f"This model keeps {len(kept)} of the {total} decoder layers of `{model_name}`: layers "
        f"{', '.join(str(i) for i in kept)} (0-based), {how}. "
        "Embeddings, final norm and output head are copied unchanged.\n\n"
        "It was made with `aitraining` as the starting point of a distillation student: dropping layers "
        "hurts quality, which distillation from the original model is meant to win back. Do not use it "
        "as-is.\n"
    )


def prune_to_folder(
    model_name: str,
    num_layers: int,
    output: str,
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    token: str | None = None,
    allow_pickle: bool = False,
    layers: str = "measured",
    calibration_data: str | None = None,
) -> str:
    """Depth-prune a model and save it, with its tokenizer and a short README, to ``output``.

    Args:
        model_name: Folder, ``.gguf`` file or hub id of the model to prune.
        num_layers: How many decoder layers to keep.
        output: Folder to write; must be missing or empty unless ``overwrite``.
        layers: ``"measured"``: the layers whose removal changes the model's answers least (`choose_layers`);
            ``"even"``: evenly spaced, first and last kept (instant, and much further from the original); or the
            0-based indices to keep, comma-separated (e.g. a measured choice from an earlier pruned model's README).
        calibration_data: with ``"measured"``, a data file or folder (the formats of ``--data-path``) whose prompts
            the layers are measured on (`calibration_prompts`) instead of the built-in English ones.
        overwrite: Write into a non-empty folder (old weight files there are removed first).
        trust_remote_code: Allow model code from the hub.
        token: Hub token for private models.

    Returns:
        ``output``.

    Raises:
        UserError: ``output`` is a file, or non-empty without ``overwrite``; or loading/pruning failed.
    """
    out = output_folder(output, overwrite)
    if calibration_data is not None and layers != "measured":
        raise UserError(f"--calibration-data: only --layers measured measures anything (--layers {layers} does not); "
                        "drop one of the two")
    prompts = calibration_prompts(calibration_data) if calibration_data is not None else CALIBRATION_PROMPTS

    tokenizer, model = load_tokenizer_and_model(model_name, trust_remote_code=trust_remote_code, token=token,
                                                allow_pickle=allow_pickle)
    total = len(decoder_layers(model)[1])
    kept = kept_layer_indices(total, num_layers)  # evenly spaced; and the range check, before any measuring
    if layers not in ("measured", "even"):
        kept = _layer_list(layers, num_layers, total)
    choice = choose_layers(model, tokenizer, num_layers, prompts=prompts) if layers == "measured" else None
    if choice:
        kept = choice.kept
        log.info("kept layers %s: KL to the original %.3f per answer token (evenly spaced: %.3f)", kept, choice.kl,
                 choice.even_kl)
    pruned = depth_prune(model, num_layers, kept=kept)
    del model

    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        clear_stale_weights(out)
    pruned.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "README.md").write_text(_pruned_readme(model_name, kept, total, choice, calibration_data), encoding="utf-8")
    log.info("saved %d-layer student pruned from %s to %s", num_layers, model_name, out)
    return output
