"""Shared helpers for the benchmarks: memory probes, subprocess measurement, machine description, results.

Why subprocesses: torch's CPU allocator is invisible to ``tracemalloc``, so the only honest memory figure
on CPU is the process's resident set size (RSS). RSS has a high-water mark that never goes down by
itself, so every configuration is measured in a fresh process, and inside that process the mark is reset
(or, where the kernel does not allow it, read before and after) around the code under test.

Two ways to use this module:

- In-process probes for a worker that measures one call: `reset_peak_rss`, `current_rss_kib`,
  `peak_rss_kib`, or the `PeakRSS` context manager that combines them.
- `measure_command` runs a whole command (e.g. a CLI training run) and returns its wall time and the peak
  RSS of its process tree; `run_json_worker` does the same for a worker that prints one JSON object.

Keep this module free of a torch import: the parent process should stay small so that its own memory never
leaks into what is measured, and later benchmarks may not need torch at all.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from aitraining.heap import return_freed_memory

KIB_PER_MIB = 1024


# ---------------------------------------------------------------------------------------------------------
# In-process RSS probes (Linux)
# ---------------------------------------------------------------------------------------------------------


def _status_field_kib(name: str) -> int | None:
    """A ``kB`` field of /proc/self/status (e.g. ``VmRSS``, ``VmHWM``), or None where it is unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_kib() -> int:
    """Resident set size of this process now, in KiB."""
    rss = _status_field_kib("VmRSS")
    if rss is not None:
        return rss
    # Without /proc, the best we have is the high-water mark; callers then see a conservative delta.
    return peak_rss_kib()


