"""What a user sees of a run's quality: rows held out by default, evaluation during training (metrics.jsonl and
TensorBoard), the `aitraining eval` command, and `--compare-baseline` (the same student without distillation,
judged beside the distilled one and the teacher, with pictures and samples)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import PAIRS, assert_same_weights, metrics, other_tokenizer_student, sharpened, write_jsonl

from aitraining.cli import main

pytestmark = pytest.mark.e2e

PNG = b"\x89PNG\r\n\x1a\n"


def rows(n: int) -> list[dict[str, str]]:
    """n distinct prompts (the 8 test pairs' prompts, numbered), no responses: the teacher writes them."""
    return [{"text": f"{PAIRS[i % len(PAIRS)][0]} ({i})"} for i in range(n)]


def distill(student: str, teacher: str, data: str, project: Path, *extra: str) -> int:
    return main(["llm", "--train", "--model", student, "--teacher-model", teacher, "--data-path", data,
                 "--project-name", str(project), "--use-distillation", "--distill-max-teacher-length", "8",
                 "--epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--seed", "3", "--mixed-precision", "no",
                 "--logging-steps", "1", *extra])


@pytest.mark.slow
def test_rows_are_held_out_by_default_and_evaluated_every_n_steps(tiny_student, tiny_teacher, tmp_path, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", rows(40))
    project = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="aitraining"):
        assert distill(tiny_student, tiny_teacher, data, project, "--eval-steps", "3", "--eval-max-rows", "1") == 0
    assert "held out for evaluation: 2 of 40 rows (5%, drawn with --seed 3)" in caplog.text
    run = json.loads((project / "run.json").read_text())
    assert run["final_metrics"]["step"] == 10  # 38 training rows, batch 4
    # The time split names what the five evaluations cost, inside the loop's time.
    assert 0 < run["final_metrics"]["eval_s"] < run["final_metrics"]["train_s"]
    evals = [m for m in metrics(project) if "eval_kl_to_teacher" in m]
    assert [m["step"] for m in evals] == [0, 3, 6, 9, 10]  # before, every 3 steps, after the epoch
    assert all(m["eval_n_tokens"] <= 8 for m in evals)  # one row of at most 8 answer tokens (--eval-max-rows 1)
    assert evals[-1]["eval_kl_to_teacher"] < evals[0]["eval_kl_to_teacher"]
    card = (project / "README.md").read_text()
    assert "held out for evaluation: 2 rows" in card and "before training (step 0)" in card
    assert "![training curves](training_curves.png)" in card
    assert (project / "training_curves.png").read_bytes().startswith(PNG)

    # --holdout-share 0 trains on every row; the same seed holds out the same rows.
    whole = tmp_path / "whole"
    assert distill(tiny_student, tiny_teacher, data, whole, "--holdout-share", "0") == 0
    final = json.loads((whole / "run.json").read_text())["final_metrics"]
    assert final["step"] == 10 and final["eval_s"] == 0  # 40 rows, batch 4, nothing evaluated
    assert not [m for m in metrics(whole) if "eval_ce" in m]


def test_tensorboard_gets_the_held_out_metrics(tiny_student, tiny_teacher, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_jsonl(tmp_path / "d.jsonl", rows(24))
    project = tmp_path / "tb"
    assert distill(tiny_student, tiny_teacher, data, project, "--log", "tensorboard", "--eval-steps", "2") == 0
    events = list(project.rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss", "kd", "ce", "eval_kl_to_teacher", "eval_top1_agreement"} <= set(tags)
    steps = [e.step for e in acc.Scalars("eval_kl_to_teacher")]
    assert steps == [0, 2, 4, 6]  # 23 training rows: 6 steps
    logged = [m["eval_kl_to_teacher"] for m in metrics(project) if "eval_kl_to_teacher" in m]
    assert [e.value for e in acc.Scalars("eval_kl_to_teacher")] == pytest.approx(logged, rel=1e-5)


@pytest.mark.slow
def test_compare_baseline_trains_the_same_student_without_distillation_and_judges_all_three(
        tiny_student, tiny_teacher, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", rows(24))
    project = tmp_path / "cmp"
    assert distill(tiny_student, tiny_teacher, data, project, "--compare-baseline", "--epochs", "2") == 0
    # The baseline is the distilled run's own sequences without the teacher's distribution: it equals a
    # distillation run with --distill-alpha 0 (labels only) on the same teacher answers, step for step.
    alpha0 = tmp_path / "alpha0"
    assert distill(tiny_student, tiny_teacher, data, alpha0, "--distill-alpha", "0", "--epochs", "2") == 0
    assert_same_weights(project / "baseline", alpha0, atol=1e-6)
    base_metrics = metrics(project / "baseline")
    assert all(m["kd"] == 0 for m in base_metrics if "kd" in m)
    # Its held-out curve is measured against the same cached teacher as the distilled run's.
    assert [m["step"] for m in base_metrics if "eval_kl_to_teacher" in m] == [0, 6, 12]
    assert [m["eval_kl_to_teacher"] for m in base_metrics if m["step"] == 0 and "eval_kl_to_teacher" in m] == \
        [m["eval_kl_to_teacher"] for m in metrics(project) if m["step"] == 0 and "eval_kl_to_teacher" in m]

    cmp = json.loads((project / "comparison.json").read_text())
    assert set(cmp["models"]) == {"distilled", "baseline", "teacher"}
    assert cmp["held_out_rows"] == 1
    teacher, distilled = cmp["models"]["teacher"], cmp["models"]["distilled"]
    assert teacher["kl_to_teacher"] == pytest.approx(0, abs=1e-4) and teacher["top1_agreement"] == 1.0
    assert distilled["kl_to_teacher"] > 0 and distilled["parameters"] < teacher["parameters"]
    assert distilled["disk_bytes"] > 0 and distilled["tokens_per_s"] > 0
    assert all(0 <= cmp["models"][role]["repetition"] <= 1 for role in ("distilled", "baseline", "teacher"))
    # Training's evaluation reads the cached teacher (its head plus one bucket for the rest: a lower bound of
    # the KL); the judge has the exact distribution. Same row, same student: exact >= bound.
    last_eval = [m for m in metrics(project) if "eval_kl_to_teacher" in m][-1]
    assert distilled["kl_to_teacher"] >= last_eval["eval_kl_to_teacher"] - 1e-6
    out = capsys.readouterr().out
    assert "| distilled |" in out and "| baseline |" in out and "the distilled student is" in out
    assert "| repeated trigrams |" in out
    card = (project / "README.md").read_text()
    assert "## With and without distillation" in card and "![comparison](comparison.png)" in card
    for picture in ("comparison.png", "training_curves.png"):
        assert (project / picture).read_bytes().startswith(PNG)
    samples = (project / "samples.md").read_text()
    assert "| teacher's response |" in samples and "| baseline |" in samples
    # The teacher's answers were made once, by the distilled run: the baseline has no teacher files.
    assert not (project / "baseline" / "teacher_outputs.jsonl").exists()


@pytest.mark.slow
def test_compare_baseline_across_tokenizers_trains_on_the_teachers_text_and_judges_on_text(
        real_tokenizers, tiny_teacher, tmp_path, capsys):
    """Across tokenizers (the documented examples' path) the baseline is the same student trained on the teacher's
    text, step for step a --distill-mode sequence run, and all three are judged on the teacher's answers as text:
    nats per byte above the teacher (0 for the teacher itself) and ROUGE-L, with the pictures, samples and card."""
    student = other_tokenizer_student(real_tokenizers["llama-spm"], tmp_path / "student")
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"{p} ({i})", "response": r}
                                              for i, (p, r) in enumerate(PAIRS * 3)])
    project = tmp_path / "cmp"
    assert distill(student, tiny_teacher, data, project, "--compare-baseline", "--epochs", "2") == 0
    text = tmp_path / "text"
    assert distill(student, tiny_teacher, data, text, "--distill-mode", "sequence", "--epochs", "2") == 0
    assert_same_weights(project / "baseline", text, atol=1e-6)

    cmp = json.loads((project / "comparison.json").read_text())
    assert set(cmp["models"]) == {"distilled", "baseline", "teacher"} and cmp["held_out_rows"] == 1
    held_out = cmp["samples"][0]
    assert held_out["teacher's response"] in dict(PAIRS).values()  # the row's own response, as text
    assert cmp["held_out_bytes"] == len(held_out["teacher's response"].encode())
    teacher, distilled = cmp["models"]["teacher"], cmp["models"]["distilled"]
    # The given responses are not the tiny teacher's own text: a student may find them likelier than it does.
    assert teacher["kl_per_byte"] == 0 and distilled["kl_per_byte"] != 0
    assert distilled["parameters"] < teacher["parameters"] and 0 <= distilled["rouge_l"] <= 1
    out = capsys.readouterr().out
    assert "| nats per byte above the teacher |" in out and "the distilled student is" in out
    assert "teacher's text than the baseline" in cmp["verdict"]
    card = (project / "README.md").read_text()
    assert "## With and without distillation" in card and "nats per byte above the teacher" in card
    for picture in ("comparison.png", "training_curves.png"):
        assert (project / picture).read_bytes().startswith(PNG)
    assert "| baseline |" in (project / "samples.md").read_text()


@pytest.mark.slow
def test_compare_baseline_interrupted_in_the_baseline_resumes_the_baseline(tiny_student, tiny_teacher, tmp_path,
                                                                           monkeypatch):
    """Ctrl-C while the baseline trains, then the same command with --resume-from-checkpoint latest: the baseline
    continues from its own checkpoint (not from scratch) and ends with the uninterrupted baseline's weights."""
    import aitraining.loop as loop_mod

    data = write_jsonl(tmp_path / "d.jsonl", rows(24))
    steps = {"n": 0}
    real_add = loop_mod._Stats.add

    def counted(self, *a, **kw):
        real_add(self, *a, **kw)
        steps["n"] += 1

    monkeypatch.setattr(loop_mod._Stats, "add", counted)
    full = tmp_path / "full"
    assert distill(tiny_student, tiny_teacher, data, full, "--compare-baseline", "--epochs", "2") == 0
    per_run = steps["n"] // 2  # the distilled run's steps, then the baseline's as many

    def interrupted(self, *a, **kw):
        counted(self, *a, **kw)
        if steps["n"] == per_run + per_run // 2 + 1:  # in the baseline's second epoch
            raise KeyboardInterrupt

    steps["n"] = 0
    monkeypatch.setattr(loop_mod._Stats, "add", interrupted)
    project = tmp_path / "cmp"
    assert distill(tiny_student, tiny_teacher, data, project, "--compare-baseline", "--epochs", "2") == 130
    assert any((project / "baseline").glob("checkpoint-*")) and not (project / "comparison.json").exists()
    steps["n"] = 0
    monkeypatch.setattr(loop_mod._Stats, "add", counted)
    assert distill(tiny_student, tiny_teacher, data, project, "--compare-baseline", "--epochs", "2",
                   "--resume-from-checkpoint", "latest") == 0
    assert steps["n"] == per_run - per_run // 2  # the distilled run had finished; the baseline did what was left
    assert_same_weights(full / "baseline", project / "baseline", atol=1e-6)
    assert_same_weights(full, project, atol=1e-6)
    assert (project / "comparison.json").exists()


def test_compare_baseline_without_held_out_rows_is_refused_before_anything_runs(tiny_student, tiny_teacher, tmp_path,
                                                                                 capsys):
    data = write_jsonl(tmp_path / "d.jsonl", rows(8))
    project = tmp_path / "few"
    assert distill(tiny_student, tiny_teacher, data, project, "--compare-baseline") == 2
    err = capsys.readouterr().err
    assert "--compare-baseline needs held-out rows" in err and err.count("\n") == 1
    assert not project.exists()


@pytest.mark.slow
def test_eval_command_judges_a_model_and_reuses_the_teachers_answers(tiny_student, tiny_teacher, tmp_path, capsys):
    data = write_jsonl(tmp_path / "held.jsonl", rows(3))
    out = tmp_path / "judged" / "eval.json"
    args = ["eval", "--model", tiny_student, "--teacher-model", tiny_teacher, "--data-path", data,
            "--max-new-tokens", "6", "--output", str(out)]
    assert main([*args, "--baseline", tiny_teacher]) == 0
    record = json.loads(out.read_text())
    assert set(record["models"]) == {"model", "baseline", "teacher"}
    model, teacher = record["models"]["model"], record["models"]["teacher"]
    assert record["held_out_rows"] == 3 and len(record["samples"]) == 3 and "teacher's response" in record["samples"][0]
    assert teacher["kl_to_teacher"] == pytest.approx(0, abs=1e-4)
    assert record["models"]["baseline"]["kl_to_teacher"] == pytest.approx(0, abs=1e-4)  # the teacher itself
    assert model["kl_to_teacher"] > 1e-3 and model["perplexity"] > 1 and 0 <= model["rouge_l"] <= 1
    assert "| model |" in capsys.readouterr().out
    written = out.parent / "eval_teacher" / "teacher_outputs.jsonl"
    before = written.read_text()
    assert main(args) == 0  # another model, the same teacher and rows: the answers are read back, not rewritten
    assert written.read_text() == before
    assert json.loads(out.read_text())["models"]["model"]["kl_to_teacher"] == pytest.approx(model["kl_to_teacher"])


def test_the_judges_kl_is_kl_of_the_teacher_to_the_model_in_float64(tiny_student, tiny_teacher, tmp_path):
    """`aitraining eval`'s KL is KL(teacher || model) per answer token at T = 1: equal to a float64 computation
    over the full vocabulary on the teacher's answers, and told apart from KL(model || teacher) (a sharpened
    teacher makes the two directions differ)."""
    from transformers import AutoModelForCausalLM

    from aitraining.batches import StudentSettings
    from aitraining.data.examples import DataSettings
    from aitraining.judge import TeacherReference
    from aitraining.params import LLMTrainingParams
    from aitraining.teacher import TeacherSettings

    teacher = sharpened(tiny_teacher, tmp_path / "sharp", 16.0)
    data = write_jsonl(tmp_path / "held.jsonl", rows(3))
    out = tmp_path / "judged" / "eval.json"
    assert main(["eval", "--model", tiny_student, "--teacher-model", teacher, "--data-path", data,
                 "--max-new-tokens", "6", "--output", str(out)]) == 0
    judged = json.loads(out.read_text())["models"]["model"]["kl_to_teacher"]
    # The rows the judge read (the student's rendering of each prompt and the teacher's answer, read back).
    params = LLMTrainingParams(model=tiny_student, teacher_model=teacher, data_path=data, use_distillation=True,
                               project_name=str(tmp_path / "r"), distill_max_teacher_length=6)
    items = TeacherReference(params.settings(StudentSettings), params.settings(TeacherSettings),
                             params.settings(DataSettings), str(out.parent / "eval_teacher")).items
    models = [AutoModelForCausalLM.from_pretrained(m, torch_dtype=torch.float64).eval() for m in (teacher, tiny_student)]
    forward = reverse = 0.0
    n = 0
    for it in items:
        ids = torch.tensor([it.input_ids])
        with torch.no_grad():
            p, q = (torch.log_softmax(m(input_ids=ids).logits[0], -1) for m in models)
        for t in range(it.n_prompt - 1, len(it.input_ids) - 1):
            forward += float((p[t].exp() * (p[t] - q[t])).sum())
            reverse += float((q[t].exp() * (q[t] - p[t])).sum())
            n += 1
    assert n == sum(it.n_response for it in items) > 10
    assert judged == pytest.approx(forward / n, rel=1e-4)
    assert abs(forward - reverse) / n > 0.2 * forward / n


def test_eval_command_names_a_bad_row_or_leaves_it_out(tiny_student, tiny_teacher, tmp_path, capsys, caplog):
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(2)) + '{"text": 7}\n', encoding="utf-8")
    args = ["eval", "--model", tiny_student, "--teacher-model", tiny_teacher, "--data-path", str(data),
            "--max-new-tokens", "4", "--output", str(tmp_path / "eval.json")]
    assert main(args) == 2
    assert "line 3 column 'text' must be a string, got int" in capsys.readouterr().err
    caplog.set_level("WARNING", logger="aitraining")
    assert main([*args, "--skip-bad-rows"]) == 0
    assert "--skip-bad-rows: left out 1 of 3 rows (1 column 'text' must be a string, got int)" in caplog.text
    assert json.loads((tmp_path / "eval.json").read_text())["held_out_rows"] == 2


