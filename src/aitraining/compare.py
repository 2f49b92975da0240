"""What distillation bought: the distilled student, the same student trained without distillation (the baseline,
trained by `train.run` with --compare-baseline) and the teacher, judged side by side on the run's held-out rows.

The teacher (float32, exact) gives its distribution on the held-out rows once, and each model is judged by
`judge.TeacherReference` (one implementation of every metric) and sized by `metrics.model_facts`. Written to the
project folder: `comparison.json`, a table on the console and in the model card, `comparison.png` and
`samples.md` (held-out prompts with the three answers).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from aitraining.batches import Item
from aitraining.card import add_comparison
from aitraining.judge import N_SAMPLES, TeacherReference, judge_models, without_answers
from aitraining.metrics import paired_difference
from aitraining.plots import comparison_chart, training_curves
from aitraining.runfolder import RunFolder
from aitraining.teacher import TeacherSource

log = logging.getLogger(__name__)

COMPARISON_FILE = "comparison.json"
SAMPLES_FILE = "samples.md"
ROLES = ("distilled", "baseline", "teacher")


def judge(items: Sequence[Item], prompts: Sequence[str], source: TeacherSource, tokenizer: Any,
          folders: dict[str, str], *, trust_remote_code: bool = False, allow_pickle: bool = False,
          token: str | None = None, show_progress: bool = False) -> dict[str, Any]:
    """Each model folder (role -> folder; "teacher" the teacher) on the run's held-out `items` (`prompts`: their
    user text), against the teacher's exact `source` (`open_source(..., exact=True)`)."""
    reference = TeacherReference.from_items(items, source, tokenizer, prompts, show_progress=show_progress)
    return judge_models(reference, folders, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, token=token,
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
    if not a.get("rouge_l_per_answer") or not b.get("rouge_l_per_answer"):
        return ""
    got = paired_difference([a["rouge_l_per_answer"]], [b["rouge_l_per_answer"]])
    lo, hi = got["ci95"]
    what = "a real difference" if got["excludes_zero"] else "within what the prompts drawn allow"
    return f" (difference {got['mean']:+.3f}, 95 % interval {lo:+.3f} to {hi:+.3f}: {what})"


def write_comparison(folder: RunFolder, result: dict[str, Any], baseline_metrics: list[dict[str, Any]]) -> None:
    """comparison.json, samples.md, the pictures (both runs' curves: `baseline_metrics` are the baseline's
    metrics.jsonl records) and the model card's comparison section; the table and verdict on the console."""
    record = without_answers(result)
    record["verdict"] = verdict(result)
    folder.write_json(COMPARISON_FILE, record)
    write_samples(folder.file(SAMPLES_FILE), result)
    pictures = comparison_chart(folder.file("comparison.png"), result)
    pictures += training_curves(folder.file("training_curves.png"),
                                {"distilled": folder.metrics(), "baseline": baseline_metrics})
    lines = table(result)
    print("\n" + "\n".join(lines) + "\n" + verdict(result) + "\n", flush=True)
    add_comparison(folder.path, lines, verdict(result), [os.path.basename(p) for p in pictures])
    log.info("comparison: %s (%s, %s)", verdict(result), COMPARISON_FILE, SAMPLES_FILE)


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
