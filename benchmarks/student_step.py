"""Where the student step's time goes, against this machine's matmul peak (issue 29, point 2).

    python benchmarks/student_step.py            # vs_trl.py's work: the measured 8-layer student, the teacher's
                                                 # 64-token answers to 64 Self-Instruct prompts, batch 8
    python benchmarks/student_step.py --quick    # tiny models, 8 rows (what the tests run)

1. Peak: the best of square matmuls of 2048 and 4096 in bfloat16 and in float32, on this machine's threads.
2. A real run in this process (`aitraining.train.run` at the documented defaults: the cached teacher, bfloat16
   autocast where the CPU has it, lr 1e-4), 4 epochs. Every optimizer step is timed; every pass's tokens are
   counted as the loop batches them; the checkpoints written at each epoch's end are timed and left out of the
   steps. torch.profiler records --active steps after --skip (the teacher phase and the
   first steps' warm-up are outside it); the steps after that window run unprofiled.
3. Achieved: model FLOPs of the real tokens (6 x body parameters x tokens + 6 x head parameters x trained positions
   + 6 x layers x width x the causal attention's token pairs) per second of unprofiled step time, as a share of the
   peak of the run's precision; and the matmul FLOPs the profiler counted (the work done, padding included).
4. Where a step's time goes (the profiled steps): the body's forward (its attention apart), the output head and
   loss (`aitraining::head_and_loss`: logits, loss and their gradients, chunk by chunk), the backward through the
   body (attention apart), the optimizer (AdamW, clipping, zero_grad), other operators, and what no operator
   covers (Python and the framework between operators); with the matmul share of each.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _measure import describe_machine, format_table, utc_now_iso, write_json  # noqa: E402
from _setup import bundled_teacher_folder, pruned_student, tiny_models  # noqa: E402
from quality import TRAIN_PROMPTS, read_prompts, teacher_answers, write_jsonl  # noqa: E402
from utilization import matmul_gflops  # noqa: E402

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
BACKWARD = "autograd::engine::evaluate_function: "


def work_data(work: Path, quick: bool) -> tuple[str, str, str]:
    """(teacher, student, data): vs_trl.py's work (the same folders, so its answers and student are reused)."""
    work.mkdir(parents=True, exist_ok=True)
    if quick:
        teacher, student = tiny_models()
        prompts, max_new = read_prompts(TRAIN_PROMPTS)[:8], 8
    else:
        teacher = bundled_teacher_folder()
        student = pruned_student(teacher, work / "student-8-measured", layers="measured")
        prompts, max_new = read_prompts(TRAIN_PROMPTS)[:64], 64
    answers = teacher_answers(teacher, prompts, work / "answers-train.json", max_new, 16)
    rows = [{"prompt": p, "response": a} for p, a in zip(prompts, answers, strict=True)]
    return teacher, student, write_jsonl(work / "train_pairs.jsonl", rows)


def category(name: str, head_and_loss: str) -> str:
    if name == head_and_loss or name.startswith(BACKWARD + "_FusedLinearLoss"):
        return "head and loss"
    if name.startswith(("Optimizer.", "aten::_foreach", "aten::_fused_adam")) or "clip_grad" in name:
        return "optimizer"
    if name.startswith(BACKWARD):
        return "attention, backward" if "Attention" in name else "body, backward"
    if "attention" in name:
        return "attention, forward"
    return "body forward and other operators"