def test_eval_command_across_tokenizers_judges_on_text(real_tokenizers, tiny_teacher, tmp_path, capsys):
    student = other_tokenizer_student(real_tokenizers["llama-spm"], tmp_path / "spm-student")
    data = write_jsonl(tmp_path / "held.jsonl", rows(2))
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", student, "--teacher-model", tiny_teacher, "--data-path", data,
                 "--max-new-tokens", "6", "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["models"]["teacher"]["kl_per_byte"] == pytest.approx(0, abs=1e-4)
    assert record["models"]["model"]["kl_per_byte"] > 0
    assert 0 <= record["models"]["model"]["repetition"] <= 1
    assert "model: KL per byte" in capsys.readouterr().out


def test_eval_command_bad_input_is_one_line(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nope"), "--teacher-model", str(tmp_path / "nope"),
                 "--data-path", "x.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aitraining: error: --model") and err.count("\n") == 1
    assert main(["eval", "--model", "m", "--teacher-model", "t", "--data-path", "x.jsonl", "--max-rows", "0"]) == 2
    assert capsys.readouterr().err == "aitraining: error: --max-rows must be >= 1, got 0\n"


def test_a_loss_that_is_not_finite_stops_the_run_and_keeps_the_last_checkpoint(tiny_student, tiny_teacher, tmp_path,
                                                                                 monkeypatch, capsys):
    from aitraining.objective import Objective

    data = write_jsonl(tmp_path / "d.jsonl", rows(16))
    project = tmp_path / "nan"
    real = Objective.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 6:  # step 2 of the second epoch (4 steps per epoch)
            return (out[0] * float("nan"), *out[1:])
        return out

    monkeypatch.setattr(Objective, "forward", poisoned)
    assert distill(tiny_student, tiny_teacher, data, project, "--epochs", "2") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("aitraining: error: the loss became nan at step 6")
    assert "checkpoint-4" in errors[0] and "Traceback" not in errors[0]
    assert [p.name for p in project.glob("checkpoint-*")] == ["checkpoint-4"]
    assert json.loads((project / "run.json").read_text())["status"] == "running"


def test_with_a_live_teacher_training_evaluation_and_the_judge_are_one_metric(tiny_student, tiny_teacher, tmp_path):
    """The same exact KL, measured by training's held-out evaluation and by `aitraining eval`, on the same row
    (the teacher answers it again, greedily, to the same length: the same tokens)."""
    from aitraining.data.examples import held_out_rows

    data = write_jsonl(tmp_path / "d.jsonl", rows(20))
    project = tmp_path / "live"
    assert distill(tiny_student, tiny_teacher, data, project, "--teacher-source", "live") == 0
    held = write_jsonl(tmp_path / "held.jsonl", [rows(20)[i] for i in held_out_rows(20, 0.05, 3)])
    assert main(["eval", "--model", str(project), "--teacher-model", tiny_teacher, "--data-path", held,
                 "--max-new-tokens", "8"]) == 0
    judged = json.loads((project / "eval.json").read_text())["models"]["model"]
    last_eval = [m for m in metrics(project) if "eval_kl_to_teacher" in m][-1]
    assert judged["kl_to_teacher"] == pytest.approx(last_eval["eval_kl_to_teacher"], rel=1e-4)
    assert judged["top1_agreement"] == pytest.approx(last_eval["eval_top1_agreement"])
