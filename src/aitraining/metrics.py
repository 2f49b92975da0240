"""How close a student is to its teacher, measured on response tokens and on answers: one implementation of each
metric, used by training (held-out rows, every epoch), by the judge (judge.py), the benchmarks and the demo.

- `response_metrics`: on the teacher's responses, the student's label loss (and perplexity), the KL divergence
  KL(teacher || student) at T = 1 per token, and how often the student's most likely token is the teacher's.
  With a live teacher the KL is exact (full vocabulary). With the cache it is taken over the teacher's head
  ids plus one bucket for the rest (whose mass at T = 1 is stored exactly): a lower bound of the full KL that
  only misses how differently the two spread the few percent of mass outside the head. With a teacher of another
  vocabulary (`CrossTargets`) KL and top-1 agreement are taken at the student positions that have a teacher
  position predicting the same text, against the teacher's distribution projected onto the student's vocabulary
  (Note [Across vocabularies] in signal.py).
- `rouge_l_scores`: ROUGE-L F-measure of each of the student's answers against the teacher's (the `rouge-score`
  package); `paired_difference`: whether two models' mean differs by more than the prompts drawn;
  `repeated_trigrams`: how much an answer repeats itself.
- `answer_log_likelihoods`: how likely a model finds given answers (the judge's per-byte comparison).
- `model_facts`: parameters, bytes on disk and generation speed.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from aitraining.losses import bucket_log_probs, divergence
from aitraining.models.generate import generate_answers, stop_ids
from aitraining.models.heads import causal_lm, decoder, output_head
from aitraining.models.load import count_parameters
from aitraining.objective import target_positions
from aitraining.padding import padded
from aitraining.signal import CrossTargets, DenseTargets, Targets


def kl_and_top1(student_logits: Tensor, teacher: Targets) -> tuple[Tensor, Tensor, Tensor]:
    """KL(teacher || student) at T = 1 per position, (N,), the teacher's most likely id in the student's
    vocabulary, (N,), and which positions have a teacher at all, (N,) bool.

    The KL is exact for a live teacher (whose logits are made once for both), and over the head's buckets plus
    the rest for cached targets (never the sampled estimate: a measurement must not be random). A teacher with
    another vocabulary is compared where a teacher position predicts the same token, by its distribution
    projected onto the student's vocabulary."""
    if isinstance(teacher, DenseTargets):
        z = teacher.logits(student_logits.shape[-1])
        kl = divergence(F.log_softmax(student_logits.float(), -1), F.log_softmax(z, -1), "forward_kl")
        return kl, z.argmax(-1), torch.ones_like(kl, dtype=torch.bool)
    if isinstance(teacher, CrossTargets):  # in the student's vocabulary already (projected when cached)
        kl, top1, _ = kl_and_top1(student_logits, teacher.teacher)
        return torch.where(teacher.aligned, kl, 0.0), top1, teacher.aligned
    student = bucket_log_probs(student_logits, teacher.ids[:, : teacher.k], 1.0)
    kl = divergence(student, teacher.bucket_log_probs(1.0), "forward_kl")
    return kl, teacher.ids[:, 0], torch.ones_like(kl, dtype=torch.bool)


