"""How close a student is to its teacher, measured on response tokens and on answers.

One implementation of each metric, used by training (held-out rows, every epoch), by the quality benchmark
and by the demo:

- `response_metrics`: on the teacher's responses, the student's label loss (and perplexity), the KL divergence
  KL(teacher || student) at T = 1 per token, and how often the student's most likely token is the teacher's.
  With a live teacher the KL is exact (full vocabulary). With the cache it is taken over the teacher's head
  ids plus one bucket for the rest (whose mass at T = 1 is stored exactly): a lower bound of the full KL that
  only misses how differently the two spread the few percent of mass outside the head.
- `rouge_l`: ROUGE-L F-measure of the student's answers against the teacher's (the `rouge-score` package).
- `TeacherReference`: the exact (live, float32) teacher on its answers to held-out prompts, computed once, and
  any student compared to it: exact KL, top-1 agreement, label loss, ROUGE-L of the student's greedy answers.
- `TextReference`: the same comparison on text, for students with any tokenizer: the student's negative
  log-likelihood of the teacher's answers per byte, minus the teacher's own, and ROUGE-L.

With a teacher of another vocabulary (`CrossTargets`) the in-training KL and top-1 agreement are taken at the
student positions that have a teacher position predicting the same text, over the projected buckets
(Note [Across vocabularies] in losses.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from aitraining.losses import CrossTargets, DenseTargets, Targets, bucket_log_probs, cross_bucket_log_probs, divergence
from aitraining.objective import decoder, output_head, target_positions
from aitraining.params import LLMTrainingParams


def kl_and_top1(student_logits: Tensor, teacher: Targets) -> tuple[Tensor, Tensor, Tensor]:
    """KL(teacher || student) at T = 1 per position, (N,), the teacher's most likely id in the student's
    vocabulary, (N,), and which positions have a teacher at all, (N,) bool.

    The KL is exact for a live teacher (whose logits are made once for both), and over the head's buckets plus
    the rest for cached targets (never the sampled estimate: a measurement must not be random). A teacher with
    another vocabulary is compared where a teacher position predicts the same token, over what both
    vocabularies can write (its top-1 is -1 where the student has no such token)."""
    if isinstance(teacher, DenseTargets):
        z = teacher.logits(student_logits.shape[-1])
        kl = divergence(F.log_softmax(student_logits.float(), -1), F.log_softmax(z, -1), "forward_kl")
        return kl, z.argmax(-1), torch.ones_like(kl, dtype=torch.bool)
    if isinstance(teacher, CrossTargets):
        student, target = cross_bucket_log_probs(student_logits, teacher, 1.0)
        kl = torch.where(teacher.aligned, divergence(student, target, "forward_kl"), 0.0)
        return kl, teacher.vocab.to_student[teacher.teacher.ids[:, 0]], teacher.aligned
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


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure of each prediction against its reference (stemmed, as the package's authors
    recommend for English)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return sum(scores) / max(len(scores), 1)


class TeacherReference:
    """The teacher's exact distribution on its own answers to held-out prompts, computed once (its final hidden
    states at every answer token: small), then any student compared to it with `compare`.

    `params` names the teacher, the student (whose tokenizer and templates render the prompts) and the held-out
    rows as (prompt, teacher answer) pairs; the teacher runs in float32 for this, whatever the training used.
    """

    def __init__(self, params: LLMTrainingParams, work_dir: str, *, batch_size: int = 8, show_progress: bool = False) -> None:
        from aitraining import models
        from aitraining.data import load_examples, resolve_chat_template
        from aitraining.teacher import prepare_teacher
        from aitraining.train import collate, student_items

        params = params.model_copy(update={"teacher_source": "live", "mixed_precision": "no", "use_distillation": True})
        self.tokenizer = models.load_tokenizer(params.model or "", trust_remote_code=params.trust_remote_code,
                                               token=params.token)
        examples, _ = load_examples(params)
        os.makedirs(work_dir, exist_ok=True)
        teacher_items, source = prepare_teacher(params, examples, self.tokenizer, work_dir, torch.device("cpu"),
                                                show_progress=show_progress)
        chat = resolve_chat_template(self.tokenizer, params.chat_template)
        pairs = [(ex, it) for ex, it in zip(examples, student_items(examples, teacher_items, self.tokenizer, params, chat),
                                             strict=True) if it is not None]
        self.items = [it for _, it in pairs]
        self.answers = [ex.response or "" for ex, _ in pairs]
        self.max_new_tokens = max((len(it.input_ids) - it.n_prompt for it in self.items), default=1)
        self.pad = pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.batches = []
        for s in tqdm(range(0, len(self.items), batch_size), desc="teacher: reference distribution", unit="batch",
                      disable=not show_progress):
            rows = self.items[s : s + batch_size]
            self.batches.append((collate(rows, pad), source.targets(rows)))
        source.teacher.free()

    def compare(self, model: nn.Module, *, batch_size: int = 16, show_progress: bool = False) -> dict[str, Any]:
        """KL(teacher || student) at T = 1 (exact), top-1 agreement and label loss on the teacher's answers, and
        the ROUGE-L of the student's greedy answers (as long as the teacher's longest) against the teacher's."""
        from aitraining import models

        metrics = response_metrics(model, self.batches)
        prompts = [it.input_ids[: it.n_prompt] for it in self.items]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        written = [""] * len(prompts)
        stop = models.stop_ids(self.tokenizer, model)
        with torch.no_grad():
            for s in tqdm(range(0, len(order), batch_size), desc="student: answering", unit="batch",
                          disable=not show_progress):
                chunk = order[s : s + batch_size]
                outs = models.generate_answers(model, [prompts[i] for i in chunk], max_new_tokens=self.max_new_tokens,
                                               stop=stop, pad=self.pad)
                for i, out in zip(chunk, outs, strict=True):
                    written[i] = self.tokenizer.decode(out, skip_special_tokens=True)
        return {"kl_to_teacher": metrics["kl_to_teacher"], "top1_agreement": metrics["top1_agreement"],
                "ce": metrics["ce"], "perplexity": metrics["perplexity"], "rouge_l": rouge_l(written, self.answers),
                "n_tokens": metrics["n_tokens"], "answers": written}


