"""LLMTrainingParams: every setting of a run, validated once.

The field names and defaults are the documented interface (`aitraining llm --train --<field-with-dashes>`
and the Python API). The CLI builds its flags from these fields, so a field added here is a flag too.
Errors name the flag a user typed (`--distill-alpha must be in [0, 1], got 1.5`), whichever front end
was used, because the CLI and the Python API share this one object.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aitraining.errors import UserError

DIVERGENCE_KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")
CHAT_TEMPLATES = ("auto", "tokenizer", "none", "chatml", "zephyr")

# Keys of the parameter JSON that never reach disk (secrets) and those that only steer *this* invocation
# (they do not make a run "different" when the project folder is reused). --skip-bad-rows is one: a run without
# it either fails on a bad row or trains on the very rows it would keep.
SECRET_FIELDS = frozenset({"token"})
INVOCATION_FIELDS = frozenset({"resume_from_checkpoint", "overwrite", "token", "log", "eval_steps", "eval_max_rows",
                               "compare_baseline", "skip_bad_rows",
                               "allow_pickle_weights",
                               # where the teacher is served and how it is asked: the same teacher on another port
                               # is the same run (its cache is keyed by the served model and the tokenizer)
                               "teacher_url", "teacher_api_key_env", "teacher_concurrency", "teacher_timeout"})


T = TypeVar("T")


def digest(obj: Any, length: int = 24) -> str:
    """A short stable fingerprint of a JSON-able object (run identities, cache keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:length]


def flag(field: str) -> str:
    """The CLI spelling of a field: `distill_alpha` -> `--distill-alpha`."""
    return "--" + field.replace("_", "-")


def _f(default: Any, group: str, help: str, **kw: Any) -> Any:
    return Field(default, description=help, json_schema_extra={"group": group}, **kw)


