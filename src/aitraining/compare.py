"""What distillation bought: the distilled student, the same student trained without distillation (the baseline,
trained by `train.run` with --compare-baseline) and the teacher, judged side by side on the run's held-out rows.

With the teacher's tokenizer (`judge`), the teacher (float32, exact) gives its distribution on the held-out rows
once and each model is judged by `judge.TeacherReference`; across tokenizers (`judge_text`) token-level KL is not
defined, and each model is judged on the teacher's answers as text by `judge.TextReference` (nats per byte above
the teacher, ROUGE-L). Either way one implementation of every metric, and `metrics.model_facts` for the sizes.
Written to the project folder: `comparison.json`, a table on the console and in the model card, `comparison.png`
and `samples.md` (held-out prompts with the three answers); where the baseline is the better student on a
measure, the console and the card say so and name its folder, so that no one keeps the worse one unknowingly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from aitraining.batches import Item, StudentSettings
from aitraining.card import add_comparison
from aitraining.judge import N_SAMPLES, TeacherReference, judge_models, judge_on_text, without_answers
from aitraining.metrics import paired_difference
from aitraining.plots import comparison_chart, training_curves
from aitraining.runfolder import RunFolder
from aitraining.teacher import TeacherSettings, TeacherSource

log = logging.getLogger(__name__)

COMPARISON_FILE = "comparison.json"
SAMPLES_FILE = "samples.md"
ROLES = ("distilled", "baseline", "teacher")
# What comparison.png draws for a comparison on text (plots.TOKEN_METRICS on the teacher's tokens).
TEXT_METRICS = (("kl_per_byte", "nats per byte above the teacher, lower is better", "{:.3f}"),
                ("rouge_l", "ROUGE-L vs the teacher's answers", "{:.3f}"),
                ("repetition", "repeated trigrams in greedy answers", "{:.1%}"),
                ("tokens_per_s", "generation tokens/s (this machine)", "{:.0f}"))


def judge(items: Sequence[Item], prompts: Sequence[str], source: TeacherSource, tokenizer: Any,
          folders: dict[str, str], *, trust_remote_code: bool = False, allow_pickle: bool = False,
          token: str | None = None, show_progress: bool = False) -> dict[str, Any]:
    """Each model folder (role -> folder; "teacher" the teacher) on the run's held-out `items` (`prompts`: their
    user text), against the teacher's exact `source` (`open_source(..., exact=True)`)."""
    reference = TeacherReference.from_items(items, source, tokenizer, prompts, show_progress=show_progress)
    return judge_models(reference, folders, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, token=token,
                        show_progress=show_progress)


def judge_text(items: Sequence[Item], prompts: Sequence[str], teacher: TeacherSettings, student: StudentSettings,
               tokenizer: Any, folders: dict[str, str]) -> dict[str, Any]:
    """Across tokenizers: each model folder on the held-out rows as text (`judge.judge_on_text`): `prompts` (their
    user text) and the teacher's answers, read from the held-out `items` (in the student's `tokenizer`)."""
    answers = [tokenizer.decode(it.input_ids[it.n_prompt :], skip_special_tokens=True) for it in items]
    return judge_on_text(teacher, student, list(zip(prompts, answers, strict=True)), folders)


def on_text(result: dict[str, Any]) -> bool:
    """Whether a comparison was judged on text (`judge_text`) rather than on the teacher's tokens (`judge`)."""
    return "held_out_bytes" in result


# -------------------------------------------------------------------------------------------- what is written


def table(result: dict[str, Any], roles: list[str] | None = None) -> list[str]:
    """The comparison as Markdown table lines (also what the console shows)."""
    if on_text(result):
        return _text_table(result, roles)
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


def _text_table(result: dict[str, Any], roles: list[str] | None) -> list[str]:
    lines = ["| | nats per byte above the teacher | NLL per byte | ROUGE-L | repeated trigrams | parameters | on disk "
             "| tokens/s |", "|---|---|---|---|---|---|---|---|"]
    for role in roles or ROLES:
        r = result["models"][role]
        disk = f"{r['disk_bytes'] / 2**20:.0f} MiB" if r.get("disk_bytes") else "-"
        lines.append(f"| {role} | {r['kl_per_byte']:.3f} | {r['nll_per_byte']:.3f} | {r['rouge_l']:.3f} | "
                     f"{r['repetition']:.1%} | {r['parameters']:,} | {disk} | {r['tokens_per_s']:.1f} |")
    return lines


