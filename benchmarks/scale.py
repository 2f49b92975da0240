"""Scaling with data: the same distillation run at 1x, 4x and 16x the rows; time per token and peak memory.

    python benchmarks/scale.py                          # bundled SmolLM2 teacher, 8-layer student, 16 real rows x1/x4/x16
    python benchmarks/scale.py --quick --out /tmp/scale.json   # tiny models, seconds (what the tests run)

The base is the first B (prompt, response) rows of benchmarks/data/user_oriented_pairs.jsonl, repeated whole
to 4x and 16x. Each scale is one `aitraining llm --train --use-distillation` run, 1 epoch, every other
setting the same, in a fresh project folder and its own subprocess (wall time and peak RSS from the kernel,
see _measure.py).

What "linear" and "flat" mean here: student training time per 1k trained tokens stays about the same as the
data grows (a straight line through the three points, no superlinear growth), and the run's peak RSS does not
grow with the rows (the cache streams teacher targets from disk; only the batch is in memory).

Caveat: repeated rows are identical, so they share one teacher-cache key and the teacher scores each distinct
row once per run. The teacher phase therefore does NOT grow with the factor; the student's part (`train_s`)
is what scales, and it is reported apart from the whole run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import end_to_end  # noqa: E402
from _measure import describe_machine, format_table, safe_ratio, utc_now_iso, write_json  # noqa: E402

PAIRS_FILE = end_to_end.DATA / "user_oriented_pairs.jsonl"
FACTORS = (1, 4, 16)
# Our reading of the issue's "linear" and "flat" (see the module docstring).
MIN_R2, MAX_PER_TOKEN_RATIO, MAX_RSS_RATIO = 0.98, 1.25, 1.10


def write_scaled_rows(work: Path, base_rows: int, factor: int) -> tuple[str, int]:
    """The first `base_rows` pairs repeated `factor` times into one JSON-lines file; returns (path, rows)."""
    base = [x for x in PAIRS_FILE.read_text(encoding="utf-8").splitlines() if x.strip()][:base_rows]
    rows = base * factor
    path = work / f"data-x{factor}.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(path), len(rows)


def trained_tokens(project: Path) -> int:
    """Response tokens the student trained on, summed over every logged step of metrics.jsonl.

    Why not run.json: its `tokens` is the last logging window only. With --logging-steps 1 every step is
    logged, so the sum covers the whole run exactly (prompt and padding positions are never counted).
    """
    total = 0
    with open(project / "metrics.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if "tokens" in rec:
                total += int(rec["tokens"])
    return total


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float | None]:
    """Least-squares y = a + b*x and its r^2 (None where the points do not determine them)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = safe_ratio(sxy, sxx)
    if slope is None:
        return {"intercept": None, "slope": None, "r2": None}
    r2 = safe_ratio(sxy * sxy, sxx * syy)
    return {"intercept": my - slope * mx, "slope": slope, "r2": r2}


