"""Peak memory and time of the distillation loss + backward: ours (chunked, sparse teacher) vs the naive dense form.

Run from the repository root::

    .venv/bin/python benchmarks/loss_memory.py            # full run, writes benchmarks/results/loss_memory.json
    .venv/bin/python benchmarks/loss_memory.py --quick --out /tmp/lm.json   # tiny sizes, seconds

What is compared, for N positions, hidden size H, vocabulary V, float32, temperature T, alpha:

- ``naive``: what a reference implementation does. Full-vocabulary student logits ``hidden @ W^T`` for all N
  positions (with grad), the full-vocabulary teacher logits as a given (N, V) tensor,
  ``alpha * kl_div(log_softmax(s / T), softmax(t / T), "batchmean") * T^2 + (1 - alpha) * CE(s, labels)``,
  then backward.
- ``ours``: ``aitraining.chunked.chunked_token_loss_sums`` with the head ``h @ W^T``, a top-k sparse teacher
  (``TeacherTargets``, the default head of 32 and 112 tail samples) and a given ``chunk_size``, divided by N (what the trainer does), then backward.
  The teacher targets are built before measurement, chunk by chunk, as in a real run where they come from
  the on-disk cache and full teacher logits never exist.

Each configuration runs in a fresh subprocess (``--worker``), because torch's CPU allocator is invisible to
tracemalloc and RSS high-water marks never go down. The worker allocates the inputs, resets the high-water
mark, and reports ``peak RSS - RSS before the call`` for the first call: the loss's own peak (it includes
the gradient buffers the backward creates: dW, V x H x 4 bytes, and dhidden). Time is the median over all
timed calls of forward + backward. Every configuration runs in ``--rounds`` fresh workers, the rounds
interleaved (naive, ours..., then the reverse order), because on a shared machine absolute times drift: the
figures that matter are the ratios ours / naive measured in the same run.

Peak figures are RSS, so they include what glibc's allocator keeps: tensors below its mmap threshold (which
rises up to 32 MiB as big blocks are freed) are served from the heap and may stay resident after a free,
so a chunk size whose per-chunk tensors fall under 32 MiB can show a higher peak than a larger one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import _measure as M

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "loss_memory.json"

# The target: ours at most a quarter of the naive peak, at no loss of speed. "No loss of speed" is
# read as a time ratio <= 1.0 with a 5% allowance, because repeated runs on a shared 2-core machine move
# by about that much; the measured ratio is always written out so the strict reading can be checked too.
PEAK_RATIO_MAX = 0.25
TIME_RATIO_MAX = 1.05

FULL = {
    "vocabs": [262_144, 49_152],  # Gemma 3's vocabulary; SmolLM2's
    "positions": 2048,  # batch 4 x 512 response tokens
    "hidden": 576,  # SmolLM2-135M's hidden size
    "chunk_sizes": [128, 256, 512, 1024],
    "rounds": 3,
    "repeats": 1,
    "threads": None,  # torch's default (one per core)
}
QUICK = {
    "vocabs": [4096],
    "positions": 128,
    "hidden": 64,
    "chunk_sizes": [32, 64],
    "rounds": 1,
    "repeats": 1,
    # One thread: with one per core on a machine that is busy with other work, every tiny op waits for a
    # descheduled pool thread (milliseconds each), and the smoke test would take many times longer.
    "threads": 1,
}

MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------------------
# Worker: one configuration, one fresh process
# ---------------------------------------------------------------------------------------------------------


def _warm_up(temperature: float, alpha: float) -> None:
    """Run both losses once on tiny tensors.

    The kernels' and the thread pool's one-time allocations (thread stacks, library workspaces) then belong
    to the baseline instead of being charged to the measured call.
    """
    import torch
    import torch.nn.functional as F

    from aitraining.chunked import LinearHead, chunked_token_loss_sums
    from aitraining.signal import teacher_targets_from_logits

    h = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(32, 16, requires_grad=True)
    t = teacher_targets_from_logits(torch.randn(8, 32), k=4, tau=temperature)
    ours = chunked_token_loss_sums(
        h, LinearHead(w), torch.randint(32, (8,)), t, chunk_size=4, temperature=temperature, alpha=alpha
    )[0]
    naive = F.kl_div(F.log_softmax(h @ w.T, -1), F.softmax(torch.randn(8, 32), -1), reduction="batchmean")
    (ours + naive + F.cross_entropy(h @ w.T, torch.randint(32, (8,)))).backward()


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one configuration in this (fresh) process; returns the JSON-able result."""
    # Imported here, not at module level, so the parent process stays small (see _measure's docstring).
    import torch
    import torch.nn.functional as F

    from aitraining.chunked import LinearHead, chunked_token_loss_sums
    from aitraining.signal import TeacherTargets, teacher_targets_from_logits

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    n, h, v = args.positions, args.hidden, args.vocab
    T, alpha = args.temperature, args.alpha
    torch.manual_seed(args.seed)

    _warm_up(T, alpha)

    # Inputs. In-place scaling (mul_, normal_) so that setup never holds a second copy of a big tensor.
    hidden = torch.randn(n, h).requires_grad_(True)
    weight = torch.randn(v, h).mul_(h**-0.5).requires_grad_(True)  # logits of unit scale
    labels = torch.randint(v, (n,))
    gen = torch.Generator().manual_seed(args.seed + 1)
    teacher_std = 2.0  # a teacher somewhat more peaked than the student
    gen_chunk = 128  # rows of teacher logits alive at once while building the sparse targets

    teacher_logits: torch.Tensor | None = None
    targets: TeacherTargets | None = None
    if args.worker == "naive":
        teacher_logits = torch.empty(n, v)
        for s in range(0, n, gen_chunk):
            teacher_logits[s : s + gen_chunk].normal_(0.0, teacher_std, generator=gen)
    else:
        parts = []
        for s in range(0, n, gen_chunk):
            rows = torch.empty(min(gen_chunk, n - s), v).normal_(0.0, teacher_std, generator=gen)
            parts.append(teacher_targets_from_logits(rows, k=args.k, samples=args.samples, tau=T))
            del rows
        targets = TeacherTargets.cat(parts)
        del parts

    def head(x: torch.Tensor) -> torch.Tensor:
        return x @ weight.T

    def naive_loss() -> torch.Tensor:
        assert teacher_logits is not None
        student = head(hidden)
        log_p_s = F.log_softmax(student / T, dim=-1)
        p_t = F.softmax(teacher_logits / T, dim=-1)
        kd = F.kl_div(log_p_s, p_t, reduction="batchmean") * T**2
        ce = F.cross_entropy(student, labels)
        return alpha * kd + (1.0 - alpha) * ce

    def our_loss() -> torch.Tensor:
        # The head as the trainer passes it (objective.output_head): a LinearHead, so the loss takes the
        # gradients chunk by chunk in forward.
        loss_sum, _, _ = chunked_token_loss_sums(
            hidden, LinearHead(weight), labels, targets, chunk_size=args.chunk_size, temperature=T, alpha=alpha,
            kind="forward_kl",
        )
        # The trainer divides the sum by the token count (Note [Sum reduction]); do the same so the values
        # are on the scale of the naive mean.
        return loss_sum / n

    loss_fn = naive_loss if args.worker == "naive" else our_loss

    def call() -> tuple[float, float, float]:
        """One forward + backward: (wall seconds, CPU seconds of all threads, loss value)."""
        hidden.grad = None
        weight.grad = None
        c0, t0 = time.process_time(), time.perf_counter()
        loss = loss_fn()
        loss.backward()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        return elapsed, cpu, float(loss.detach())

    # Peak from the first call, which is also the first timing sample: later calls are no cheaper, since
    # glibc serves every temporary above its mmap threshold with fresh pages (mmap/munmap) each time.
    with M.PeakRSS() as peak:
        first = call()
    calls = [first] + [call() for _ in range(args.repeats - 1)]
    times = [c[0] for c in calls]
    cpu_times = [c[1] for c in calls]
    grads_finite = bool(torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all())

    return {
        "method": args.worker,
        "vocab": v,
        "positions": n,
        "hidden": h,
        "chunk_size": args.chunk_size if args.worker == "ours" else None,
        "k": args.k if args.worker == "ours" else None,
        "samples": args.samples if args.worker == "ours" else None,
        "peak_mib": peak.delta_kib / 1024,
        "peak_exact": peak.exact,
        "hwm_reset": peak.reset_ok,
        "baseline_rss_mib": peak.baseline_kib / 1024,
        "time_s": M.median(times),
        "times_s": times,
        # CPU time is a cross-check of the wall-time ratio that other load on the machine disturbs less.
        "cpu_time_s": M.median(cpu_times),
        "loss": first[2],
        "grads_finite": grads_finite,
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------------------
# Parent: run every configuration, compare, write the results
# ---------------------------------------------------------------------------------------------------------


def _worker_argv(args: argparse.Namespace, method: str, vocab: int, chunk_size: int | None) -> list[str]:
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        method,
        "--vocab",
        str(vocab),
        "--positions",
        str(args.positions),
        "--hidden",
        str(args.hidden),
        "--k",
        str(args.k),
        "--samples",
        str(args.samples),
        "--temperature",
        str(args.temperature),
        "--alpha",
        str(args.alpha),
        "--repeats",
        str(args.repeats),
        "--seed",
        str(args.seed),
    ]
    if chunk_size is not None:
        argv += ["--chunk-size", str(chunk_size)]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    return argv


