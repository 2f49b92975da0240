"""`aitraining eval`: a model (and a baseline) judged against its teacher on held-out rows, written to eval.json.

Models with the teacher's tokenizer are judged token by token against the teacher's exact distribution
(`judge.TeacherReference`); models with another tokenizer on the teacher's answers as text, per byte
(`judge.TextReference`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from typing import Any

from aitraining.align import match_tokenizers
from aitraining.batches import StudentSettings
from aitraining.data.examples import DataSettings
from aitraining.judge import TeacherReference, judge_models, judge_on_text, without_answers
from aitraining.models.load import load_tokenizer
from aitraining.teacher import TeacherSettings

log = logging.getLogger(__name__)


def run_eval(student: StudentSettings, teacher: TeacherSettings, data: DataSettings, output: str, *,
             baseline: str | None = None, show_progress: bool = True) -> dict[str, Any]:
    """The student (and a baseline) against the teacher on the rows of `data` (the teacher writes the responses
    that rows lack, greedily, once: they are kept beside `output` for the next model); writes `output` (JSON) and
    returns it."""
    out_dir = os.path.dirname(os.path.abspath(output))
    work = os.path.join(out_dir, "eval_teacher")
    folders = {"model": student.model, **({"baseline": baseline} if baseline else {}), "teacher": teacher.teacher_model}
    teacher_tokenizer = load_tokenizer(teacher.teacher_model, trust_remote_code=teacher.trust_remote_code,
                                       token=teacher.token, flag="--teacher-model")
    same = all(match_tokenizers(load_tokenizer(folders[r], trust_remote_code=student.trust_remote_code,
                                               token=student.token), teacher_tokenizer).same
               for r in folders if r != "teacher")
    os.makedirs(work, exist_ok=True)
    if same:
        reference = TeacherReference(student, teacher, data, work, show_progress=show_progress)
        result = judge_models(reference, folders, trust_remote_code=student.trust_remote_code,
                              allow_pickle=student.allow_pickle_weights, token=student.token,
                              show_progress=show_progress)
    else:
        log.info("the tokenizers differ: judged on the teacher's answers as text (per byte)")
        # The teacher's answers in its own tokens: the reference of a "student" that is the teacher itself.
        reference = TeacherReference(replace(student, model=teacher.teacher_model), teacher, data, work,
                                     show_progress=show_progress)
        result = judge_on_text(teacher, student, list(zip(reference.prompts, reference.answers, strict=True)), folders)
    record = {"data": data.data_path, **without_answers(result)}
    os.makedirs(out_dir, exist_ok=True)
    tmp = output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, ensure_ascii=False)
    os.replace(tmp, output)
    return record
