"""End-to-end cost of a distillation: aitraining against the naive way, in one run, as ratios.

    python benchmarks/end_to_end.py                 # bundled SmolLM2 teacher, 8-layer student, real prompts
    python benchmarks/end_to_end.py --rows 200      # the issue's full size (the naive side is slow)
    python benchmarks/end_to_end.py --quick --out /tmp/e2e.json   # tiny models, seconds (what the tests run)

Both sides train the same student on the same (prompt, response) rows of benchmarks/data for the same epochs,
batch size, learning rate, loss and temperature:

- ours: `aitraining llm --train --use-distillation` (the teacher scores each response once into the cache;
  epochs read the cache; sequences are padded to the batch's longest; chunked top-k loss);
- naive: the reference implementation's way, written here: the teacher runs on every batch of every epoch,
  every sample is padded to the maximum length, and the KL is taken over full-vocabulary float32 logits.

Each side runs in its own subprocess; wall time and peak RSS come from the kernel (see _measure.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _measure import describe_machine, format_table, measure_command, safe_ratio, utc_now_iso, write_json  # noqa: E402
from _setup import bundled_teacher_folder, pruned_student, tiny_models  # noqa: E402

DATA = HERE / "data"  # copies of the shared real prompts (data/README.md)
TEMPERATURE, ALPHA, LR, BATCH = 3.0, 0.7, 1e-4, 8


def make_models(work: Path, quick: bool) -> tuple[str, str]:
    """(teacher, student) folders: the bundled teacher and an 8-layer cut of it, or two tiny Llamas."""
    if quick:
        return tiny_models()
    teacher = bundled_teacher_folder()
    return teacher, pruned_student(teacher, work / "student", layers="even")


def write_rows(work: Path, rows: int) -> str:
    source = DATA / "user_oriented_pairs.jsonl"
    lines = [x for x in source.read_text(encoding="utf-8").splitlines() if x.strip()][:rows]
    path = work / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def run_ours(teacher: str, student: str, data: str, project: Path, *, epochs: int, max_len: int,
             extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """One `aitraining` run in a subprocess; float32 unless `extra` names a precision (like for like with the
    naive loop, which is float32)."""
    cli = str(Path(sys.executable).parent / "aitraining")
    argv = [cli, "llm", "--train", "--holdout-share", "0", "--model", student, "--teacher-model", teacher, "--data-path", data,
            "--project-name", str(project), "--use-distillation", "--epochs", str(epochs), "--batch-size", str(BATCH),
            "--lr", str(LR), "--distill-temperature", str(TEMPERATURE), "--distill-alpha", str(ALPHA),
            "--block-size", str(max_len), "--distill-max-teacher-length", str(max_len), "--logging-steps", "1000",
            *(() if "--mixed-precision" in extra else ("--mixed-precision", "no")), *extra]
    res = measure_command(argv, env={**os.environ, "TQDM_DISABLE": "1"})
    if res.returncode != 0:
        raise SystemExit(f"ours failed ({res.returncode}):\n{res.stderr[-3000:]}")
    final = json.loads((project / "run.json").read_text())["final_metrics"]
    return {"wall_s": round(res.wall_s, 2), "peak_rss_mib": round(res.peak_rss_mib or 0, 1), "final": final}


def run_naive(teacher: str, student: str, data: str, *, epochs: int, max_len: int) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--naive-worker", "--teacher", teacher, "--student", student,
            "--data", data, "--epochs", str(epochs), "--max-len", str(max_len)]
    res = measure_command(argv)
    if res.returncode != 0:
        raise SystemExit(f"naive failed ({res.returncode}):\n{res.stderr[-3000:]}")
    worker = json.loads([x for x in res.stdout.splitlines() if x.strip()][-1])
    return {"wall_s": round(res.wall_s, 2), "peak_rss_mib": round(res.peak_rss_mib or 0, 1), "worker": worker}


def naive_worker(args: argparse.Namespace) -> None:
    """The reference implementation's loop: live teacher, max-length padding, dense full-vocabulary KL."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.student)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher).eval()
    student = AutoModelForCausalLM.from_pretrained(args.student)
    rows = [json.loads(x) for x in open(args.data, encoding="utf-8") if x.strip()]
    seqs = []
    for r in rows:
        prompt = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False, add_generation_prompt=True)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append((p + a)[: args.max_len])
    ids = torch.full((len(seqs), args.max_len), tok.pad_token_id)
    mask = torch.zeros((len(seqs), args.max_len), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(student.parameters(), lr=LR)
    started = time.time()
    steps = 0
    for _ in range(args.epochs):
        order = torch.randperm(len(seqs))
        for s in range(0, len(seqs), BATCH):
            b = order[s : s + BATCH]
            with torch.no_grad():
                t_logits = teacher(input_ids=ids[b], attention_mask=mask[b]).logits.float()
            out = student(input_ids=ids[b], attention_mask=mask[b])
            s_logits = out.logits.float()
            kd = F.kl_div(F.log_softmax(s_logits / TEMPERATURE, -1), F.softmax(t_logits / TEMPERATURE, -1),
                          reduction="batchmean") * TEMPERATURE**2
            ce = F.cross_entropy(s_logits[:, :-1].reshape(-1, s_logits.shape[-1]), labels[b][:, 1:].reshape(-1))
            loss = ALPHA * kd + (1 - ALPHA) * ce
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            steps += 1
    print(json.dumps({"train_s": round(time.time() - started, 2), "steps": steps,
                      "padded_tokens_per_epoch": len(seqs) * args.max_len,
                      "real_tokens_per_epoch": int(mask.sum())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models and data: seconds, for the tests")
    ap.add_argument("--rows", type=int, default=None, help="rows of benchmarks/data/user_oriented_pairs.jsonl")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--max-len", type=int, default=512, help="maximum sequence length (the naive pads to it)")
    ap.add_argument("--out", default=str(HERE / "results" / "end_to_end.json"))
    ap.add_argument("--naive-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--teacher", help=argparse.SUPPRESS)
    ap.add_argument("--student", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive_worker:
        naive_worker(args)
        return
    rows = args.rows or (8 if args.quick else 64)
    epochs = 1 if args.quick else args.epochs
    max_len = 128 if args.quick else args.max_len
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    try:
        teacher, student = make_models(work, args.quick)
        data = write_rows(work, rows)
        naive = run_naive(teacher, student, data, epochs=epochs, max_len=max_len)
        ours = run_ours(teacher, student, data, work / "ours", epochs=epochs, max_len=max_len)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    speedup = safe_ratio(naive["wall_s"], ours["wall_s"])
    memory = safe_ratio(ours["peak_rss_mib"], naive["peak_rss_mib"])
    result = {
        "benchmark": "end_to_end",
        "date": utc_now_iso(),
        "machine": describe_machine(),
        "setup": {"quick": args.quick, "rows": rows, "epochs": epochs, "max_len": max_len, "batch_size": BATCH,
                  "teacher": "tiny Llama (4 layers)" if args.quick else "SmolLM2-135M-Instruct (bundled GGUF, dequantized)",
                  "student": "tiny Llama (2 layers)" if args.quick else "8 of the teacher's 30 layers",
                  "data": "benchmarks/data/user_oriented_pairs.jsonl"},
        "ours": ours,
        "naive": naive,
        "speedup_wall": speedup,
        "peak_rss_ratio_ours_over_naive": memory,
        "target": "at least 3x faster at the same or lower peak memory",
        "target_met": bool(speedup and memory and speedup >= 3 and memory <= 1.0),
    }
    print(format_table(["side", "wall s", "peak RSS MiB"],
                       [["naive", naive["wall_s"], naive["peak_rss_mib"]], ["aitraining", ours["wall_s"], ours["peak_rss_mib"]]]))
    print(f"speed-up {speedup:.2f}x, peak memory ours/naive {memory:.2f}; target met: {result['target_met']}")
    if ours["final"].get("teacher_s") is not None:
        print(f"ours: teacher phase {ours['final']['teacher_s']} s of {ours['final'].get('total_s')} s")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
