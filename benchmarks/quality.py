"""Quality: is the distilled student closer to its teacher than the same student fine-tuned on the teacher's text?

    python benchmarks/quality.py                         # every arm, seeds 0 1 2 (hours on a 2-core CPU)
    python benchmarks/quality.py --arms baseline ours --seeds 0
    python benchmarks/quality.py --quick --out /tmp/q.json   # tiny models, a minute (what the tests run)

Setup (the issue's): the bundled teacher (SmolLM2-135M-Instruct), a student of 8 of its 30 layers
(`aitraining prune`: the layers it measures, 0, 1, 8, 11, 21, 24, 27, 29; `--student-layers even --work
benchmarks/.work/quality` for the evenly spaced student of the earlier tables); training prompts: benchmarks/data/self_instruct_seed_prompts.jsonl (175); held out: the
last 100 rows of benchmarks/data/user_oriented_prompts.jsonl. The teacher answers every prompt once, greedily,
in float32 (at most --max-new-tokens tokens); every arm trains on the same (prompt, teacher answer) rows with
the same epochs, batch size, learning rate, schedule and seed, through the `aitraining` command line:

- baseline: no distillation, the student fine-tuned on the teacher's answers;
- dense: the exact reference: live teacher, full-vocabulary loss, float32, no cache;
- ours: `--use-distillation` at the documented defaults (T = 3, alpha = 0.7) and the default cache;
- the variants in ARMS.

Judge, on the held-out prompts, each student against the float32 teacher: KL(teacher || student) at T = 1 per
token of the teacher's answers, over the full vocabulary; top-1 agreement on those tokens; ROUGE-L of the
student's greedy answers against the teacher's (the rouge-score package). Also per arm: wall time and peak RSS
of the training command (its own process, measured by the kernel, see _measure.py) and the cache's bytes per
token. Each (arm, seed) run lands in --work and is reused by a rerun, so the benchmark can be resumed.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _measure import describe_machine, format_table, measure_command, utc_now_iso, write_json  # noqa: E402
from _setup import bundled_teacher_folder, pruned_student, tiny_models  # noqa: E402

DATA = HERE / "data"
TRAIN_PROMPTS = DATA / "self_instruct_seed_prompts.jsonl"
HELDOUT_PROMPTS = DATA / "user_oriented_prompts.jsonl"
N_HELDOUT = 100
DISTILL = ("--use-distillation",)
# The student's folder in --work for each `aitraining prune --layers` choice (the evenly spaced one keeps the name
# the runs made before measured pruning were recorded with).
STUDENT_FOLDER = {"measured": "student-8-measured", "even": "student-8-layers"}


def add_student_layers(ap: argparse.ArgumentParser, default: str, note: str) -> None:
    """``--student-layers``, the same choice in every benchmark that cuts the 8-layer student from the teacher."""
    ap.add_argument("--student-layers", choices=list(STUDENT_FOLDER), default=default,
                    help=f"which 8 of the teacher's layers the student keeps (`aitraining prune --layers`); {note}")


# name -> (what it is, extra flags). Every arm also gets the common budget flags (see `train_argv`).
ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "baseline": ("no distillation: fine-tuned on the teacher's answers", ()),
    "dense": ("exact reference: live teacher, full vocabulary, float32", (*DISTILL, "--teacher-source", "live",
                                                                          "--mixed-precision", "no")),
    "ours": ("--use-distillation, documented defaults", DISTILL),
    "topk64": ("the previous cache: top-64 + one tail bucket, no samples",
               (*DISTILL, "--distill-top-k", "64", "--distill-tail-samples", "0")),
    "dense_bf16": ("live teacher, full vocabulary, bfloat16 (the default precision here)",
                   (*DISTILL, "--teacher-source", "live")),
    "ours_t1": ("defaults but T = 1", (*DISTILL, "--distill-temperature", "1")),
    "ours_t2": ("defaults but T = 2", (*DISTILL, "--distill-temperature", "2")),
    "ours_k64_m128": ("top-64 + 128 tail samples", (*DISTILL, "--distill-top-k", "64", "--distill-tail-samples", "128")),
    "ours_alpha1": ("defaults but alpha = 1 (no label loss)", (*DISTILL, "--distill-alpha", "1")),
    "ours_skew": ("defaults but skew KL (DistiLLM), beta 0.1", (*DISTILL, "--distill-loss", "skew_kl", "--distill-beta", "0.1")),
    "ours_rkl": ("defaults but reverse KL", (*DISTILL, "--distill-loss", "reverse_kl")),
    "ours_onpolicy": ("defaults + on-policy on half the steps (the student's own answers up to their first repeat, the live teacher scores)",
                      (*DISTILL, "--distill-on-policy", "0.5")),
}
# The teacher served by llama-cpp-python for the server arm, on a fixed port so that a rerun is the same command.
SERVER_URL = "http://127.0.0.1:8791/v1"
ARMS.update({
    "ours_k20": ("defaults in a server's form: top-20, no tail samples (the in-process teacher)",
                 (*DISTILL, "--distill-top-k", "20", "--distill-tail-samples", "0")),
    "ours_k20_t1": ("a server's form at T = 1: top-20, no tail samples, --distill-temperature 1",
                    (*DISTILL, "--distill-top-k", "20", "--distill-tail-samples", "0", "--distill-temperature", "1")),
    "ours_server": ("the teacher served by llama-cpp-python (its Q4_1 GGUF), top-20, at the documented T = 3",
                    (*DISTILL, "--teacher-source", "server", "--teacher-url", SERVER_URL, "--distill-top-k", "20",
                     "--distill-temperature", "3")),
    "ours_server_t1": ("the served teacher at T = 1 (a server's default)",
                       (*DISTILL, "--teacher-source", "server", "--teacher-url", SERVER_URL, "--distill-top-k", "20",
                        "--distill-temperature", "1")),
})
DEFAULT_ARMS = ("baseline", "dense", "ours", "topk64")


def read_prompts(path: Path) -> list[str]:
    return [json.loads(x)["text"] for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def stored(path: Path, make: Callable[[], Any]) -> Any:
    """``make()``'s result, computed once: kept as JSON at ``path`` and read back by later runs."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(make(), indent=2, ensure_ascii=False))
    return json.loads(path.read_text())


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------ teacher answers


