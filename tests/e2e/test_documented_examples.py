"""Every example of the documented page (../shared/spec/distillation-docs.txt), as written, with local model
folders where it names hub models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import other_tokenizer_student, write_jsonl
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


def test_quick_start_across_tokenizer_families(bundled_gguf, real_tokenizers, in_tmp):
    """The documented pairs cross tokenizer families (Gemma-3 from Gemma-2 or Llama): the Quick Start as written,
    with the bundled teacher as a .gguf file (SmolLM2, byte-level BPE) and a student folder with Llama 2's
    SentencePiece tokenizer: nothing added for the crossing; the run takes the cross-vocabulary path."""
    student = other_tokenizer_student(real_tokenizers["llama-spm"], in_tmp / "student")
    assert main(["llm", "--train", "--model", student, "--teacher-model", bundled_gguf,
                 "--data-path", "./prompts.jsonl", "--project-name", "distilled-model", "--use-distillation",
                 "--distill-temperature", "3.0", "--distill-max-teacher-length", "8"]) == 0
    run = json.loads((in_tmp / "distilled-model" / "run.json").read_text())
    assert run["status"] == "finished" and "across vocabularies" in run["distill_path"]
    assert run["final_metrics"]["aligned_token_share"] > 0.5
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


def test_prompt_templates(tiny_student, tiny_teacher, in_tmp, monkeypatch):
    """The documented templates reach the real sequences: the teacher wrote its answers after its template
    (inside its chat template), the student trained on its own rendering followed by exactly those answers."""
    from transformers import AutoTokenizer

    from aitraining.objective import Objective
    from aitraining.teacher.engine import Engine
    from autotrain.project import AutoTrainProject
    from autotrain.trainers.clm.params import LLMTrainingParams

    prompts_seen: list[list[int]] = []
    answers: list[list[int]] = []
    real_generate = Engine.generate

    def generate(self, prompts, **kw):
        prompts_seen.extend(prompts)
        out = real_generate(self, prompts, **kw)
        answers.extend(resp for resp, _ in out)
        return out

    rows: list[tuple[list[int], int]] = []
    real_forward = Objective.forward

    def forward(self, input_ids, attention_mask, n_prompt, teacher=None, weight=1.0, labels_are_own=False):
        for r in range(input_ids.shape[0]):
            rows.append((input_ids[r, : int(attention_mask[r].sum())].tolist(), int(n_prompt[r])))
        return real_forward(self, input_ids, attention_mask, n_prompt, teacher, weight, labels_are_own)

    monkeypatch.setattr(Engine, "generate", generate)
    monkeypatch.setattr(Objective, "forward", forward)
    params = LLMTrainingParams(
        model=tiny_student, teacher_model=tiny_teacher, data_path="./prompts.jsonl", project_name="templated",
        distill_max_teacher_length=8,
        use_distillation=True,
        teacher_prompt_template="<|system|>You are helpful.<|user|>{input}<|assistant|>",
        student_prompt_template="{input}",
    )
    AutoTrainProject(params=params, backend="local", process=True).create()
    tok = AutoTokenizer.from_pretrained(tiny_student)
    chat = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
            for c in ("<|system|>You are helpful.<|user|>PROMPT<|assistant|>", "PROMPT")]
    texts = {p["text"] for p in DOC_PROMPTS}
    teacher_views = {tok.decode(ids) for ids in prompts_seen}
    assert teacher_views == {chat[0].replace("PROMPT", t) for t in texts}
    by_prompt = {tok.decode(ids): answer for ids, answer in zip(prompts_seen, answers, strict=True)}
    assert {tok.decode(ids[:n]) for ids, n in rows} == {chat[1].replace("PROMPT", t) for t in texts}
    for ids, n in rows:
        user = next(t for t in texts if tok.decode(ids[:n]) == chat[1].replace("PROMPT", t))
        assert ids[n:] == by_prompt[chat[0].replace("PROMPT", user)]  # what the teacher wrote, token for token


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
