"""One training run, read top to bottom as its stages:

    run(params)       the API entry (the CLI and AutoTrainProject call it): checks, then the stages
      prepare_data    the rows -> token sequences; with a teacher: its answers and targets, made once and cached
      build_student   the student model (and its LoRA adapter)
      fit             the training loop (loop.py): steps, held-out evaluation, checkpoints, interruption
      finish          the model, tokenizer, model card and run record in the project folder
      baseline        (--compare-baseline) the same student without distillation, and all three judged (compare.py)

`run` reads the whole `LLMTrainingParams`; each stage receives only the settings it reads
(`LLMTrainingParams.settings`). The project folder's bookkeeping is in runfolder.py, every measurement in
metrics.py, the teacher behind the `TeacherSource` of teacher/.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from typing import Any

import torch
from accelerate.utils import set_seed

from aitraining import hardware, heap
from aitraining.align import ResponseAligner
from aitraining.batches import StudentSettings, sft_items, taught_items
from aitraining.card import write_model_card
from aitraining.compare import judge, judge_text, write_comparison
from aitraining.data.examples import (
    MIN_ROWS_TO_HOLD_OUT,
    DataSettings,
    Loaded,
    SkippedRow,
    read_examples,
    skipped_summary,
)
from aitraining.data.templates import resolve_chat_template
from aitraining.errors import UserError
from aitraining.loop import Fitted, LoopSettings, Prepared, fit
from aitraining.models.load import (
    count_parameters,
    load_causal_lm,
    load_tokenizer,
    parameters_from_config,
    refuse_pickled_weights,
)
from aitraining.models.lora import apply_lora
from aitraining.onpolicy import OnPolicy
from aitraining.params import LLMTrainingParams
from aitraining.plots import training_curves
from aitraining.runfolder import DISK_FULL, FolderSettings, RunFolder
from aitraining.teacher import TeacherSettings, choose_path, open_source

SKIPPED_FILE = "skipped_rows.jsonl"

log = logging.getLogger(__name__)


def run(params: LLMTrainingParams, *, show_progress: bool = True) -> str:
    """Run the whole job; returns the project folder."""
    heap.steady_heap()
    if params.mixed_precision is None:
        params = params.model_copy(update={"mixed_precision": hardware.resolve_mixed_precision(None)})
    _preflight(params)
    # Tied embeddings are saved once in checkpoints; accelerate reports that at every save. Expected, so quiet.
    logging.getLogger("accelerate.utils.other").addFilter(lambda r: "Removed shared tensor" not in r.getMessage())
    data_settings = params.settings(DataSettings)
    loaded = read_examples(data_settings)
    if params.compare_baseline and not loaded.valid:
        raise UserError(f"--compare-baseline needs held-out rows to judge on: the data has {len(loaded.train)} rows "
                        f"(fewer than {MIN_ROWS_TO_HOLD_OUT} are never split, and --holdout-share "
                        f"{params.holdout_share:g} holds none); pass --valid-split or more rows")
    folder = RunFolder(folder_settings(params))
    folder.check()
    accelerator = hardware.accelerator(params.mixed_precision or "no", params.log, folder.path)
    folder.is_main = accelerator.is_main_process
    show_progress = show_progress and accelerator.is_main_process
    student = params.settings(StudentSettings)
    teacher = params.settings(TeacherSettings) if params.use_distillation else None

    set_seed(params.seed)
    run_started = time.time()
    try:
        data = prepare_data(student, teacher, loaded, data_settings, folder, accelerator, show_progress=show_progress)
        model = build_student(student)
        if data.source is not None:
            _advise(params, model)
        fitted = fit(model, data, params.settings(LoopSettings), folder, accelerator, show_progress=show_progress,
                     tracker_config=params.public_dict())
        finish(fitted, data, params.public_dict(), folder, accelerator, run_started)
        if params.compare_baseline:
            baseline(params, data, folder, accelerator, show_progress=show_progress)
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise folder.disk_full(e) from None
    finally:
        folder.release()
    return folder.path


def folder_settings(params: LLMTrainingParams) -> FolderSettings:
    return params.settings(FolderSettings, identity=params.identity(), record=params.public_dict())


def _preflight(params: LLMTrainingParams) -> None:
    """Everything that can be checked before a file is written or a model is loaded."""
    refuse_pickled_weights(params.model or "", allowed=params.allow_pickle_weights, flag="--model")
    if params.use_distillation:
        refuse_pickled_weights(params.teacher_model or "", allowed=params.allow_pickle_weights, flag="--teacher-model")
    if params.resume_from_checkpoint and params.resume_from_checkpoint != "latest":
        if not os.path.isdir(params.resume_from_checkpoint):
            raise UserError(
                f"--resume-from-checkpoint: '{params.resume_from_checkpoint}' is not a folder; pass a checkpoint "
                "folder from the project, or 'latest'"
            )
    if params.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this machine")
    if params.log != "none" and importlib.util.find_spec(params.log) is None:
        raise UserError(f"--log {params.log} needs the '{params.log}' package: pip install {params.log}, or use --log none")


def _advise(params: LLMTrainingParams, student: Any) -> None:
    """The documented advice, as warnings."""
    teacher_n = parameters_from_config(params.teacher_model or "", trust_remote_code=params.trust_remote_code,
                                       token=params.token, flag="--teacher-model")
    student_n = count_parameters(student)
    if teacher_n is not None and teacher_n < 4 * student_n:
        log.warning(
            "the teacher has %.1fx the student's parameters (%s vs %s); distillation works best with a teacher "
            "4x or more larger", teacher_n / student_n, f"{teacher_n:,}", f"{student_n:,}",
        )
    if params.teacher_source == "server":  # no tail samples (teacher/__init__.py)
        if params.distill_temperature != 1.0:
            # A server returns its top-k at T = 1 and of the rest only its mass, not its tempered mass (BENCHMARKS.md,
            # "The teacher behind a server": at T = 3 the student ended farther from the teacher than without
            # distillation).
            log.warning("--distill-temperature %g with a server teacher: beyond its top %d the server gives only the "
                        "mass of the rest, whose share at this temperature is a guess; at T = 3 a student learned less "
                        "than without distillation; leave --distill-temperature out (1 with a server)",
                        params.distill_temperature, params.distill_top_k)
    elif not 2.0 <= params.distill_temperature <= 4.0:
        log.warning("--distill-temperature %g is outside the recommended 2.0-4.0", params.distill_temperature)
    if params.distill_alpha == 0.0:
        log.warning("--distill-alpha 0: only the label loss is used, the teacher's distribution is ignored")
    if params.distill_alpha == 1.0:
        log.warning("--distill-alpha 1: only the distillation loss is used, the labels are ignored")


# ------------------------------------------------------------------------------------ stage 1: the data


def prepare_data(student: StudentSettings, teacher: TeacherSettings | None, loaded: Loaded, data: DataSettings,
                 folder: RunFolder, accelerator: Any, *, show_progress: bool
                 ) -> Prepared:
    """The rows as the student's token sequences; with a teacher, it answers missing responses and its targets are
    cached, once (the teacher source's `prepare`)."""
    train_examples, valid_examples = loaded.train, loaded.valid
    tokenizer = load_tokenizer(student.model, trust_remote_code=student.trust_remote_code, token=student.token)
    chat_template = resolve_chat_template(tokenizer, student.chat_template)
    out = Prepared(tokenizer, [], [])
    if teacher is None:
        items = sft_items(train_examples + valid_examples, tokenizer, template=student.student_prompt_template,
                          chat_template=chat_template, block_size=student.block_size, add_eos=student.add_eos_token)
    else:
        teacher_tokenizer = load_tokenizer(teacher.teacher_model, trust_remote_code=teacher.trust_remote_code,
                                           token=teacher.token, flag="--teacher-model")
        out.path = path = choose_path(tokenizer, teacher_tokenizer, mode=teacher.distill_mode,
                                      source=teacher.teacher_source)
        if teacher.distill_on_policy > 0 and path.mode != "same-vocabulary":
            raise UserError(f"--distill-on-policy: the teacher scores the student's own tokens, which needs the student's "
                            f"tokenizer, and this run takes the {path.mode} path ({path.reason}); drop --distill-on-policy")
        aligner = None if path.same_tokenizer else ResponseAligner(tokenizer, teacher_tokenizer,
                                                                   text_only=not path.needs_targets)
        _open_folder(folder, accelerator, loaded, data)
        log.info("distillation: %s", path.describe())
        started = time.time()
        source = open_source(teacher, project_dir=folder.path, device=accelerator.device, path=path,
                             tokenizer=teacher_tokenizer,
                             vocab=aligner.vocab if aligner is not None and path.needs_targets else None)
        items = taught_items(source, train_examples + valid_examples, tokenizer,
                             template=student.student_prompt_template, chat_template=chat_template,
                             block_size=student.block_size, aligner=aligner, is_main=accelerator.is_main_process,
                             wait=accelerator.wait_for_everyone, show_progress=show_progress)
        out.timings["teacher_s"] = round(time.time() - started, 2)
        out.source = source if path.needs_targets else None
        if teacher.distill_on_policy > 0:
            log.info("on-policy: on %.0f%% of the steps the student writes its own answers (up to %d tokens, sampled "
                     "at T = 1) and the teacher scores them up to their first repeated trigram",
                     100 * teacher.distill_on_policy, teacher.distill_max_teacher_length)
            out.on_policy = OnPolicy(source.scorer(), tokenizer, share=teacher.distill_on_policy, seed=teacher.seed,
                                     max_new_tokens=teacher.distill_max_teacher_length, block_size=student.block_size)
        if path.mode == "cross-vocabulary":
            assert aligner is not None
            rows = [r for it in items if it is not None and it.teacher_rows for r in it.teacher_rows]
            share = sum(r >= 0 for r in rows) / max(len(rows), 1)
            out.timings["aligned_token_share"] = round(share, 4)
            log.info("across vocabularies: %.1f%% of the student's answer tokens have a teacher position predicting the "
                     "same text (%d shared tokens); the rest learn from the labels only", 100 * share,
                     int((aligner.vocab.to_student >= 0).sum()))
    out.train_items = [it for it in items[: len(train_examples)] if it is not None]
    kept = [(ex, it) for ex, it in zip(valid_examples, items[len(train_examples) :], strict=True) if it is not None]
    out.valid_examples = [ex for ex, _ in kept]
    out.valid_items = [it for _, it in kept]
    if not out.train_items:
        raise UserError(
            f"--data-path: none of the {len(train_examples)} training rows fits --block-size {student.block_size} "
            "with at least one response token; raise --block-size or shorten the prompts"
        )
    dropped = len(train_examples) - len(out.train_items)
    if dropped:
        log.warning("%d of %d training rows dropped: the prompt leaves no room in --block-size %d",
                    dropped, len(train_examples), student.block_size)
    if teacher is None:
        _open_folder(folder, accelerator, loaded, data)
    return out


def _open_folder(folder: RunFolder, accelerator: Any, loaded: Loaded, data: DataSettings) -> None:
    folder.open()
    accelerator.wait_for_everyone()
    log.info("project folder: %s", folder.path)
    train, valid = loaded.train, loaded.valid
    if loaded.skipped:
        _report_skipped(folder, loaded.skipped, len(train) + len(valid))
    if valid and not data.valid_split:
        log.info("held out for evaluation: %d of %d rows (%g%%, drawn with --seed %d); --valid-split names your "
                 "own, --holdout-share 0 trains on every row", len(valid), len(train) + len(valid),
                 100 * data.holdout_share, data.seed)
    elif not valid and not data.valid_split and data.holdout_share > 0:
        log.info("nothing held out for evaluation: %d rows (fewer than %d); pass --valid-split to evaluate",
                 len(train), MIN_ROWS_TO_HOLD_OUT)


def _report_skipped(folder: RunFolder, skipped: list[SkippedRow], n_kept: int) -> None:
    """--skip-bad-rows: how many rows were left out and why, on the console and in skipped_rows.jsonl."""
    lines = [json.dumps({"file": s.file, "place": s.place, "reason": s.reason}, ensure_ascii=False) for s in skipped]
    folder.write_text(SKIPPED_FILE, "\n".join(lines) + "\n")
    log.warning("%s; every one in %s", skipped_summary(skipped, n_kept), folder.file(SKIPPED_FILE))


# -------------------------------------------------------------------------------- stage 2: the student


def build_student(student: StudentSettings) -> Any:
    model = load_causal_lm(student.model, dtype=torch.float32, trust_remote_code=student.trust_remote_code,
                           allow_pickle=student.allow_pickle_weights, token=student.token)
    if student.peft:
        model = apply_lora(model, r=student.lora_r, alpha=student.lora_alpha, dropout=student.lora_dropout,
                           target_modules=student.target_modules)
    return model


# ------------------------------------------------------------------------------------ stage 4: finishing


def finish(fitted: Fitted, data: Prepared, record: dict[str, Any], folder: RunFolder, accelerator: Any,
           run_started: float, *, summary: str | None = None) -> None:
    """The trained student, tokenizer, training curves (PNG) and model card in the project folder; run.json says
    it finished. `record`: the run's parameters as the card shows them."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = dict(fitted.last)
        if data.source is not None:
            final.update(data.source.facts())
        final["train_s"] = fitted.train_s
        final["eval_s"] = fitted.eval_s
        final.update(data.timings)
        final["total_s"] = round(time.time() - run_started, 2)
        described = data.path.describe() if data.path is not None else None
        folder.save_model(fitted.model, data.tokenizer)
        metrics = folder.metrics()
        curves = training_curves(folder.file("training_curves.png"), {folder.name: metrics})
        write_model_card(folder.path, record, final, metrics, n_train=len(data.train_items),
                         n_valid=len(data.valid_items), distill_path=described, summary=summary,
                         pictures=[os.path.basename(p) for p in curves])
        folder.write_run_file("finished", final_metrics=final, **({"distill_path": described} if described else {}))
    accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------ stage 5: the baseline


def baseline_params(params: LLMTrainingParams, folder: RunFolder) -> LLMTrainingParams:
    """The baseline's run: the distilled run's settings without distillation, in `<project>/baseline/`. When the
    distilled run resumes (--resume-from-checkpoint) the baseline resumes too, from its own latest checkpoint,
    if it has one of the same run (an interrupted or finished baseline is never trained again from scratch)."""
    bparams = params.model_copy(update={"use_distillation": False, "compare_baseline": False, "overwrite": True,
                                        "resume_from_checkpoint": None, "project_name": folder.file("baseline")})
    if params.resume_from_checkpoint and RunFolder(folder_settings(bparams), is_main=False).resumable():
        bparams = bparams.model_copy(update={"resume_from_checkpoint": "latest"})
    return bparams


def baseline(params: LLMTrainingParams, data: Prepared, folder: RunFolder, accelerator: Any, *,
             show_progress: bool) -> dict[str, Any] | None:
    """--compare-baseline: the same student fine-tuned on the teacher's responses (the very token sequences the
    distilled student trained on, without the teacher's distribution: same rows, budget, schedule and seed; the
    teacher's answers are reused, never regenerated), trained into `<project>/baseline/`; then student, baseline
    and teacher judged on the held-out rows and the comparison written (compare.py): on the teacher's exact
    distribution where the student has its tokenizer, on the teacher's answers as text across tokenizers."""
    started = time.time()
    bparams = baseline_params(params, folder)
    bfolder = RunFolder(folder_settings(bparams), is_main=accelerator.is_main_process)
    log.info("the baseline: the same student fine-tuned on the teacher's answers, without distillation (%s)",
             bfolder.path)
    set_seed(params.seed)
    # No teacher in training; the held-out evaluation reads the same cached teacher as the distilled run's, so
    # both curves of held-out KL are one measurement.
    bdata = Prepared(data.tokenizer, data.train_items, data.valid_items, valid_examples=data.valid_examples,
                     judge_source=data.source)
    bfolder.check()
    bfolder.open()
    accelerator.wait_for_everyone()
    try:
        fitted = fit(build_student(bparams.settings(StudentSettings)), bdata, bparams.settings(LoopSettings), bfolder,
                     accelerator, show_progress=show_progress, tracker_config=bparams.public_dict())
        finish(fitted, bdata, bparams.public_dict(), bfolder, accelerator, started, summary=(
            f"The no-distillation baseline of `{folder.path}`: **{params.model}** fine-tuned on the answers "
            f"**{params.teacher_model}** wrote (the same rows, budget and seed as the distilled student, without "
            "the teacher's distribution)."))
    finally:
        bfolder.release()
    folder.open_log()
    result = None
    if accelerator.is_main_process:
        assert data.path is not None
        teacher = params.settings(TeacherSettings)
        prompts = [ex.prompt_text for ex in data.valid_examples]
        folders = {"distilled": folder.path, "baseline": bfolder.path, "teacher": teacher.teacher_model}
        if data.path.mode == "same-vocabulary":
            exact = open_source(teacher, project_dir=folder.path, device=torch.device("cpu"), path=data.path,
                                exact=True)
            result = judge(data.valid_items, prompts, exact, data.tokenizer, folders,
                           trust_remote_code=params.trust_remote_code, allow_pickle=params.allow_pickle_weights,
                           token=params.token, show_progress=show_progress)
        else:
            result = judge_text(data.valid_items, prompts, teacher, params.settings(StudentSettings), data.tokenizer,
                                folders)
        write_comparison(folder, result, bfolder.metrics())
    accelerator.wait_for_everyone()
    return result
