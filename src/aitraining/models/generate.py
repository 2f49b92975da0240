"""Batched answers of a causal LM: greedy or sampled, from left-padded prompts, each cut after its first stop."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from aitraining.padding import padded

if TYPE_CHECKING:
    from transformers import LogitsProcessor, PreTrainedModel, PreTrainedTokenizerBase


def generate_answers(
    model: PreTrainedModel, prompts: Sequence[list[int]], *, max_new_tokens: int, stop: set[int], pad: int,
    processors: Sequence[LogitsProcessor] = (), do_sample: bool = False,
) -> list[list[int]]:
    """Batched generation from left-padded prompts; each answer is cut after its first stop id.

    generate() fills every field left unset from the model's own generation config (a shipped
    repetition_penalty, temperature, top_k...), and its processors run before the caller's: a recorder would
    then see a distorted distribution and greedy answers would not be greedy. So the model's config is blanked
    for the call.
    """
    from transformers import GenerationConfig, LogitsProcessorList  # lazy: seconds to import

    device = next(model.parameters()).device
    input_ids, mask = padded(prompts, pad, left=True)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=sorted(stop),
                              pad_token_id=pad)
    shipped = model.generation_config
    model.generation_config = GenerationConfig(eos_token_id=sorted(stop), pad_token_id=pad,
                                               bos_token_id=shipped.bos_token_id)
    try:
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             generation_config=config, logits_processor=LogitsProcessorList(list(processors)))
    finally:
        model.generation_config = shipped
    answers = []
    for row in out[:, input_ids.shape[1] :].cpu().tolist():
        length = next((j + 1 for j, t in enumerate(row) if t in stop), len(row))
        answers.append(row[:length])
    return answers


def stop_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> set[int]:
    """Tokens that end a response: the tokenizer's EOS and the model's own (Gemma ends turns with
    <end_of_turn>, which is not its tokenizer's EOS)."""
    stop = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    shipped = model.generation_config.eos_token_id
    stop |= set(shipped if isinstance(shipped, list) else [] if shipped is None else [shipped])
    return stop