class LLMTrainingParams(BaseModel):
    """All settings of a fine-tuning or distillation run (see `aitraining llm --help`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False, protected_namespaces=())

    # Model and project
    model: str | None = _f(None, "Model", "Student model: a local folder, a .gguf file or a hub id")
    project_name: str = _f("project-name", "Model", "Output folder (a path, relative to the current directory)")
    overwrite: bool = _f(False, "Model", "Allow replacing a different finished run in --project-name")
    trust_remote_code: bool = _f(False, "Model", "Run model code from the model repository (off by default)")
    token: str | None = _f(None, "Model", "Hub token (never written to disk)")
    allow_pickle_weights: bool = _f(
        False, "Model", "Load models whose weights are pickled (.bin, .pt), which can run code while they load; "
        "without it only safetensors and GGUF weights are read")

    # Data
    data_path: str | None = _f(None, "Data", "A .jsonl/.json/.csv/.parquet file, a folder of split files, or a datasets folder")
    train_split: str = _f("train", "Data", "Name of the training split (file stem inside a data folder)")
    valid_split: str | None = _f(None, "Data", "Name of the validation split, if any")
    holdout_share: float = _f(
        0.05, "Data",
        "Without --valid-split: share of the rows held out (drawn with --seed) to evaluate on; 0 trains on every "
        "row. Data of fewer than 20 rows is never split", ge=0.0, lt=1.0, allow_inf_nan=False,
    )
    text_column: str = _f("text", "Data", "Column of plain text rows (distillation: the prompt)")
    prompt_text_column: str = _f("prompt", "Data", "Column of prompts in prompt/response rows")
    response_column: str = _f("response", "Data", "Column of responses in prompt/response rows")
    max_samples: int | None = _f(None, "Data", "Use at most this many training rows", ge=1)
    skip_bad_rows: bool = _f(
        False, "Data", "Leave out rows that cannot be used (not JSON, wrong types, missing columns) instead of "
        "stopping; they are counted on the console and listed in skipped_rows.jsonl in the project folder",
    )
    block_size: int = _f(1024, "Data", "Maximum tokens of one student sequence (prompt + response)", ge=8)
    chat_template: str | None = _f(
        None,
        "Data",
        "Chat template: auto (the model's own, if any), tokenizer (require the model's), none (raw text), "
        "chatml, zephyr",
    )
    add_eos_token: bool = _f(True, "Data", "End every response with EOS so the model learns to stop")

    # Training
    trainer: Literal["sft", "default", "distillation"] = _f(
        "sft", "Training", "sft (default is an alias); distillation = sft with --use-distillation"
    )
    epochs: int = _f(1, "Training", "Number of passes over the training data", ge=1)
    batch_size: int = _f(2, "Training", "Rows per device per step", ge=1)
    lr: float = _f(3e-5, "Training", "Peak learning rate", gt=0.0, allow_inf_nan=False)
    warmup_ratio: float = _f(0.1, "Training", "Share of steps used for linear warmup", ge=0.0, le=1.0, allow_inf_nan=False)
    gradient_accumulation: int = _f(1, "Training", "Micro-batches per optimizer step", ge=1)
    optimizer: Literal["adamw_torch", "adamw", "sgd"] = _f("adamw_torch", "Training", "Optimizer")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts"] = _f(
        "linear", "Training", "Learning-rate schedule (after warmup)"
    )
    weight_decay: float = _f(0.0, "Training", "AdamW weight decay", ge=0.0, allow_inf_nan=False)
    max_grad_norm: float = _f(1.0, "Training", "Gradient clipping norm (0 disables clipping)", ge=0.0, allow_inf_nan=False)
    seed: int = _f(42, "Training", "Random seed (data order, dropout, initialisation)")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = _f(
        None, "Training", "Mixed precision: no, fp16, bf16 (default: bf16 where the GPU or CPU has it, else no)"
    )
    loss_chunk_size: int | None = _f(
        None, "Training", "Positions per chunk of the loss over the vocabulary (default: about 12 MiB of float32 logits, 64-1024 rows)", ge=1
    )
    logging_steps: int = _f(10, "Training", "Log metrics every N optimizer steps", ge=1)
    save_total_limit: int = _f(1, "Training", "Keep at most N checkpoints in the project folder", ge=1)
    resume_from_checkpoint: str | None = _f(
        None, "Training", "Resume from a checkpoint folder, or 'latest' for the newest one in the project"
    )
    eval_steps: int | None = _f(
        None, "Training", "Also evaluate on the held-out rows every N optimizer steps (always: before training and "
        "after each epoch)", ge=1,
    )
    eval_max_rows: int = _f(64, "Training", "Held-out rows evaluated during training (all of them after training)",
                            ge=1)
    compare_baseline: bool = _f(
        False, "Training",
        "With --use-distillation: also train the same student without distillation on the teacher's answers (same "
        "data, budget and seed) and compare student, baseline and teacher on the held-out rows (comparison.json)",
    )
    log: Literal["none", "tensorboard", "wandb"] = _f("none", "Training", "Experiment tracker besides metrics.jsonl")

    # LoRA
    peft: bool = _f(False, "LoRA", "Train a LoRA adapter instead of all weights")
    lora_r: int = _f(16, "LoRA", "LoRA rank", ge=1)
    lora_alpha: int = _f(32, "LoRA", "LoRA scaling alpha", ge=1)
    lora_dropout: float = _f(0.05, "LoRA", "LoRA dropout", ge=0.0, lt=1.0, allow_inf_nan=False)
    target_modules: str = _f("all-linear", "LoRA", "Modules to adapt: all-linear or a comma list (q_proj,v_proj)")
    merge_adapter: bool = _f(False, "LoRA", "Also save the adapter merged into the base model")

    # Distillation
    use_distillation: bool = _f(False, "Distillation", "Enable distillation from --teacher-model")
    teacher_model: str | None = _f(None, "Distillation", "Teacher: a local folder, a .gguf file or a hub id")
    distill_temperature: float = _f(3.0, "Distillation", "Softmax temperature (2.0-4.0 recommended; 1.0 with --teacher-source server unless given)", gt=0.0, allow_inf_nan=False)
    distill_alpha: float = _f(0.7, "Distillation", "Weight of the distillation loss (1 - alpha on the label loss)", ge=0.0, le=1.0, allow_inf_nan=False)
    distill_max_teacher_length: int = _f(512, "Distillation", "Max response tokens the teacher writes and scores", ge=1)
    teacher_prompt_template: str | None = _f(None, "Distillation", "Template of teacher prompts; {input} = prompt")
    student_prompt_template: str = _f("{input}", "Distillation", "Template of student prompts; {input} = prompt")
    distill_loss: Literal[DIVERGENCE_KINDS] = _f(  # type: ignore[valid-type]
        "forward_kl", "Distillation", "Divergence: forward_kl, reverse_kl, jsd, skew_kl, skew_reverse_kl, tvd"
    )
    distill_beta: float = _f(0.5, "Distillation", "Mixing weight of jsd and skew losses (skew: 0.1 is typical)", gt=0.0, lt=1.0, allow_inf_nan=False)
    distill_top_k: int = _f(32, "Distillation", "Teacher's most likely tokens cached per position, with their log-probs", ge=1)
    distill_tail_samples: int = _f(
        112, "Distillation",
        "Teacher tokens sampled per position from the rest of its tempered distribution (0-255; 0: the rest is "
        "one bucket)", ge=0, le=255
    )
    teacher_source: Literal["cache", "live", "server"] = _f(
        "cache", "Distillation",
        "cache: the teacher runs once and its targets are stored; live: it stays loaded and gives its exact "
        "full distribution at every step (slower, more memory); server: the teacher is served elsewhere "
        "(--teacher-url; vLLM, SGLang, llama.cpp) and its top-k log-probs are stored like the cache's "
        "(--teacher-model then names its tokenizer)",
    )
    teacher_url: str | None = _f(
        None, "Distillation", "With --teacher-source server: the OpenAI-compatible server, e.g. http://host:8000/v1",
    )
    teacher_api_key_env: str | None = _f(
        None, "Distillation",
        "With --teacher-source server: the environment variable holding the server's API key (the key itself is "
        "never written anywhere)",
    )
    teacher_concurrency: int = _f(8, "Distillation", "With --teacher-source server: requests in flight at once", ge=1)
    teacher_timeout: float = _f(
        120.0, "Distillation", "With --teacher-source server: seconds one request may take before it is retried",
        gt=0.0, allow_inf_nan=False,
    )
    distill_on_policy: float = _f(
        0.0, "Distillation",
        "Share of the steps on which the student writes its own answers and the teacher, kept loaded, scores them "
        "(on-policy distillation; 0: off, 0.5: every other step on average; slower, more memory)",
        ge=0.0, le=1.0, allow_inf_nan=False,
    )
    distill_mode: Literal["logits", "sequence"] = _f(
        "logits", "Distillation",
        "logits: learn the teacher's distribution at every answer token (across tokenizers too: on the tokens "
        "both vocabularies share); sequence: learn the teacher's answers as text only",
    )
    teacher_batch_size: int = _f(8, "Distillation", "Prompts per teacher generation / scoring batch", ge=1)
    teacher_do_sample: bool = _f(False, "Distillation", "Sample teacher responses instead of greedy decoding")
    teacher_sampling_temperature: float = _f(0.7, "Distillation", "Sampling temperature of teacher responses", gt=0.0, allow_inf_nan=False)
    teacher_top_p: float = _f(0.95, "Distillation", "Nucleus sampling of teacher responses", gt=0.0, le=1.0, allow_inf_nan=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise UserError(_describe(e)) from None

    @model_validator(mode="after")
    def _check(self) -> LLMTrainingParams:
        if self.trainer == "default":
            self.trainer = "sft"
        if self.trainer == "distillation":
            self.use_distillation = True
        if not self.model:
            raise UserError("--model is required: pass a local model folder, a .gguf file or a hub id")
        if not self.data_path:
            raise UserError("--data-path is required: pass a .jsonl/.json/.csv/.parquet file or a data folder")
        if not self.project_name or not self.project_name.strip():
            raise UserError("--project-name must not be empty")
        if self.chat_template is not None and self.chat_template not in CHAT_TEMPLATES:
            raise UserError(f"--chat-template must be one of {', '.join(CHAT_TEMPLATES)}, got {self.chat_template!r}")
        for name in ("student_prompt_template", "teacher_prompt_template"):
            value = getattr(self, name)
            if value is not None and "{input}" not in value:
                raise UserError(f"{flag(name)} must contain the placeholder {{input}}, got {value!r}")
        if self.use_distillation and not self.teacher_model:
            raise UserError("--teacher-model is required with --use-distillation: pass the teacher's folder, .gguf or hub id")
        if self.compare_baseline and not self.use_distillation:
            raise UserError("--compare-baseline compares a distilled student with one trained without distillation; "
                            "add --use-distillation and --teacher-model")
        if self.compare_baseline and self.distill_mode == "sequence":
            raise UserError("--compare-baseline: with --distill-mode sequence the student learns the teacher's text only, "
                            "which is what the baseline does; use --distill-mode logits")
        if self.distill_on_policy > 0 and not self.use_distillation:
            raise UserError("--distill-on-policy needs a teacher to score the student's answers; add --use-distillation "
                            "and --teacher-model")
        if self.distill_on_policy > 0 and self.distill_mode == "sequence":
            raise UserError("--distill-on-policy: with --distill-mode sequence there are no teacher logits to score the "
                            "student's own answers with; use --distill-mode logits")
        if self.distill_on_policy > 0 and self.distill_alpha == 0:
            raise UserError("--distill-on-policy trains the distillation term on the student's own answers, and "
                            "--distill-alpha 0 gives it no weight; raise --distill-alpha or drop --distill-on-policy")
        if not self.target_modules.strip():
            raise UserError("--target-modules must not be empty: use all-linear or a comma list such as q_proj,v_proj")
        if self.teacher_source == "server" and not self.teacher_url:
            raise UserError("--teacher-source server needs --teacher-url: the OpenAI-compatible server, e.g. "
                            "http://localhost:8000/v1")
        if self.teacher_url and self.teacher_source != "server":
            raise UserError("--teacher-url is only read with --teacher-source server; add it, or drop --teacher-url")
        if self.teacher_source == "server" and "distill_temperature" not in self.model_fields_set:
            # A server gives its top-k at T = 1 and only the mass of the rest, not its tempered mass: at the
            # documented T = 3 the student learned less than without distillation (BENCHMARKS.md, "The teacher
            # behind a server"), at T = 1 close to the in-process cache. A temperature given is kept (with a warning).
            self.distill_temperature = 1.0
        if self.teacher_source == "server" and self.distill_on_policy > 0:
            raise UserError("--distill-on-policy needs the teacher's exact distribution on the student's own answers, "
                            "which a server's top-k does not give; drop one of --distill-on-policy and "
                            "--teacher-source server")
        if self.teacher_model and not self.use_distillation:
            warnings.warn(
                "--teacher-model is set but --use-distillation is not: the teacher is ignored (add --use-distillation)",
                stacklevel=2,
            )
        return self

    # Serialisation --------------------------------------------------------------------------------------

    def public_dict(self) -> dict[str, Any]:
        """The parameters as written to the project folder: never the token."""
        return {k: v for k, v in self.model_dump().items() if k not in SECRET_FIELDS}

    def run_identity(self) -> dict[str, Any]:
        """The fields that make two runs the same run (what a reused project folder is compared on)."""
        return {k: v for k, v in self.model_dump().items() if k not in INVOCATION_FIELDS}

    def identity(self) -> str:
        """The run's identity: a digest of `run_identity`, what run.json and checkpoints record."""
        return digest(self.run_identity(), 16)

    def settings(self, cls: type[T], **given: Any) -> T:
        """A stage's settings: a dataclass whose fields are named as the parameters they hold (`given` sets those
        that are no parameter), so that a stage receives what it reads and never the whole parameters object."""
        names = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in given]  # type: ignore[arg-type]
        unknown = [n for n in names if n not in type(self).model_fields]
        if unknown:
            raise TypeError(f"{cls.__name__}: {', '.join(unknown)} are no parameters; pass them as keywords")
        return cls(**{n: getattr(self, n) for n in names}, **given)

    @property
    def effective_teacher_template(self) -> str:
        return self.teacher_prompt_template if self.teacher_prompt_template is not None else "{input}"


