"""Tests for aitraining.params.LLMTrainingParams: defaults, documented snippets, validation messages."""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import pytest

from aitraining.errors import UserError
from aitraining.params import CHAT_TEMPLATES, DIVERGENCE_KINDS, LLMTrainingParams, flag

BASE = {"model": "student-folder", "data_path": "data.jsonl"}


def make(**kw: object) -> LLMTrainingParams:
    return LLMTrainingParams(**{**BASE, **kw})


# ---------------------------------------------------------------------------------------------- defaults


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("distill_temperature", 3.0),
        ("distill_alpha", 0.7),
        ("distill_max_teacher_length", 512),
        ("teacher_prompt_template", None),
        ("student_prompt_template", "{input}"),
        ("use_distillation", False),
        ("teacher_model", None),
        ("lora_r", 16),
        ("lora_alpha", 32),
        ("lora_dropout", 0.05),
        ("target_modules", "all-linear"),
        ("trainer", "sft"),
        ("peft", False),
        ("token", None),
    ],
)
def test_documented_defaults(field: str, expected: object) -> None:
    p = make()
    assert getattr(p, field) == expected
    assert type(getattr(p, field)) is type(expected)
    # The class-level default is the same one (the CLI help prints it).
    assert LLMTrainingParams.model_fields[field].default == expected


def test_effective_teacher_template_defaults_to_input() -> None:
    assert make().effective_teacher_template == "{input}"
    assert make(teacher_prompt_template="T: {input}").effective_teacher_template == "T: {input}"


# ------------------------------------------------------------------------------------- documented snippets


def test_documented_python_api_snippet_works_as_written() -> None:
    from autotrain.project import AutoTrainProject
    from autotrain.trainers.clm.params import LLMTrainingParams as DocParams

    assert DocParams is LLMTrainingParams
    params = DocParams(
        # Student model (smaller)
        model="./student",
        # Teacher model (larger)
        teacher_model="./teacher",
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
    assert params.use_distillation is True
    assert params.teacher_model == "./teacher"
    assert (params.epochs, params.batch_size, params.lr) == (5, 4, 1e-4)
    assert params.trainer == "sft"

    project = AutoTrainProject(params=params, backend="local", process=True)
    assert project.params is params
    assert callable(project.create)  # not called: that would train


def test_auto_train_project_rejects_bad_arguments() -> None:
    from autotrain.project import AutoTrainProject

    with pytest.raises(UserError, match="backend must be one of local"):
        AutoTrainProject(params=make(), backend="spaces")
    with pytest.raises(UserError, match="LLMTrainingParams"):
        AutoTrainProject(params={"model": "x"})  # type: ignore[arg-type]


def test_documented_prompt_template_snippet() -> None:
    params = make(
        teacher_model="./teacher",
        use_distillation=True,
        teacher_prompt_template="<|system|>You are helpful.<|user|>{input}<|assistant|>",
        student_prompt_template="{input}",
    )
    assert params.effective_teacher_template == "<|system|>You are helpful.<|user|>{input}<|assistant|>"
    assert params.student_prompt_template == "{input}"


@pytest.mark.parametrize("temperature", [2.0, 3.0, 4.0])
def test_documented_temperature_snippets(temperature: float) -> None:
    assert make(distill_temperature=temperature).distill_temperature == temperature


def test_documented_training_duration_and_api_assistant_snippets() -> None:
    p = make(epochs=5, lr=1e-4)
    assert (p.epochs, p.lr) == (5, 1e-4)
    p = LLMTrainingParams(
        model="./student",
        teacher_model="./teacher",
        data_path="./api_prompts.jsonl",
        project_name="api-assistant-small",
        use_distillation=True,
        distill_temperature=3.0,
        distill_alpha=0.7,
        epochs=10,
        batch_size=8,
        lr=5e-5,
        peft=True,
        lora_r=32,
    )
    assert p.peft is True and p.lora_r == 32 and p.lora_alpha == 32
    assert p.project_name == "api-assistant-small"


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.7, 1.0])
def test_documented_alpha_values_are_accepted(alpha: float) -> None:
    assert make(distill_alpha=alpha).distill_alpha == alpha


# ---------------------------------------------------------------------------------------- trainer aliases


def test_trainer_default_is_sft() -> None:
    p = make(trainer="default")
    assert p.trainer == "sft"
    assert p.use_distillation is False


def test_trainer_distillation_turns_on_distillation() -> None:
    p = make(trainer="distillation", teacher_model="./teacher")
    assert p.use_distillation is True


