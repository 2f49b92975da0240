"""End-to-end runs of the CLI and the Python API on tiny models: what a run leaves, gradient invariances,
resume, LoRA, and a project folder that is never overwritten by mistake."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same_weights, max_weight_change, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from aitraining.cli import main

pytestmark = pytest.mark.e2e


def cli(*args: str) -> int:
    return main(["llm", "--train", *args])


def common(student: str, data: str, project: Path, *extra: str) -> list[str]:
    # float32: these tests compare weights to 1e-6, which bfloat16 autocast (the default on CPUs with it) is not.
    return ["--model", student, "--data-path", data, "--project-name", str(project), "--seed", "7",
            "--mixed-precision", "no", *extra]


def test_sft_run_leaves_a_loadable_documented_folder(tiny_student, pairs_file, tmp_path):
    project = tmp_path / "sft"
    rc = cli(*common(tiny_student, pairs_file, project, "--epochs", "2", "--batch-size", "4", "--lr", "1e-3",
                     "--logging-steps", "1", "--token", "hf_SECRET_TOKEN_123"))
    assert rc == 0
    model = AutoModelForCausalLM.from_pretrained(project)
    tok = AutoTokenizer.from_pretrained(project)
    out = model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] >= 2
    assert (project / "model.safetensors").exists()
    params = json.loads((project / "training_params.json").read_text())
    assert params["lr"] == 1e-3 and "token" not in params
    card = (project / "README.md").read_text()
    assert tiny_student in card and "loss" in card
    metrics = [json.loads(x) for x in (project / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= metrics[0].keys()
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert [p.name for p in project.glob("checkpoint-*")] == ["checkpoint-4"]  # save_total_limit 1
    # The token never reaches the disk.
    for path in project.rglob("*"):
        if path.is_file():
            assert b"hf_SECRET_TOKEN_123" not in path.read_bytes(), path


def test_documented_python_api_with_distillation(tiny_student, tiny_teacher, prompts_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from autotrain.project import AutoTrainProject
    from autotrain.trainers.clm.params import LLMTrainingParams

    params = LLMTrainingParams(
        model=tiny_student,
        teacher_model=tiny_teacher,
        data_path=prompts_file,
        project_name="distilled-gemma",
        use_distillation=True,
        distill_temperature=3.0,
        distill_alpha=0.7,
        distill_max_teacher_length=8,
        trainer="sft",
        epochs=2,
        batch_size=4,
        lr=1e-4,
    )
    project = AutoTrainProject(params=params, backend="local", process=True).create()
    assert project == str(tmp_path / "distilled-gemma")
    AutoModelForCausalLM.from_pretrained(project)
    outputs = (Path(project) / "teacher_outputs.jsonl").read_text().splitlines()
    assert len(outputs) == 8
    assert json.loads((Path(project) / "run.json").read_text())["status"] == "finished"


def _one_step(student: str, data: str, project: Path, *extra: str) -> Path:
    rc = cli(*common(student, data, project, "--epochs", "1", "--optimizer", "sgd", "--lr", "0.5", "--warmup-ratio",
                     "0", "--scheduler", "constant", "--max-grad-norm", "0", *extra))
    assert rc == 0
    return project


@pytest.mark.parametrize("distill", [False, True])
def test_gradient_accumulation_gives_the_gradient_of_one_big_batch(tiny_student, tiny_teacher, pairs_file, tmp_path, distill):
    """SGD makes the update proportional to the gradient, so equal weights mean equal gradients. The rows
    have different lengths: averaging per micro-batch (the common mistake) would give other weights."""
    extra = ("--use-distillation", "--teacher-model", tiny_teacher, "--distill-alpha", "0.5") if distill else ()
    a = _one_step(tiny_student, pairs_file, tmp_path / "a", "--batch-size", "8", "--gradient-accumulation", "1", *extra)
    b = _one_step(tiny_student, pairs_file, tmp_path / "b", "--batch-size", "2", "--gradient-accumulation", "4", *extra)
    c = _one_step(tiny_student, pairs_file, tmp_path / "c", "--batch-size", "1", "--gradient-accumulation", "8", *extra)
    assert max_weight_change(a, tiny_student) > 1e-4  # the step did something
    assert_same_weights(a, b, atol=2e-6)
    assert_same_weights(a, c, atol=2e-6)


@pytest.mark.parametrize("distill", [False, True])
def test_a_batch_cut_into_passes_of_similar_length_gives_the_same_step(tiny_student, tiny_teacher, tmp_path, monkeypatch,
                                                                        distill):
    """A micro-batch run as several forward passes of rows of similar length (batches.length_groups) takes the
    step of the whole batch; here one long row would otherwise pad seven short ones."""
    import aitraining.batches as batches_mod
    from aitraining.objective import Objective

    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(7)]
    rows.append({"prompt": "A long question " + "with many words " * 20, "response": "A long answer " + "and more " * 10})
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    extra = ("--use-distillation", "--teacher-model", tiny_teacher, "--distill-alpha", "0.5") if distill else ()
    widths: list[list[int]] = []
    real_forward = Objective.forward

    def forward(self, input_ids, *args, **kw):
        widths[-1].append(input_ids.shape[0])
        return real_forward(self, input_ids, *args, **kw)

    monkeypatch.setattr(Objective, "forward", forward)
    steps = {}
    for name, per_forward in (("whole", None), ("cut", 64)):
        monkeypatch.setattr(batches_mod, "CPU_FORWARD_TOKENS", per_forward)
        widths.append([])
        steps[name] = _one_step(tiny_student, data, tmp_path / name, "--batch-size", "8", "--holdout-share", "0", *extra)
    assert widths == [[8], [7, 1]]
    assert max_weight_change(steps["whole"], tiny_student) > 1e-4
    assert_same_weights(steps["whole"], steps["cut"], atol=2e-6)


@pytest.mark.slow
def test_two_processes_give_the_gradient_of_one_big_batch(tiny_student, tiny_teacher, pairs_file, tmp_path):
    """Two data-parallel CPU processes (gloo), each taking half of the global batch.

    `accelerate launch --multi_gpu --num_processes 2` starts them through torchrun; on a machine without
    CUDA the Accelerator runs them on the CPU. (`accelerate launch --cpu --num_processes 2` starts only one
    process unless an MPI hostfile is given: accelerate's simple launcher.)
    """
    extra = ["--use-distillation", "--teacher-model", tiny_teacher, "--distill-alpha", "0.5"]
    # One thread, as each of the two processes below: which tail ids the teacher's cache samples depends on its
    # logits' last bits (a point of the sampler may sit within 1e-7 of a boundary), and those on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = _one_step(tiny_student, pairs_file, tmp_path / "one", "--batch-size", "8", *extra)
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two"
    args = common(tiny_student, pairs_file, two, "--epochs", "1", "--optimizer", "sgd", "--lr", "0.5", "--warmup-ratio",
                  "0", "--scheduler", "constant", "--max-grad-norm", "0", "--batch-size", "4", *extra)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "-m", "aitraining.cli", "llm", "--train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launcher, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1]  # one optimizer step over the global batch of 8 rows
    assert_same_weights(one, two, atol=2e-6)


def test_interrupted_run_resumes_to_the_same_weights(tiny_student, pairs_file, tmp_path, monkeypatch):
    base = ("--epochs", "3", "--batch-size", "2", "--lr", "1e-3", "--logging-steps", "1", "--save-total-limit", "2")
    full = tmp_path / "full"
    assert cli(*common(tiny_student, pairs_file, full, *base)) == 0

    import aitraining.loop as loop_mod

    calls = {"n": 0}
    real_add = loop_mod._Stats.add

    def add_then_interrupt(self, *a, **kw):
        real_add(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 7:  # in the middle of the second epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(loop_mod._Stats, "add", add_then_interrupt)
    stopped = tmp_path / "stopped"
    assert cli(*common(tiny_student, pairs_file, stopped, *base)) == 130
    assert (stopped / "checkpoint-6").is_dir()
    monkeypatch.setattr(loop_mod._Stats, "add", real_add)
    assert cli(*common(tiny_student, pairs_file, stopped, *base, "--resume-from-checkpoint", "latest")) == 0
    assert_same_weights(full, stopped, atol=1e-6)


def test_resume_from_an_epoch_checkpoint_folder(tiny_student, pairs_file, tmp_path):
    base = ("--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--save-total-limit", "2", "--peft",
            "--lora-dropout", "0.1", "--merge-adapter")
    full = tmp_path / "full"
    assert cli(*common(tiny_student, pairs_file, full, *base)) == 0
    # A second project continues from the first epoch's checkpoint of the first one.
    again = tmp_path / "again"
    assert cli(*common(tiny_student, pairs_file, again, *base, "--resume-from-checkpoint", str(full / "checkpoint-2"))) == 0
    assert_same_weights(full, again, atol=1e-6)


def test_lora_adapter_and_merged_model(tiny_student, pairs_file, tmp_path):
    plain = tmp_path / "lora"
    assert cli(*common(tiny_student, pairs_file, plain, "--peft", "--lora-r", "4", "--lora-alpha", "8",
                       "--target-modules", "q_proj,v_proj", "--lr", "1e-2")) == 0
    config = json.loads((plain / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert (plain / "adapter_model.safetensors").exists() and not (plain / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(plain)  # transformers applies the adapter to the base model
    assert any("lora" in n for n, _ in loaded.named_parameters())

    merged = tmp_path / "merged"
    assert cli(*common(tiny_student, pairs_file, merged, "--peft", "--merge-adapter", "--lr", "1e-2")) == 0
    assert (merged / "model.safetensors").exists() and (merged / "adapter" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert max_weight_change(merged, tiny_student) > 0


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_a_different_finished_run_is_never_overwritten(tiny_student, pairs_file, tmp_path, capsys):
    project = tmp_path / "p"
    assert cli(*common(tiny_student, pairs_file, project)) == 0
    before = _tree_digest(project)
    capsys.readouterr()
    assert cli(*common(tiny_student, pairs_file, project, "--lr", "1e-3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    assert _tree_digest(project) == before
    # A folder of something else is protected too.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert cli(*common(tiny_student, pairs_file, other)) == 2
    assert (other / "notes.txt").read_text() == "mine" and len(list(other.iterdir())) == 1
    # With --overwrite it runs.
    assert cli(*common(tiny_student, pairs_file, project, "--lr", "1e-3", "--overwrite")) == 0
    assert json.loads((project / "training_params.json").read_text())["lr"] == 1e-3


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "./no/such/model"], "--model"),
        (["--teacher-model", "./no/such/teacher", "--use-distillation"], "--teacher-model"),
        (["--distill-alpha", "1.5"], "--distill-alpha must be in [0, 1], got 1.5"),
        (["--use-distillation"], "--teacher-model is required"),
        (["--resume-from-checkpoint", "./nowhere"], "--resume-from-checkpoint"),
        (["--block-size", "9", "--chat-template", "tokenizer"], "--block-size"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tiny_student, pairs_file, tmp_path, capsys, args, expected):
    project = tmp_path / "never"
    # argparse keeps the last value of a repeated flag, so `args` override the good defaults.
    flat = common(tiny_student, pairs_file, project, *args)
    assert cli(*flat) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not project.exists()


def test_data_folder_with_validation_split_and_chat_rows(tiny_student, tmp_path):
    data = tmp_path / "data"
    chat = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p},
                          {"role": "assistant", "content": r}]} for p, r in [("Hi", "Hello!"), ("2+2?", "4")] * 3]
    write_jsonl(data / "train.jsonl", chat)
    write_jsonl(data / "valid.jsonl", chat[:2])
    project = tmp_path / "chat"
    assert cli("--model", tiny_student, "--data-path", str(data), "--valid-split", "valid", "--project-name",
               str(project), "--epochs", "2", "--lr", "1e-3") == 0
    evals = [json.loads(x) for x in (project / "metrics.jsonl").read_text().splitlines() if "eval_ce" in x]
    assert [e["epoch"] for e in evals] == [0, 1, 2]
    assert evals[-1]["eval_ce"] < evals[0]["eval_ce"]


def test_checkpoints_are_self_describing(tiny_student, pairs_file, tmp_path):
    project = tmp_path / "ck"
    assert cli(*common(tiny_student, pairs_file, project, "--epochs", "2", "--save-total-limit", "5")) == 0
    found = sorted(p.name for p in project.glob("checkpoint-*"))
    assert found == ["checkpoint-4", "checkpoint-8"]
    state = json.loads((project / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["epoch"] == 1


def test_shared_real_data_sft(tiny_student, real_data, tmp_path):
    project = tmp_path / "real"
    assert cli("--model", tiny_student, "--data-path", str(real_data / "user_oriented_pairs.jsonl"), "--project-name",
               str(project), "--max-samples", "24", "--batch-size", "8", "--block-size", "256", "--lr", "1e-3") == 0
    assert torch.isfinite(torch.tensor(json.loads((project / "run.json").read_text())["final_metrics"]["loss"]))
    shutil.rmtree(project)


def test_a_restart_without_resume_never_loses_its_new_checkpoint(tiny_student, pairs_file, tmp_path, monkeypatch):
    """An interrupted run at a later step, then the same command again without --resume: the new run's
    checkpoints are kept (newest by time, not by step) and `latest` means the new run."""
    import aitraining.loop as loop_mod

    base = ("--epochs", "2", "--batch-size", "2", "--lr", "1e-3", "--logging-steps", "1")
    project = tmp_path / "restart"
    real_add = loop_mod._Stats.add
    calls = {"n": 0}

    def add_then_interrupt(self, *a, **kw):
        real_add(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop_mod._Stats, "add", add_then_interrupt)
    assert cli(*common(tiny_student, pairs_file, project, *base)) == 130
    assert (project / "checkpoint-5").is_dir()
    monkeypatch.setattr(loop_mod._Stats, "add", real_add)
    calls["n"] = 0
    from aitraining.runfolder import RunFolder

    real_save = RunFolder.save_checkpoint
    kept_after_each_save = []

    def save_and_look(self, accelerator, step, epoch):
        real_save(self, accelerator, step, epoch)
        kept_after_each_save.append(sorted(p.name for p in project.glob("checkpoint-*")))

    monkeypatch.setattr(RunFolder, "save_checkpoint", save_and_look)
    assert cli(*common(tiny_student, pairs_file, project, *base)) == 0  # the same command, from scratch
    # The stale step-5 checkpoint goes, never the one just written.
    assert kept_after_each_save == [["checkpoint-4"], ["checkpoint-8"]]
    assert (project / "metrics.previous.jsonl").exists()
    steps = [json.loads(x)["step"] for x in (project / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == sorted(steps)  # one run's curve, not two interleaved


@pytest.mark.slow
def test_two_runs_started_on_one_folder_at_once_the_second_is_refused(tiny_student, pairs_file, tmp_path):
    """Two real processes, the same command and folder, started together: one trains, the other stops with one
    line before writing anything; the folder holds one complete run."""
    project = tmp_path / "shared-folder"
    argv = [str(Path(sys.executable).parent / "aitraining"), "llm", "--train",
            *common(tiny_student, pairs_file, project, "--epochs", "40", "--batch-size", "2", "--lr", "1e-4")]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    done = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in done)
    assert codes == [0, 2], done
    refused = next(err for rc, err in done if rc == 2)
    errors = [line for line in refused.splitlines() if line.startswith("aitraining: error:")]
    assert len(errors) == 1 and "is in use by a run that is still going (pid " in errors[0]
    assert "Traceback" not in refused
    assert json.loads((project / "run.json").read_text())["status"] == "finished"
    steps = [json.loads(x)["step"] for x in (project / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # one run's curve, nothing interleaved


def test_a_folder_locked_by_a_running_process_is_refused_and_free_once_it_ends(tiny_student, pairs_file, tmp_path,
                                                                                capsys):
    project = tmp_path / "locked"
    project.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({str(project / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write(f'pid {{os.getpid()}}');"
        " f.flush(); print('held', flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli(*common(tiny_student, pairs_file, project, "--epochs", "1")) == 2
        assert f"is in use by a run that is still going (pid {holder.pid})" in capsys.readouterr().err
        assert sorted(p.name for p in project.iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert cli(*common(tiny_student, pairs_file, project, "--epochs", "1")) == 0  # the kernel dropped the lock


def test_bad_rows_stop_the_run_or_are_left_out_with_skip_bad_rows(tiny_student, tmp_path, capsys, caplog):
    """A damaged line stops the run before anything is written (exit 2, the line named); --skip-bad-rows trains on
    the rest and says how many were left out, and which, in the project folder."""
    good = [json.dumps({"prompt": f"Say {i}.", "response": f"{i}"}) for i in range(24)]
    lines = [*good[:5], '{"prompt": "cut', *good[5:9], json.dumps({"prompt": ["x"], "response": "y"}), *good[9:]]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    project = tmp_path / "p"
    assert cli(*common(tiny_student, str(data), project, "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert f"{data} line 6 is not valid JSON" in err and "--skip-bad-rows" in err and err.count("\n") == 1
    assert not project.exists()
    caplog.set_level("WARNING", logger="aitraining")
    assert cli(*common(tiny_student, str(data), project, "--epochs", "1", "--skip-bad-rows")) == 0
    assert "--skip-bad-rows: left out 2 of 26 rows (1 is not valid JSON, 1 column 'prompt' must be a string, got list)" in caplog.text
    listed = [json.loads(line) for line in (project / "skipped_rows.jsonl").read_text().splitlines()]
    assert [(r["place"], r["reason"]) for r in listed] == [("line 6", "is not valid JSON (Unterminated string starting at)"),
                                                          ("line 11", "column 'prompt' must be a string, got list")]
    teacherless = json.loads((project / "run.json").read_text())
    assert teacherless["status"] == "finished"


def test_pickled_weights_are_refused_unless_allowed(tiny_student, pairs_file, tmp_path, capsys):
    """A folder holding only pytorch_model.bin (pickle: it can run code while it loads) is refused before anything
    runs, for training, the teacher and `prune`; --allow-pickle-weights loads it."""
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_student, pickled)
    state = AutoModelForCausalLM.from_pretrained(tiny_student).state_dict()
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    capsys.readouterr()
    project = tmp_path / "p"
    for argv in (common(str(pickled), pairs_file, project, "--epochs", "1"),
                 common(tiny_student, pairs_file, project, "--epochs", "1", "--use-distillation", "--teacher-model",
                        str(pickled))):
        assert cli(*argv) == 2
        err = capsys.readouterr().err
        assert "holds pickled weights only (pytorch_model.bin)" in err and "--allow-pickle-weights" in err, err
        assert err.count("\n") == 1 and not project.exists()
    assert main(["prune", "--model", str(pickled), "--num-layers", "1", "--output", str(tmp_path / "pr")]) == 2
    assert "holds pickled weights only" in capsys.readouterr().err and not (tmp_path / "pr").exists()
    assert cli(*common(str(pickled), pairs_file, project, "--epochs", "1", "--allow-pickle-weights")) == 0
    assert (project / "model.safetensors").exists() and not list(project.glob("*.bin"))


@pytest.fixture
def small_disk(tmp_path):
    """A 60 MB tmpfs (the size is changed later with a remount); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or done.returncode}): needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("free_mib, full", [(0, True), (36, True), (10_000, False)])
