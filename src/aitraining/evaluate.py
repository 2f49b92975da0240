"""How close a student is to its teacher, measured on response tokens and on answers.

One implementation of each metric, used by training (held-out rows, every epoch), by the quality benchmark
and by the demo:

- `response_metrics`: on the teacher's responses, the student's label loss (and perplexity), the KL divergence
  KL(teacher || student) at T = 1 per token, and how often the student's most likely token is the teacher's.
  With a live teacher the KL is exact (full vocabulary). With the cache it is taken over the teacher's head
  ids plus one bucket for the rest (whose mass at T = 1 is stored exactly): a lower bound of the full KL that
  only misses how differently the two spread the few percent of mass outside the head.
- `rouge_l_scores`: ROUGE-L F-measure of each of the student's answers against the teacher's (the `rouge-score`
  package); `paired_difference`: whether two models' mean differs by more than the prompts drawn.
- `TeacherReference`: the exact (live, float32) teacher on its answers to held-out prompts, computed once, and
  any student compared to it: exact KL, top-1 agreement, label loss, ROUGE-L of the student's greedy answers.
- `TextReference`: the same comparison on text, for students with any tokenizer: the student's negative
  log-likelihood of the teacher's answers per byte, minus the teacher's own, and ROUGE-L.

With a teacher of another vocabulary (`CrossTargets`) the in-training KL and top-1 agreement are taken at the
student positions that have a teacher position predicting the same text, against the teacher's distribution
projected onto the student's vocabulary (Note [Across vocabularies] in losses.py).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from aitraining.losses import CrossTargets, DenseTargets, Targets, bucket_log_probs, divergence
from aitraining.models import decoder, output_head
from aitraining.objective import target_positions
from aitraining.params import LLMTrainingParams

log = logging.getLogger(__name__)


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
    import random

    n = len(a[0])
    diffs = [sum(x[i] - y[i] for x, y in zip(a, b, strict=True)) / len(a) for i in range(n)]
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(draws))
    lo, hi = means[int(0.025 * draws)], means[int(0.975 * draws) - 1]
    return {"mean": sum(diffs) / n, "ci95": [lo, hi], "excludes_zero": lo > 0 or hi < 0, "prompts": n, "runs": len(a)}


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[Any]:
    """ROUGE-L of each prediction against its reference (stemmed, as the package's authors recommend for
    English): the package's scores, with precision, recall and fmeasure."""
    from rouge_score import rouge_scorer

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


def _mean(values: Sequence[float]) -> float:
    return sum(values) / max(len(values), 1)


