"""The judge: the teacher's answers to held-out prompts, computed once, and any model compared to them.

- `TeacherReference`: the exact (live, float32) teacher on its answers, and students with its tokenizer compared
  to it: exact KL, top-1 agreement, label loss, ROUGE-L of the student's greedy answers.
- `TextReference`: the same comparison on text, for models with any tokenizer: the model's negative
  log-likelihood of the teacher's answers per byte, minus the teacher's own, and ROUGE-L.
- `judge_models`, `judge_on_text`: model folders judged by one of them, with their parameters, size and speed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from aitraining.batches import Item, StudentSettings, collate, taught_items
from aitraining.data.examples import DataSettings, read_examples, skipped_summary
from aitraining.data.templates import encode, render_prompt, resolve_chat_template
from aitraining.metrics import (
    answer_log_likelihoods,
    greedy_texts,
    mean,
    model_facts,
    repeated_trigrams,
    response_metrics,
    rouge_l_scores,
)
from aitraining.models.load import load_causal_lm, load_tokenizer, load_tokenizer_and_model
from aitraining.padding import pad_id
from aitraining.teacher import TeacherSettings, TeacherSource, choose_path, open_source

log = logging.getLogger(__name__)

N_SAMPLES = 5  # answers written beside the figures


class TeacherReference:
    """The teacher's exact distribution on its own answers to held-out prompts, computed once (its final hidden
    states at every answer token: small), then any student compared to it with `compare`.

    The student's tokenizer and templates render the prompts; every row of `data` is judged (the teacher writes the
    responses rows lack, kept in `work_dir`); the teacher runs in float32 for this, whatever the training used.
    """

    def __init__(self, student: StudentSettings, teacher: TeacherSettings, data: DataSettings, work_dir: str, *,
                 batch_size: int = 8, show_progress: bool = False) -> None:
        tokenizer = load_tokenizer(student.model, trust_remote_code=student.trust_remote_code, token=student.token)
        loaded = read_examples(replace(data, use_distillation=True, holdout_share=0.0))
        examples = loaded.train
        if loaded.skipped:
            log.warning("%s", skipped_summary(loaded.skipped, len(examples)))
        os.makedirs(work_dir, exist_ok=True)
        teacher_tokenizer = load_tokenizer(teacher.teacher_model, trust_remote_code=teacher.trust_remote_code,
                                           token=teacher.token, flag="--teacher-model")
        path = choose_path(tokenizer, teacher_tokenizer, source="live")
        source = open_source(teacher, project_dir=work_dir, device=torch.device("cpu"), path=path,
                             tokenizer=teacher_tokenizer, exact=True)
        items = taught_items(source, examples, tokenizer, template=student.student_prompt_template,
                             chat_template=resolve_chat_template(tokenizer, student.chat_template),
                             block_size=student.block_size, show_progress=show_progress)
        self._build([it for it in items if it is not None], source, tokenizer, batch_size=batch_size,
                    show_progress=show_progress)
        self.prompts = [ex.prompt_text for ex, it in zip(examples, items, strict=True) if it is not None]

    @classmethod
    def from_items(cls, items: Sequence[Item], source: TeacherSource, tokenizer: Any, prompts: Sequence[str], *,
                   batch_size: int = 8, show_progress: bool = False) -> TeacherReference:
        """The reference on a run's own held-out items (the student's prompt and the teacher's response ids;
        `prompts`: their user text) and the teacher's exact source (`open_source(..., exact=True)`)."""
        self = cls.__new__(cls)
        self._build(list(items), source, tokenizer, batch_size=batch_size, show_progress=show_progress)
        self.prompts = list(prompts)
        return self

    def _build(self, items: list[Item], source: TeacherSource, tokenizer: Any, *, batch_size: int,
               show_progress: bool) -> None:
        self.tokenizer = tokenizer
        self.items = items
        self.answers = [tokenizer.decode(it.input_ids[it.n_prompt :], skip_special_tokens=True) for it in items]
        self.max_new_tokens = max((it.n_response for it in self.items), default=1)
        self.pad = pad_id(tokenizer)
        self.batches = []
        for s in tqdm(range(0, len(self.items), batch_size), desc="teacher: reference distribution", unit="batch",
                      disable=not show_progress):
            rows = self.items[s : s + batch_size]
            self.batches.append((collate(rows, self.pad), source.targets(rows)))
        source.free()

    def compare(self, model: nn.Module, *, batch_size: int = 16, show_progress: bool = False) -> dict[str, Any]:
        """KL(teacher || student) at T = 1 (exact), top-1 agreement and label loss on the teacher's answers, and
        the ROUGE-L of the student's greedy answers (as long as the teacher's longest) against the teacher's."""
        metrics = response_metrics(model, self.batches)
        written = greedy_texts(model, self.tokenizer, [it.input_ids[: it.n_prompt] for it in self.items],
                               max_new_tokens=self.max_new_tokens, pad=self.pad, batch_size=batch_size,
                               show_progress=show_progress)
        scores = rouge_l_scores(written, self.answers)
        return {"kl_to_teacher": metrics["kl_to_teacher"], "top1_agreement": metrics["top1_agreement"],
                "ce": metrics["ce"], "perplexity": metrics["perplexity"], "rouge_l": mean(scores),
                "rouge_l_per_answer": scores, "repetition": mean([repeated_trigrams(a) for a in written]),
                "n_tokens": metrics["n_tokens"], "answers": written}


