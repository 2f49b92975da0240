"""Every example of the documented page (../shared/spec/distillation-docs.txt), as written, with local model
folders where it names hub models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import write_jsonl
from transformers import AutoModelForCausalLM

from aitraining.cli import main

pytestmark = pytest.mark.e2e

DOC_PROMPTS = [
    {"text": "What is machine learning?"},
    {"text": "Explain how neural networks work."},
    {"text": "Write a function to sort a list in Python."},
]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "prompts.jsonl", DOC_PROMPTS)
    write_jsonl(tmp_path / "api_prompts.jsonl", DOC_PROMPTS)
    write_jsonl(tmp_path / "data.jsonl", [{"prompt": "What is AI?", "response": "Artificial intelligence."}] * 3)
    return tmp_path


def test_quick_start(tiny_student, tiny_teacher, in_tmp):
    assert main(["llm", "--train", "--model", tiny_student, "--teacher-model", tiny_teacher,
                 "--data-path", "./prompts.jsonl", "--project-name", "distilled-model", "--use-distillation",
                 "--distill-temperature", "3.0", "--distill-max-teacher-length", "8"]) == 0
    AutoModelForCausalLM.from_pretrained(in_tmp / "distilled-model")


def test_python_api_as_written(tiny_student, tiny_teacher, in_tmp):
    from autotrain.project import AutoTrainProject
    from autotrain.trainers.clm.params import LLMTrainingParams

    params = LLMTrainingParams(
        # Student model (smaller)
        model=tiny_student,
        # Teacher model (larger)
        teacher_model=tiny_teacher,
        # Data
        data_path="./prompts.jsonl",
        project_name="distilled-gemma",
        # Enable distillation
        use_distillation=True,
        distill_temperature=3.0,  # Default: 3.0
        distill_alpha=0.7,  # Default: 0.7
        distill_max_teacher_length=512,  # Default: 512
        # Training
        trainer="sft",
        epochs=5,
        batch_size=4,
        lr=1e-4,
    )
    project = AutoTrainProject(params=params, backend="local", process=True)
    folder = project.create()
    assert Path(folder) == in_tmp / "distilled-gemma"
    assert json.loads((in_tmp / "distilled-gemma" / "run.json").read_text())["status"] == "finished"


def test_prompt_templates(tiny_student, tiny_teacher, in_tmp):
    from autotrain.project import AutoTrainProject
    from autotrain.trainers.clm.params import LLMTrainingParams

    params = LLMTrainingParams(
        model=tiny_student, teacher_model=tiny_teacher, data_path="./prompts.jsonl", project_name="templated",
        distill_max_teacher_length=8,
        use_distillation=True,
        teacher_prompt_template="<|system|>You are helpful.<|user|>{input}<|assistant|>",
        student_prompt_template="{input}",
    )
    AutoTrainProject(params=params, backend="local", process=True).create()
    written = [json.loads(x) for x in (in_tmp / "templated" / "teacher_outputs.jsonl").read_text().splitlines()]
    assert {w["prompt"] for w in written} == {p["text"] for p in DOC_PROMPTS}


@pytest.mark.parametrize("temperature", [2.0, 3.0, 4.0])
def test_temperature_tuning(tiny_student, tiny_teacher, in_tmp, temperature):
    from autotrain.trainers.clm.params import LLMTrainingParams

    params = LLMTrainingParams(model=tiny_student, teacher_model=tiny_teacher, data_path="./prompts.jsonl",
                               project_name="t", use_distillation=True, distill_temperature=temperature)
    assert params.distill_temperature == temperature


def test_api_assistant_with_lora(tiny_student, tiny_teacher, in_tmp):
    from autotrain.project import AutoTrainProject
    from autotrain.trainers.clm.params import LLMTrainingParams

    params = LLMTrainingParams(
        model=tiny_student,
        teacher_model=tiny_teacher,
        data_path="./api_prompts.jsonl",
        project_name="api-assistant-small",

        use_distillation=True,
        distill_temperature=3.0,
        distill_alpha=0.7,
        distill_max_teacher_length=8,

        epochs=10,
        batch_size=8,
        lr=5e-5,
        peft=True,
        lora_r=32,
    )
    folder = AutoTrainProject(params=params, backend="local", process=True).create()
    assert json.loads((Path(folder) / "adapter_config.json").read_text())["r"] == 32
    AutoModelForCausalLM.from_pretrained(folder)


def test_comparison_without_and_with_distillation(tiny_student, tiny_teacher, in_tmp):
    assert main(["llm", "--train", "--model", tiny_student, "--data-path", "./data.jsonl",
                 "--project-name", "standard-model"]) == 0
    assert main(["llm", "--train", "--model", tiny_student, "--teacher-model", tiny_teacher,
                 "--data-path", "./data.jsonl", "--project-name", "distilled-model", "--use-distillation"]) == 0
    for name in ("standard-model", "distilled-model"):
        AutoModelForCausalLM.from_pretrained(in_tmp / name)