Config = tuple[int, str, "int | None"]  # (vocab, method, chunk size)


def _run_config(args: argparse.Namespace, config: Config, round_no: int) -> dict[str, Any]:
    """Run one worker; a failure (e.g. the naive form running out of memory) is recorded, not raised."""
    vocab, method, chunk_size = config
    label = method if chunk_size is None else f"{method} chunk={chunk_size}"
    print(f"  round {round_no}  V={vocab:>7}  {label:<16} ...", end="", flush=True, file=sys.stderr)
    try:
        result, proc = M.run_json_worker(_worker_argv(args, method, vocab, chunk_size), timeout_s=args.timeout)
    except M.WorkerError as e:
        print(" FAILED", file=sys.stderr)
        return {"method": method, "vocab": vocab, "chunk_size": chunk_size, "error": str(e)}
    # The whole worker process's peak (imports, inputs and the loss): a cross-check of the in-process figure.
    result["process_peak_rss_mib"] = proc.peak_rss_mib
    result["process_wall_s"] = proc.wall_s
    print(f" peak {result['peak_mib']:.0f} MiB, {result['time_s']:.3f} s", file=sys.stderr)
    return result


def _aggregate(config: Config, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's figures over its rounds: medians, plus every round's raw figures."""
    vocab, method, chunk_size = config
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"method": method, "vocab": vocab, "chunk_size": chunk_size, "error": runs[-1]["error"]}
    out = {key: ok[0][key] for key in ("method", "vocab", "positions", "hidden", "chunk_size", "k", "loss")}
    out.update(
        {
            "peak_mib": M.median([r["peak_mib"] for r in ok]),
            "peak_exact": all(r["peak_exact"] for r in ok),
            "time_s": M.median([t for r in ok for t in r["times_s"]]),
            "cpu_time_s": M.median([r["cpu_time_s"] for r in ok]),
            "times_s": [t for r in ok for t in r["times_s"]],
            "baseline_rss_mib": M.median([r["baseline_rss_mib"] for r in ok]),
            "process_peak_rss_mib": max(r["process_peak_rss_mib"] for r in ok),
            "grads_finite": all(r["grads_finite"] for r in ok),
            "torch_threads": ok[0]["torch_threads"],
            "rounds": [
                {k: r.get(k) for k in ("peak_mib", "time_s", "cpu_time_s", "process_peak_rss_mib", "error")}
                for r in runs
            ],
        }
    )
    return out


def _compare(naive: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    peak_ratio = M.safe_ratio(ours.get("peak_mib"), naive.get("peak_mib"))
    time_ratio = M.safe_ratio(ours.get("time_s"), naive.get("time_s"))
    return {
        "chunk_size": ours["chunk_size"],
        "peak_ratio": peak_ratio,
        "time_ratio": time_ratio,
        "cpu_time_ratio": M.safe_ratio(ours.get("cpu_time_s"), naive.get("cpu_time_s")),
        "peak_met": peak_ratio is not None and peak_ratio <= PEAK_RATIO_MAX,
        "time_met": time_ratio is not None and time_ratio <= TIME_RATIO_MAX,
    }


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    started = M.utc_now_iso()
    machine = M.describe_machine()
    configs: list[Config] = [
        (vocab, method, cs)
        for vocab in args.vocabs
        for method, cs in [("naive", None), *(("ours", c) for c in args.chunk_sizes)]
    ]
    # Rounds, each running every configuration once, in alternating order: load from other work on a
    # shared machine then drifts over naive and ours alike instead of landing on whichever ran at the time.
    runs: dict[Config, list[dict[str, Any]]] = {c: [] for c in configs}
    for round_no in range(args.rounds):
        for config in configs if round_no % 2 == 0 else reversed(configs):
            runs[config].append(_run_config(args, config, round_no))
    per_vocab: list[dict[str, Any]] = []
    for vocab in args.vocabs:
        naive = _aggregate((vocab, "naive", None), runs[(vocab, "naive", None)])
        ours = [_aggregate((vocab, "ours", cs), runs[(vocab, "ours", cs)]) for cs in args.chunk_sizes]
        comparisons = [_compare(naive, o) for o in ours if "error" not in o]
        both = [c for c in comparisons if c["peak_met"] and c["time_met"]]
        per_vocab.append(
            {
                "vocab": vocab,
                "logits_tensor_mib": args.positions * vocab * 4 / MIB,
                "weight_grad_mib": vocab * args.hidden * 4 / MIB,
                "naive": naive,
                "ours": ours,
                "comparisons": comparisons,
                "target_met": bool(both),
                "best_chunk_size": min(both, key=lambda c: c["time_ratio"])["chunk_size"] if both else None,
            }
        )
    threads = next(
        (r.get("torch_threads") for pv in per_vocab for r in [pv["naive"], *pv["ours"]] if "torch_threads" in r),
        None,
    )
    machine["torch_threads"] = threads
    machine["load_avg_1_5_15_at_end"] = M.describe_machine()["load_avg_1_5_15"]
    return {
        "benchmark": "loss_memory",
        "date_utc": started,
        "quick": args.quick,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine,
        "settings": {
            "positions": args.positions,
            "hidden": args.hidden,
            "dtype": "float32",
            "k": args.k,
            "temperature": args.temperature,
            "alpha": args.alpha,
            "kind": "forward_kl",
            "rounds": args.rounds,
            "repeats": args.repeats,
            "threads_requested": args.threads,
            "chunk_sizes": args.chunk_sizes,
            "seed": args.seed,
        },
        "target": {
            "peak_ratio_max": PEAK_RATIO_MAX,
            "time_ratio_max": TIME_RATIO_MAX,
            "note": "ratios are ours / naive in the same run; met for a vocabulary if some chunk size meets both",
        },
        "target_met": bool(per_vocab) and all(pv["target_met"] for pv in per_vocab),
        "results": per_vocab,
    }


def _print_table(payload: dict[str, Any]) -> None:
    rows = []
    for pv in payload["results"]:
        naive = pv["naive"]
        comps = {c["chunk_size"]: c for c in pv["comparisons"]}
        for r in [naive, *pv["ours"]]:
            label = "naive" if r["method"] == "naive" else f"ours chunk={r['chunk_size']}"
            if "error" in r:
                rows.append([f"V={pv['vocab']} {label}", "FAILED", "", "", "", "", ""])
                continue
            c = comps.get(r.get("chunk_size")) if r["method"] == "ours" else None
            rows.append(
                [
                    f"V={pv['vocab']} {label}",
                    _fmt(r["peak_mib"], ".0f") + ("" if r["peak_exact"] else " (upper bound)"),
                    _fmt(r["time_s"], ".3f"),
                    _fmt(c["peak_ratio"], ".3f") if c else "",
                    _fmt(c["time_ratio"], ".3f") if c else "",
                    _fmt(c["cpu_time_ratio"], ".3f") if c else "",
                    ("yes" if c["peak_met"] and c["time_met"] else "no") if c else "",
                ]
            )
    s = payload["settings"]
    m = payload["machine"]
    print(
        f"loss + backward, N={s['positions']} positions, H={s['hidden']}, {s['dtype']}, T={s['temperature']}, "
        f"alpha={s['alpha']}, k={s['k']}, median of {s['rounds']} rounds x {s['repeats']} calls; "
        f"{m['cpu_model']}, {m['cpus_usable']} cpus, torch {m['torch']} ({m['torch_threads']} threads), "
        f"load {m['load_avg_1_5_15']}"
    )
    t = payload["target"]
    print(
        M.format_table(
            [
                "config",
                "peak MiB",
                "time s",
                "peak ours/naive",
                "time ours/naive",
                "cpu ours/naive",
                f"target (<={t['peak_ratio_max']}, <={t['time_ratio_max']})",
            ],
            rows,
        )
    )
    print(f"target met: {'yes' if payload['target_met'] else 'no'}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke test in seconds")
    p.add_argument("--out", type=Path, help=f"result JSON (default: {DEFAULT_OUT.relative_to(REPO_ROOT)})")
    p.add_argument("--vocabs", type=int, nargs="+", help="vocabulary sizes")
    p.add_argument("--positions", type=int, help="N, positions in the loss (batch x response tokens)")
    p.add_argument("--hidden", type=int, help="H, hidden size")
    p.add_argument("--chunk-sizes", type=int, nargs="+", help="chunk sizes of ours to try")
    p.add_argument("--rounds", type=int, help="fresh worker processes per configuration, interleaved")
    p.add_argument("--repeats", type=int, help="timed calls per worker (the median over all is reported)")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: torch's, one per core)")
    p.add_argument("--k", type=int, default=32, help="teacher head of ours (the default cache's)")
    p.add_argument("--samples", type=int, default=112, help="teacher tail samples of ours (the default cache's)")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker before it is killed")
    # Internal: one configuration in this process.
    p.add_argument("--worker", choices=["naive", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    p.add_argument("--chunk-size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.worker == "ours" and args.chunk_size is None:
        p.error("--worker ours needs --chunk-size")
    if args.repeats < 1 or args.rounds < 1:
        p.error("--repeats and --rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.worker is not None:
        print(json.dumps(_worker(args)))
        return 0
    payload = _run(args)
    out = M.write_json(args.out or DEFAULT_OUT, payload)
    _print_table(payload)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
