"""Across tokenizers: does learning the teacher's distribution (logit level) beat learning its text (sequence level)
when the student's vocabulary is not the teacher's?

    python benchmarks/cross_tokenizer.py                    # both arms, seeds 0 1 2 (about an hour on 2 cores)
    python benchmarks/cross_tokenizer.py --seeds 0
    python benchmarks/cross_tokenizer.py --quick --out /tmp/x.json   # tiny models, a minute (what the tests run)

Teacher: the bundled SmolLM2-135M-Instruct (byte-level BPE, 49,152 tokens). Student: 8 of its 30 layers
(`aitraining prune`) given Llama 2's SentencePiece tokenizer (32,000 tokens, from llama.cpp's vocabulary file:
tests/fetch_vocabularies.py) by `aitraining transplant` (each new token's embedding the mean of the teacher's
pieces of the same bytes). Data, budget and teacher answers: those of benchmarks/quality.py (175 training
prompts with the teacher's greedy float32 answers, 4 epochs, batch 8, lr 3e-4, warm-up 10 %; held out: the last
100 user-oriented prompts). Arms, through the `aitraining` command line, the same budget and seed:

- sequence: `--use-distillation --distill-mode sequence`: the student learns the teacher's answers as text;
- logits: `--use-distillation` (the defaults): the cross-vocabulary loss on the cached teacher distribution
  (Note [Across vocabularies] in losses.py).

Judge (aitraining.judge.TextReference), on the held-out prompts: the student's negative log-likelihood of the
teacher's answers per byte of text minus the teacher's own ("KL per byte": token-level KL is not defined across
vocabularies), and ROUGE-L of the student's greedy answers against the teacher's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _measure import describe_machine, format_table, measure_command, utc_now_iso, write_json  # noqa: E402
from quality import (  # noqa: E402
    add_student_layers,
    answer_shape,
    run_record,
    same_command,
    setup,
    stored,
    teacher_answers,
    write_jsonl,
)

ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sequence": ("the teacher's answers as text (--distill-mode sequence)", ("--distill-mode", "sequence")),
    "logits": ("the teacher's distribution across vocabularies (the defaults)", ()),
}


def other_tokenizer_student(base: str, folder: Path) -> str:
    """`base` with Llama 2's tokenizer (aitraining transplant), made once."""
    from aitraining.models.transplant import transplant_to_folder
    from fetch_vocabularies import default_dest, fetch

    if not (folder / "config.json").exists():
        fetch(default_dest())
        transplant_to_folder(base, str(default_dest() / "ggml-vocab-llama-spm.gguf"), str(folder), overwrite=True)
    return str(folder)


