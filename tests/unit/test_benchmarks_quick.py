"""Smoke tests of the benchmarks: they run and write well-formed results. Speed targets are NOT asserted.

Benchmarks measure time and memory, which depend on the machine and its load; a test that asserted the
targets would fail at random on a busy CI machine. What must hold everywhere is that the scripts run end to
end in their ``--quick`` mode and write results with every field present and every number finite.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH = REPO_ROOT / "benchmarks"


def _load_measure() -> ModuleType:
    """Import benchmarks/_measure.py by path: benchmarks/ is a folder of scripts, not a package."""
    name = "aitraining_benchmarks_measure"  # unlikely to shadow anything in sys.modules
    spec = importlib.util.spec_from_file_location(name, BENCH / "_measure.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses looks the defining module up in sys.modules, so it must be registered before it runs.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


M = _load_measure()


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_loss_memory_quick_writes_complete_results(tmp_path: Path) -> None:
    out = tmp_path / "loss_memory.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "loss_memory.py"), "--quick", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        # --quick takes seconds; the margin is for a loaded machine, not a budget to grow into.
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "peak ours/naive" in proc.stdout  # the readable table was printed

    data = json.loads(out.read_text())
    assert data["benchmark"] == "loss_memory"
    assert data["quick"] is True
    assert isinstance(data["date_utc"], str) and data["date_utc"]
    for key in ("cpu_model", "cpu_count", "torch", "torch_threads", "load_avg_1_5_15"):
        assert key in data["machine"], key
    assert _finite(data["machine"]["torch_threads"])
    assert data["settings"]["dtype"] == "float32"
    assert _finite(data["target"]["peak_ratio_max"]) and _finite(data["target"]["time_ratio_max"])
    assert isinstance(data["target_met"], bool)

    assert data["results"], "no vocabulary was measured"
    for pv in data["results"]:
        runs = [pv["naive"], *pv["ours"]]
        assert len(pv["ours"]) == len(data["settings"]["chunk_sizes"])
        for r in runs:
            assert "error" not in r, r.get("error")
            for key in ("peak_mib", "time_s", "cpu_time_s", "baseline_rss_mib", "loss", "process_peak_rss_mib"):
                assert _finite(r[key]), (key, r[key])
            assert r["peak_mib"] >= 0 and r["time_s"] > 0
            assert all(_finite(t) and t > 0 for t in r["times_s"])
            assert r["grads_finite"] is True
        # The worker's own figure cannot exceed its whole process's peak.
        for r in runs:
            assert r["baseline_rss_mib"] + r["peak_mib"] <= r["process_peak_rss_mib"] + 1
        assert [c["chunk_size"] for c in pv["comparisons"]] == data["settings"]["chunk_sizes"]
        for c in pv["comparisons"]:
            assert _finite(c["peak_ratio"]) and _finite(c["time_ratio"]), c
            assert isinstance(c["peak_met"], bool) and isinstance(c["time_met"], bool)
        assert isinstance(pv["target_met"], bool)


def test_measure_command_reports_child_peak_and_output() -> None:
    # A child that holds ~64 MiB of touched memory; its peak must show, and not a previous child's.
    code = "b = b'\\x01' * (64 * 1024 * 1024); print('done')"
    res = M.measure_command([sys.executable, "-c", code], timeout_s=120)
    assert res.returncode == 0 and not res.timed_out
    assert res.stdout.strip() == "done"
    assert res.peak_rss_mib >= 64
    small = M.measure_command([sys.executable, "-c", "pass"], timeout_s=120)
    # Per-command rusage: neither a max over all children so far nor inflated by this (large) process's peak.
    assert small.peak_rss_mib is not None and small.peak_rss_mib < 48 < res.peak_rss_mib
    assert small.wall_s > 0


def test_measure_command_sees_a_grandchild() -> None:
    # The peak of a process tree: the big allocation happens in a child of the measured command.
    grandchild = "b = b'\\x01' * (64 * 1024 * 1024)"
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}], check=True)"
    res = M.measure_command([sys.executable, "-c", code], timeout_s=120)
    assert res.returncode == 0, res.stderr
    assert res.peak_rss_mib is not None and res.peak_rss_mib >= 64


def test_measure_command_timeout_kills_the_child() -> None:
    res = M.measure_command([sys.executable, "-c", "import time; time.sleep(60)"], timeout_s=1)
    assert res.timed_out and res.returncode != 0


def test_run_json_worker_raises_on_failure() -> None:
    with pytest.raises(M.WorkerError, match="exit status 3"):
        M.run_json_worker([sys.executable, "-c", "import sys; sys.exit(3)"], timeout_s=120)
    payload, _ = M.run_json_worker([sys.executable, "-c", "print('noise'); print('{\"a\": 1}')"], timeout_s=120)
    assert payload == {"a": 1}


def test_peak_rss_context_sees_an_allocation() -> None:
    # In a fresh interpreter: inside the test runner, freed heap that is still resident can serve the block
    # without raising RSS at all.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import _measure as M\n"
        "with M.PeakRSS() as peak:\n"
        "    block = b'\\x01' * (32 * 1024 * 1024)\n"
        "    del block\n"
        "print(peak.delta_kib if peak.exact else -1)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(BENCH)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    delta = int(done.stdout.strip().splitlines()[-1])
    assert delta == -1 or delta >= 30 * 1024


def test_write_json_rejects_non_finite(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        M.write_json(tmp_path / "x.json", {"x": float("nan")})
    assert not (tmp_path / "x.json").exists()
    path = M.write_json(tmp_path / "sub" / "y.json", {"x": 1.5})
    assert json.loads(path.read_text()) == {"x": 1.5}
    assert M.safe_ratio(1.0, 0.0) is None and M.safe_ratio(1.0, 4.0) == 0.25
    assert M.describe_machine(extra_field=1)["extra_field"] == 1