def test_trainer_distillation_still_needs_a_teacher() -> None:
    with pytest.raises(UserError, match=r"--teacher-model is required with --use-distillation"):
        make(trainer="distillation")


def test_unknown_trainer_lists_choices() -> None:
    with pytest.raises(UserError) as e:
        make(trainer="ppo")
    assert str(e.value) == "--trainer must be one of 'sft', 'default' or 'distillation', got 'ppo'"


# ------------------------------------------------------------------------------------------ range checks


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("distill_alpha", 1.5, "--distill-alpha must be in [0, 1], got 1.5"),
        ("distill_alpha", -0.1, "--distill-alpha must be in [0, 1], got -0.1"),
        ("distill_temperature", 0.0, "--distill-temperature must be > 0, got 0.0"),
        ("distill_temperature", -1.0, "--distill-temperature must be > 0, got -1.0"),
        ("distill_max_teacher_length", 0, "--distill-max-teacher-length must be >= 1, got 0"),
        ("distill_beta", 0.0, "--distill-beta must be in (0, 1), got 0.0"),
        ("distill_beta", 1.0, "--distill-beta must be in (0, 1), got 1.0"),
        ("distill_top_k", 0, "--distill-top-k must be >= 1, got 0"),
        ("teacher_batch_size", 0, "--teacher-batch-size must be >= 1, got 0"),
        ("teacher_sampling_temperature", 0.0, "--teacher-sampling-temperature must be > 0, got 0.0"),
        ("teacher_top_p", 0.0, "--teacher-top-p must be in (0, 1], got 0.0"),
        ("teacher_top_p", 1.5, "--teacher-top-p must be in (0, 1], got 1.5"),
        ("epochs", 0, "--epochs must be >= 1, got 0"),
        ("batch_size", 0, "--batch-size must be >= 1, got 0"),
        ("gradient_accumulation", 0, "--gradient-accumulation must be >= 1, got 0"),
        ("lr", 0.0, "--lr must be > 0, got 0.0"),
        ("lr", -1e-4, "--lr must be > 0, got -0.0001"),
        ("warmup_ratio", 1.5, "--warmup-ratio must be in [0, 1], got 1.5"),
        ("warmup_ratio", -0.1, "--warmup-ratio must be in [0, 1], got -0.1"),
        ("weight_decay", -0.01, "--weight-decay must be >= 0, got -0.01"),
        ("max_grad_norm", -1.0, "--max-grad-norm must be >= 0, got -1.0"),
        ("block_size", 4, "--block-size must be >= 8, got 4"),
        ("loss_chunk_size", 0, "--loss-chunk-size must be >= 1, got 0"),
        ("logging_steps", 0, "--logging-steps must be >= 1, got 0"),
        ("save_total_limit", 0, "--save-total-limit must be >= 1, got 0"),
        ("max_samples", 0, "--max-samples must be >= 1, got 0"),
        ("lora_r", 0, "--lora-r must be >= 1, got 0"),
        ("lora_alpha", 0, "--lora-alpha must be >= 1, got 0"),
        ("lora_dropout", 1.0, "--lora-dropout must be in [0, 1), got 1.0"),
        ("lora_dropout", -0.5, "--lora-dropout must be in [0, 1), got -0.5"),
    ],
)
def test_out_of_range_values_name_flag_and_range(field: str, value: object, message: str) -> None:
    with pytest.raises(UserError) as e:
        make(**{field: value})
    assert str(e.value) == message
    assert flag(field) in str(e.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("distill_alpha", 0.0),
        ("distill_alpha", 1.0),
        ("warmup_ratio", 0.0),
        ("warmup_ratio", 1.0),
        ("max_grad_norm", 0.0),
        ("weight_decay", 0.0),
        ("lora_dropout", 0.0),
        ("teacher_top_p", 1.0),
        ("block_size", 8),
        ("max_samples", 1),
        ("max_samples", None),
    ],
)
def test_range_boundaries_that_are_allowed(field: str, value: object) -> None:
    assert getattr(make(**{field: value}), field) == value


@pytest.mark.parametrize("field", ["lr", "distill_alpha", "distill_temperature", "warmup_ratio", "teacher_top_p"])
def test_nan_is_rejected(field: str) -> None:
    with pytest.raises(UserError, match=f"^{flag(field)} must be"):
        make(**{field: float("nan")})


@pytest.mark.parametrize("field", ["lr", "distill_temperature", "teacher_sampling_temperature"])
def test_infinite_values_are_rejected(field: str) -> None:
    with pytest.raises(UserError, match=f"^{flag(field)}"):
        make(**{field: math.inf})


