"""Teacher generation: batched against one-prompt-at-a-time, and the share of a run spent in the teacher.

    python benchmarks/teacher_generation.py                  # bundled SmolLM2 teacher, 32 real prompts, 64 new tokens
    python benchmarks/teacher_generation.py --quick --out /tmp/gen.json   # tiny Llama, seconds (what the tests run)

Two measurements:

1. Generated tokens per second. One worker process loads the teacher once and writes greedy responses to the
   same prompts twice, through the project's own `Teacher.generate` (so the top-k recorder that fills the
   cache runs too, as in a real run):
   - batched, the way `prepare_teacher` does it: prompts sorted by length, cut into batches of 16;
   - one at a time: each prompt alone.
   Tokens are the real response tokens (up to and including EOS). A batch keeps stepping until its longest
   response is done, so rows that finished early are still computed as padding; the JSON reports those
   computed slots next to the real tokens.
2. The teacher's share of a whole run: `aitraining llm --train --use-distillation` on the same prompts as
   prompt-only rows (the teacher writes every response), `teacher_s / total_s` from its run.json.

Wall time and peak RSS of each process come from the kernel (see _measure.py).
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

import end_to_end  # noqa: E402
from _measure import (  # noqa: E402
    describe_machine,
    format_table,
    run_json_worker,
    safe_ratio,
    utc_now_iso,
    write_json,
)

PROMPTS_FILE = end_to_end.DATA / "user_oriented_prompts.jsonl"
# prepare_teacher batches by --teacher-batch-size; the run below passes the same value so both parts agree.
GEN_BATCH = 16


def write_prompts(work: Path, n: int) -> tuple[str, int]:
    """The first `n` real prompts as prompt-only rows ({"text": ...}); returns (path, rows written)."""
    lines = [x for x in PROMPTS_FILE.read_text(encoding="utf-8").splitlines() if x.strip()][:n]
    path = work / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path), len(lines)


def _fmt(x: float | None, spec: str) -> str:
    """`x` formatted, or "n/a" when a ratio could not be formed (a zero or missing denominator)."""
    return "n/a" if x is None else format(x, spec)


def gen_worker(args: argparse.Namespace) -> None:
    """Load the teacher once; time batched and one-at-a-time generation of the same prompts; print JSON."""
    import dataclasses

    import torch

    from aitraining.data.examples import Example
    from aitraining.params import LLMTrainingParams
    from aitraining.teacher import TeacherSettings
    from aitraining.teacher.engine import Engine

    torch.manual_seed(0)
    # The worker needs no data or student; these fields are required by validation only.
    params = LLMTrainingParams(model=args.teacher, data_path=args.data, use_distillation=True, teacher_model=args.teacher,
                               distill_max_teacher_length=args.max_new, teacher_batch_size=args.batch_size)
    settings = params.settings(TeacherSettings)
    teacher = Engine(settings, torch.device("cpu"))
    started = time.perf_counter()
    _ = teacher.model  # loaded lazily: load it outside the timed parts
    load_s = time.perf_counter() - started
    texts = [json.loads(x)["text"] for x in open(args.data, encoding="utf-8") if x.strip()]
    prompts = [teacher.prompt_ids(Example(messages=[{"role": "user", "content": t}])) for t in texts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))

    # Warm-up: the first generate() pays one-time costs (kernel selection, allocator growth) that neither
    # side should carry. Two new tokens are enough to run both the prefill and the decode path.
    teacher.settings = dataclasses.replace(settings, distill_max_teacher_length=2)
    teacher.generate([prompts[order[0]]])
    teacher.generate([prompts[i] for i in order[: min(len(order), args.batch_size)]])
    teacher.settings = settings

    batched: dict[int, list[int]] = {}
    slots = 0
    started = time.perf_counter()
    for s in range(0, len(order), args.batch_size):
        batch = order[s : s + args.batch_size]
        results = teacher.generate([prompts[i] for i in batch])
        for i, (resp, _targets) in zip(batch, results, strict=True):
            batched[i] = resp
        # Every row of a batch is computed for as many steps as its longest response takes.
        slots += len(batch) * max(len(r) for r, _ in results)
    batched_s = time.perf_counter() - started

    single: dict[int, list[int]] = {}
    started = time.perf_counter()
    for i in order:
        single[i] = teacher.generate([prompts[i]])[0][0]
    single_s = time.perf_counter() - started

    batched_tokens = sum(len(r) for r in batched.values())
    single_tokens = sum(len(r) for r in single.values())
    print(json.dumps({
        "torch_threads": torch.get_num_threads(),
        "teacher_load_s": round(load_s, 3),
        "prompts": len(prompts),
        "prompt_tokens": [len(prompts[i]) for i in order],
        "batched": {"wall_s": round(batched_s, 3), "tokens": batched_tokens, "computed_slots": slots,
                    "tokens_per_s": round(batched_tokens / batched_s, 2),
                    "finished_with_eos": sum(bool(r) and r[-1] == teacher.tokenizer.eos_token_id for r in batched.values())},
        "one_at_a_time": {"wall_s": round(single_s, 3), "tokens": single_tokens,
                          "tokens_per_s": round(single_tokens / single_s, 2)},
        # Left padding changes float rounding, so a greedy argmax may flip on a near tie: informational only.
        "same_responses": sum(batched[i] == single[i] for i in order),
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models and data: seconds, for the tests")
    ap.add_argument("--prompts", type=int, default=None, help="prompts of benchmarks/data/user_oriented_prompts.jsonl")
    ap.add_argument("--max-new", type=int, default=None, help="max new tokens per response (greedy)")
    ap.add_argument("--batch-size", type=int, default=GEN_BATCH, help="prompts per batched generate() call")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of the whole run (share of the teacher)")
    ap.add_argument("--out", default=str(HERE / "results" / "teacher_generation.json"))
    ap.add_argument("--gen-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--teacher", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gen_worker:
        gen_worker(args)
        return
    n_prompts = args.prompts or (4 if args.quick else 32)
    max_new = args.max_new or (8 if args.quick else 64)
    epochs = args.epochs or (1 if args.quick else 5)
    # Room for the longest real prompt with its chat template (~180 tokens) plus the response.
    block = 256 if args.quick else 512
    work = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    try:
        teacher, student = end_to_end.make_models(work, args.quick)
        data, n_prompts = write_prompts(work, n_prompts)
        gen, gen_proc = run_json_worker([sys.executable, str(Path(__file__).resolve()), "--gen-worker", "--teacher", teacher,
                                         "--data", data, "--max-new", str(max_new), "--batch-size", str(args.batch_size)])
        run = end_to_end.run_ours(teacher, student, data, work / "run", epochs=epochs, max_len=block,
                                  extra=("--distill-max-teacher-length", str(max_new),
                                         "--teacher-batch-size", str(args.batch_size)))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    b, s = gen["batched"], gen["one_at_a_time"]
    final = run["final"]
    share = safe_ratio(final.get("teacher_s"), final.get("total_s"))
    result: dict[str, Any] = {
        "benchmark": "teacher_generation",
        "date": utc_now_iso(),
        "machine": describe_machine(torch_threads=gen["torch_threads"]),
        "setup": {"quick": args.quick, "prompts": n_prompts, "max_new_tokens": max_new, "greedy": True,
                  "batch_size": args.batch_size, "run_epochs": epochs, "run_block_size": block,
                  "run_batch_size": end_to_end.BATCH,
                  "teacher": "tiny Llama (4 layers)" if args.quick else "SmolLM2-135M-Instruct (bundled GGUF, dequantized)",
                  "student": "tiny Llama (2 layers)" if args.quick else "8 of the teacher's 30 layers",
                  "data": "benchmarks/data/user_oriented_prompts.jsonl"},
        "generation": {
            **gen,
            "batched_over_one_at_a_time_tokens_per_s": safe_ratio(b["tokens_per_s"], s["tokens_per_s"]),
            # Share of the batched side's computed response slots that were real tokens (1.0 = no padding).
            "batched_slot_utilisation": safe_ratio(b["tokens"], b["computed_slots"]),
            "worker_wall_s": round(gen_proc.wall_s, 2),
            "worker_peak_rss_mib": round(gen_proc.peak_rss_mib or 0, 1),
        },
        "run": {
            **run,
            "teacher_share_of_total": share,
            "teacher_share_of_wall": safe_ratio(final.get("teacher_s"), run["wall_s"]),
            # Includes loading the teacher: what the user waits for before training starts.
            "teacher_phase_cache_tokens_per_s": safe_ratio(final.get("teacher_cache_tokens"), final.get("teacher_s")),
        },
        "notes": [
            "Both generation sides run in one process on the same prompts, after a short warm-up; tokens are real "
            "response tokens (EOS included), not padding.",
            "Batched generation keeps computing rows that already finished until the longest response of the batch "
            "is done; computed_slots counts those (batch rows x steps), batched_slot_utilisation = tokens / slots.",
            "The run's teacher_s covers loading the teacher, writing every response and recording top-k targets. "
            "total_s runs from the start of the teacher phase to the end of training (student load and one checkpoint "
            "per epoch included); process start-up, data loading and the final save are outside it but in wall_s, "
            "hence the second share, teacher_s / wall_s.",
        ],
    }
    print(format_table(["generation", "wall s", "tokens", "tokens/s"],
                       [[f"batched ({args.batch_size}/call)", b["wall_s"], b["tokens"], b["tokens_per_s"]],
                        ["one at a time", s["wall_s"], s["tokens"], s["tokens_per_s"]]]))
    ratio = result["generation"]["batched_over_one_at_a_time_tokens_per_s"]
    print(f"batched / one-at-a-time tokens/s: {_fmt(ratio, '.2f')}x; batched slots used by real tokens: "
          f"{_fmt(result['generation']['batched_slot_utilisation'], '.2f')}; "
          f"same responses: {gen['same_responses']}/{gen['prompts']}")
    print(f"run ({n_prompts} prompt-only rows, {epochs} epoch(s)): teacher {final.get('teacher_s')} s of "
          f"{final.get('total_s')} s total = {_fmt(share, '.1%')} (student training {final.get('train_s')} s)")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
