"""The README model card of a project folder: what was trained from what, how, and what it measured."""

from __future__ import annotations

import json
import os
from typing import Any

from aitraining.params import LLMTrainingParams

_KEY_PARAMS = (
    "epochs", "batch_size", "gradient_accumulation", "lr", "scheduler", "warmup_ratio", "optimizer",
    "block_size", "chat_template", "student_prompt_template", "peft", "lora_r", "lora_alpha", "seed",
)
_DISTILL_PARAMS = (
    "distill_temperature", "distill_alpha", "distill_loss", "distill_beta", "distill_top_k",
    "distill_tail_samples", "distill_mode", "teacher_source", "distill_max_teacher_length", "teacher_prompt_template", "teacher_do_sample",
)


def _signal(params: LLMTrainingParams) -> str:
    if params.teacher_source == "live":
        return "against the teacher's exact full-vocabulary distribution, computed live at every step."
    tail = (f" plus {params.distill_tail_samples} tokens sampled from the rest of its tempered distribution"
            if params.distill_tail_samples else " plus the mass of the rest")
    return f"against the teacher's top-{params.distill_top_k} tokens{tail}, cached once."


def write_model_card(
    project: str, params: LLMTrainingParams, final: dict[str, Any], *, n_train: int, n_valid: int,
    distill_path: str | None = None,
) -> str:
    name = os.path.basename(os.path.abspath(project))
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {params.model}",
        "tags: [aitraining" + (", distillation" if params.use_distillation else ", sft") + (", lora" if params.peft else "") + "]",
        "---",
        "",
        f"# {name}",
        "",
    ]
    if params.use_distillation and params.distill_mode == "sequence":
        lines += [f"A student trained with aitraining on the answers **{params.teacher_model}** wrote for the prompts "
                  f"(sequence-level distillation), into **{params.model}**."]
    elif params.use_distillation:
        lines += [
            f"A student distilled from **{params.teacher_model}** into **{params.model}** with aitraining: "
            f"loss = {params.distill_alpha:g} x T^2 x {params.distill_loss}(teacher_T || student_T) + "
            f"{1 - params.distill_alpha:g} x cross-entropy, T = {params.distill_temperature:g}, on response tokens only, "
            + _signal(params),
        ]
    else:
        lines += [f"**{params.model}** fine-tuned with aitraining (supervised, on response tokens)."]
    if distill_path:
        lines += ["", f"Path: {distill_path}."]
    lines += [
        "",
        "## Data",
        "",
        f"- source: `{params.data_path}` (split `{params.train_split}`: {n_train} rows used"
        + (f"; validation `{params.valid_split}`: {n_valid} rows" if params.valid_split else "")
        + ")",
        "",
        "## Parameters",
        "",
        "| parameter | value |",
        "|---|---|",
    ]
    keys = _KEY_PARAMS + (_DISTILL_PARAMS if params.use_distillation else ())
    for k in keys:
        lines.append(f"| {k} | `{json.dumps(getattr(params, k))}` |")
    lines += ["", "The full set is in `training_params.json`; the training curve in `metrics.jsonl`.", "", "## Result", ""]
    if final:
        lines += ["| metric | value |", "|---|---|"]
        for k, v in final.items():
            lines.append(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |")
    else:
        lines.append("No metrics were recorded.")
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
    if params.peft and not params.merge_adapter:
        lines.append("This folder holds a LoRA adapter; transformers loads it onto the base model (peft must be installed).")
    elif params.peft:
        lines.append("This folder holds the merged model; the LoRA adapter alone is in `adapter/`.")
    path = os.path.join(project, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path