@torch.no_grad()
def answer_log_likelihoods(model: nn.Module, rows: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 8) -> list[float]:
    """Sum of log p(answer token | prompt, earlier answer tokens) for each (prompt ids, answer ids) row."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        width = max(len(p) + len(a) for p, a in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (p, a) in enumerate(chunk):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            mask[i, : len(p) + len(a)] = 1
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


class TextReference:
    """The teacher's answers to held-out prompts as text, and how likely the teacher finds them; any model, with
    any tokenizer, is compared on the same text: per-byte log-likelihood of the answers (token-level KL is not
    defined across vocabularies) and ROUGE-L of its greedy answers.

    ``kl_per_byte`` = (the model's negative log-likelihood of the teacher's answers - the teacher's own) / bytes:
    how many more nats per byte of the teacher's text the model needs than the teacher (0 for the teacher itself;
    with answers sampled from the teacher it would estimate the sequence-level KL(teacher || model) per byte; the
    teacher's greedy answers make it a close proxy).
    """

    def __init__(self, teacher: str, rows: Sequence[tuple[str, str]], params: LLMTrainingParams) -> None:
        from aitraining import models

        self.params = params
        self.prompts = [p for p, _ in rows]
        self.answers = [a for _, a in rows]
        self.bytes = sum(len(a.encode("utf-8")) for a in self.answers)
        tokenizer = models.load_tokenizer(teacher, trust_remote_code=params.trust_remote_code, token=params.token,
                                          flag="--teacher-model")
        model = models.load_causal_lm(teacher, dtype=torch.float32, trust_remote_code=params.trust_remote_code,
                                      token=params.token, flag="--teacher-model")
        self.teacher_nll = -sum(answer_log_likelihoods(model, self._rows(tokenizer, params.effective_teacher_template)))
        del model

    def _prompt_ids(self, tokenizer: Any, template: str) -> list[list[int]]:
        from aitraining.data import encode, render_prompt, resolve_chat_template

        chat = resolve_chat_template(tokenizer, "none" if self.params.chat_template == "none" else "auto")
        out = []
        for p in self.prompts:
            text, special = render_prompt(tokenizer, [{"role": "user", "content": p}], template, chat)
            out.append(encode(tokenizer, text, add_special_tokens=special))
        return out

    def _rows(self, tokenizer: Any, template: str) -> list[tuple[list[int], list[int]]]:
        from aitraining.data import encode

        return [(p, encode(tokenizer, a, add_special_tokens=False))
                for p, a in zip(self._prompt_ids(tokenizer, template), self.answers, strict=True)]

    def compare(self, model: nn.Module, tokenizer: Any, *, batch_size: int = 16) -> dict[str, Any]:
        """The model (rendering prompts as the student does) on the teacher's answers."""
        from aitraining import models

        rows = self._rows(tokenizer, self.params.student_prompt_template)
        nll = -sum(answer_log_likelihoods(model, rows))
        prompts = [p for p, _ in rows]
        # The same text takes another number of tokens in another vocabulary (and a model may write what its
        # tokenizer would merge piece by piece): room for 1.5x the longest answer, plus a few.
        longest = int(1.5 * max(len(a) for _, a in rows)) + 4
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        stop = models.stop_ids(tokenizer, model)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        written = [""] * len(prompts)
        with torch.no_grad():
            for s in range(0, len(order), batch_size):
                chunk = order[s : s + batch_size]
                outs = models.generate_answers(model, [prompts[i] for i in chunk], max_new_tokens=longest, stop=stop,
                                               pad=pad)
                for i, out in zip(chunk, outs, strict=True):
                    written[i] = tokenizer.decode(out, skip_special_tokens=True)
        return {"kl_per_byte": (nll - self.teacher_nll) / self.bytes, "nll_per_byte": nll / self.bytes,
                "teacher_nll_per_byte": self.teacher_nll / self.bytes, "bytes": self.bytes,
                "rouge_l": rouge_l(written, self.answers), "answers": written}