@torch.no_grad()
def response_metrics(
    model: nn.Module,
    batches: Iterable[tuple[dict[str, Tensor], Targets | None]],
    *,
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """Mean label loss (ce, perplexity) on response tokens; with a teacher also `kl_to_teacher` (mean KL at
    T = 1, see `kl_and_top1`) and `top1_agreement`.

    `batches` yields (tensors with input_ids, attention_mask, n_prompt; the teacher at the trained positions
    or None).
    """
    was_training = model.training
    model.eval()
    head = output_head(model)
    body = decoder(model)
    device = next(model.parameters()).device
    ce_sum = kl_sum = agree = 0.0
    n = n_teacher = 0
    for tensors, teacher in batches:
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
                kl, top1, counted = kl_and_top1(logits, t)
                kl_sum += kl.sum().item()
                agree += ((logits.argmax(-1) == top1) & counted).sum().item()
                n_teacher += int(counted.sum().item())
        n += h.shape[0]
    if was_training:
        model.train()
    out: dict[str, Any] = {"n_tokens": n, "ce": ce_sum / max(n, 1), "perplexity": math.exp(min(ce_sum / max(n, 1), 50))}
    if n_teacher:
        out["kl_to_teacher"] = kl_sum / n_teacher
        out["top1_agreement"] = agree / n_teacher
    return out


def paired_difference(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], *, draws: int = 10_000,
                      seed: int = 0) -> dict[str, Any]:
    """The mean of a - b over prompts (each prompt's difference averaged over runs: a[r][i] and b[r][i] are run
    r's scores on prompt i, e.g. ROUGE-L per answer of one seed) and its 95 % interval from resampling the
    prompts (percentile bootstrap): whether a difference is more than the prompts that happened to be drawn."""
    n = len(a[0])
    diffs = [sum(x[i] - y[i] for x, y in zip(a, b, strict=True)) / len(a) for i in range(n)]
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(draws))
    lo, hi = means[int(0.025 * draws)], means[int(0.975 * draws) - 1]
    return {"mean": sum(diffs) / n, "ci95": [lo, hi], "excludes_zero": lo > 0 or hi < 0, "prompts": n, "runs": len(a)}


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[Any]:
    """ROUGE-L of each prediction against its reference (stemmed, as the package's authors recommend for
    English): the package's scores, with precision, recall and fmeasure."""
    from rouge_score import rouge_scorer  # lazy: only judging answers needs it (and nltk, slow to import)

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"] for pred, ref in zip(predictions, references, strict=True)]


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure of each prediction against its reference (`rouge_l`)."""
    return [score.fmeasure for score in rouge_l(predictions, references)]


def repeated_trigrams(answer: str) -> float:
    """The share of an answer's word trigrams that repeat an earlier one: 0 for text that never repeats itself,
    near 1 for a loop ("the list of the list of ..."); 0 under three words. Small students that write a teacher's
    words in order may still loop under greedy decoding, which ROUGE-L alone does not show."""
    words = answer.split()
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return 1 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0


def mean(values: Sequence[float]) -> float:
    return sum(values) / max(len(values), 1)


@torch.no_grad()
def answer_log_likelihoods(model: nn.Module, rows: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 8) -> list[float]:
    """Sum of log p(answer token | prompt, earlier answer tokens) for each (prompt ids, answer ids) row."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        ids, mask = padded([p + a for p, a in chunk], 0)
        hidden = decoder(model)(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        head = output_head(model)
        for i, (p, a) in enumerate(chunk):
            if not a:
                out.append(0.0)
                continue
            logp = F.log_softmax(head(hidden[i, len(p) - 1 : len(p) + len(a) - 1]).float(), -1)
            out.append(logp.gather(-1, torch.tensor(a, device=device).unsqueeze(-1)).sum().item())
    if was_training:
        model.train()
    return out


def greedy_texts(model: nn.Module, tokenizer: Any, prompts: Sequence[list[int]], *, max_new_tokens: int, pad: int,
                 batch_size: int = 16, show_progress: bool = False) -> list[str]:
    """The model's greedy answer to each prompt (token ids) as text, in batches of prompts of similar length."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    written = [""] * len(prompts)
    stop = stop_ids(tokenizer, model)
    with torch.no_grad():
        for s in tqdm(range(0, len(order), batch_size), desc="student: answering", unit="batch",
                      disable=not show_progress):
            chunk = order[s : s + batch_size]
            outs = generate_answers(model, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens, stop=stop,
                                    pad=pad)
            for i, out in zip(chunk, outs, strict=True):
                written[i] = tokenizer.decode(out, skip_special_tokens=True)
    return written


def weights_on_disk(name: str) -> int | None:
    """Bytes of a model's weight files (safetensors, bin, gguf) in its folder, or of its .gguf file; None for a
    hub id that is not on this machine."""
    if os.path.isfile(name):
        return os.path.getsize(name)
    if not os.path.isdir(name):
        return None
    return sum(os.path.getsize(os.path.join(name, f)) for f in os.listdir(name)
               if f.endswith((".safetensors", ".bin", ".gguf", ".pt")) and os.path.isfile(os.path.join(name, f)))


@torch.no_grad()
def generation_speed(model: nn.Module, prompts: Sequence[list[int]], *, pad: int, new_tokens: int = 32) -> float:
    """Greedy generation tokens per second, one prompt at a time (what a single user waits for), counted over
    the tokens actually written (a stop token ends an answer early). The first prompt warms the model up and
    is not counted."""
    was_training = model.training
    model.eval()
    written, seconds = 0, 0.0
    for i, prompt in enumerate(prompts):
        started = time.perf_counter()
        out = generate_answers(model, [prompt], max_new_tokens=new_tokens, stop=set(), pad=pad)
        if i or len(prompts) == 1:
            seconds += time.perf_counter() - started
            written += len(out[0])
    if was_training:
        model.train()
    return written / max(seconds, 1e-9)


def model_facts(name: str, model: nn.Module, prompts: Sequence[list[int]], *, pad: int) -> dict[str, Any]:
    """Parameters, bytes on disk and generation speed of a model, as the comparison reports them."""
    return {"parameters": count_parameters(causal_lm(model)), "disk_bytes": weights_on_disk(name),
            "tokens_per_s": generation_speed(model, prompts, pad=pad)}


# ---------------------------------------------------------------------------------------- judging model folders
