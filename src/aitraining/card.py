"""The README model card of a project folder: what was trained from what, how, and what it measured."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

_KEY_PARAMS = (
    "epochs", "batch_size", "gradient_accumulation", "lr", "scheduler", "warmup_ratio", "optimizer",
    "block_size", "chat_template", "student_prompt_template", "peft", "lora_r", "lora_alpha", "seed",
)
_DISTILL_PARAMS = (
    "distill_temperature", "distill_alpha", "distill_loss", "distill_beta", "distill_top_k",
    "distill_tail_samples", "distill_mode", "teacher_source", "distill_on_policy", "distill_max_teacher_length", "teacher_prompt_template", "teacher_do_sample",
)


COMPARISON_MARK = "<!-- comparison -->"
COMPARISON_END = "<!-- /comparison -->"

# Held-out figures of an evaluation record (metrics.jsonl, eval_*), as the card names them.
_EVAL_ROWS = (("eval_kl_to_teacher", "KL(teacher ‖ student) per response token", "{:.4f}"),
              ("eval_top1_agreement", "top-1 agreement with the teacher", "{:.1%}"),
              ("eval_ce", "label loss (nats per response token)", "{:.4f}"),
              ("eval_perplexity", "perplexity", "{:.2f}"))


def _result(final: dict[str, Any], metrics: list[dict[str, Any]], n_valid: int) -> list[str]:
    """Measured figures: the held-out evaluation before training and after it, then how the training went."""
    lines: list[str] = []
    evals = [m for m in metrics if "eval_ce" in m]
    if evals:
        first, last = evals[0], evals[-1]
        lines += [f"On the {n_valid} held-out rows (response tokens the student never trained on):", "",
                  f"| metric | before training (step {first['step']}) | after (step {last['step']}) |", "|---|---|---|"]
        for key, label, fmt in _EVAL_ROWS:
            if key in last:
                before = fmt.format(first[key]) if key in first else "-"
                lines.append(f"| {label} | {before} | {fmt.format(last[key])} |")
        lines.append("")
    else:
        lines += ["No rows were held out, so nothing was measured on unseen data (`--valid-split` or "
                  "`--holdout-share` give some).", ""]
    train = [m for m in metrics if "loss" in m]
    facts = [("optimizer steps", final.get("step")), ("training loss, last logged window", final.get("loss")),
             ("training time (s)", final.get("train_s")), ("training tokens/s", final.get("tokens_per_s")),
             ("teacher time (s)", final.get("teacher_s")), ("teacher cache bytes per token",
                                                             final.get("teacher_cache_bytes_per_token")),
             ("answer tokens aligned to a teacher position", final.get("aligned_token_share")),
             ("whole run (s)", final.get("total_s"))]
    facts = [(k, v) for k, v in facts if v is not None]
    if facts and train:
        lines += ["| training | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in facts]
        lines.append("")
    return lines


def add_comparison(project: str, table: list[str], verdict: str, pictures: list[str]) -> None:
    """The student / baseline / teacher comparison (compare.py) in the model card, where the card keeps room."""
    path = os.path.join(project, "README.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    section = ["## With and without distillation", "",
               "The same student fine-tuned on the teacher's answers without distillation (the baseline, in "
               "`baseline/`), judged with the distilled student and the teacher on the held-out rows "
               "(`comparison.json`; answers side by side in `samples.md`):", "", *table, "", verdict[0].upper() + verdict[1:] + ".",
               "", *[f"![{os.path.splitext(p)[0].replace('_', ' ')}]({p})" for p in pictures], ""]
    head, mark, rest = text.partition(COMPARISON_MARK)
    if not mark:
        head, rest = text + "\n", "\n"
    _, _, tail = rest.partition(COMPARISON_END) if COMPARISON_END in rest else ("", "", rest)
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + COMPARISON_MARK + "\n" + "\n".join(section) + COMPARISON_END + tail)


def _signal(params: Mapping[str, Any]) -> str:
    if params['distill_on_policy'] > 0:
        return (f"{_offline_signal(params)[:-1]}; on {params['distill_on_policy']:.0%} of the steps on the student's own "
                "sampled answers instead, scored by the teacher's exact distribution up to their first repeated "
                "trigram (on-policy).")
    return _offline_signal(params)


def _offline_signal(params: Mapping[str, Any]) -> str:
    if params['teacher_source'] == "live":
        return "against the teacher's exact full-vocabulary distribution, computed live at every step."
    tail = (f" plus {params['distill_tail_samples']} tokens sampled from the rest of its tempered distribution"
            if params['distill_tail_samples'] else " plus the mass of the rest")
    return f"against the teacher's top-{params['distill_top_k']} tokens{tail}, cached once."


def write_model_card(
    project: str, params: Mapping[str, Any], final: dict[str, Any], metrics: list[dict[str, Any]], *, n_train: int,
    n_valid: int, distill_path: str | None = None, summary: str | None = None, pictures: list[str] | None = None,
) -> str:
    """README.md of the project folder. `final`: the run's final figures (run.json); `metrics`: the records of
    metrics.jsonl, whose held-out evaluations (before training and after the last epoch) make the result table."""
    name = os.path.basename(os.path.abspath(project))
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {params['model']}",
        "tags: [aitraining" + (", distillation" if params['use_distillation'] else ", sft") + (", lora" if params['peft'] else "") + "]",
        "---",
        "",
        f"# {name}",
        "",
    ]
    if summary:
        lines += [summary]
    elif params['use_distillation'] and params['distill_mode'] == "sequence":
        lines += [f"A student trained with aitraining on the answers **{params['teacher_model']}** wrote for the prompts "
                  f"(sequence-level distillation), into **{params['model']}**."]
    elif params['use_distillation']:
        lines += [
            f"A student distilled from **{params['teacher_model']}** into **{params['model']}** with aitraining: "
            f"loss = {params['distill_alpha']:g} x T^2 x {params['distill_loss']}(teacher_T || student_T) + "
            f"{1 - params['distill_alpha']:g} x cross-entropy, T = {params['distill_temperature']:g}, on response tokens only, "
            + _signal(params),
        ]
    else:
        lines += [f"**{params['model']}** fine-tuned with aitraining (supervised, on response tokens)."]
    if distill_path:
        lines += ["", f"Path: {distill_path}."]
    lines += [
        "",
        "## Data",
        "",
        f"- source: `{params['data_path']}` (split `{params['train_split']}`: {n_train} rows used"
        + (f"; validation `{params['valid_split']}`: {n_valid} rows" if params['valid_split'] else
           f"; held out for evaluation: {n_valid} rows" if n_valid else "")
        + ")",
        "",
        "## Parameters",
        "",
        "| parameter | value |",
        "|---|---|",
    ]
    keys = _KEY_PARAMS + (_DISTILL_PARAMS if params['use_distillation'] else ())
    for k in keys:
        lines.append(f"| {k} | `{json.dumps(params[k])}` |")
    lines += ["", "The full set is in `training_params['json']`; every logged step in `metrics.jsonl`.", "", "## Result", ""]
    lines += _result(final, metrics, n_valid)
    lines += [f"![{os.path.splitext(p)[0].replace('_', ' ')}]({p})" for p in pictures or []]
    lines += ["", COMPARISON_MARK]
    loader = "AutoModelForCausalLM.from_pretrained(path)"
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"path = {os.path.abspath(project)!r}",
        f"model = {loader}",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "```",
        "",
    ]
    if params['peft'] and not params['merge_adapter']:
        lines.append("This folder holds a LoRA adapter; transformers loads it onto the base model (peft must be installed).")
    elif params['peft']:
        lines.append("This folder holds the merged model; the LoRA adapter alone is in `adapter/`.")
    path = os.path.join(project, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path