# ------------------------------------------------------------------------------------------ choices


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("optimizer", "adam8bit"),
        ("scheduler", "polynomial"),
        ("mixed_precision", "fp8"),
        ("log", "mlflow"),
        ("distill_loss", "kl"),
    ],
)
def test_literal_fields_list_their_choices(field: str, value: str) -> None:
    with pytest.raises(UserError) as e:
        make(**{field: value})
    msg = str(e.value)
    assert msg.startswith(f"{flag(field)} must be one of ")
    assert msg.endswith(f"got '{value}'")


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_every_divergence_kind_is_accepted(kind: str) -> None:
    assert make(distill_loss=kind).distill_loss == kind


@pytest.mark.parametrize("choice", CHAT_TEMPLATES)
def test_chat_template_choices_accepted(choice: str) -> None:
    assert make(chat_template=choice).chat_template == choice


def test_unknown_chat_template_is_rejected() -> None:
    with pytest.raises(UserError) as e:
        make(chat_template="llama3")
    assert str(e.value) == "--chat-template must be one of auto, tokenizer, none, chatml, zephyr, got 'llama3'"


# ------------------------------------------------------------------------------------ required / coupled


def test_model_is_required() -> None:
    with pytest.raises(UserError, match=r"^--model is required"):
        LLMTrainingParams(data_path="d.jsonl")


def test_data_path_is_required() -> None:
    with pytest.raises(UserError, match=r"^--data-path is required"):
        LLMTrainingParams(model="m")


@pytest.mark.parametrize("name", ["", "   "])
def test_project_name_must_not_be_empty(name: str) -> None:
    with pytest.raises(UserError, match=r"^--project-name must not be empty"):
        make(project_name=name)


def test_use_distillation_without_teacher_model() -> None:
    with pytest.raises(UserError) as e:
        make(use_distillation=True)
    assert str(e.value).startswith("--teacher-model is required with --use-distillation")


def test_teacher_without_use_distillation_warns() -> None:
    with pytest.warns(UserWarning, match="--use-distillation"):
        p = make(teacher_model="./teacher")
    assert p.use_distillation is False


def test_plain_params_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make()
        make(use_distillation=True, teacher_model="./teacher")


@pytest.mark.parametrize("field", ["student_prompt_template", "teacher_prompt_template"])
@pytest.mark.parametrize("template", ["Q: {prompt}", "{}", "no placeholder", "{ input }", "{INPUT}"])
def test_template_without_input_placeholder(field: str, template: str) -> None:
    with pytest.raises(UserError) as e:
        make(**{field: template})
    assert str(e.value) == f"{flag(field)} must contain the placeholder {{input}}, got '{template}'"


@pytest.mark.parametrize("template", ["{input}", "Q: {input}\nA:", "{input} {input}", "x{input}{0}{}"])
def test_templates_with_input_are_accepted(template: str) -> None:
    p = make(student_prompt_template=template, teacher_prompt_template=template)
    assert p.student_prompt_template == template
    assert p.teacher_prompt_template == template


# ---------------------------------------------------------------------------------- unknown field / types


def test_unknown_field_is_named_with_its_flag() -> None:
    with pytest.raises(UserError) as e:
        make(distil_alpha=0.5)
    assert str(e.value) == (
        "unknown parameter 'distil_alpha' (--distil-alpha): see `aitraining llm --help` for the valid ones"
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", "many"),
        ("epochs", 1.5),
        ("epochs", [1]),
        ("batch_size", "four"),
        ("distill_alpha", "high"),
        ("distill_temperature", "warm"),
        ("lr", "fast"),
        ("peft", "maybe"),
        ("use_distillation", "perhaps"),
        ("lora_r", 2.5),
        ("max_samples", "all"),
        ("model", 5),
        ("student_prompt_template", 3),
    ],
)
def test_wrong_type_names_the_flag(field: str, value: object) -> None:
    with pytest.raises(UserError) as e:
        LLMTrainingParams(**{**BASE, field: value})
    msg = str(e.value)
    assert msg.startswith(flag(field)), msg
    assert repr(value) in msg
    assert "\n" not in msg


def test_numeric_strings_are_coerced() -> None:
    """YAML reads `1e-4` as a string; the params still accept it as a number."""
    p = make(lr="1e-4", epochs="3", distill_alpha="0.5")
    assert (p.lr, p.epochs, p.distill_alpha) == (1e-4, 3, 0.5)