def teacher_answers(teacher: str, prompts: list[str], out: Path, max_new: int, batch: int) -> list[str]:
    """The teacher's greedy float32 answers (made once, kept in `out`)."""
    key = hashlib.sha256(json.dumps([teacher, prompts, max_new]).encode()).hexdigest()[:16]
    path = out.with_name(f"{out.stem}-{key}.json")
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    import torch
    from tqdm.auto import tqdm

    from aitraining.data.examples import Example
    from aitraining.params import LLMTrainingParams
    from aitraining.teacher import TeacherSettings
    from aitraining.teacher.engine import Engine

    params = LLMTrainingParams(model=teacher, teacher_model=teacher, data_path="-", use_distillation=True,
                               mixed_precision="no", distill_max_teacher_length=max_new)
    t = Engine(params.settings(TeacherSettings), torch.device("cpu"))
    ids = [t.prompt_ids(Example(messages=[{"role": "user", "content": p}])) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    answers: list[str] = [""] * len(ids)
    for s in tqdm(range(0, len(order), batch), desc="teacher answers", unit="batch"):
        chunk = order[s : s + batch]
        for i, (resp, _) in zip(chunk, t.generate([ids[i] for i in chunk], record=False), strict=True):
            answers[i] = t.tokenizer.decode(resp, skip_special_tokens=True)
    path.parent.mkdir(parents=True, exist_ok=True)  # another benchmark's folder (cross_tokenizer.py reads quality's)
    path.write_text(json.dumps(answers, ensure_ascii=False), encoding="utf-8")
    return answers


# ------------------------------------------------------------------------------------------------- training


def train_argv(arm: str, student: str, teacher: str, data: str, project: Path, seed: int, args: argparse.Namespace) -> list[str]:
    cli = str(Path(sys.executable).parent / "aitraining")
    return [cli, "llm", "--train", "--holdout-share", "0", "--model", student, "--teacher-model", teacher, "--data-path", data,
            "--project-name", str(project), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--seed", str(seed), "--warmup-ratio", "0.1", "--logging-steps", "10",
            # Answers hold at most max_new tokens plus the EOS that every arm appends.
            "--distill-max-teacher-length", str(args.max_new_tokens + 1), *ARMS[arm][1]]


def same_command(record: dict[str, Any], argv: list[str]) -> bool:
    """Whether a recorded run (its bench.json) was of this command, paths compared absolute: `--work` given relative
    or not, and the benchmark started from another folder (the record's relative paths are read from the folder its
    run started in, "cwd", where recorded), so that a finished run is never thrown away for a path's spelling."""
    def absolute(command: list[str], base: str) -> list[str]:
        return [os.path.abspath(os.path.join(base, x)) if os.path.exists(os.path.join(base, x)) else x for x in command]

    saved = record.get("argv")
    return saved is not None and absolute(saved, record.get("cwd", os.getcwd())) == absolute(argv, os.getcwd())


def run_record(argv: list[str], res: Any, **fields: Any) -> dict[str, Any]:
    """What bench.json keeps of a finished training run: its command, where it was started, and its costs."""
    return {"argv": argv, "cwd": os.getcwd(), "wall_s": round(res.wall_s, 2),
            "cpu_s": round((res.user_s or 0) + (res.sys_s or 0), 2), "peak_rss_mib": round(res.peak_rss_mib or 0, 1),
            **fields}


def finished(arm: str, seed: int, student: str, teacher: str, data: str, work: Path, args: argparse.Namespace) -> bool:
    """Whether this (arm, seed) already has a finished run of the same command (that `train_arm` would reuse)."""
    project = work / "runs" / f"{arm}-seed{seed}"
    record = project / "bench.json"
    return record.exists() and same_command(json.loads(record.read_text()),
                                            train_argv(arm, student, teacher, data, project, seed, args))


def train_arm(arm: str, seed: int, student: str, teacher: str, data: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train one (arm, seed) in its own process, or reuse a finished run of the same command."""
    project = work / "runs" / f"{arm}-seed{seed}"
    argv = train_argv(arm, student, teacher, data, project, seed, args)
    record = project / "bench.json"
    if record.exists():
        saved = json.loads(record.read_text())
        if same_command(saved, argv):
            return saved
    shutil.rmtree(project, ignore_errors=True)
    print(f"training {arm} (seed {seed}) ...", flush=True)
    teacher_env = {**os.environ, "TQDM_DISABLE": "1"}
    res = measure_command(argv, env=teacher_env)
    if res.returncode != 0:
        raise SystemExit(f"{arm} seed {seed} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    final = json.loads((project / "run.json").read_text())["final_metrics"]
    saved = run_record(argv, res, final=final)
    record.write_text(json.dumps(saved, indent=2))
    return saved


# ---------------------------------------------------------------------------------------------------- judge


def make_judge(teacher: str, student: str, data: str, work: Path):
    """The exact teacher on its held-out answers (aitraining.judge.TeacherReference), and a function that
    compares a trained student folder to it."""
    from aitraining.batches import StudentSettings
    from aitraining.data.examples import DataSettings
    from aitraining.judge import TeacherReference
    from aitraining.models.load import load_causal_lm
    from aitraining.params import LLMTrainingParams
    from aitraining.teacher import TeacherSettings

    params = LLMTrainingParams(model=student, teacher_model=teacher, data_path=data, use_distillation=True,
                               distill_max_teacher_length=1024, project_name=str(work / "judge"))
    reference = TeacherReference(params.settings(StudentSettings), params.settings(TeacherSettings),
                                 params.settings(DataSettings), str(work / "judge"))

    def judge(folder: str) -> dict[str, Any]:
        model = load_causal_lm(folder)
        got = reference.compare(model)
        return {"kl_t1": got["kl_to_teacher"], "top1": got["top1_agreement"], "ce": got["ce"], "rouge_l": got["rouge_l"],
                "rouge_l_per_answer": got["rouge_l_per_answer"], "n_tokens": got["n_tokens"], "answers": got["answers"],
                **copying(model, reference.items),
                "samples": [{"teacher": t, "student": a} for t, a in zip(reference.answers[:3], got["answers"][:3], strict=True)]}

    # Its items and the student's tokenizer, for the figures added to runs judged before those figures existed.
    judge.reference = reference  # type: ignore[attr-defined]
    return judge


def copying(model: Any, items: list[Any]) -> dict[str, float]:
    """How much a model repeats, read on the teacher's own answers (teacher-forced, so no loop of its own can
    feed it): at every answer token after the first, whether its top-1 is a token that the answer already holds
    (``copy_top1``) and the probability it gives to those tokens together (``copy_mass``); ``label_repeats``:
    how often the teacher's next token is one of them. Greedy loops start where a student copies as readily as
    its teacher but has less else to say."""
    import torch

    top1: list[float] = []
    mass: list[float] = []
    labels: list[float] = []
    model.eval()
    with torch.no_grad():
        for it in items:
            answer = it.input_ids[it.n_prompt :]
            if len(answer) < 2:
                continue
            probs = model(torch.tensor([it.input_ids])).logits[0].float().softmax(-1)
            for j in range(1, len(answer)):
                seen = sorted(set(answer[:j]))
                row = probs[it.n_prompt + j - 1]
                top1.append(float(int(row.argmax()) in seen))
                mass.append(float(row[seen].sum()))
                labels.append(float(answer[j] in seen))
    mean = statistics.fmean if top1 else (lambda _: 0.0)
    return {"copy_top1": mean(top1), "copy_mass": mean(mass), "label_repeats": mean(labels)}


def teacher_on_loops(teacher: Any, tokenizer: Any, items: list[Any], answers: list[str]) -> dict[str, float]:
    """What the teacher says inside a student's greedy loops: its answers re-encoded after the judge's prompts and
    read by the teacher, the share of the student's tokens that are the teacher's own top-1 before the first
    repeated token trigram (``teacher_top1_before_repeat``), on the token where that repeat begins (``..._at``)
    and after it completes (``..._after``), and ``tokens_after_repeat``: the share of the counted answer tokens
    that lie after it. On-policy steps score the student's answers only up to there (onpolicy.until_first_repeat)."""
    import torch

    from aitraining.onpolicy import LOOP_NGRAM, first_repeat_end

    counts = {"before": [0, 0], "at": [0, 0], "after": [0, 0]}  # [tokens, of which the teacher's top-1]
    teacher.eval()
    with torch.no_grad():
        for it, text in zip(items, answers, strict=True):
            answer = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not answer:
                continue
            prompt = list(it.input_ids[: it.n_prompt])
            top = teacher(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
            end = first_repeat_end(answer)
            start = len(answer) if end is None else end - LOOP_NGRAM
            for j, (mine, theirs) in enumerate(zip(answer, top, strict=True)):
                where = "before" if j < start else "at" if j == start else "after" if j >= (end or 0) else None
                if where:  # the repeated trigram's other tokens are in neither figure
                    counts[where][0] += 1
                    counts[where][1] += int(mine == theirs)
    total = sum(n for n, _ in counts.values())
    return {**{f"teacher_top1_{k}_repeat": agree / n for k, (n, agree) in counts.items() if n},
            "tokens_after_repeat": counts["after"][0] / max(total, 1)}


# -------------------------------------------------------------------------------------------------- report


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def answer_shape(answers: list[str], references: list[str]) -> dict[str, float]:
    """What ROUGE-L is made of, for reading it: words per answer, the share of an answer's word trigrams that
    repeat an earlier one (loops), and ROUGE-L's precision and recall (the F-measure is their harmonic mean)."""
    from aitraining.metrics import repeated_trigrams, rouge_l

    scores = rouge_l(answers, references)
    return {"words": statistics.fmean(len(a.split()) for a in answers),
            "repeated_trigrams": statistics.fmean(repeated_trigrams(a) for a in answers),
            "rouge_l_precision": statistics.fmean(x.precision for x in scores),
            "rouge_l_recall": statistics.fmean(x.recall for x in scores)}


def summarize(runs: dict[str, dict[int, dict[str, Any]]], references: list[str] | None = None) -> dict[str, Any]:
    """Per arm: mean / min / max / std over seeds of every figure, and ratios to the baseline and the dense
    reference (per seed, then their spread: the seeds pair up, they share the data order), and the ROUGE-L
    difference's 95 % interval over the held-out prompts. With the teacher's answers (`references`) and runs
    judged since judge.json keeps every answer, also `answer_shape`."""
    from aitraining.metrics import paired_difference

    out: dict[str, Any] = {}
    for arm, by_seed in runs.items():
        seeds = sorted(by_seed)
        row: dict[str, Any] = {"seeds": seeds, "what": ARMS[arm][0]}
        for name in ("kl_t1", "top1", "rouge_l", "ce"):
            row[name] = spread([by_seed[s]["judge"][name] for s in seeds])
        for name in ("copy_top1", "copy_mass", "teacher_top1_before_repeat", "teacher_top1_at_repeat",
                     "teacher_top1_after_repeat", "tokens_after_repeat"):  # for runs judged since they exist
            if all(name in by_seed[s]["judge"] for s in seeds):
                row[name] = spread([by_seed[s]["judge"][name] for s in seeds])
        if references is not None and all("answers" in by_seed[s]["judge"] for s in seeds):
            shapes = [answer_shape(by_seed[s]["judge"]["answers"], references) for s in seeds]
            row["answers"] = {name: spread([x[name] for x in shapes]) for name in shapes[0]}
        for name in ("wall_s", "cpu_s", "peak_rss_mib"):  # None: not measured (the run's record says why)
            measured = [by_seed[s][name] for s in seeds if by_seed[s].get(name) is not None]
            row[name] = spread(measured) if measured else None
        bpt = {by_seed[s]["final"].get("teacher_cache_bytes_per_token") for s in seeds}
        row["cache_bytes_per_token"] = bpt.pop() if len(bpt) == 1 else sorted(x for x in bpt if x)
        for ref in ("baseline", "dense"):
            if ref in runs and ref != arm:
                common = [s for s in seeds if s in runs[ref]]
                if common:
                    row[f"kl_vs_{ref}"] = spread([by_seed[s]["judge"]["kl_t1"] / runs[ref][s]["judge"]["kl_t1"] for s in common])
                    timed = [s for s in common if by_seed[s].get("wall_s") and runs[ref][s].get("wall_s")]
                    if timed:
                        row[f"wall_vs_{ref}"] = spread([by_seed[s]["wall_s"] / runs[ref][s]["wall_s"] for s in timed])
                    row[f"rouge_minus_{ref}"] = spread([by_seed[s]["judge"]["rouge_l"] - runs[ref][s]["judge"]["rouge_l"]
                                                        for s in common])
                    if all("rouge_l_per_answer" in r[s]["judge"] for r in (by_seed, runs[ref]) for s in common):
                        row[f"rouge_minus_{ref}_interval"] = paired_difference(
                            [by_seed[s]["judge"]["rouge_l_per_answer"] for s in common],
                            [runs[ref][s]["judge"]["rouge_l_per_answer"] for s in common])
        out[arm] = row
    return out


def targets(summary: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets for `ours`, on the seed means (and whether they hold on every seed)."""
    ours = summary.get("ours")
    if not ours or "kl_vs_baseline" not in ours or "kl_vs_dense" not in ours:
        return {}
    bpt = ours["cache_bytes_per_token"]
    checks = {
        "kl_at_most_0.72x_baseline": ours["kl_vs_baseline"]["mean"] <= 0.72,
        "kl_at_most_0.72x_baseline_every_seed": ours["kl_vs_baseline"]["max"] <= 0.72,
        "rouge_above_baseline": ours["rouge_minus_baseline"]["mean"] > 0,
        "rouge_above_baseline_every_seed": ours["rouge_minus_baseline"]["min"] > 0,
        "kl_within_3pct_of_dense": ours["kl_vs_dense"]["mean"] <= 1.03,
        "kl_within_3pct_of_dense_every_seed": ours["kl_vs_dense"]["max"] <= 1.03,
        "wall_at_most_0.5x_dense": "wall_vs_dense" in ours and ours["wall_vs_dense"]["mean"] <= 0.5,
        "cache_at_most_1kb_per_token": isinstance(bpt, int) and bpt <= 1024,
    }
    return checks


def setup(args: argparse.Namespace) -> tuple[Path, str, str, list[str], list[str]]:
    """(work folder, teacher, 8-layer student, training prompts, held-out prompts); with --quick tiny models, 12 + 6
    prompts, one epoch, one seed and 8-token answers (the quick settings are written into `args`)."""
    work = Path(args.work)
    if args.quick:
        work = work / "quick"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        teacher, student = tiny_models()
        args.epochs, args.max_new_tokens, args.seeds = 1, 8, args.seeds[:1]
        return work, teacher, student, read_prompts(TRAIN_PROMPTS)[:12], read_prompts(HELDOUT_PROMPTS)[-6:]
    work.mkdir(parents=True, exist_ok=True)
    teacher = bundled_teacher_folder()
    layers = getattr(args, "student_layers", "even")  # the cross-tokenizer benchmark's student: evenly spaced
    student = pruned_student(teacher, work / STUDENT_FOLDER[layers], layers=layers)
    return work, teacher, student, read_prompts(TRAIN_PROMPTS), read_prompts(HELDOUT_PROMPTS)[-N_HELDOUT:]


def served_teacher(args: argparse.Namespace, work: Path, student: str, teacher: str, data: str) -> Any:
    """The bundled GGUF served by llama-cpp-python at SERVER_URL (all cores), if the server arm has runs to make."""
    served = [arm for arm in args.arms if arm.startswith("ours_server")]
    if not served or args.only_finished or all(
            finished(arm, seed, student, teacher, data, work, args) for arm in served for seed in args.seeds):
        return None
    sys.path.insert(0, str(HERE.parent / "tests" / "e2e"))
    from teacher_server import LlamaServer

    from aitraining.models.load import bundled_teacher_path

    port = int(SERVER_URL.rsplit(":", 1)[1].split("/")[0])
    return LlamaServer(bundled_teacher_path() or "", work / "server.log", port=port, threads=os.cpu_count() or 1).start()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--max-new-tokens", type=int, default=64, help="longest teacher answer")
    add_student_layers(ap, "measured", "the tables before 2026-11-29's sixth session used even")
    ap.add_argument("--work", default=str(HERE / ".work" / "quality-measured"), help="runs and teacher answers (reused)")
    ap.add_argument("--out", default=str(HERE / "results" / "quality.json"))
    ap.add_argument("--quick", action="store_true", help="tiny models, 12 + 6 prompts, one epoch: for the tests")
    ap.add_argument("--only-finished", action="store_true",
                    help="train nothing: report the (arm, seed) runs already finished in --work")
    args = ap.parse_args()
    work, teacher, student, train_prompts, heldout_prompts = setup(args)
    train_answers = teacher_answers(teacher, train_prompts, work / "answers-train.json", args.max_new_tokens, 16)
    heldout_answers = teacher_answers(teacher, heldout_prompts, work / "answers-heldout.json", args.max_new_tokens, 16)
    train_data = write_jsonl(work / "train_pairs.jsonl",
                             [{"prompt": p, "response": a} for p, a in zip(train_prompts, train_answers, strict=True)])
    heldout_data = write_jsonl(work / "heldout_pairs.jsonl",
                               [{"prompt": p, "response": a} for p, a in zip(heldout_prompts, heldout_answers, strict=True)])
    judge = make_judge(teacher, student, heldout_data, work)
    key = hashlib.sha256((Path(heldout_data).read_text() + student + teacher).encode()).hexdigest()[:16]
    untrained = stored(work / "judge" / f"untrained-{key}.json", lambda: judge(student))
    from aitraining.models.load import load_causal_lm

    # The float32 teacher, for `copying` on its own answers and `teacher_on_loops`: loaded once, if anything needs it.
    teacher_model = functools.cache(lambda: load_causal_lm(teacher))
    teacher_copying = stored(work / "judge" / f"teacher-copying-{key}.json",
                             lambda: copying(teacher_model(), judge.reference.items))
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    result: dict[str, Any] = {}
    server = served_teacher(args, work, student, teacher, train_data)
    for seed in args.seeds:
        for arm in args.arms:
            if args.only_finished and not finished(arm, seed, student, teacher, train_data, work, args):
                print(f"  {arm:14s} seed {seed}: not run (--only-finished)", flush=True)
                continue
            rec = train_arm(arm, seed, student, teacher, train_data, work, args)
            judged = work / "runs" / f"{arm}-seed{seed}" / "judge.json"
            if not judged.exists():
                judged.write_text(json.dumps(judge(str(judged.parent)), indent=2, ensure_ascii=False))
            rec["judge"] = json.loads(judged.read_text())
            if "copy_top1" not in rec["judge"]:  # judged before `copying` existed: add it, the rest stands
                rec["judge"].update(copying(load_causal_lm(str(judged.parent)), judge.reference.items))
                judged.write_text(json.dumps(rec["judge"], indent=2, ensure_ascii=False))
            if "tokens_after_repeat" not in rec["judge"] and "answers" in rec["judge"]:  # the same for `teacher_on_loops`
                rec["judge"].update(teacher_on_loops(teacher_model(), judge.reference.tokenizer, judge.reference.items,
                                                     rec["judge"]["answers"]))
                judged.write_text(json.dumps(rec["judge"], indent=2, ensure_ascii=False))
            runs.setdefault(arm, {})[seed] = rec
            j = rec["judge"]
            print(f"  {arm:14s} seed {seed}: KL {j['kl_t1']:.3f}  top-1 {j['top1']:.3f}  ROUGE-L {j['rouge_l']:.3f}  "
                  f"wall {rec['wall_s'] or 0:.0f} s  peak {rec['peak_rss_mib'] or 0:.0f} MiB", flush=True)
            summary = summarize(runs, heldout_answers)
            result = {
                "benchmark": "quality",
                "date": utc_now_iso(),
                "machine": describe_machine(),
                "setup": {"quick": args.quick, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                          "seeds": args.seeds, "max_new_tokens": args.max_new_tokens,
                          "train": f"{TRAIN_PROMPTS.name} ({len(train_prompts)} prompts)",
                          "heldout": f"last {len(heldout_prompts)} of {HELDOUT_PROMPTS.name}",
                          "teacher": "tiny Llama (4 layers)" if args.quick else "SmolLM2-135M-Instruct (bundled)",
                          "student": "tiny Llama (2 layers)" if args.quick else "8 of the teacher's 30 layers",
                          "judge": "float32 teacher; KL at T=1 over the full vocabulary on its greedy answers"},
                "untrained_student": {k: v for k, v in untrained.items() if k != "samples"},
                "teacher_copying": teacher_copying,
                "arms": summary,
                "targets_for_ours": targets(summary),
                "runs": {a: {str(s): r for s, r in v.items()} for a, v in runs.items()},
            }
            write_json(args.out, result)
    if server is not None:
        server.stop()
    rows = []
    for arm, row in result["arms"].items():
        rows.append([arm, f"{row['kl_t1']['mean']:.3f} ({row['kl_t1']['min']:.3f}-{row['kl_t1']['max']:.3f})",
                     f"{row.get('kl_vs_baseline', {}).get('mean', 1.0):.3f}",
                     f"{row.get('kl_vs_dense', {}).get('mean', 1.0):.3f}" if arm != "dense" else "1.000",
                     f"{row['top1']['mean']:.3f}", f"{row['rouge_l']['mean']:.3f}",
                     f"{row['wall_s']['mean']:.0f}" if row["wall_s"] else "-",
                     f"{row['peak_rss_mib']['mean']:.0f}" if row["peak_rss_mib"] else "-", row["cache_bytes_per_token"]])
    print(f"untrained student: KL {untrained['kl_t1']:.3f}, ROUGE-L {untrained['rouge_l']:.3f}")
    print(f"on the teacher's answers, top-1 repeats an earlier answer token: teacher {teacher_copying['copy_top1']:.3f}, "
          + ", ".join(f"{arm} {row['copy_top1']['mean']:.3f}" for arm, row in result["arms"].items() if "copy_top1" in row)
          + f" (the teacher's next token repeats one {teacher_copying['label_repeats']:.3f})")
    print(format_table(["arm", "KL T=1 (min-max)", "x baseline", "x dense", "top-1", "ROUGE-L", "wall s", "peak MiB",
                        "cache B/token"], rows))
    for name, ok in result["targets_for_ours"].items():
        print(f"  {name}: {'met' if ok else 'NOT met'}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