def test_a_write_that_fails_on_a_nearly_full_disk_is_a_full_disk(tmp_path, monkeypatch, free_mib, full):
    """torch.save says "unexpected pos" or "iostream error", no errno; a real checkpoint write here failed that way
    with 36 MiB still reported free (Note [Nearly full]). Either way the half-written folder goes."""
    import errno
    from types import SimpleNamespace

    from aitraining import runfolder

    monkeypatch.setattr(runfolder.shutil, "disk_usage", lambda _: SimpleNamespace(total=2**40, used=0, free=free_mib << 20))
    aside = tmp_path / "checkpoint-4.tmp"
    aside.mkdir()
    (aside / "optimizer.bin").write_bytes(b"half")
    with pytest.raises((OSError, RuntimeError)) as raised:
        with runfolder._written_aside(str(aside)):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 113264320 vs 113264208")
    assert (isinstance(raised.value, OSError) and raised.value.errno == errno.ENOSPC) == full
    assert not aside.exists()


def test_a_full_disk_stops_the_run_keeps_everything_and_resumes(tiny_model_factory, tmp_path, small_disk, capsys):
    """The project on a 60 MB disk: the teacher's outputs and the epoch-1 checkpoint (about 38 MB) fit, the epoch-2
    checkpoint does not. The run stops with one line (exit 2), the half-written checkpoint is gone, the previous
    one and every teacher output stay; with space back, the same command resumes and ends on the very weights of
    a run that never stopped."""
    student = tiny_model_factory(n_layers=1, seed=4, path=tmp_path / "student")
    teacher = tiny_model_factory(n_layers=2, seed=5, path=tmp_path / "teacher")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"Count to {i}."} for i in range(8)])
    argv = lambda project, *extra: ["llm", "--train", "--model", student, "--teacher-model", teacher, "--data-path",  # noqa: E731
                                    data, "--project-name", str(project), "--use-distillation", "--epochs", "3",
                                    "--batch-size", "4", "--distill-max-teacher-length", "6", "--mixed-precision", "no",
                                    "--seed", "3", *extra]
    assert main(argv(tmp_path / "whole")) == 0
    project = small_disk / "p"
    capsys.readouterr()
    assert main(argv(project)) == 2
    said = capsys.readouterr().err
    err = [line for line in said.splitlines() if line.startswith("aitraining: error:")]
    assert len(err) == 1 and f"the disk holding {project} is full (no space left on device" in err[0], said
    assert "the last complete checkpoint (checkpoint-2) is kept" in err[0] and "--resume-from-checkpoint latest" in err[0]
    assert sorted(p.name for p in project.glob("checkpoint-*")) == ["checkpoint-2"]
    outputs = (project / "teacher_outputs.jsonl").read_text()
    assert len(outputs.splitlines()) == 8 and (project / "teacher_cache").is_dir()
    subprocess.run(["mount", "-o", "remount,size=400m", str(small_disk)], check=True)
    assert main(argv(project, "--resume-from-checkpoint", "latest")) == 0
    assert (project / "teacher_outputs.jsonl").read_text() == outputs  # nothing regenerated, nothing lost
    assert_same_weights(str(tmp_path / "whole"), str(project))