def peak_rss_kib() -> int:
    """High-water mark of this process's RSS in KiB (since start or the last successful `reset_peak_rss`).

    ``VmHWM`` is read first because ``/proc/self/clear_refs`` resets it on every Linux since 4.0, whereas
    ``ru_maxrss`` also folds in a mark inherited at exec time on some kernels and may then never go down.
    """
    hwm = _status_field_kib("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark to the current RSS; False where the kernel does not allow it.

    Without a reset, a setup step that briefly used more memory than the code under test would hide the
    latter's peak entirely (the mark would not move).
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    # Trust but verify: some sandboxes accept the write and ignore it.
    hwm = _status_field_kib("VmHWM")
    rss = _status_field_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


@dataclass
class PeakRSS:
    """Context manager measuring the peak RSS growth of the enclosed code, in KiB.

    ``baseline_kib`` is the RSS on entry (after the inputs exist), ``peak_kib`` the high-water mark on exit,
    and ``delta_kib = peak_kib - baseline_kib`` the code's own peak. Free heap memory is released first (see
    `aitraining.heap.return_freed_memory`), so the baseline counts live memory only. When the high-water mark could not be
    reset and was already above the baseline on entry, the delta is only an upper bound: ``exact`` says
    which. Memory that the allocator keeps after a free still counts, as it does for the OS.
    """

    baseline_kib: int = 0
    peak_kib: int = 0
    exact: bool = True
    reset_ok: bool = False
    _mark_on_entry: int = field(default=0, repr=False)

    def __enter__(self) -> PeakRSS:
        return_freed_memory()
        self.reset_ok = reset_peak_rss()
        self.baseline_kib = current_rss_kib()
        self._mark_on_entry = peak_rss_kib()
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_kib = peak_rss_kib()
        # If the mark never rose above where setup left it, the enclosed code's true peak may be lower.
        self.exact = self.reset_ok or self.peak_kib > self._mark_on_entry

    @property
    def delta_kib(self) -> int:
        """Peak RSS growth of the enclosed code over the baseline, in KiB (>= 0)."""
        return max(0, self.peak_kib - self.baseline_kib)


# ---------------------------------------------------------------------------------------------------------
# Subprocess measurement
# ---------------------------------------------------------------------------------------------------------


@dataclass
class CommandResult:
    """Outcome of `measure_command`.

    ``peak_rss_kib`` is the largest RSS high-water mark of any single process in the command's tree (the
    command and every descendant it waited for), as the kernel reports it in ``wait4``'s rusage: a max, not
    the sum of processes that were alive at the same time. It is None when the command was killed before
    it could be reaped normally (e.g. on timeout). ``wall_s`` is the time from launch to exit.
    """

    argv: list[str]
    returncode: int
    wall_s: float
    peak_rss_kib: int | None
    user_s: float | None
    sys_s: float | None
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def peak_rss_mib(self) -> float | None:
        """``peak_rss_kib`` in MiB."""
        return None if self.peak_rss_kib is None else self.peak_rss_kib / KIB_PER_MIB


# Runs in a minimal interpreter (-I -S, so a few MiB) between us and the measured command. Why not measure
# our own child directly: at exec, Linux folds the RSS high-water mark of the exec-ing process's old address
# space into the new program's ``ru_maxrss``. Python launches children with vfork, whose "old address space"
# is the parent's, so the child would report at least the parent's all-time peak (a test runner with torch
# loaded: hundreds of MiB). A plain fork from this tiny launcher caps that floor at the launcher's size.
_LAUNCHER = r"""
import json, os, sys, time
argv, report = json.loads(sys.argv[1]), sys.argv[2]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        os.write(2, f"cannot run {argv[0]!r}: {e}\n".encode())
    os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(report, "w") as f:
    json.dump({"status": status, "wall_s": wall, "maxrss_kib": ru.ru_maxrss,
               "user_s": ru.ru_utime, "sys_s": ru.ru_stime}, f)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def measure_command(
    argv: Sequence[str],
    *,
    timeout_s: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> CommandResult:
    """Run ``argv`` to completion; return its wall time, peak RSS of its process tree, CPU times and output.

    The rusage comes from ``wait4`` on that one command (through a small launcher, see ``_LAUNCHER``)
    rather than from ``getrusage(RUSAGE_CHILDREN)`` before and after: the latter's ``ru_maxrss`` is a max
    over every child this process ever reaped, so an earlier, larger child would mask a later one. The
    reported peak has a floor of the launcher's own size (about 10 MiB). Output goes through temporary
    files instead of pipes so that waiting cannot deadlock on a full pipe. On timeout the command's whole
    process group is killed.
    """
    argv = [str(a) for a in argv]
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.TemporaryDirectory(prefix="measure-") as tmp,
    ):
        report = Path(tmp) / "rusage.json"
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(argv), str(report)],
            stdout=out,
            stderr=err,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,  # own process group, so a timeout can kill grandchildren too
        )
        try:
            proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", errors="replace")
        stderr = err.read().decode("utf-8", errors="replace")
        usage = json.loads(report.read_text()) if report.is_file() else None
    if usage is None:  # the launcher itself was killed: only its exit status is known
        return CommandResult(argv, proc.returncode, wall, None, None, None, stdout, stderr, timed_out)
    return CommandResult(
        argv=argv,
        returncode=os.waitstatus_to_exitcode(usage["status"]),
        wall_s=usage["wall_s"],
        peak_rss_kib=int(usage["maxrss_kib"]),
        user_s=usage["user_s"],
        sys_s=usage["sys_s"],
        stdout=stdout,
        stderr=stderr,
        timed_out=timed_out,
    )


class WorkerError(RuntimeError):
    """A worker subprocess failed or printed no JSON result."""


def run_json_worker(argv: Sequence[str], *, timeout_s: float | None = None) -> tuple[dict[str, Any], CommandResult]:
    """Run a worker that prints one JSON object as its last stdout line; return it and the `CommandResult`.

    Raises:
        WorkerError: on a non-zero exit, a timeout, or a last line that is not a JSON object. The message
            carries the tail of stderr, which is where a worker's traceback (or an OOM kill) shows.
    """
    res = measure_command(argv, timeout_s=timeout_s)
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    why = None
    if res.timed_out:
        why = f"timed out after {timeout_s} s"
    elif res.returncode != 0:
        # -9 is what the kernel's OOM killer leaves behind; say so, it is the likely cause in a memory benchmark.
        hint = " (killed: out of memory?)" if res.returncode == -signal.SIGKILL else ""
        why = f"exit status {res.returncode}{hint}"
    elif not lines:
        why = "no output"
    if why is None:
        try:
            payload = json.loads(lines[-1])
        except json.JSONDecodeError:
            payload = None
        if isinstance(payload, dict):
            return payload, res
        why = "last stdout line is not a JSON object"
    raise WorkerError(f"worker {' '.join(argv)} failed: {why}\n--- stderr tail ---\n{res.stderr[-3000:]}")


# ---------------------------------------------------------------------------------------------------------
# Machine description and results
# ---------------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_mib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / KIB_PER_MIB
    except OSError:
        pass
    return None


def _package_version(name: str) -> str | None:
    # importlib.metadata rather than `import torch`: see the module docstring.
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def describe_machine(**extra: Any) -> dict[str, Any]:
    """What a reader needs to compare results across machines: CPU, cores, memory, versions, load.

    ``load_avg_1_5_15`` is sampled when this is called; absolute times on a shared machine depend on it,
    which is why benchmarks report ratios measured in the same run. ``extra`` (e.g. the torch thread count,
    which only a worker that imports torch can report) is merged in.
    """
    try:
        load: list[float] | None = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    mem = _mem_total_mib()
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "mem_total_mib": None if mem is None else round(mem, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _package_version("torch"),
        "load_avg_1_5_15": load,
    }
    info.update(extra)
    return info


def utc_now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (robust to the odd slow repeat on a shared machine)."""
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def safe_ratio(num: float | None, den: float | None) -> float | None:
    """``num / den``, or None when either is missing or the ratio would not be a finite number."""
    if num is None or den is None or den == 0:
        return None
    r = num / den
    return r if math.isfinite(r) else None


def write_json(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, atomically (temp file + rename), creating parent folders.

    ``allow_nan=False``: NaN and Infinity are not JSON, and a result file that other tools cannot parse is
    worse than a loud failure here.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2, sort_keys=False, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned columns (left-aligned first column)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(cells[0]), sep, *(fmt(r) for r in cells[1:])])