def _fmt(x: float | None, spec: str) -> str:
    """`x` formatted, or "n/a" when a ratio could not be formed (a zero or missing denominator)."""
    return "n/a" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models and data: seconds, for the tests")
    ap.add_argument("--base-rows", type=int, default=None, help="rows of benchmarks/data/user_oriented_pairs.jsonl at 1x")
    ap.add_argument("--max-len", type=int, default=None, help="block size and max teacher length")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="rows per training step and per teacher batch (must divide --base-rows)")
    ap.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    args = ap.parse_args()
    # Quick: 2 rows (2, 8, 32 rows in all) keeps the three runs within a minute on 2 loaded cores.
    base_rows = args.base_rows or (2 if args.quick else 16)
    # Room for the longest real prompt with its chat template (~180 tokens) plus its response.
    max_len = args.max_len or (256 if args.quick else 512)
    # Quick mode has few rows; a smaller batch keeps every scale on full batches (see below).
    batch = args.batch_size or (2 if args.quick else end_to_end.BATCH)
    if base_rows % batch:
        # At 1x a partial batch would hold fewer rows than every batch at 16x: a smaller activation peak and a
        # different per-token cost that have nothing to do with the amount of data.
        raise SystemExit(f"--base-rows {base_rows} must be a multiple of --batch-size {batch}")
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    runs: list[dict[str, Any]] = []
    try:
        teacher, student = end_to_end.make_models(work, args.quick)
        for factor in FACTORS:
            data, n_rows = write_scaled_rows(work, base_rows, factor)
            project = work / f"run-x{factor}"
            # Later flags override run_ours's own (--batch-size, --logging-steps): argparse keeps the last value.
            res = end_to_end.run_ours(teacher, student, data, project, epochs=1, max_len=max_len,
                                      extra=("--logging-steps", "1", "--batch-size", str(batch),
                                             "--teacher-batch-size", str(batch)))
            final = res["final"]
            runs.append({
                "factor": factor, "rows": n_rows, "distinct_rows": base_rows,
                "trained_tokens": trained_tokens(project),
                "teacher_cache_tokens": final.get("teacher_cache_tokens"),
                "wall_s": res["wall_s"], "train_s": final.get("train_s"), "teacher_s": final.get("teacher_s"),
                "total_s": final.get("total_s"), "peak_rss_mib": res["peak_rss_mib"], "final": final,
            })
    finally:
        shutil.rmtree(work, ignore_errors=True)

    one = runs[0]
    for r in runs:
        k_tokens = r["trained_tokens"] / 1000
        r["train_s_per_1k_tokens"] = safe_ratio(r["train_s"], k_tokens)
        r["wall_s_per_1k_tokens"] = safe_ratio(r["wall_s"], k_tokens)
        r["train_s_per_1k_tokens_ratio_to_1x"] = safe_ratio(r["train_s_per_1k_tokens"], one["train_s_per_1k_tokens"])
        r["wall_s_per_1k_tokens_ratio_to_1x"] = safe_ratio(r["wall_s_per_1k_tokens"], one["wall_s_per_1k_tokens"])
        r["peak_rss_ratio_to_1x"] = safe_ratio(r["peak_rss_mib"], one["peak_rss_mib"])
        # The data is the base repeated, so exactly `factor` times the 1x tokens are trained.
        r["trained_tokens_ratio_to_1x"] = safe_ratio(r["trained_tokens"], one["trained_tokens"])
        r["teacher_cache_tokens_ratio_to_1x"] = safe_ratio(r["teacher_cache_tokens"], one["teacher_cache_tokens"])
    last = runs[-1]
    # Whether the teacher scored each distinct row once (its cache would then hold the 1x tokens at every scale)
    # or every repeat again: measured, not assumed.
    deduplicated = all(r["teacher_cache_tokens"] == one["teacher_cache_tokens"] for r in runs)
    teacher_note = (
        "Repeated rows are identical and share one teacher-cache key; the teacher scored each distinct row once per "
        "run (teacher_cache_tokens is the same at every scale), so the teacher phase does not grow with the factor."
        if deduplicated else
        "Repeated rows are identical and share one teacher-cache key, yet the teacher scored every repeat again "
        "(teacher_cache_tokens grows with the factor: duplicates are not deduplicated before scoring), so teacher_s "
        "grows with the rows here (a data set of distinct rows needs that work anyway; only the repeats are wasted)."
    )
    fit = linear_fit([r["trained_tokens"] / 1000 for r in runs], [r["train_s"] for r in runs])
    per_token_ratio = last["train_s_per_1k_tokens_ratio_to_1x"]
    rss_ratio = last["peak_rss_ratio_to_1x"]
    linear = bool(fit["r2"] is not None and fit["r2"] >= MIN_R2 and per_token_ratio is not None
                  and per_token_ratio <= MAX_PER_TOKEN_RATIO)
    flat = bool(rss_ratio is not None and rss_ratio <= MAX_RSS_RATIO)
    result = {
        "benchmark": "scale",
        "date": utc_now_iso(),
        "machine": describe_machine(),
        "setup": {"quick": args.quick, "base_rows": base_rows, "factors": list(FACTORS), "epochs": 1,
                  "max_len": max_len, "batch_size": batch, "teacher_batch_size": batch,
                  "teacher": "tiny Llama (4 layers)" if args.quick else "SmolLM2-135M-Instruct (bundled GGUF, dequantized)",
                  "student": "tiny Llama (2 layers)" if args.quick else "8 of the teacher's 30 layers",
                  "data": "benchmarks/data/user_oriented_pairs.jsonl, first base_rows rows repeated factor times"},
        "runs": runs,
        "train_s_linear_fit": {"intercept_s": fit["intercept"], "slope_s_per_1k_tokens": fit["slope"], "r2": fit["r2"]},
        "train_s_per_1k_tokens_ratio_16x_over_1x": per_token_ratio,
        "peak_rss_ratio_16x_over_1x": rss_ratio,
        "target": (f"time linear in tokens (train_s fit r2 >= {MIN_R2}, per-1k-token time at 16x <= "
                   f"{MAX_PER_TOKEN_RATIO}x of 1x) and peak RSS flat (16x/1x <= {MAX_RSS_RATIO})"),
        "linear_met": linear,
        "flat_met": flat,
        "target_met": linear and flat,
        "teacher_deduplicated_repeats": deduplicated,
        "notes": [
            teacher_note,
            "train_s (the student's part) is what the linearity target reads; wall_s and total_s also carry the "
            "fixed start-up and the teacher phase.",
            "trained_tokens = response tokens the student trained on, summed over metrics.jsonl (--logging-steps 1); "
            "run.json's tokens is only the last logging window.",
            "train_s includes one checkpoint save per epoch, a fixed cost: it shows as the fit's intercept and makes "
            "the per-1k-token time at 16x come out below 1x rather than equal.",
            "peak_rss_mib is the whole run's peak, teacher phase included. Every scale runs full batches (base_rows is "
            "a multiple of batch_size), so the largest batch is the same at 1x and 16x.",
        ],
    }
    print(format_table(
        ["scale", "rows", "tokens", "wall s", "train s", "train s/1k tok", "ratio to 1x", "peak RSS MiB"],
        [[f"{r['factor']}x", r["rows"], r["trained_tokens"], r["wall_s"], r["train_s"],
          _fmt(r["train_s_per_1k_tokens"], ".3f"), _fmt(r["train_s_per_1k_tokens_ratio_to_1x"], ".2f"),
          r["peak_rss_mib"]] for r in runs]))
    print(f"train_s = {_fmt(fit['intercept'], '.2f')} s + {_fmt(fit['slope'], '.3f')} s per 1k tokens "
          f"(r2 {_fmt(fit['r2'], '.4f')}); peak RSS 16x/1x {_fmt(rss_ratio, '.2f')}; "
          f"linear: {linear}, flat: {flat}")
    print(f"teacher phase {', '.join(str(r['teacher_s']) for r in runs)} s at {', '.join(f'{f}x' for f in FACTORS)}; "
          f"cached teacher tokens {', '.join(str(r['teacher_cache_tokens']) for r in runs)}")
    print("note: " + teacher_note)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
