"""Side by side with the peer: TRL's GKDTrainer and aitraining on the same teacher, student, prompts and epochs.

    python benchmarks/vs_trl.py                 # 64 prompts, 64-token answers, 5 epochs, lr 1e-4 (about 15 minutes here)
    python benchmarks/vs_trl.py --ours-args "--teacher-source live"   # ours with other flags (TRL's run reused)
    python benchmarks/vs_trl.py --quick         # tiny models, 8 prompts, one epoch (what the tests run: no TRL
                                                # install, the TRL side is skipped unless --trl-venv is given)

TRL's finished run is reused by a later invocation with the same settings (its record, trl/bench.json, dates
it): its side does not change with our code, and takes three quarters of the time.

TRL runs in a virtual environment of its own, made by this script (benchmarks/.work/trl-venv: torch 2.13.0 CPU,
the same transformers as ours, trl 1.16.0), so that neither install touches the other. Both sides train the
8-layer student pruned from the bundled teacher on the teacher's greedy answers to the first --prompts
Self-Instruct prompts (benchmarks/data), same epochs, batch size, learning rate, warm-up, clipping and seed:

- TRL: `GKDTrainer` with lmbda = 0 (off-policy: the given answers) and beta = 0 (forward KL), whose loss is the
  dense full-vocabulary KL at T = 1 with a live teacher; float32, or bfloat16 with --trl-bf16;
- ours: `aitraining llm --train --use-distillation` at the documented defaults (cache, T = 3, alpha = 0.7).

Reported: wall time and peak RSS of each training command (its own process, measured by the kernel), and the
held-out KL(teacher || student) at T = 1 of each student (the last 100 user-oriented prompts, the float32
teacher, full vocabulary: aitraining.judge.TeacherReference, as in quality.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _measure import describe_machine, format_table, measure_command, safe_ratio, utc_now_iso, write_json  # noqa: E402
from _setup import bundled_teacher_folder, pruned_student, tiny_models  # noqa: E402
from quality import (  # noqa: E402
    HELDOUT_PROMPTS,
    N_HELDOUT,
    STUDENT_FOLDER,
    TRAIN_PROMPTS,
    add_student_layers,
    make_judge,
    read_prompts,
    teacher_answers,
    write_jsonl,
)

TRL_VERSION = "1.16.0"

# Runs inside TRL's venv: only TRL, transformers, torch and datasets there.
TRL_WORKER = r'''
import json, sys
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
try:
    from trl.experimental.gkd import GKDConfig, GKDTrainer
except ImportError:
    from trl import GKDConfig, GKDTrainer
cfg = json.loads(sys.argv[1])
tok = AutoTokenizer.from_pretrained(cfg["student"])
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
rows = [json.loads(x) for x in open(cfg["data"], encoding="utf-8") if x.strip()]
data = Dataset.from_list([{"messages": [{"role": "user", "content": r["prompt"]},
                                        {"role": "assistant", "content": r["response"]}]} for r in rows])
args = GKDConfig(output_dir=cfg["out"], per_device_train_batch_size=cfg["batch_size"], num_train_epochs=cfg["epochs"],
                 learning_rate=cfg["lr"], lr_scheduler_type="linear", warmup_steps=0.1, max_grad_norm=1.0,
                 seed=cfg["seed"], lmbda=0.0, beta=0.0, temperature=1.0, max_length=cfg["max_length"],
                 logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, bf16=cfg["bf16"],
                 dataloader_num_workers=0)
student = AutoModelForCausalLM.from_pretrained(cfg["student"], dtype=torch.float32)
teacher = AutoModelForCausalLM.from_pretrained(cfg["teacher"], dtype=torch.float32)
trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tok)
out = trainer.train()
trainer.save_model(cfg["out"])
tok.save_pretrained(cfg["out"])
print(json.dumps({"train_runtime_s": out.metrics.get("train_runtime"), "steps": out.global_step,
                  "final_loss": out.training_loss}))
'''


def trl_python(venv: Path, transformers_version: str) -> str:
    """The interpreter of TRL's own venv, made (once) with torch 2.13.0 CPU, our transformers and trl."""
    python = venv / "bin" / "python"
    stamp = venv / f".installed-trl-{TRL_VERSION}-transformers-{transformers_version}"
    if not stamp.exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU wheel: see the Makefile
        subprocess.run([*pip, f"transformers=={transformers_version}", f"trl=={TRL_VERSION}"], check=True)
        stamp.touch()
    return str(python)