def matmul_self_us(event: Any) -> float:
    own = event.self_cpu_time_total if event.name in MATMULS else 0.0
    return own + sum(matmul_self_us(c) for c in event.cpu_children)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", type=int, default=4, help="steps before the profiled window")
    ap.add_argument("--active", type=int, default=4, help="profiled steps")
    ap.add_argument("--epochs", type=int, default=4, help="of 8 steps each; the steps after the profiled ones are timed")
    ap.add_argument("--work", default=str(HERE / ".work" / "vs_trl"))
    ap.add_argument("--out", default=str(HERE / "results" / "student_step.json"))
    args = ap.parse_args()
    from safetensors.torch import load_file
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    import aitraining.loop as loop
    from aitraining.hardware import resolve_mixed_precision
    from aitraining.objective import HEAD_AND_LOSS, target_positions
    from aitraining.params import LLMTrainingParams
    from aitraining.runfolder import RunFolder
    from aitraining.train import run

    if args.quick:
        args.skip, args.active = 1, 2
    work = Path(args.work) / ("quick" if args.quick else "full")
    teacher, student, data = work_data(work, args.quick)
    precision = resolve_mixed_precision(None)
    peak = {d: round(max(matmul_gflops(d, n, 2 if args.quick else 5) for n in ((512,) if args.quick else (2048, 4096))), 1)
            for d in ("float32", "bfloat16")}

    config = json.loads((Path(student) / "config.json").read_text())
    width, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    n_params = sum(v.numel() for v in load_file(str(Path(student) / "model.safetensors")).values())
    n_head = width * vocab  # tied: the embedding stands for the head's matmul; the lookup costs no FLOPs
    n_body = n_params - n_head

    passes: list[list[tuple[int, int, int, int]]] = [[]]  # per step: (rows x length, real tokens, trained, pairs)
    collate = loop.collate

    def counting_collate(rows: Any, pad: int) -> dict[str, Any]:
        batch = collate(rows, pad)
        mask = batch["attention_mask"]
        lengths = mask.sum(1)
        trained = int(target_positions(mask, batch["n_prompt"]).sum())
        pairs = int((lengths * (lengths + 1) // 2).sum())
        passes[-1].append((mask.numel(), int(lengths.sum()), trained, pairs))
        return batch

    loop.collate = counting_collate
    stamps: list[float] = []
    prof = profile(activities=[ProfilerActivity.CPU], with_flops=True,
                   schedule=schedule(wait=args.skip - 1, warmup=1, active=args.active, repeat=1))

    def on_step(*_: Any) -> None:
        stamps.append(time.perf_counter())
        passes.append([])
        prof.step()

    hook = register_optimizer_step_post_hook(on_step)
    saving: dict[int, float] = defaultdict(float)  # checkpoint seconds by the step whose time holds them
    save = RunFolder.save_checkpoint

    def timed_save(self: Any, *a: Any, **k: Any) -> Any:
        started = time.perf_counter()
        try:
            return save(self, *a, **k)
        finally:
            saving[len(stamps)] += time.perf_counter() - started

    RunFolder.save_checkpoint = timed_save
    project = work / "student-step-run"
    shutil.rmtree(project, ignore_errors=True)
    params = LLMTrainingParams(model=student, teacher_model=teacher, data_path=data, project_name=str(project),
                               use_distillation=True, epochs=3 if args.quick else args.epochs, batch_size=4 if args.quick else 8, lr=1e-4, seed=0,
                               warmup_ratio=0.1, holdout_share=0.0, distill_max_teacher_length=65,
                               overwrite=True)
    try:
        with prof:
            run(params, show_progress=False)
    finally:
        hook.remove()
        loop.collate = collate
        RunFolder.save_checkpoint = save

    def model_flops(step: list[tuple[int, int, int, int]]) -> float:
        return sum(6 * n_body * real + 6 * n_head * trained + 6 * layers * width * pairs for _, real, trained, pairs in step)

    # Optimizer step i + 2 runs from stamps[i] to stamps[i + 1] (the first step holds the start and the teacher
    # phase). The profiler's step k is optimizer step k + 1: the active window is steps skip + 1 .. skip + active.
    # A step's time leaves out the checkpoint written at an epoch's end (no part of the step).
    steps = [(stamps[i] - stamps[i - 1] - saving[i], passes[i]) for i in range(1, len(stamps))]  # steps[i]: step i + 2
    window = range(args.skip - 1, args.skip - 1 + args.active)
    after = [s for i, s in enumerate(steps) if i >= window.stop] or [s for i, s in enumerate(steps) if i not in window]
    unprofiled_s = sum(t for t, _ in after)
    achieved = sum(model_flops(p) for _, p in after) / unprofiled_s / 1e9
    profiled_s = sum(steps[i][0] for i in window)
    executed = sum(p[0] for i in window for p in steps[i][1])
    real = sum(p[1] for i in window for p in steps[i][1])

    # The profiler's ProfilerStep ranges hold each profiled step's operators as their children.
    by: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    counted_flops = sum(e.flops or 0 for e in prof.events())
    for r in (e for e in prof.events() if e.name.startswith("ProfilerStep")):
        for e in r.cpu_children:
            c = category(e.name, HEAD_AND_LOSS)
            by[c][0] += e.cpu_time_total / 1e6
            by[c][1] += matmul_self_us(e) / 1e6
    covered = sum(v[0] for v in by.values())
    split = {c: {"s": round(v[0], 3), "share": round(v[0] / profiled_s, 4), "matmul_s": round(v[1], 3)}
             for c, v in sorted(by.items(), key=lambda kv: -kv[1][0])}
    split["outside operators (Python, framework)"] = {"s": round(profiled_s - covered, 3),
                                                       "share": round((profiled_s - covered) / profiled_s, 4), "matmul_s": 0.0}
    peak_of_run = peak["bfloat16" if precision == "bf16" else "float32"]
    result = {
        "benchmark": "student_step",
        "date": utc_now_iso(),
        "machine": describe_machine(),
        "setup": {"quick": args.quick, "precision": precision, "student_parameters": n_params, "body_parameters": n_body,
                  "head_parameters": n_head, "layers": layers, "width": width, "vocab": vocab, "steps": len(steps),
                  "profiled_steps": [i + 2 for i in window], "unprofiled_steps_timed": len(after)},
        "matmul_peak_gflops": peak,
        "step_s_unprofiled_mean": round(unprofiled_s / len(after), 3),
        "step_s_profiled_mean": round(profiled_s / args.active, 3),
        "achieved_model_gflops": round(achieved, 1),
        "share_of_peak": round(achieved / peak_of_run, 4),
        "target": "at least 30 % of the peak of the run's precision (issue 29)",
        "counted_matmul_gflops_in_profile": round(counted_flops / profiled_s / 1e9, 1),
        "padding_share_of_positions": round(1 - real / max(executed, 1), 4),
        "split": split,
        "top_operators_self_s": {a.key: round(a.self_cpu_time_total / 1e6, 3) for a in sorted(
            prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:15]},
    }
    print(f"matmul peak: float32 {peak['float32']} GFLOP/s, bfloat16 {peak['bfloat16']} GFLOP/s; the run: {precision}")
    print(f"step: {result['step_s_unprofiled_mean']} s unprofiled ({result['step_s_profiled_mean']} s profiled); "
          f"model FLOPs {achieved:.1f} GFLOP/s = {result['share_of_peak']:.1%} of the peak; padding "
          f"{result['padding_share_of_positions']:.1%} of positions")
    print(format_table(["where", "s", "share", "of it matmul s"],
                       [[k, v["s"], f"{v['share']:.1%}", v["matmul_s"]] for k, v in split.items()]))
    print("operators by their own time in the profiled steps: " + ", ".join(
        f"{k} {v} s" for k, v in result["top_operators_self_s"].items()))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