class TeacherReference:
    """The teacher's exact distribution on its own answers to held-out prompts, computed once (its final hidden
    states at every answer token: small), then any student compared to it with `compare`.

    `params` names the teacher, the student (whose tokenizer and templates render the prompts) and the held-out
    rows as (prompt, teacher answer) pairs; the teacher runs in float32 for this, whatever the training used.
    """

    def __init__(self, params: LLMTrainingParams, work_dir: str, *, batch_size: int = 8, show_progress: bool = False) -> None:
        from aitraining import models
        from aitraining.data import read_examples, resolve_chat_template, skipped_summary
        from aitraining.train import taught_items

        params = params.model_copy(update={"teacher_source": "live", "mixed_precision": "no", "use_distillation": True,
                                            "holdout_share": 0.0})
        tokenizer = models.load_tokenizer(params.model or "", trust_remote_code=params.trust_remote_code,
                                          token=params.token)
        loaded = read_examples(params)
        examples = loaded.train
        if loaded.skipped:
            log.warning("%s", skipped_summary(loaded.skipped, len(examples)))
        os.makedirs(work_dir, exist_ok=True)
        chat = resolve_chat_template(tokenizer, params.chat_template)
        items, source = taught_items(params, examples, tokenizer, chat, work_dir, torch.device("cpu"),
                                     show_progress=show_progress)
        self._build([it for it in items if it is not None], source, tokenizer, batch_size=batch_size,
                    show_progress=show_progress)
        self.prompts = [prompt_text(ex) for ex, it in zip(examples, items, strict=True) if it is not None]

    @classmethod
    def from_items(cls, items: Sequence[Any], source: Any, tokenizer: Any, prompts: Sequence[str], *,
                   batch_size: int = 8, show_progress: bool = False) -> TeacherReference:
        """The reference on a run's own held-out items (train.Item: the student's prompt and the teacher's
        response ids; `prompts`: their user text) and a live teacher source (teacher.LiveTeacher)."""
        self = cls.__new__(cls)
        self._build(list(items), source, tokenizer, batch_size=batch_size, show_progress=show_progress)
        self.prompts = list(prompts)
        return self

    def _build(self, items: list[Any], source: Any, tokenizer: Any, *, batch_size: int, show_progress: bool) -> None:
        from aitraining.train import collate

        self.tokenizer = tokenizer
        self.items = items
        self.answers = [tokenizer.decode(it.input_ids[it.n_prompt :], skip_special_tokens=True) for it in items]
        self.max_new_tokens = max((len(it.input_ids) - it.n_prompt for it in self.items), default=1)
        self.pad = pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
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
        scores = rouge_l_scores(written, self.answers)
        return {"kl_to_teacher": metrics["kl_to_teacher"], "top1_agreement": metrics["top1_agreement"],
                "ce": metrics["ce"], "perplexity": metrics["perplexity"], "rouge_l": _mean(scores),
                "rouge_l_per_answer": scores, "repetition": _mean([repeated_trigrams(a) for a in written]),
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
        tokenizer, model = models.load_tokenizer_and_model(teacher, trust_remote_code=params.trust_remote_code,
                                                           allow_pickle=params.allow_pickle_weights, token=params.token,
                                                           flag="--teacher-model")
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
        scores = rouge_l_scores(written, self.answers)
        return {"kl_per_byte": (nll - self.teacher_nll) / self.bytes, "nll_per_byte": nll / self.bytes,
                "teacher_nll_per_byte": self.teacher_nll / self.bytes, "bytes": self.bytes,
                "rouge_l": _mean(scores), "rouge_l_per_answer": scores,
                "repetition": _mean([repeated_trigrams(a) for a in written]), "answers": written}


def prompt_text(ex: Any) -> str:
    """The user's text of an example (its last message), for tables and samples."""
    return (ex.messages or [{"content": ex.text or ""}])[-1].get("content", "")


# --------------------------------------------------------------------------------- smaller, faster: by how much


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
    import time

    from aitraining import models

    was_training = model.training
    model.eval()
    written, seconds = 0, 0.0
    for i, prompt in enumerate(prompts):
        started = time.perf_counter()
        out = models.generate_answers(model, [prompt], max_new_tokens=new_tokens, stop=set(), pad=pad)
        if i or len(prompts) == 1:
            seconds += time.perf_counter() - started
            written += len(out[0])
    if was_training:
        model.train()
    return written / max(seconds, 1e-9)


def model_facts(name: str, model: nn.Module, prompts: Sequence[list[int]], *, pad: int) -> dict[str, Any]:
    """Parameters, bytes on disk and generation speed of a model, as the comparison reports them."""
    from aitraining import models

    return {"parameters": models.count_parameters(models.causal_lm(model)), "disk_bytes": weights_on_disk(name),
            "tokens_per_s": generation_speed(model, prompts, pad=pad)}


# ---------------------------------------------------------------------------------------- judging model folders


def judge_models(reference: TeacherReference, folders: dict[str, str], params: LLMTrainingParams, *,
                 show_progress: bool = False) -> dict[str, Any]:
    """Each model (role -> folder, .gguf or hub id; the role "teacher" loads in float32 as the teacher) against
    the reference: its metrics, parameters, bytes on disk and generation speed, and its greedy answers."""
    from aitraining import models

    speed_prompts = [it.input_ids[: it.n_prompt] for it in reference.items][:4]
    rows: dict[str, Any] = {}
    for role, name in folders.items():
        flag = "--teacher-model" if role == "teacher" else "--model"
        model = models.load_causal_lm(name, dtype=torch.float32, trust_remote_code=params.trust_remote_code,
                                      allow_pickle=params.allow_pickle_weights, token=params.token, flag=flag)
        got = reference.compare(model, show_progress=show_progress)
        rows[role] = {"model": name, **{k: got[k] for k in ("kl_to_teacher", "top1_agreement", "ce", "perplexity",
                                                           "rouge_l", "rouge_l_per_answer", "repetition")},
                      **model_facts(name, model, speed_prompts, pad=reference.pad), "answers": got["answers"]}
        del model
    return {"held_out_rows": len(reference.items),
            "held_out_tokens": sum(len(it.input_ids) - it.n_prompt for it in reference.items),
            "judge": "the float32 teacher's exact distribution: KL(teacher || model) at T = 1 per response token over "
                     "the full vocabulary, top-1 agreement, perplexity of the responses; ROUGE-L of greedy answers "
                     "against the teacher's responses; generation tokens/s one prompt at a time on this machine",
            "models": rows, "prompts": reference.prompts, "references": reference.answers}


def judge_on_text(teacher: str, rows: Sequence[tuple[str, str]], folders: dict[str, str], params: LLMTrainingParams
                  ) -> dict[str, Any]:
    """Models of any tokenizer against the teacher's answers as text (TextReference): KL and NLL per byte,
    ROUGE-L, parameters, bytes on disk, generation speed."""
    from aitraining import models

    reference = TextReference(teacher, rows, params)
    out: dict[str, Any] = {}
    for role, name in folders.items():
        flag = "--teacher-model" if role == "teacher" else "--model"
        tokenizer, model = models.load_tokenizer_and_model(name, trust_remote_code=params.trust_remote_code,
                                                           allow_pickle=params.allow_pickle_weights, token=params.token,
                                                           flag=flag)
        got = reference.compare(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        prompts = reference._prompt_ids(tokenizer, params.student_prompt_template)[:4]
        out[role] = {"model": name, **{k: got[k] for k in ("kl_per_byte", "nll_per_byte", "rouge_l", "rouge_l_per_answer",
                                                          "repetition")},
                     **model_facts(name, model, prompts, pad=pad), "answers": got["answers"]}
        del model
    return {"held_out_rows": len(rows), "held_out_bytes": reference.bytes,
            "judge": "the teacher's answers as text: the model's negative log-likelihood per byte minus the teacher's "
                     "(KL per byte; tokenizers differ), ROUGE-L of greedy answers; tokens/s one prompt at a time",
            "models": out, "prompts": reference.prompts, "references": reference.answers}


def run_eval(params: LLMTrainingParams, output: str, *, baseline: str | None = None, show_progress: bool = True
             ) -> dict[str, Any]:
    """`aitraining eval`: the model (and a baseline) against the teacher on the rows of --data-path (the teacher
    writes the responses that rows lack, greedily, once: they are kept beside `output` for the next model);
    writes `output` (JSON) and returns it."""
    import json
    import logging

    from aitraining import models
    from aitraining.align import match_tokenizers

    log = logging.getLogger(__name__)
    out_dir = os.path.dirname(os.path.abspath(output))
    work = os.path.join(out_dir, "eval_teacher")
    folders = {"model": params.model or "", **({"baseline": baseline} if baseline else {}),
               "teacher": params.teacher_model or ""}
    teacher_tokenizer = models.load_tokenizer(folders["teacher"], trust_remote_code=params.trust_remote_code,
                                              token=params.token, flag="--teacher-model")
    same = all(match_tokenizers(models.load_tokenizer(folders[r], trust_remote_code=params.trust_remote_code,
                                                      token=params.token), teacher_tokenizer).same
               for r in folders if r != "teacher")
    os.makedirs(work, exist_ok=True)
    if same:
        reference = TeacherReference(params.model_copy(update={"project_name": work}), work, show_progress=show_progress)
        result = judge_models(reference, folders, params, show_progress=show_progress)
    else:
        log.info("the tokenizers differ: judged on the teacher's answers as text (per byte)")
        as_teacher = params.model_copy(update={"model": params.teacher_model, "project_name": work})
        reference = TeacherReference(as_teacher, work, show_progress=show_progress)
        result = judge_on_text(folders["teacher"], list(zip(reference.prompts, reference.answers, strict=True)),
                               folders, params)
    from aitraining.compare import without_answers

    record = {"data": params.data_path, **without_answers(result)}
    os.makedirs(out_dir, exist_ok=True)
    tmp = output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, ensure_ascii=False)
    os.replace(tmp, output)
    return record
