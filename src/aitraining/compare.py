"""What distillation bought: the same student without it, and student, baseline and teacher judged side by side.

`--compare-baseline` (after a distillation run): the baseline is the same student fine-tuned on the teacher's
responses (the very token sequences the distilled student trained on, without the teacher's distribution:
same rows, budget, schedule and seed; the teacher's answers are reused, never regenerated). It is trained
into `<project>/baseline/`. Then the teacher (float32, exact) gives its distribution on the held-out rows
once, and each model is judged by `evaluate.TeacherReference` (one implementation of every metric) and sized
by `evaluate.model_facts`. Written to the project folder: `comparison.json`, a table on the console and in
the model card, `comparison.png` and `samples.md` (held-out prompts with the three answers).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from aitraining.params import LLMTrainingParams
from aitraining.runfolder import RunFolder

log = logging.getLogger(__name__)

COMPARISON_FILE = "comparison.json"
SAMPLES_FILE = "samples.md"
N_SAMPLES = 5
ROLES = ("distilled", "baseline", "teacher")


def baseline_params(params: LLMTrainingParams, folder: RunFolder) -> LLMTrainingParams:
    """The baseline's run: the distilled run's settings without distillation, in `<project>/baseline/`. When the
    distilled run resumes (--resume-from-checkpoint) the baseline resumes too, from its own latest checkpoint,
    if it has one of the same run (an interrupted or finished baseline is never trained again from scratch)."""
    bparams = params.model_copy(update={"use_distillation": False, "compare_baseline": False, "overwrite": True,
                                        "resume_from_checkpoint": None, "project_name": folder.file("baseline")})
    if params.resume_from_checkpoint and RunFolder(bparams, is_main=False).resumable():
        bparams = bparams.model_copy(update={"resume_from_checkpoint": "latest"})
    return bparams


def compare_with_baseline(params: LLMTrainingParams, data: Any, folder: RunFolder, accelerator: Any, *,
                          show_progress: bool) -> dict[str, Any] | None:
    """Train the baseline, judge the three on the held-out rows and write the comparison (see the module)."""
    from accelerate.utils import set_seed

    from aitraining.train import Prepared, build_student, finish, fit

    started = time.time()
    bparams = baseline_params(params, folder)
    bfolder = RunFolder(bparams, is_main=accelerator.is_main_process)
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
        fitted = fit(build_student(bparams, distilling=False), bdata, bparams, bfolder, accelerator,
                     show_progress=show_progress)
        finish(fitted, bdata, bparams, bfolder, accelerator, started, summary=(
            f"The no-distillation baseline of `{folder.path}`: **{params.model}** fine-tuned on the answers "
            f"**{params.teacher_model}** wrote (the same rows, budget and seed as the distilled student, without "
            "the teacher's distribution)."))
    finally:
        bfolder.release()
    folder.open_log()
    result = None
    if accelerator.is_main_process:
        result = judge(params, data, {"distilled": folder.path, "baseline": bfolder.path}, show_progress=show_progress)
        write_comparison(folder, params, result)
    accelerator.wait_for_everyone()
    return result


def judge(params: LLMTrainingParams, data: Any, students: dict[str, str], *, show_progress: bool) -> dict[str, Any]:
    """Each student folder and the teacher on the run's held-out rows (evaluate.judge_models)."""
    import torch

    from aitraining.evaluate import TeacherReference, judge_models, prompt_text
    from aitraining.teacher import LiveTeacher, Teacher

    exact = params.model_copy(update={"mixed_precision": "no", "teacher_source": "live"})
    reference = TeacherReference.from_items(data.valid_items, LiveTeacher(Teacher(exact, torch.device("cpu"))),
                                            data.tokenizer, [prompt_text(ex) for ex in data.valid_examples],
                                            show_progress=show_progress)
    return judge_models(reference, {**students, "teacher": params.teacher_model or ""}, params,
                        show_progress=show_progress)


# -------------------------------------------------------------------------------------------- what is written


