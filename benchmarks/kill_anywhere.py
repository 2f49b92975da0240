"""Kill anywhere: SIGKILL a distillation run at random moments, rerun the same command, and check that nothing was lost.

    python benchmarks/kill_anywhere.py                        # 4 phases x 6 trials x 2 kills each (48 kills), tiny models
    python benchmarks/kill_anywhere.py --quick --out /tmp/k.json   # one kill in each phase (what the tests run)

The run: `aitraining llm --train --use-distillation` on 24 real prompt-only rows (12 with --quick) (the teacher writes every response
and the cache is filled as it writes), 3 epochs, a checkpoint at each epoch's end, float32, a fixed seed; tiny
models (a 4-layer teacher and a 2-layer student with the bundled teacher's tokenizer) so that a kill costs seconds.
First one uninterrupted run: the reference. Then each trial starts an empty project folder and kills the run with
SIGKILL, aimed at a phase:

- `teacher`: once the teacher has written a random number of its responses (generation and cache writing);
- `training`: a random moment after the first metrics line;
- `checkpoint`: a random moment (0-40 ms) after a new `checkpoint-*.tmp` folder appears, if it is still being
  written then (otherwise at the next checkpoint);
- `anywhere`: a random moment of the reference's wall time.

and reruns the same command (with `--resume-from-checkpoint latest` once a checkpoint exists) until it finishes,
killing it again up to --kills times. The phase a kill actually hit is read from the folder it left. After every
kill: each complete line of teacher_outputs.jsonl parses and no prompt is there twice (a torn last line is counted:
the next open cuts it); every indexed cache record is wholly on disk; every complete checkpoint folder has its state
file and readable weights; the newest complete checkpoint from before the kill is still there. After the last
rerun: the run finished, its teacher outputs are the reference's (each prompt once, the same response), and its
weights are the reference's (the largest difference is reported; on CPU with one seed it is exactly 0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _measure import describe_machine, utc_now_iso, write_json  # noqa: E402
from _setup import tiny_models  # noqa: E402

PROMPTS = HERE / "data" / "self_instruct_seed_prompts.jsonl"
PHASES = ("teacher", "training", "checkpoint", "anywhere")
ROWS, QUICK_ROWS = 24, 12


def command(student: str, teacher: str, data: str, project: Path, *, resume: bool) -> list[str]:
    cli = str(Path(sys.executable).parent / "aitraining")
    return [cli, "llm", "--train", "--model", student, "--teacher-model", teacher, "--data-path", data, "--project-name",
            str(project), "--use-distillation", "--epochs", "3", "--batch-size", "4", "--teacher-batch-size", "4",
            "--distill-max-teacher-length", "24", "--mixed-precision", "no", "--seed", "5", "--holdout-share", "0",
            "--logging-steps", "1", *(["--resume-from-checkpoint", "latest"] if resume else [])]


def complete_checkpoints(project: Path) -> list[Path]:
    return sorted((p for p in project.glob("checkpoint-*") if p.is_dir() and not p.name.endswith(".tmp")),
                  key=lambda p: int(p.name.split("-")[1]))


def output_lines(project: Path) -> tuple[list[dict[str, Any]], bool]:
    """Complete lines of teacher_outputs.jsonl, and whether a torn (unterminated) last line follows them."""
    path = project / "teacher_outputs.jsonl"
    if not path.exists():
        return [], False
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    torn = lines[-1] != b""
    return [json.loads(x) for x in lines[:-1] if x.strip()], torn


# ------------------------------------------------------------------------------------------------ one kill


def wait_and_kill(proc: subprocess.Popen, project: Path, phase: str, rng: random.Random, reference_s: float,
                  n_rows: int) -> bool:
    """Wait for the aimed-at moment and SIGKILL the run; False when it finished first."""
    started = time.time()
    target_lines = rng.randrange(0, n_rows)
    known = {p.name for p in project.glob("checkpoint-*")}
    deadline: float | None = started + rng.uniform(0.5, reference_s) if phase == "anywhere" else None
    while proc.poll() is None:
        now = time.time()
        if phase == "anywhere" and deadline is not None and now >= deadline:
            break
        if phase == "teacher" and len(output_lines(project)[0]) >= target_lines and (project / "teacher_cache").exists():
            break
        if phase == "training" and (project / "metrics.jsonl").exists():
            if deadline is None:
                deadline = now + rng.uniform(0.0, 3.0)
            if now >= deadline:
                break
        writing = [p for p in project.glob("checkpoint-*.tmp") if p.name not in known] if phase == "checkpoint" else []
        if writing:
            # A checkpoint is being written: kill at a random moment of its writing. A small one can be written in
            # less than the moment drawn; then wait for the next one rather than kill in training.
            until = now + rng.uniform(0.0, 0.04)
            while time.time() < until and writing[0].exists():
                time.sleep(0.0005)
            if writing[0].exists():
                break
            known.add(writing[0].name)
        time.sleep(0.002)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def phase_hit(project: Path, n_rows: int) -> str:
    """Which phase the kill interrupted, read from what the run left."""
    if not project.exists() or not (project / "run.json").exists():
        return "start-up"
    if any(project.glob("checkpoint-*.tmp")):
        return "checkpoint saving"
    lines, torn = output_lines(project)
    if len(lines) < n_rows or torn:
        return "teacher generation and cache writing"
    if json.loads((project / "run.json").read_text()).get("status") == "finished" or (project / "model.safetensors").exists():
        return "finishing"
    if complete_checkpoints(project) or (project / "metrics.jsonl").exists():
        return "training"
    return "between the teacher and training"


def check_after_kill(project: Path, before: list[str]) -> dict[str, bool]:
    """What must hold in the folder a kill left, before anything repairs it."""
    from safetensors import safe_open

    from aitraining.teacher.cache import record_dtype

    lines, torn = output_lines(project)
    prompts = [r["key"] for r in lines]
    held = {"outputs_parse_and_are_unique": len(prompts) == len(set(prompts)), "outputs_torn_line": torn}
    index = project / "teacher_cache"
    caches = [p.parent for p in index.rglob("index.jsonl")] if index.exists() else []
    whole = True
    for cache in caches:
        meta = json.loads((cache / "meta.json").read_text()) if (cache / "meta.json").exists() else None
        if meta is None:
            continue
        size = record_dtype(int(meta["k"]), int(meta.get("samples", 0))).itemsize
        data = (cache / "targets.bin").stat().st_size if (cache / "targets.bin").exists() else 0
        for line in (cache / "index.jsonl").read_text().split("\n")[:-1]:
            rec = json.loads(line)
            whole &= (rec["start"] + rec["length"]) * size <= data
    held["cache_records_whole"] = whole
    intact = True
    for ckpt in complete_checkpoints(project):
        intact &= (ckpt / "trainer_state.json").exists()
        for weights in ckpt.glob("*.safetensors"):
            with safe_open(str(weights), "pt") as f:
                intact &= len(list(f.keys())) > 0
    held["checkpoints_intact"] = intact
    now = [p.name for p in complete_checkpoints(project)]
    held["previous_checkpoint_kept"] = not before or before[-1] in now or any(
        int(n.split("-")[1]) > int(before[-1].split("-")[1]) for n in now)
    return held


def weights_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    if wa.keys() != wb.keys():
        return float("inf")
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


# ------------------------------------------------------------------------------------------------ trials


def trial(aims: list[str], rng: random.Random, models: tuple[str, str], data: str, n_rows: int, project: Path,
          reference: Path, reference_s: float) -> dict[str, Any]:
    """One project folder from empty to finished, killed once per aim (in order), rerun after each kill."""
    teacher, student = models
    shutil.rmtree(project, ignore_errors=True)
    done: list[dict[str, Any]] = []
    runs = missed = 0
    while True:
        resume = bool(complete_checkpoints(project)) if project.exists() else False
        before = [p.name for p in complete_checkpoints(project)] if project.exists() else []
        proc = subprocess.Popen(command(student, teacher, data, project, resume=resume), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        runs += 1
        while len(done) + missed < len(aims):
            phase = aims[len(done) + missed]
            if wait_and_kill(proc, project, phase, rng, reference_s, n_rows):
                done.append({"aimed_at": phase, "hit": phase_hit(project, n_rows), **check_after_kill(project, before)})
                break
            missed += 1  # the run finished (or passed that phase) first
        if proc.returncode is not None and proc.returncode < 0:
            continue
        _, err = proc.communicate()
        if proc.returncode != 0:
            return {"aims": aims, "kills": done, "runs": runs, "finished": False, "error": err[-2000:]}
        break
    lines, torn = output_lines(project)
    ref_lines, _ = output_lines(reference)
    same_outputs = (not torn and sorted((r["key"], r["response"]) for r in lines)
                    == sorted((r["key"], r["response"]) for r in ref_lines))
    return {"aims": aims, "kills": done, "missed": missed, "runs": runs, "finished": True,
            "outputs_equal_reference": same_outputs,
            "max_weight_difference": weights_difference(project, reference)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=16, help="project folders taken from empty to finished")
    ap.add_argument("--kills", type=int, default=3, help="kills per trial, each aimed at a phase drawn at random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(HERE / ".work" / "kill_anywhere"))
    ap.add_argument("--out", default=str(HERE / "results" / "kill_anywhere.json"))
    ap.add_argument("--quick", action="store_true",
                    help="one trial, killed in the teacher's phase, in training and while a checkpoint is written")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    models = tiny_models()
    n_rows = QUICK_ROWS if args.quick else ROWS
    prompts = [json.loads(x)["text"] for x in PROMPTS.read_text(encoding="utf-8").splitlines() if x.strip()][:n_rows]
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"text": p}, ensure_ascii=False) + "\n" for p in prompts), encoding="utf-8")
    reference = work / "reference"
    started = time.time()
    subprocess.run(command(models[1], models[0], str(data), reference, resume=False), check=True, capture_output=True,
                   env={**os.environ, "TQDM_DISABLE": "1"})
    reference_s = time.time() - started
    print(f"reference run: {reference_s:.1f} s")
    rng = random.Random(args.seed)
    trials = []
    plans = [["teacher", "training", "checkpoint"]] if args.quick else [
        [rng.choice(PHASES) for _ in range(args.kills)] for _ in range(args.trials)]
    for t, aims in enumerate(plans, 1):
        got = trial(aims, rng, models, str(data), n_rows, work / "killed", reference, reference_s)
        trials.append(got)
        hits = ", ".join(k["hit"] for k in got["kills"]) or "none"
        print(f"  trial {t}: aimed at {', '.join(aims)}; killed in: {hits}; finished {got['finished']}; outputs as "
              f"the reference {got.get('outputs_equal_reference')}; weights differ by {got.get('max_weight_difference')}",
              flush=True)
    kills = [k for t in trials for k in t["kills"]]
    by_phase: dict[str, int] = {}
    for k in kills:
        by_phase[k["hit"]] = by_phase.get(k["hit"], 0) + 1
    checks = ("outputs_parse_and_are_unique", "cache_records_whole", "checkpoints_intact", "previous_checkpoint_kept")
    summary = {
        "kills": len(kills), "kills_by_phase_hit": by_phase, "reruns": sum(t["runs"] for t in trials),
        "torn_output_lines_left_by_kills": sum(k["outputs_torn_line"] for k in kills),
        "held_after_every_kill": {c: all(k[c] for k in kills) for c in checks},
        "every_trial_finished": all(t["finished"] for t in trials),
        "outputs_equal_reference_every_trial": all(t.get("outputs_equal_reference") for t in trials),
        "max_weight_difference": None if not all(t["finished"] for t in trials) else max(
            (t["max_weight_difference"] for t in trials), default=None),
    }
    print(json.dumps(summary, indent=2))
    out = write_json(args.out, {"benchmark": "kill_anywhere", "date": utc_now_iso(), "machine": describe_machine(),
                                "settings": {"trials": len(plans), "kills_per_trial": len(plans[0]), "quick": args.quick,
                                             "seed": args.seed, "rows": n_rows, "reference_s": round(reference_s, 2)},
                                "summary": summary, "trials": trials})
    print(f"wrote {out}")
    if not (summary["every_trial_finished"] and all(summary["held_after_every_kill"].values())
            and summary["outputs_equal_reference_every_trial"] and summary["max_weight_difference"] == 0.0):
        raise SystemExit("something did not hold: see the JSON")


if __name__ == "__main__":
    main()