class TextReference:
    """The teacher's answers to held-out prompts as text, and how likely the teacher finds them; any model, with
    any tokenizer, is compared on the same text: per-byte log-likelihood of the answers (token-level KL is not
    defined across vocabularies) and ROUGE-L of its greedy answers.

    ``kl_per_byte`` = (the model's negative log-likelihood of the teacher's answers - the teacher's own) / bytes:
    how many more nats per byte of the teacher's text the model needs than the teacher (0 for the teacher itself;
    with answers sampled from the teacher it would estimate the sequence-level KL(teacher || model) per byte; the
    teacher's greedy answers make it a close proxy).
    """

    def __init__(self, teacher: TeacherSettings, student: StudentSettings, rows: Sequence[tuple[str, str]]) -> None:
        self.student = student
        self.prompts = [p for p, _ in rows]
        self.answers = [a for _, a in rows]
        self.bytes = sum(len(a.encode("utf-8")) for a in self.answers)
        tokenizer, model = load_tokenizer_and_model(teacher.teacher_model, trust_remote_code=teacher.trust_remote_code,
                                                    allow_pickle=teacher.allow_pickle_weights, token=teacher.token,
                                                    flag="--teacher-model")
        self.teacher_nll = -sum(answer_log_likelihoods(model, self._rows(tokenizer, teacher.prompt_template)))
        del model

    def prompt_ids(self, tokenizer: Any, template: str) -> list[list[int]]:
        """The held-out prompts as a model with `tokenizer` sees them (its chat template, unless none is asked)."""
        chat = resolve_chat_template(tokenizer, "none" if self.student.chat_template == "none" else "auto")
        out = []
        for p in self.prompts:
            text, special = render_prompt(tokenizer, [{"role": "user", "content": p}], template, chat)
            out.append(encode(tokenizer, text, add_special_tokens=special))
        return out

    def _rows(self, tokenizer: Any, template: str) -> list[tuple[list[int], list[int]]]:
        return [(p, encode(tokenizer, a, add_special_tokens=False))
                for p, a in zip(self.prompt_ids(tokenizer, template), self.answers, strict=True)]

    def compare(self, model: nn.Module, tokenizer: Any, *, batch_size: int = 16) -> dict[str, Any]:
        """The model (rendering prompts as the student does) on the teacher's answers."""
        rows = self._rows(tokenizer, self.student.student_prompt_template)
        nll = -sum(answer_log_likelihoods(model, rows))
        # The same text takes another number of tokens in another vocabulary (and a model may write what its
        # tokenizer would merge piece by piece): room for 1.5x the longest answer, plus a few.
        longest = int(1.5 * max(len(a) for _, a in rows)) + 4
        written = greedy_texts(model, tokenizer, [p for p, _ in rows], max_new_tokens=longest, pad=pad_id(tokenizer),
                               batch_size=batch_size)
        scores = rouge_l_scores(written, self.answers)
        return {"kl_per_byte": (nll - self.teacher_nll) / self.bytes, "nll_per_byte": nll / self.bytes,
                "teacher_nll_per_byte": self.teacher_nll / self.bytes, "bytes": self.bytes,
                "rouge_l": mean(scores), "rouge_l_per_answer": scores,
                "repetition": mean([repeated_trigrams(a) for a in written]), "answers": written}