def table(result: dict[str, Any], roles: list[str] | None = None) -> list[str]:
    """The comparison as Markdown table lines (also what the console shows)."""
    m = result["models"]
    lines = ["| | KL(teacher ‖ model) | top-1 agreement | perplexity | ROUGE-L | repeated trigrams | parameters | on disk "
             "| tokens/s |", "|---|---|---|---|---|---|---|---|---|"]
    for role in roles or ROLES:
        r = m[role]
        disk = f"{r['disk_bytes'] / 2**20:.0f} MiB" if r.get("disk_bytes") else "-"
        loops = f"{r['repetition']:.1%}" if "repetition" in r else "-"  # comparisons written before it existed
        lines.append(f"| {role} | {r['kl_to_teacher']:.3f} | {r['top1_agreement']:.1%} | {r['perplexity']:.2f} | "
                     f"{r['rouge_l']:.3f} | {loops} | {r['parameters']:,} | {disk} | {r['tokens_per_s']:.1f} |")
    return lines


def verdict(result: dict[str, Any]) -> str:
    d, b = result["models"]["distilled"], result["models"]["baseline"]
    closer = d["kl_to_teacher"] < b["kl_to_teacher"]
    ratio = d["kl_to_teacher"] / max(b["kl_to_teacher"], 1e-12)
    return (f"the distilled student is {'closer to' if closer else 'NOT closer to'} the teacher than the baseline: "
            f"KL {d['kl_to_teacher']:.3f} vs {b['kl_to_teacher']:.3f} ({ratio:.2f}x), ROUGE-L {d['rouge_l']:.3f} vs "
            f"{b['rouge_l']:.3f}{rouge_interval(d, b)}, on {result['held_out_rows']} held-out rows")


def rouge_interval(a: dict[str, Any], b: dict[str, Any]) -> str:
    """' (difference +0.006, 95 % interval -0.011 to +0.024: within what the prompts drawn allow)', from the
    per-answer scores; '' where they are missing."""
    from aitraining.evaluate import paired_difference

    if not a.get("rouge_l_per_answer") or not b.get("rouge_l_per_answer"):
        return ""
    got = paired_difference([a["rouge_l_per_answer"]], [b["rouge_l_per_answer"]])
    lo, hi = got["ci95"]
    what = "a real difference" if got["excludes_zero"] else "within what the prompts drawn allow"
    return f" (difference {got['mean']:+.3f}, 95 % interval {lo:+.3f} to {hi:+.3f}: {what})"


def write_comparison(folder: RunFolder, params: LLMTrainingParams, result: dict[str, Any]) -> None:
    from aitraining import plots

    record = without_answers(result)
    record["verdict"] = verdict(result)
    folder.write_json(COMPARISON_FILE, record)
    write_samples(folder.file(SAMPLES_FILE), result)
    pictures = plots.comparison_chart(folder.file("comparison.png"), result)
    pictures += plots.training_curves(folder.file("training_curves.png"),
                                      {"distilled": folder.metrics(), "baseline": RunFolder(baseline_params(params, folder)).metrics()})
    lines = table(result)
    print("\n" + "\n".join(lines) + "\n" + verdict(result) + "\n", flush=True)
    from aitraining.card import add_comparison

    add_comparison(folder.path, lines, verdict(result), [os.path.basename(p) for p in pictures])
    log.info("comparison: %s (%s, %s)", verdict(result), COMPARISON_FILE, SAMPLES_FILE)


def without_answers(result: dict[str, Any], n_samples: int = N_SAMPLES) -> dict[str, Any]:
    """A judged result as written to JSON: the figures, and the first few answers as samples."""
    record = {k: v for k, v in result.items() if k not in ("prompts", "references", "models")}
    record["models"] = {r: {k: v for k, v in row.items() if k != "answers"} for r, row in result["models"].items()}
    record["samples"] = [{"prompt": p, "teacher's response": t,
                          **{r: row["answers"][i] for r, row in result["models"].items()}}
                         for i, (p, t) in enumerate(zip(result["prompts"][:n_samples], result["references"][:n_samples],
                                                        strict=True))]
    return record


def write_samples(path: str, result: dict[str, Any], n: int = N_SAMPLES) -> None:
    m = result["models"]
    out = ["# Held-out samples", "", "Greedy answers to prompts that no model trained on.", ""]
    for i in range(min(n, len(result["references"]))):
        prompt = result["prompts"][i] if i < len(result["prompts"]) else ""
        out += [f"## {i + 1}. {_one_line(prompt)}", "", "| | answer |", "|---|---|",
                f"| teacher's response | {_cell(result['references'][i])} |"]
        out += [f"| {role} | {_cell(m[role]['answers'][i])} |" for role in ROLES]
        out.append("")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out))


def _one_line(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "*(empty)*"
