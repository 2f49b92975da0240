"""Vocabulary transplant: a model given another tokenizer, each new token's embedding from the old pieces that
write the same bytes."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from aitraining.align import token_bytes
from aitraining.errors import UserError
from aitraining.models.folders import clear_stale_weights, output_folder
from aitraining.models.load import load_causal_lm, load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


def transplant_tokenizer(model: PreTrainedModel, old: Any, new: Any) -> PreTrainedModel:
    """Give a model another tokenizer: a new embedding (and output head) row for every token of ``new``, the mean
    of the model's rows for the pieces that ``old`` writes the same bytes with (the longest known piece first,
    byte by byte where nothing longer fits; Fast Vocabulary Transfer). Special tokens take the old tokenizer's
    row of the same role (BOS, EOS, PAD, UNK) or the mean row. The rest of the model is untouched.
    """
    old_ids: dict[bytes, int] = {}
    for i, b in enumerate(token_bytes(old)):
        if b and b not in old_ids:
            old_ids[b] = i
    longest = max((len(b) for b in old_ids), default=1)

    def pieces(b: bytes) -> list[int]:
        out, at = [], 0
        while at < len(b):
            for end in range(min(len(b), at + longest), at, -1):
                if b[at:end] in old_ids:
                    out.append(old_ids[b[at:end]])
                    at = end
                    break
            else:
                at += 1  # a byte the old vocabulary cannot write at all: skipped
        return out

    roles = {getattr(new, f"{r}_token_id"): getattr(old, f"{r}_token_id") for r in ("unk", "pad", "bos", "eos")}
    plans: list[list[int]] = []
    for i, b in enumerate(token_bytes(new)):
        if i in roles and roles[i] is not None:
            plans.append([roles[i]])
        else:
            plans.append(pieces(b) if b else [])

    def rows(weight: torch.Tensor) -> torch.Tensor:
        w = weight.detach().float()
        mean = w[: len(old)].mean(0)
        out = torch.empty(len(plans), w.shape[1], dtype=torch.float32)
        for i, plan in enumerate(plans):
            out[i] = w[plan].mean(0) if plan else mean
        return out.to(weight.dtype)

    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr())
    embed = rows(model.get_input_embeddings().weight)
    head = None if tied or model.get_output_embeddings() is None else rows(model.get_output_embeddings().weight)
    model.resize_token_embeddings(len(new))
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(embed)
        if head is not None:
            model.get_output_embeddings().weight.copy_(head)
    for role in ("bos", "eos", "pad"):
        value = getattr(new, f"{role}_token_id")
        setattr(model.config, f"{role}_token_id", value)
        setattr(model.generation_config, f"{role}_token_id", value)
    return model


def transplant_to_folder(
    model_name: str, tokenizer_name: str, output: str, *, overwrite: bool = False, trust_remote_code: bool = False,
    token: str | None = None, allow_pickle: bool = False,
) -> str:
    """`transplant_tokenizer` of a model onto the tokenizer of another model (folder, .gguf or hub id), saved with
    that tokenizer to ``output``. A tokenizer without a chat template gets the model's own (the format the model
    was trained on; its markers are then plain text to the new tokenizer)."""
    out = output_folder(output, overwrite)
    old = load_tokenizer(model_name, trust_remote_code=trust_remote_code, token=token)
    new = load_tokenizer(tokenizer_name, trust_remote_code=trust_remote_code, token=token, flag="--tokenizer")
    for name, tok in (("--model", old), ("--tokenizer", new)):
        if not getattr(tok, "is_fast", False):
            raise UserError(f"{name}: a fast tokenizer (tokenizer.json) is needed to read what each token writes")
    model = transplant_tokenizer(load_causal_lm(model_name, trust_remote_code=trust_remote_code, token=token,
                                                allow_pickle=allow_pickle), old, new)
    if not getattr(new, "chat_template", None) and getattr(old, "chat_template", None):
        new.chat_template = old.chat_template
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        clear_stale_weights(out)
    model.save_pretrained(str(out))
    new.save_pretrained(str(out))
    (out / "README.md").write_text(
        f"# {out.name}\n\n{model_name} with the tokenizer of {tokenizer_name} ({len(new):,} tokens instead of "
        f"{len(old):,}), made by `aitraining transplant`: each new token's embedding is the mean of the old "
        "embeddings of the pieces that write the same bytes. Train it (fine-tune or distill) before use.\n",
        encoding="utf-8")
    log.info("saved %s with the %d-token tokenizer of %s to %s", model_name, len(new), tokenizer_name, out)
    return output