def verdict(result: dict[str, Any]) -> str:
    d, b = result["models"]["distilled"], result["models"]["baseline"]
    if on_text(result):
        closer = d["kl_per_byte"] < b["kl_per_byte"]
        # Below the teacher's own NLL (a response that is not the teacher's text) a ratio means nothing.
        ratio = f" ({d['kl_per_byte'] / b['kl_per_byte']:.2f}x)" if min(d["kl_per_byte"], b["kl_per_byte"]) > 0 else ""
        return (f"the distilled student is {'closer to' if closer else 'NOT closer to'} the teacher's text than the "
                f"baseline (the same student trained on the teacher's text): {d['kl_per_byte']:.3f} vs "
                f"{b['kl_per_byte']:.3f} nats per byte above the teacher{ratio}, ROUGE-L {d['rouge_l']:.3f} vs "
                f"{b['rouge_l']:.3f}{rouge_interval(d, b)}, on {result['held_out_rows']} held-out rows")
    closer = d["kl_to_teacher"] < b["kl_to_teacher"]
    ratio = d["kl_to_teacher"] / max(b["kl_to_teacher"], 1e-12)
    return (f"the distilled student is {'closer to' if closer else 'NOT closer to'} the teacher than the baseline: "
            f"KL {d['kl_to_teacher']:.3f} vs {b['kl_to_teacher']:.3f} ({ratio:.2f}x), ROUGE-L {d['rouge_l']:.3f} vs "
            f"{b['rouge_l']:.3f}{rouge_interval(d, b)}, on {result['held_out_rows']} held-out rows")


def rouge_interval(a: dict[str, Any], b: dict[str, Any]) -> str:
    """' (difference +0.006, 95 % interval -0.011 to +0.024: within what the prompts drawn allow)', from the
    per-answer scores; '' where they are missing."""
    if not a.get("rouge_l_per_answer") or not b.get("rouge_l_per_answer"):
        return ""
    got = paired_difference([a["rouge_l_per_answer"]], [b["rouge_l_per_answer"]])
    lo, hi = got["ci95"]
    what = "a real difference" if got["excludes_zero"] else "within what the prompts drawn allow"
    return f" (difference {got['mean']:+.3f}, 95 % interval {lo:+.3f} to {hi:+.3f}: {what})"


def advice(result: dict[str, Any], baseline_folder: str) -> str | None:
    """Where the baseline is the better student (closer to the teacher, or writing answers closer to the teacher's
    by more than the prompts drawn allow), a sentence saying so and naming its folder; None otherwise."""
    d, b = result["models"]["distilled"], result["models"]["baseline"]
    key = "kl_per_byte" if on_text(result) else "kl_to_teacher"
    better = []
    if b[key] < d[key]:
        better.append("is closer to the teacher" + ("'s text" if on_text(result) else ""))
    if d.get("rouge_l_per_answer") and b.get("rouge_l_per_answer"):
        got = paired_difference([b["rouge_l_per_answer"]], [d["rouge_l_per_answer"]])
        if got["excludes_zero"] and got["mean"] > 0:
            better.append(f"writes answers closer to the teacher's (ROUGE-L {got['mean']:+.3f}, 95 % interval "
                          f"{got['ci95'][0]:+.3f} to {got['ci95'][1]:+.3f})")
    if not better:
        return None
    return (f"the baseline {' and '.join(better)}: it may be the better student for you; its model is in "
            f"{baseline_folder}")


def write_comparison(folder: RunFolder, result: dict[str, Any], baseline_metrics: list[dict[str, Any]]) -> None:
    """comparison.json, samples.md, the pictures (both runs' curves: `baseline_metrics` are the baseline's
    metrics.jsonl records) and the model card's comparison section; the table and verdict on the console, and
    the advice where the baseline is the better student (`advice`)."""
    record = without_answers(result)
    said = verdict(result)
    better = advice(result, folder.file("baseline"))
    if better:
        said += ". " + better[0].upper() + better[1:]
    record["verdict"] = said
    folder.write_json(COMPARISON_FILE, record)
    write_samples(folder.file(SAMPLES_FILE), result)
    pictures = comparison_chart(folder.file("comparison.png"), result, *(
        (TEXT_METRICS, f"{result['held_out_rows']} held-out rows, {result['held_out_bytes']:,} bytes of the teacher's "
                       "answers") if on_text(result) else ()))
    pictures += training_curves(folder.file("training_curves.png"),
                                {"distilled": folder.metrics(), "baseline": baseline_metrics})
    lines = table(result)
    print("\n" + "\n".join(lines) + "\n" + said + "\n", flush=True)
    add_comparison(folder.path, lines, said, [os.path.basename(p) for p in pictures])
    log.info("comparison: %s (%s, %s)", verdict(result), COMPARISON_FILE, SAMPLES_FILE)
    if better:
        log.warning("%s", better)


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
