"""Tests for the `aitraining` command line: flags from fields, YAML configs, one-line errors with status 2."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from aitraining.cli import build_parser, main, params_from_args
from aitraining.params import LLMTrainingParams, flag

CONSOLE_SCRIPT = Path(sys.executable).parent / "aitraining"


def parse(argv: list[str]) -> LLMTrainingParams:
    return params_from_args(build_parser().parse_args(argv))


def run_main(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str) -> str:
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("aitraining: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def model_dir(tmp_path: Path) -> str:
    """A folder that passes the --model existence check (it has a config.json) without being loaded."""
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "config.json").write_text("{}", encoding="utf-8")
    return str(folder)


# ------------------------------------------------------------------------------------------ bad input


def test_unknown_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, ["llm", "--train", "--model", "m", "--data-path", "d", "--frobnicate", "3"])
    line = assert_one_line_error(code, err)
    assert "--frobnicate" in line


def test_invalid_value_for_typed_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, ["llm", "--train", "--model", "m", "--data-path", "d", "--epochs", "abc"])
    line = assert_one_line_error(code, err)
    assert "--epochs" in line and "'abc'" in line


def test_invalid_choice(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, ["llm", "--train", "--model", "m", "--data-path", "d", "--trainer", "ppo"])
    line = assert_one_line_error(code, err)
    assert "--trainer" in line and "ppo" in line


def test_distill_alpha_out_of_range(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(
        capsys,
        ["llm", "--train", "--model", "m", "--data-path", "d.jsonl", "--distill-alpha", "1.5"],
    )
    line = assert_one_line_error(code, err)
    assert line == "aitraining: error: --distill-alpha must be in [0, 1], got 1.5"


def test_use_distillation_without_teacher(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, ["llm", "--train", "--model", "m", "--data-path", "d", "--use-distillation"])
    line = assert_one_line_error(code, err)
    assert "--teacher-model is required" in line


def test_missing_data_file(capsys: pytest.CaptureFixture[str], model_dir: str, tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    project = tmp_path / "proj"
    code, _, err = run_main(
        capsys,
        ["llm", "--train", "--model", model_dir, "--data-path", str(missing), "--project-name", str(project)],
    )
    line = assert_one_line_error(code, err)
    assert "--data-path" in line and "missing.jsonl" in line and "does not exist" in line
    assert not project.exists()  # nothing written before the data is known to be readable


def test_missing_model_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_main(
        capsys,
        ["llm", "--train", "--model", str(tmp_path / "nope"), "--data-path", "d.jsonl", "--project-name", "p"],
    )
    line = assert_one_line_error(code, err)
    assert "--model" in line


def test_missing_train_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, ["llm", "--model", "m", "--data-path", "d.jsonl"])
    line = assert_one_line_error(code, err)
    assert "--train" in line


def test_malformed_yaml_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "run.yml"
    config.write_text("model: [unclosed\nlr: 1e-4\n  bad: indent: here\n", encoding="utf-8")
    code, _, err = run_main(capsys, ["llm", "--train", "--config", str(config)])
    line = assert_one_line_error(code, err)
    assert "--config" in line and "not valid YAML" in line


def test_missing_yaml_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_main(capsys, ["llm", "--train", "--config", str(tmp_path / "none.yml")])
    line = assert_one_line_error(code, err)
    assert "--config" in line and "does not exist" in line


def test_yaml_config_that_is_not_a_mapping(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "run.yml"
    config.write_text("- model\n- lr\n", encoding="utf-8")
    code, _, err = run_main(capsys, ["llm", "--train", "--config", str(config)])
    line = assert_one_line_error(code, err)
    assert "mapping" in line


def test_unknown_key_in_yaml_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "run.yml"
    config.write_text("model: m\ndata_path: d.jsonl\ndistil_alpha: 0.5\n", encoding="utf-8")
    code, _, err = run_main(capsys, ["llm", "--train", "--config", str(config)])
    line = assert_one_line_error(code, err)
    assert "'distil_alpha'" in line and "--distil-alpha" in line


def test_template_error_from_yaml_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "run.yml"
    config.write_text(
        'model: m\ndata_path: d.jsonl\nstudent_prompt_template: "Question: {prompt}\\nAnswer:"\n', encoding="utf-8"
    )
    code, _, err = run_main(capsys, ["llm", "--train", "--config", str(config)])
    assert_one_line_error(code, err)


def test_no_command_prints_help_and_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, [])
    assert code == 2
    assert "llm" in out and "prune" in out


def test_installed_console_script_missing_data_exits_2(tmp_path: Path) -> None:
    assert CONSOLE_SCRIPT.is_file(), CONSOLE_SCRIPT
    proc = subprocess.run(
        [str(CONSOLE_SCRIPT), "llm", "--train", "--model", "x", "--data-path", "missing.jsonl", "--project-name", "p"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("aitraining: error: ")
    assert not (tmp_path / "p").exists()


# ------------------------------------------------------------------------------------------ config + flags


def test_config_values_are_used_and_flags_override_them(tmp_path: Path) -> None:
    config = tmp_path / "run.yml"
    config.write_text(
        "model: ./student\n"
        "data_path: ./prompts.jsonl\n"
        "project-name: from-file\n"  # kebab-case keys are accepted too
        "lr: 1.0e-3\n"
        "epochs: 3\n"
        "peft: true\n"
        "distill-alpha: 0.2\n"
        "use_distillation: true\n"
        "teacher_model: ./teacher\n",
        encoding="utf-8",
    )
    p = parse(["llm", "--train", "--config", str(config), "--lr", "1e-4", "--no-peft", "--project-name", "cli"])
    assert p.lr == 1e-4  # flag wins
    assert p.peft is False  # --no-peft wins over `peft: true`
    assert p.project_name == "cli"
    assert p.epochs == 3  # from the file
    assert p.distill_alpha == 0.2
    assert p.use_distillation is True and p.teacher_model == "./teacher"
    assert p.model == "./student" and p.data_path == "./prompts.jsonl"
    assert p.distill_temperature == 3.0  # neither: the default


def test_yaml_scientific_notation_without_dot(tmp_path: Path) -> None:
    """PyYAML reads `1e-4` as a string; it must still become the float 1e-4."""
    config = tmp_path / "run.yml"
    config.write_text("model: m\ndata_path: d.jsonl\nlr: 1e-4\n", encoding="utf-8")
    assert parse(["llm", "--config", str(config)]).lr == 1e-4


def test_empty_config_file_uses_flags_only(tmp_path: Path) -> None:
    config = tmp_path / "run.yml"
    config.write_text("", encoding="utf-8")
    p = parse(["llm", "--config", str(config), "--model", "m", "--data-path", "d.jsonl"])
    assert p.model == "m"


def test_unset_flags_keep_field_defaults() -> None:
    p = parse(["llm", "--train", "--model", "m", "--data-path", "d.jsonl"])
    defaults = LLMTrainingParams(model="m", data_path="d.jsonl")
    assert p.model_dump() == defaults.model_dump()


def test_documented_quick_start_command() -> None:
    p = parse(
        [
            "llm", "--train",
            "--model", "google/gemma-3-270m",
            "--teacher-model", "google/gemma-2-2b",
            "--data-path", "./prompts.jsonl",
            "--project-name", "distilled-model",
            "--use-distillation",
            "--distill-temperature", "3.0",
        ]
    )  # fmt: skip
    assert p.use_distillation is True
    assert p.teacher_model == "google/gemma-2-2b"
    assert p.distill_temperature == 3.0
    assert p.distill_alpha == 0.7


def test_trainer_aliases_from_the_command_line() -> None:
    assert parse(["llm", "--model", "m", "--data-path", "d", "--trainer", "default"]).trainer == "sft"
    p = parse(["llm", "--model", "m", "--data-path", "d", "--trainer", "distillation", "--teacher-model", "t"])
    assert p.use_distillation is True


# ------------------------------------------------------------------------------------------ flags from fields


def _sample_argv(name: str) -> tuple[list[str], object]:
    """Flag(s) setting field `name` to a non-default value, and the value expected in the namespace."""
    info = LLMTrainingParams.model_fields[name]
    ann = info.annotation
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        ann = next(a for a in typing.get_args(ann) if a is not type(None))
    if ann is bool:
        return ([flag(name)] if not info.default else ["--no-" + name.replace("_", "-")]), not info.default
    if typing.get_origin(ann) is typing.Literal:
        choices = [c for c in typing.get_args(ann) if c != info.default]
        return [flag(name), str(choices[0])], choices[0]
    if ann is int:
        return [flag(name), "7"], 7
    if ann is float:
        return [flag(name), "0.25"], 0.25
    assert ann is str, (name, ann)
    return [flag(name), "some-value"], "some-value"


@pytest.mark.parametrize("name", sorted(LLMTrainingParams.model_fields))
def test_every_field_has_a_kebab_case_flag(name: str) -> None:
    argv, expected = _sample_argv(name)
    assert argv[0].startswith("--") and "_" not in argv[0]
    ns = build_parser().parse_args(["llm", *argv])
    assert getattr(ns, name) == expected
    assert type(getattr(ns, name)) is type(expected)


def test_unset_flags_are_absent_from_the_namespace() -> None:
    ns = build_parser().parse_args(["llm", "--lr", "0.1"])
    present = {k for k in vars(ns) if k in LLMTrainingParams.model_fields}
    assert present == {"lr"}


@pytest.mark.parametrize(("argv", "expected"), [([], False), (["--peft"], True), (["--no-peft"], False)])
def test_peft_boolean_flags(argv: list[str], expected: bool) -> None:
    assert parse(["llm", "--model", "m", "--data-path", "d", *argv]).peft is expected


@pytest.mark.parametrize(
    ("argv", "expected"), [([], True), (["--add-eos-token"], True), (["--no-add-eos-token"], False)]
)
def test_add_eos_token_boolean_flags(argv: list[str], expected: bool) -> None:
    assert parse(["llm", "--model", "m", "--data-path", "d", *argv]).add_eos_token is expected


def test_last_boolean_flag_wins() -> None:
    assert parse(["llm", "--model", "m", "--data-path", "d", "--peft", "--no-peft"]).peft is False
    assert parse(["llm", "--model", "m", "--data-path", "d", "--no-peft", "--peft"]).peft is True


def test_boolean_flags_take_no_value(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, ["llm", "--train", "--model", "m", "--data-path", "d", "--peft", "true"])
    assert_one_line_error(code, err)


# ------------------------------------------------------------------------------------------ help


def test_llm_help_shows_groups_and_defaults(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside "(default: ...)"
    with pytest.raises(SystemExit) as e:
        main(["llm", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    headings = [line.rstrip(":") for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    positions = [headings.index(g) for g in ("Model", "Data", "Training", "LoRA", "Distillation")]
    assert positions == sorted(positions)
    for text in (
        "--distill-temperature DISTILL_TEMPERATURE",
        "(default: 3.0)",
        "(default: 0.7)",
        "(default: 512)",
        "(default: {input})",
        "(default: all-linear)",
        "--peft, --no-peft",
        "--use-distillation, --no-use-distillation",
        "{sft,default,distillation}",
    ):
        assert text in out, text
    for name in LLMTrainingParams.model_fields:
        assert flag(name) in out, name


def test_help_flag_sections_contain_their_fields(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit):
        main(["llm", "--help"])
    out = capsys.readouterr().out
    sections: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            current = line[:-1]
            sections[current] = ""
        elif current:
            sections[current] += line + "\n"
    for name, info in LLMTrainingParams.model_fields.items():
        group = info.json_schema_extra["group"]  # type: ignore[index]
        assert f"  {flag(name)}" in sections[group], (name, group)
    assert "--distill-alpha DISTILL_ALPHA" in sections["Distillation"]
    assert "--lora-r LORA_R" in sections["LoRA"]


def test_parser_is_argparse() -> None:
    assert isinstance(build_parser(), argparse.ArgumentParser)
