"""Smoke tests of benchmarks/teacher_generation.py and benchmarks/scale.py in their ``--quick`` mode.

They check that each script runs end to end and writes every result field, with every number finite. Speed
and memory targets are NOT asserted: they depend on the machine and its load (see test_benchmarks_quick.py).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH = REPO_ROOT / "benchmarks"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _run_quick(script: str, out: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        # --quick takes well under a minute; the margin is for a loaded machine, not a budget to grow into.
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_teacher_generation_quick_writes_complete_results(tmp_path: Path) -> None:
    out = tmp_path / "teacher_generation.json"
    proc = _run_quick("teacher_generation.py", out)
    assert "batched / one-at-a-time tokens/s" in proc.stdout  # the readable summary was printed

    data = json.loads(out.read_text())
    assert data["benchmark"] == "teacher_generation"
    assert data["setup"]["quick"] is True
    assert isinstance(data["date"], str) and data["date"]
    for key in ("cpu_model", "cpu_count", "torch", "torch_threads", "load_avg_1_5_15"):
        assert key in data["machine"], key

    gen = data["generation"]
    assert gen["prompts"] == data["setup"]["prompts"] > 0
    for side in ("batched", "one_at_a_time"):
        for key in ("wall_s", "tokens", "tokens_per_s"):
            assert _finite(gen[side][key]) and gen[side][key] > 0, (side, key, gen[side][key])
        # Greedy with a cap: no response is longer than max_new_tokens.
        assert gen[side]["tokens"] <= gen["prompts"] * data["setup"]["max_new_tokens"]
    assert gen["batched"]["computed_slots"] >= gen["batched"]["tokens"]
    for key in ("batched_over_one_at_a_time_tokens_per_s", "batched_slot_utilisation", "teacher_load_s",
                "worker_wall_s", "worker_peak_rss_mib"):
        assert _finite(gen[key]), (key, gen[key])
    assert 0 < gen["batched_slot_utilisation"] <= 1
    assert 0 <= gen["same_responses"] <= gen["prompts"]

    run = data["run"]
    for key in ("wall_s", "peak_rss_mib", "teacher_share_of_total", "teacher_share_of_wall",
                "teacher_phase_cache_tokens_per_s"):
        assert _finite(run[key]), (key, run[key])
    for key in ("teacher_s", "train_s", "total_s", "teacher_cache_tokens"):
        assert _finite(run["final"][key]), (key, run["final"][key])
    assert 0 < run["teacher_share_of_total"] <= 1
    assert data["notes"]


@pytest.mark.slow
def test_scale_quick_writes_complete_results(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    proc = _run_quick("scale.py", out)
    assert "peak RSS 16x/1x" in proc.stdout

    data = json.loads(out.read_text())
    assert data["benchmark"] == "scale"
    assert data["setup"]["quick"] is True
    assert isinstance(data["date"], str) and data["date"]
    assert "cpu_model" in data["machine"] and "load_avg_1_5_15" in data["machine"]

    runs = data["runs"]
    assert [r["factor"] for r in runs] == data["setup"]["factors"] == [1, 4, 16]
    for r in runs:
        assert r["rows"] == data["setup"]["base_rows"] * r["factor"]
        for key in ("trained_tokens", "teacher_cache_tokens", "wall_s", "train_s", "teacher_s", "total_s",
                    "peak_rss_mib", "train_s_per_1k_tokens", "wall_s_per_1k_tokens",
                    "train_s_per_1k_tokens_ratio_to_1x", "wall_s_per_1k_tokens_ratio_to_1x", "peak_rss_ratio_to_1x",
                    "trained_tokens_ratio_to_1x", "teacher_cache_tokens_ratio_to_1x"):
            assert _finite(r[key]), (r["factor"], key, r[key])
        assert r["trained_tokens"] > 0 and r["peak_rss_mib"] > 0
        # The data is the base repeated: the student trains on exactly `factor` times the 1x tokens.
        assert r["trained_tokens"] == runs[0]["trained_tokens"] * r["factor"]
    fit = data["train_s_linear_fit"]
    for key in ("intercept_s", "slope_s_per_1k_tokens", "r2"):
        assert _finite(fit[key]), (key, fit[key])
    assert _finite(data["train_s_per_1k_tokens_ratio_16x_over_1x"])
    assert _finite(data["peak_rss_ratio_16x_over_1x"])
    for key in ("linear_met", "flat_met", "target_met", "teacher_deduplicated_repeats"):
        assert isinstance(data[key], bool), key
    assert data["notes"]