def run_trl(python: str, teacher: str, student: str, data: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """TRL's training, or its finished run from an earlier invocation with the same settings (TRL's side does not
    change with our code; `reused_from` then dates the figures). Like quality.py's runs, reused by settings and
    paths alone: a work folder whose student or data changed needs a new --work."""
    cfg = {"teacher": teacher, "student": student, "data": data, "out": str(out), "epochs": args.epochs,
           "batch_size": args.batch_size, "lr": args.lr, "seed": 0, "max_length": 1024, "bf16": args.trl_bf16}
    identity = {**cfg, "trl": TRL_VERSION}
    record = out / "bench.json"
    if record.exists() and (out / "model.safetensors").exists():
        done = json.loads(record.read_text())
        if done.get("identity") == identity:
            print(f"TRL: reusing the finished run of {done['date']} in {out}", flush=True)
            return {**done["result"], "reused_from": done["date"]}
    res = measure_command([python, "-c", TRL_WORKER, json.dumps(cfg)], env={**os.environ, "TQDM_DISABLE": "1"})
    if res.returncode != 0:
        raise SystemExit(f"TRL failed ({res.returncode}):\n{res.stderr[-3000:]}")
    worker = json.loads([x for x in res.stdout.splitlines() if x.strip().startswith("{")][-1])
    train_s = worker.get("train_runtime_s") or 0.0
    result = {"wall_s": round(res.wall_s, 2), "peak_rss_mib": round(res.peak_rss_mib or 0, 1), "worker": worker,
              "split": {"teacher_s": "inside training (a live teacher forward every step)", "training_s": round(train_s, 2),
                        "evaluation_s": 0.0, "start_up_and_finish_s": round(res.wall_s - train_s, 2)},
              "precision": "bf16" if args.trl_bf16 else "fp32"}
    record.write_text(json.dumps({"identity": identity, "date": utc_now_iso(), "result": result}, indent=1))
    return result


def run_ours(teacher: str, student: str, data: str, project: Path, args: argparse.Namespace) -> dict[str, Any]:
    cli = str(Path(sys.executable).parent / "aitraining")
    shutil.rmtree(project, ignore_errors=True)
    argv = [cli, "llm", "--train", "--holdout-share", "0", "--model", student, "--teacher-model", teacher, "--data-path", data,
            "--project-name", str(project), "--use-distillation", "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", "0", "--warmup-ratio", "0.1",
            "--distill-max-teacher-length", str(args.max_new_tokens + 1), "--logging-steps", "10", *args.ours_args]
    res = measure_command(argv, env={**os.environ, "TQDM_DISABLE": "1"})
    if res.returncode != 0:
        raise SystemExit(f"ours failed ({res.returncode}):\n{res.stderr[-3000:]}")
    final = json.loads((project / "run.json").read_text())["final_metrics"]
    split = {"teacher_s": final["teacher_s"], "training_s": round(final["train_s"] - final.get("eval_s", 0.0), 2),
             "evaluation_s": final.get("eval_s", 0.0), "start_up_and_finish_s": round(res.wall_s - final["teacher_s"] - final["train_s"], 2)}
    return {"wall_s": round(res.wall_s, 2), "peak_rss_mib": round(res.peak_rss_mib or 0, 1), "split": split,
            "final": final}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--trl-bf16", action="store_true", help="TRL in bfloat16 autocast (default: its float32)")
    ap.add_argument("--ours-args", type=shlex.split, default=[],
                    help='flags added to our command, e.g. "--teacher-source live" (trained in ours-<flags>/)')
    ap.add_argument("--trl-venv", default=str(HERE / ".work" / "trl-venv"))
    add_student_layers(ap, "measured", "the default student, what `aitraining prune` measures")
    ap.add_argument("--work", default=str(HERE / ".work" / "vs_trl"))
    ap.add_argument("--out", default=str(HERE / "results" / "vs_trl.json"))
    ap.add_argument("--quick", action="store_true", help="tiny models; TRL only if its venv already exists")
    args = ap.parse_args()
    from importlib import metadata

    work = Path(args.work) / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    if args.quick:
        teacher, student = tiny_models()
        args.prompts, args.epochs, args.max_new_tokens = 8, 1, 8
        heldout_prompts = read_prompts(HELDOUT_PROMPTS)[-4:]
    else:
        teacher = bundled_teacher_folder()
        student = pruned_student(teacher, work / STUDENT_FOLDER[args.student_layers], layers=args.student_layers)
        heldout_prompts = read_prompts(HELDOUT_PROMPTS)[-N_HELDOUT:]
    prompts = read_prompts(TRAIN_PROMPTS)[: args.prompts]
    answers = teacher_answers(teacher, prompts, work / "answers-train.json", args.max_new_tokens, 16)
    heldout = teacher_answers(teacher, heldout_prompts, work / "answers-heldout.json", args.max_new_tokens, 16)
    data = write_jsonl(work / "train_pairs.jsonl", [{"prompt": p, "response": a} for p, a in zip(prompts, answers, strict=True)])
    heldout_data = write_jsonl(work / "heldout_pairs.jsonl",
                               [{"prompt": p, "response": a} for p, a in zip(heldout_prompts, heldout, strict=True)])
    judge = make_judge(teacher, student, heldout_data, work)

    print("training ours ...", flush=True)
    ours_folder = "-".join(["ours", *(a.strip("-") for a in args.ours_args)]).replace("/", "_")
    ours = run_ours(teacher, student, data, work / ours_folder, args)
    ours["judge"] = judge(str(work / ours_folder))
    trl: dict[str, Any] | None = None
    venv = Path(args.trl_venv)
    if not args.quick or (venv / "bin" / "python").exists():
        print("preparing TRL's own venv ...", flush=True)
        python = trl_python(venv, metadata.version("transformers"))
        print("TRL ...", flush=True)
        trl = run_trl(python, teacher, student, data, work / "trl", args)
        trl["judge"] = judge(str(work / "trl"))
    result: dict[str, Any] = {
        "benchmark": "vs_trl",
        "date": utc_now_iso(),
        "machine": describe_machine(),
        "setup": {"quick": args.quick, "prompts": args.prompts, "epochs": args.epochs, "batch_size": args.batch_size,
                  "lr": args.lr, "max_new_tokens": args.max_new_tokens, "trl": TRL_VERSION,
                  "trl_config": "GKDTrainer, lmbda 0 (off-policy), beta 0 (forward KL), loss at T = 1, pure KD",
                  "ours": "aitraining defaults: cache, T = 3, alpha = 0.7",
                  "ours_args": args.ours_args,
                  "student": "tiny Llama" if args.quick else f"8 of the teacher's 30 layers ({args.student_layers})",
                  "heldout": f"last {len(heldout_prompts)} of {HELDOUT_PROMPTS.name}"},
        "ours": ours,
        "trl": trl,
    }
    rows = [["aitraining", ours["wall_s"], ours["peak_rss_mib"], f"{ours['judge']['kl_t1']:.3f}"]]
    if trl is not None:
        speedup = safe_ratio(trl["wall_s"], ours["wall_s"])
        memory = safe_ratio(ours["peak_rss_mib"], trl["peak_rss_mib"])
        result.update({
            "speedup_wall": speedup, "peak_rss_ratio_ours_over_trl": memory,
            "kl_ratio_ours_over_trl": safe_ratio(ours["judge"]["kl_t1"], trl["judge"]["kl_t1"]),
            "target": "at least 8x faster, at most 0.2x the peak, held-out KL at most TRL's (issue 29)",
            "target_met": bool(speedup and memory and speedup >= 8 and memory <= 0.2
                               and ours["judge"]["kl_t1"] <= trl["judge"]["kl_t1"]),
        })
        rows.append([f"TRL GKDTrainer ({trl['precision']})", trl["wall_s"], trl["peak_rss_mib"], f"{trl['judge']['kl_t1']:.3f}"])
    print(format_table(["side", "wall s", "peak RSS MiB", "held-out KL T=1"], rows))
    for side, res in (("aitraining", ours), ("TRL", trl)):
        if res is not None and "split" in res:
            print(f"{side}: " + ", ".join(f"{k} {v}" for k, v in res["split"].items()))
    if trl is not None:
        print(f"speed-up {result['speedup_wall']:.2f}x, peak ours/TRL {result['peak_rss_ratio_ours_over_trl']:.3f}, "
              f"KL ours/TRL {result['kl_ratio_ours_over_trl']:.3f}; target met: {result['target_met']}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
