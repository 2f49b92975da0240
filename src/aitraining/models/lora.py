"""LoRA adapters on a causal LM (peft): only the adapter weights train."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aitraining.errors import UserError, one_line

if TYPE_CHECKING:
    from transformers import PreTrainedModel

if TYPE_CHECKING:
    from peft import PeftModel


def apply_lora(
    model: PreTrainedModel, *, r: int, alpha: int, dropout: float, target_modules: str | list[str]
) -> PeftModel:
    """Wrap a causal LM with LoRA adapters; only the adapter weights stay trainable.

    Args:
        model: The model to adapt (modified in place by peft).
        r: LoRA rank.
        alpha: LoRA scaling numerator.
        dropout: Dropout on the LoRA input.
        target_modules: ``"all-linear"``, a comma-separated string such as ``"q_proj,v_proj"``, or a list.

    Raises:
        UserError: The rank is not positive, no modules are named, or none of them exist in the model.
    """
    from peft import LoraConfig, TaskType, get_peft_model  # lazy: only LoRA runs need peft (seconds to import)

    if r <= 0:
        raise UserError(f"--lora-r: LoRA rank must be a positive integer, got {r}")
    if isinstance(target_modules, str) and target_modules.strip() != "all-linear":
        targets: str | list[str] = [part.strip() for part in target_modules.split(",") if part.strip()]
    elif isinstance(target_modules, str):
        targets = "all-linear"
    else:
        targets = list(target_modules)
    if not targets:
        raise UserError(
            "LoRA target modules are empty; name modules like 'q_proj,v_proj' or use 'all-linear'"
        )
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise UserError(
            f"LoRA target modules {targets!r} do not fit this model ({one_line(error)}); "
            "name modules that exist, e.g. 'q_proj,v_proj', or use 'all-linear'"
        ) from error