def test_user_error_is_not_a_pydantic_error() -> None:
    from pydantic import ValidationError

    with pytest.raises(UserError) as e:
        make(distill_alpha=2)
    assert not isinstance(e.value, ValidationError)
    assert e.value.__cause__ is None
    assert e.value.exit_code == 2


def test_template_error_message_is_one_line() -> None:
    with pytest.raises(UserError) as e:
        make(student_prompt_template="Question: {prompt}\nAnswer:")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ serialisation


def saved_json(p: LLMTrainingParams) -> Path:
    """training_params.json, as the project folder of a run with these parameters writes it when it opens."""
    from aitraining.runfolder import PARAMS_FILE, RunFolder
    from aitraining.train import folder_settings

    logger = logging.getLogger("aitraining")
    handlers, level = list(logger.handlers), logger.level
    folder = RunFolder(folder_settings(p))
    try:
        folder.open()
    finally:
        folder.release()
        for h in list(logger.handlers):
            if h not in handlers:  # the folder's train.log
                logger.removeHandler(h)
                h.close()
        logger.setLevel(level)
    return Path(folder.file(PARAMS_FILE))


def test_token_never_in_public_dict_or_saved_json(tmp_path) -> None:
    secret = "hf_SECRETtoken123"
    p = make(token=secret, project_name=str(tmp_path / "project"))
    assert p.token == secret
    public = p.public_dict()
    assert "token" not in public
    assert secret not in json.dumps(public)
    path = saved_json(p)
    text = path.read_text(encoding="utf-8")
    assert secret not in text
    saved = json.loads(text)
    assert "token" not in saved
    assert saved["distill_alpha"] == 0.7
    assert set(saved) == set(LLMTrainingParams.model_fields) - {"token"}


def test_saved_json_round_trips(tmp_path) -> None:
    p = make(use_distillation=True, teacher_model="./t", distill_alpha=0.3, peft=True,
             project_name=str(tmp_path / "project"))
    path = saved_json(p)
    again = LLMTrainingParams(**json.loads(path.read_text(encoding="utf-8")))
    assert again.public_dict() == p.public_dict()


def test_run_identity_ignores_invocation_fields() -> None:
    a = make(token="t1", overwrite=False, log="none")
    b = make(token="t2", overwrite=True, resume_from_checkpoint="latest", log="tensorboard")
    assert a.run_identity() == b.run_identity()
    assert "token" not in a.run_identity()
    assert make(lr=1e-3).run_identity() != a.run_identity()


@pytest.mark.parametrize("field", sorted(LLMTrainingParams.model_fields))
def test_every_field_is_documented_and_grouped(field: str) -> None:
    info = LLMTrainingParams.model_fields[field]
    assert info.description
    assert isinstance(info.json_schema_extra, dict)
    assert info.json_schema_extra["group"] in ("Model", "Data", "Training", "LoRA", "Distillation")


def test_flag_spelling() -> None:
    assert flag("distill_alpha") == "--distill-alpha"
    assert flag("lr") == "--lr"


def test_a_server_teacher_distills_at_t1_unless_a_temperature_is_given(tiny_model_factory, caplog) -> None:
    """A server gives its top-k and only the mass of the rest: with --teacher-source server and no temperature the
    run uses T = 1; a temperature given is kept, with the measured warning; other sources keep the documented 3.0."""
    from transformers import AutoModelForCausalLM

    from aitraining.train import _advise

    server = dict(model="m", data_path="d", teacher_model="t", use_distillation=True, teacher_source="server",
                  teacher_url="http://127.0.0.1:9/v1")
    assert LLMTrainingParams(**server).distill_temperature == 1.0
    assert LLMTrainingParams(**server, distill_temperature=3.0).distill_temperature == 3.0
    assert LLMTrainingParams(model="m", data_path="d", teacher_model="t", use_distillation=True).distill_temperature == 3.0
    teacher = tiny_model_factory(n_layers=1, seed=5)
    student = AutoModelForCausalLM.from_pretrained(tiny_model_factory(n_layers=1, seed=6))
    caplog.set_level("WARNING", logger="aitraining")
    _advise(LLMTrainingParams(**{**server, "teacher_model": teacher}, distill_temperature=3.0), student)
    assert "--distill-temperature 3 with a server teacher" in caplog.text and "outside the recommended" not in caplog.text
    caplog.clear()
    _advise(LLMTrainingParams(**{**server, "teacher_model": teacher}), student)
    assert "server teacher" not in caplog.text and "outside the recommended" not in caplog.text
