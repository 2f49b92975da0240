"""Which decoder layers a depth-pruned student keeps, by measurement: those whose removal changes the model's own
answers least (Note [Choosing layers])."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from aitraining.data.examples import DataSettings, read_examples
from aitraining.data.templates import encode, render_prompt
from aitraining.errors import UserError
from aitraining.models.generate import generate_answers, stop_ids
from aitraining.models.heads import decoder, output_head
from aitraining.models.layers import PER_LAYER_CONFIG_KEYS, decoder_layers, keep_config_layers, kept_layer_indices
from aitraining.padding import pad_id, padded

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

# Prompts whose answers `choose_layers` measures a pruned model on when no others are given: written for this,
# of different kinds (explaining, listing, writing, code, arithmetic, advice), short enough to answer fast.
CALIBRATION_PROMPTS = (
    "Explain why the sky is blue to a ten-year-old.",
    "Write a short, polite email asking a colleague to review my report by Friday.",
    "List three ways to save water at home.",
    "What is the difference between a list and a tuple in Python?",
    "Tell a short story about a lost dog finding its way home.",
    "How many miles are 5 kilometres? Show the calculation.",
    "Suggest a quick vegetarian dinner and how to cook it.",
    "What should I check before buying a used car?",
    "Write a haiku about autumn rain.",
    "Why do we have leap years?",
    "Give me three tips for a job interview.",
    "Translate 'Where is the train station?' into French and Spanish.",
    "Write a Python function that returns the largest number in a list.",
    "What are the main causes of inflation?",
    "Describe a healthy morning routine in a few sentences.",
    "Compare cats and dogs as pets.",
)


def calibration_prompts(path: str, n: int = len(CALIBRATION_PROMPTS)) -> list[str]:
    """``--calibration-data``: up to ``n`` user prompts spread evenly over a data file or folder in the formats
    of ``--data-path`` (prompt-only rows, pairs or conversations: the last user turn before any answer), so that
    `choose_layers` measures the pruned model on the kind of text it will be trained and used on.

    Raises:
        UserError: the data cannot be read or holds no prompt (the message names --calibration-data).
    """
    try:
        examples = read_examples(DataSettings(path, use_distillation=True, holdout_share=0.0)).train
    except UserError as e:
        raise UserError(str(e).replace("--data-path", "--calibration-data")) from None
    prompts = [ex.prompt_text for ex in examples]
    if len(prompts) > n:
        prompts = [prompts[i * len(prompts) // n] for i in range(n)]
    return prompts


@dataclass
class LayerChoice:
    """The decoder layers `choose_layers` keeps, and how far the pruned model's answers are from the
    original's: mean per-token KL(original || pruned) on the original's greedy answers to the calibration
    prompts (``prompts`` of them, ``tokens`` answer tokens), for the chosen layers and for evenly spaced ones."""
    kept: list[int]
    kl: float
    even_kl: float
    tokens: int
    prompts: int = len(CALIBRATION_PROMPTS)


@contextlib.contextmanager
def _only_layers(model: PreTrainedModel, kept: Sequence[int]) -> Iterator[None]:
    """Run ``model`` with only the decoder layers ``kept`` (for forward passes without a KV cache): the same
    module list and per-layer config entries `depth_prune` keeps, swapped in place and restored after."""
    _, layers = decoder_layers(model)
    config = model.config
    saved = {key: getattr(config, key) for key in (*PER_LAYER_CONFIG_KEYS, "num_hidden_layers") if hasattr(config, key)}
    model.model.layers = nn.ModuleList([layers[i] for i in kept])
    keep_config_layers(config, kept, len(layers))
    try:
        yield
    finally:
        model.model.layers = layers
        for key, value in saved.items():
            setattr(config, key, value)


@dataclass
class _Calibration:
    input_ids: Tensor
    attention_mask: Tensor
    scored: Tensor  # bool (B, L): positions whose next token is an answer token
    reference: Tensor  # (n, V) float32 log-probabilities of the whole model at the scored positions


@torch.no_grad()
def _calibration(model: PreTrainedModel, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> _Calibration:
    """The model's own greedy answers to ``prompts`` (in its chat template when it has one), as one right-padded
    batch with its log-probabilities on them."""
    template = getattr(tokenizer, "chat_template", None)
    prompt_ids = [encode(tokenizer, text, add_special_tokens=special)
                  for text, special in (render_prompt(tokenizer, [{"role": "user", "content": p}], "{input}", template)
                                        for p in prompts)]
    pad = pad_id(tokenizer)
    answers = generate_answers(model, prompt_ids, max_new_tokens=max_new_tokens, stop=stop_ids(tokenizer, model), pad=pad)
    rows = [(p, a) for p, a in zip(prompt_ids, answers, strict=True) if a]
    if not rows:
        raise UserError("--layers measured: the model answered none of the calibration prompts (each answer ended at "
                        "once); pass --layers even or the layers to keep")
    input_ids, attention = padded([p + a for p, a in rows], pad)
    scored = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (p, a) in enumerate(rows):
        scored[i, len(p) - 1 : len(p) + len(a) - 1] = True
    device = next(model.parameters()).device
    cal = _Calibration(input_ids.to(device), attention.to(device), scored.to(device), torch.empty(0))
    cal.reference = _answer_log_probs(model, cal)
    return cal


@torch.no_grad()
def _answer_log_probs(model: PreTrainedModel, cal: _Calibration) -> Tensor:
    hidden = decoder(model)(input_ids=cal.input_ids, attention_mask=cal.attention_mask, use_cache=False).last_hidden_state
    return torch.log_softmax(output_head(model)(hidden[cal.scored]).float(), dim=-1)


@torch.no_grad()
def _kl_without(model: PreTrainedModel, cal: _Calibration, kept: Sequence[int]) -> float:
    with _only_layers(model, kept):
        pruned = _answer_log_probs(model, cal)
    return float((cal.reference.exp() * (cal.reference - pruned)).sum(-1).mean())


@torch.no_grad()
def _kls_without_each(model: PreTrainedModel, cal: _Calibration, kept: list[int], done: Callable[[], Any]) -> list[float]:
    """`_kl_without` for ``kept`` less each of its layers in turn. The hidden state entering every layer (and the
    final norm) is taken from one forward pass of ``kept``; the trial without layer j starts from the state that
    entered j and runs only the layers after it, about half the work of running the whole stack each time."""
    _, layers = decoder_layers(model)
    stack = [layers[i] for i in kept] + [model.model.norm]
    entering: list[Tensor] = []

    def take(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        entering.append(args[0] if args else kwargs["hidden_states"])

    hooks = [module.register_forward_pre_hook(take, with_kwargs=True) for module in stack]
    try:
        with _only_layers(model, kept):
            decoder(model)(input_ids=cal.input_ids, attention_mask=cal.attention_mask, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    kls = []
    for j in range(len(kept)):

        def start_from(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], state: Tensor = entering[j]):
            return ((state, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": state})

        hook = stack[j + 1].register_forward_pre_hook(start_from, with_kwargs=True)
        try:
            kls.append(_kl_without(model, cal, kept[j + 1 :]))
        finally:
            hook.remove()
        done()
    return kls


def choose_layers(
    model: PreTrainedModel, tokenizer: Any, num_layers: int, *, prompts: Sequence[str] = CALIBRATION_PROMPTS,
    max_new_tokens: int = 48,
) -> LayerChoice:
    """The ``num_layers`` decoder layers whose model answers most like the whole one (Note [Choosing layers]).

    Raises:
        UserError: ``num_layers`` is out of range, or the model has no ``model.model.layers``.
    """
    total = len(decoder_layers(model)[1])
    even = kept_layer_indices(total, num_layers)
    cal = _calibration(model, tokenizer, prompts, max_new_tokens)
    kept = list(range(total))
    rounds = []  # how many layers each round drops: a quarter of what is left to drop, at least one
    while (left := total - sum(rounds) - num_layers) > 0:
        rounds.append(max(1, left // 4))
    log.info("choosing %d of %d layers by measurement: the whole model answers %d prompts, then each round tries "
             "removing each remaining layer", num_layers, total, len(prompts))
    bar = tqdm(total=sum(total - sum(rounds[:i]) for i in range(len(rounds))), desc="choosing layers", unit="trial",
               disable=None)
    for drop in rounds:
        trials = sorted(zip(_kls_without_each(model, cal, kept, bar.update), kept, strict=True))
        for _, layer in trials[:drop]:
            kept.remove(layer)
    bar.close()
    return LayerChoice(kept, _kl_without(model, cal, kept), _kl_without(model, cal, even), int(cal.scored.sum()),
                       len(prompts))


# Note [Choosing layers]
# ~~~~~~~~~~~~~~~~~~~~~~~
# Which layers a depth-pruned student keeps decides where distillation starts. For the bundled teacher (30
# layers, 8 kept) evenly spaced layers give a model whose answers are KL 16.0 per token from the teacher's on the
# quality benchmark's held-out prompts; the 8 layers picked below (0, 1, 8, 11, 21, 24, 27, 29), 5.9, and after
# the same training both arms of that benchmark end far closer to the teacher (BENCHMARKS.md).
# They are picked by measurement: starting from the whole stack, each round tries removing every remaining
# layer alone, measures KL(whole || pruned) on the whole model's greedy answers to CALIBRATION_PROMPTS, and drops
# the layers whose removal costs least (a quarter of those still to drop, at least one, so the last choices
# are made one at a time). Measured on that teacher: plain greedy (one per round, 2.4x the trials) on 16 of the
# benchmark's training answers chose the same 8 layers; dropping half of what is left per round chose worse ones
# (held-out KL 8.1), and so did 8 prompts instead of 16 (7.9); contiguous blocks (the first a and the last 8 - a
# layers, a = 1..6) reach 7.9 at best. Each trial is one forward pass of about 700 answer tokens through the
# remaining stack, with the layers swapped in place (_only_layers), so no copy of the model is made, and starting
# from the hidden state that entered the dropped layer (_kls_without_each), so only the layers after it run:
# 179 trials, about 4 minutes for this teacher on two CPU cores.