def train_arm(arm: str, seed: int, student: str, teacher: str, data: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    project = work / "runs" / f"{arm}-seed{seed}"
    cli = str(Path(sys.executable).parent / "aitraining")
    argv = [cli, "llm", "--train", "--holdout-share", "0", "--model", student, "--teacher-model", teacher, "--data-path", data,
            "--project-name", str(project), "--use-distillation", "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(seed), "--warmup-ratio", "0.1",
            "--logging-steps", "10", "--distill-max-teacher-length", str(args.max_new_tokens + 1), *ARMS[arm][1]]
    record = project / "bench.json"
    if record.exists() and same_command(json.loads(record.read_text()), argv):
        return json.loads(record.read_text())
    shutil.rmtree(project, ignore_errors=True)
    print(f"training {arm} (seed {seed}) ...", flush=True)
    res = measure_command(argv)
    if res.returncode != 0:
        raise SystemExit(f"{arm} seed {seed} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    run = json.loads((project / "run.json").read_text())
    saved = run_record(argv, res, final=run["final_metrics"], path=run.get("distill_path"))
    record.write_text(json.dumps(saved, indent=2))
    return saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-new-tokens", type=int, default=64, help="longest teacher answer, in teacher tokens")
    add_student_layers(ap, "even", "kept before its tokenizer is changed; the published table: even")
    ap.add_argument("--work", default=str(HERE / ".work" / "cross_tokenizer"))
    ap.add_argument("--out", default=str(HERE / "results" / "cross_tokenizer.json"))
    ap.add_argument("--quick", action="store_true", help="tiny models, 12 + 6 prompts, one epoch: for the tests")
    args = ap.parse_args()

    from aitraining.batches import StudentSettings
    from aitraining.judge import TextReference
    from aitraining.metrics import paired_difference
    from aitraining.models.load import load_causal_lm, load_tokenizer
    from aitraining.params import LLMTrainingParams
    from aitraining.teacher import TeacherSettings

    work, teacher, base, train_prompts, heldout_prompts = setup(args)
    student = other_tokenizer_student(base, work / "student-llama2-tokenizer")
    # The teacher's answers are those of the quality benchmark (same prompts, same settings: reused if it ran).
    answers_dir = HERE / ".work" / "quality" if not args.quick else work
    train_answers = teacher_answers(teacher, train_prompts, answers_dir / "answers-train.json", args.max_new_tokens, 16)
    heldout_answers = teacher_answers(teacher, heldout_prompts, answers_dir / "answers-heldout.json", args.max_new_tokens, 16)
    data = write_jsonl(work / "train_pairs.jsonl",
                       [{"prompt": p, "response": a} for p, a in zip(train_prompts, train_answers, strict=True)])
    params = LLMTrainingParams(model=student, teacher_model=teacher, data_path=data, use_distillation=True)
    judge = TextReference(params.settings(TeacherSettings), params.settings(StudentSettings),
                          list(zip(heldout_prompts, heldout_answers, strict=True)))

    def judged(folder: str) -> dict[str, Any]:
        got = judge.compare(load_causal_lm(folder), load_tokenizer(folder))
        return {**got,
                "samples": [{"teacher": t, "student": a} for t, a in zip(heldout_answers[:3], got["answers"][:3], strict=True)]}

    # The untrained student judged once per work folder (it takes minutes; a rerun that only sums up reuses it).
    key = hashlib.sha256(json.dumps([heldout_prompts, heldout_answers, student, teacher]).encode()).hexdigest()[:16]
    untrained = stored(work / f"untrained-judge-{key}.json", lambda: judged(student))
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for seed in args.seeds:
        for arm in args.arms:
            rec = train_arm(arm, seed, student, teacher, data, work, args)
            path = work / "runs" / f"{arm}-seed{seed}" / "judge.json"
            if not path.exists() or "answers" not in json.loads(path.read_text()):  # judged before it kept them
                path.write_text(json.dumps(judged(str(path.parent)), indent=2, ensure_ascii=False))
            rec["judge"] = json.loads(path.read_text())
            runs.setdefault(arm, {})[seed] = rec
            j = rec["judge"]
            print(f"  {arm:9s} seed {seed}: KL/byte {j['kl_per_byte']:.4f}  NLL/byte {j['nll_per_byte']:.4f}  "
                  f"ROUGE-L {j['rouge_l']:.3f}  wall {rec['wall_s']:.0f} s", flush=True)

    def spread(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}

    shapes = {arm: [answer_shape(by[s]["judge"]["answers"], heldout_answers) for s in sorted(by)]
              for arm, by in runs.items()}
    summary = {arm: {"what": ARMS[arm][0], "seeds": sorted(by),
                     **{m: spread([by[s]["judge"][m] for s in sorted(by)]) for m in ("kl_per_byte", "nll_per_byte", "rouge_l")},
                     "wall_s": spread([by[s]["wall_s"] for s in sorted(by)]),
                     "aligned_token_share": by[min(by)]["final"].get("aligned_token_share"),
                     "answers": {name: spread([x[name] for x in shapes[arm]]) for name in shapes[arm][0]}}
               for arm, by in runs.items()}
    checks = {}
    if {"logits", "sequence"} <= set(runs):
        common = sorted(set(runs["logits"]) & set(runs["sequence"]))
        kl = [runs["logits"][s]["judge"]["kl_per_byte"] / runs["sequence"][s]["judge"]["kl_per_byte"] for s in common]
        rouge = [runs["logits"][s]["judge"]["rouge_l"] - runs["sequence"][s]["judge"]["rouge_l"] for s in common]
        summary["logits"]["kl_vs_sequence"] = spread(kl)
        summary["logits"]["rouge_minus_sequence"] = spread(rouge)
        if all("rouge_l_per_answer" in runs[arm][s]["judge"] for arm in ("logits", "sequence") for s in common):
            summary["logits"]["rouge_minus_sequence_interval"] = paired_difference(
                *[[runs[arm][s]["judge"]["rouge_l_per_answer"] for s in common] for arm in ("logits", "sequence")])
        checks = {"logits_closer_on_text": statistics.fmean(kl) < 1, "logits_closer_every_seed": max(kl) < 1,
                  "logits_rouge_higher": statistics.fmean(rouge) > 0, "logits_rouge_higher_every_seed": min(rouge) > 0}
    result = {"benchmark": "cross_tokenizer", "date": utc_now_iso(), "machine": describe_machine(),
              "setup": {"quick": args.quick, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                        "seeds": args.seeds, "max_new_tokens": args.max_new_tokens,
                        "teacher": "tiny Llama (SmolLM2 tokenizer)" if args.quick else "SmolLM2-135M-Instruct (bundled)",
                        "student": ("tiny Llama" if args.quick else f"8 of the teacher's 30 layers ({args.student_layers})")
                                   + " with Llama 2's tokenizer (aitraining transplant)",
                        "judge": "per-byte NLL of the teacher's held-out answers minus the teacher's; ROUGE-L"},
              "untrained_student": {k: v for k, v in untrained.items() if k not in ("samples", "answers")},
              "arms": summary, "targets": checks,
              "runs": {a: {str(s): r for s, r in v.items()} for a, v in runs.items()}}
    write_json(args.out, result)
    rows = [[arm, f"{r['kl_per_byte']['mean']:.4f} ({r['kl_per_byte']['min']:.4f}-{r['kl_per_byte']['max']:.4f})",
             f"{r['nll_per_byte']['mean']:.4f}", f"{r['rouge_l']['mean']:.3f}", f"{r['wall_s']['mean']:.0f}"]
            for arm, r in summary.items()]
    print(f"untrained: KL/byte {untrained['kl_per_byte']:.4f}, ROUGE-L {untrained['rouge_l']:.3f}; teacher NLL/byte "
          f"{untrained['teacher_nll_per_byte']:.4f}")
    print(format_table(["arm", "KL per byte (min-max)", "NLL per byte", "ROUGE-L", "wall s"], rows))
    for name, ok in checks.items():
        print(f"  {name}: {'yes' if ok else 'NO'}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