def judge_models(reference: TeacherReference, folders: dict[str, str], *, trust_remote_code: bool = False,
                 allow_pickle: bool = False, token: str | None = None, show_progress: bool = False) -> dict[str, Any]:
    """Each model (role -> folder, .gguf or hub id; the role "teacher" loads in float32 as the teacher) against
    the reference: its metrics, parameters, bytes on disk and generation speed, and its greedy answers."""
    speed_prompts = [it.input_ids[: it.n_prompt] for it in reference.items][:4]
    rows: dict[str, Any] = {}
    for role, name in folders.items():
        flag = "--teacher-model" if role == "teacher" else "--model"
        model = load_causal_lm(name, dtype=torch.float32, trust_remote_code=trust_remote_code,
                               allow_pickle=allow_pickle, token=token, flag=flag)
        got = reference.compare(model, show_progress=show_progress)
        rows[role] = {"model": name, **{k: got[k] for k in ("kl_to_teacher", "top1_agreement", "ce", "perplexity",
                                                           "rouge_l", "rouge_l_per_answer", "repetition")},
                      **model_facts(name, model, speed_prompts, pad=reference.pad), "answers": got["answers"]}
        del model
    return {"held_out_rows": len(reference.items),
            "held_out_tokens": sum(it.n_response for it in reference.items),
            "judge": "the float32 teacher's exact distribution: KL(teacher || model) at T = 1 per response token over "
                     "the full vocabulary, top-1 agreement, perplexity of the responses; ROUGE-L of greedy answers "
                     "against the teacher's responses; generation tokens/s one prompt at a time on this machine",
            "models": rows, "prompts": reference.prompts, "references": reference.answers}


def judge_on_text(teacher: TeacherSettings, student: StudentSettings, rows: Sequence[tuple[str, str]],
                  folders: dict[str, str]) -> dict[str, Any]:
    """Models of any tokenizer against the teacher's answers as text (TextReference): KL and NLL per byte,
    ROUGE-L, parameters, bytes on disk, generation speed. The models load with the student's loading options."""
    reference = TextReference(teacher, student, rows)
    out: dict[str, Any] = {}
    for role, name in folders.items():
        flag = "--teacher-model" if role == "teacher" else "--model"
        tokenizer, model = load_tokenizer_and_model(name, trust_remote_code=student.trust_remote_code,
                                                    allow_pickle=student.allow_pickle_weights, token=student.token,
                                                    flag=flag)
        got = reference.compare(model, tokenizer)
        prompts = reference.prompt_ids(tokenizer, student.student_prompt_template)[:4]
        out[role] = {"model": name, **{k: got[k] for k in ("kl_per_byte", "nll_per_byte", "rouge_l", "rouge_l_per_answer",
                                                          "repetition")},
                     **model_facts(name, model, prompts, pad=pad_id(tokenizer)), "answers": got["answers"]}
        del model
    return {"held_out_rows": len(rows), "held_out_bytes": reference.bytes,
            "judge": "the teacher's answers as text: the model's negative log-likelihood per byte minus the teacher's "
                     "(KL per byte; tokenizers differ), ROUGE-L of greedy answers; tokens/s one prompt at a time",
            "models": out, "prompts": reference.prompts, "references": reference.answers}


def without_answers(result: dict[str, Any], n_samples: int = N_SAMPLES) -> dict[str, Any]:
    """A judged result as written to JSON: the figures, and the first few answers as samples."""
    record = {k: v for k, v in result.items() if k not in ("prompts", "references", "models")}
    record["models"] = {r: {k: v for k, v in row.items() if k != "answers"} for r, row in result["models"].items()}
    record["samples"] = [{"prompt": p, "teacher's response": t,
                          **{r: row["answers"][i] for r, row in result["models"].items()}}
                         for i, (p, t) in enumerate(zip(result["prompts"][:n_samples], result["references"][:n_samples],
                                                        strict=True))]
    return record
