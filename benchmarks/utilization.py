"""How close a distillation run gets to this machine's matmul peak, and whether bfloat16 autocast pays on CPU.

    python benchmarks/utilization.py                 # bundled teacher, 8-layer student, real prompts
    python benchmarks/utilization.py --quick --out /tmp/u.json

1. Peak: a 2048 x 2048 matmul in float32 and in bfloat16 on this machine's threads (GFLOP/s).
2. Achieved: a real run (`aitraining llm --train --use-distillation`), counted as 6 x student parameters x
   student tokens per epoch x epochs (forward + backward) plus 2 x teacher parameters x teacher tokens (its one
   scoring pass), divided by the run's teacher + training seconds. Parameters include the embedding, which
   stands for the output-head matmul (tied weights); attention's sequence-length term is left out.
3. The same run with `--mixed-precision bf16` (student autocast, teacher in bfloat16): time, and quality on
   held-out rows, so that a speed-up is never bought with a worse student unseen. The label loss on the
   held-out reference responses is the like-for-like figure; the KL is to each run's own teacher cache.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _measure import describe_machine, format_table, safe_ratio, utc_now_iso, write_json  # noqa: E402
from end_to_end import DATA, make_models, run_ours  # noqa: E402


def matmul_gflops(dtype_name: str, n: int, repeats: int) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def write_split(work: Path, train_rows: int, valid_rows: int) -> str:
    source = DATA / "user_oriented_pairs.jsonl"
    lines = [x for x in source.read_text(encoding="utf-8").splitlines() if x.strip()]
    data = work / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(lines[:train_rows]) + "\n", encoding="utf-8")
    (data / "valid.jsonl").write_text("\n".join(lines[-valid_rows:]) + "\n", encoding="utf-8")
    return str(data)


def token_counts(student: str, data: str, max_len: int) -> int:
    """Tokens of the training sequences (prompt in the chat template + response + EOS), as the run sees them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student)
    total = 0
    for line in open(Path(data) / "train.jsonl", encoding="utf-8"):
        row = json.loads(line)
        prompt = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True)
        n = len(tok(prompt, add_special_tokens=False)["input_ids"]) + len(tok(row["response"], add_special_tokens=False)["input_ids"]) + 1
        total += min(n, max_len)
    return total


def parameters(folder: str) -> int:
    from transformers import AutoModelForCausalLM

    from aitraining.models.load import count_parameters

    return count_parameters(AutoModelForCausalLM.from_pretrained(folder))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "utilization.json"))
    args = ap.parse_args()
    rows, valid, epochs = (8, 4, 1) if args.quick else (args.rows, 16, args.epochs)
    max_len = 128 if args.quick else 512
    peak = {d: round(matmul_gflops(d, 512 if args.quick else 2048, 3 if args.quick else 10), 1) for d in ("float32", "bfloat16")}
    work = Path(tempfile.mkdtemp(prefix="bench-util-"))
    runs: dict[str, Any] = {}
    try:
        teacher, student = make_models(work, args.quick)
        data = write_split(work, rows, valid)
        tokens = token_counts(student, data, max_len)
        n_student, n_teacher = parameters(student), parameters(teacher)
        for name, extra in (("fp32", ("--mixed-precision", "no")), ("bf16", ("--mixed-precision", "bf16"))):
            r = run_ours(teacher, student, data, work / name, epochs=epochs, max_len=max_len,
                         extra=("--valid-split", "valid", *extra))
            final = r["final"]
            flops = 6 * n_student * tokens * epochs + 2 * n_teacher * tokens
            seconds = final["train_s"] + final.get("teacher_s", 0.0)
            evals = [json.loads(x) for x in open(work / name / "metrics.jsonl", encoding="utf-8") if "eval_ce" in x]
            runs[name] = {
                "wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"], "teacher_s": final.get("teacher_s"),
                "train_s": final["train_s"], "achieved_gflops": round(flops / seconds / 1e9, 1),
                "eval_kl_to_teacher": round(evals[-1]["eval_kl_to_teacher"], 4), "eval_ce": round(evals[-1]["eval_ce"], 4),
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fp32, bf16 = runs["fp32"], runs["bf16"]
    result = {
        "benchmark": "utilization",
        "date": utc_now_iso(),
        "machine": describe_machine(),
        "setup": {"quick": args.quick, "rows": rows, "valid_rows": valid, "epochs": epochs, "max_len": max_len,
                  "student_parameters": n_student, "teacher_parameters": n_teacher, "train_tokens_per_epoch": tokens},
        "matmul_peak_gflops": peak,
        "runs": runs,
        "utilization_fp32": safe_ratio(fp32["achieved_gflops"], peak["float32"]),
        "utilization_bf16_vs_bf16_peak": safe_ratio(bf16["achieved_gflops"], peak["bfloat16"]),
        "bf16_speedup_train": safe_ratio(fp32["train_s"], bf16["train_s"]),
        "bf16_speedup_teacher": safe_ratio(fp32["teacher_s"], bf16["teacher_s"]),
        "bf16_kl_change": round(bf16["eval_kl_to_teacher"] - fp32["eval_kl_to_teacher"], 4),
    }
    print(f"matmul peak: float32 {peak['float32']} GFLOP/s, bfloat16 {peak['bfloat16']} GFLOP/s")
    print(format_table(["run", "teacher s", "train s", "GFLOP/s", "eval KL", "eval CE", "peak MiB"],
                       [[k, v["teacher_s"], v["train_s"], v["achieved_gflops"], v["eval_kl_to_teacher"], v["eval_ce"],
                         v["peak_rss_mib"]] for k, v in runs.items()]))
    print(f"fp32 utilization {result['utilization_fp32']:.1%} of the float32 peak; bf16 training speed-up "
          f"{result['bf16_speedup_train']:.2f}x, teacher {result['bf16_speedup_teacher']:.2f}x")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