_BOUND_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"})


def _bounds_message(name: str, value: Any) -> str:
    """'--x must be >= 1, got 0' / 'must be in (0, 1], got 1.5' from the field's pydantic bounds."""
    low = high = None
    low_open = high_open = False
    for m in LLMTrainingParams.model_fields[name].metadata:
        if getattr(m, "ge", None) is not None:
            low = m.ge
        elif getattr(m, "gt", None) is not None:
            low, low_open = m.gt, True
        elif getattr(m, "le", None) is not None:
            high = m.le
        elif getattr(m, "lt", None) is not None:
            high, high_open = m.lt, True
    if isinstance(value, float) and not math.isfinite(value):
        return f"{flag(name)} must be a finite number, got {value}"
    if high is None:
        return f"{flag(name)} must be {'>' if low_open else '>='} {low:g}, got {value}"
    return f"{flag(name)} must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}, got {value}"


def _describe(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = err.get("loc") or ()
    name = str(loc[0]) if loc else ""
    if err.get("type") in _BOUND_ERRORS and name in LLMTrainingParams.model_fields:
        return _bounds_message(name, err.get("input"))
    if err.get("type") == "extra_forbidden":
        return f"unknown parameter '{name}' ({flag(name)}): see `aitraining llm --help` for the valid ones"
    value = err.get("input")
    msg = err.get("msg", "is invalid")
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        return f"{flag(name)} must be one of {ctx['expected']}, got {value!r}"
    return f"{flag(name)}: {msg}, got {value!r}"
