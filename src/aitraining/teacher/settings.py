"""What the teacher reads of a run's settings: the teacher flags, named as the parameters they come from."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TeacherSettings:
    """The teacher, how it answers prompt-only rows and what of its distribution is kept (the defaults are the
    documented ones; `LLMTrainingParams.settings(TeacherSettings)` gives a run's)."""

    teacher_model: str
    teacher_source: str = "cache"
    distill_mode: str = "logits"
    distill_on_policy: float = 0.0
    distill_top_k: int = 32
    distill_tail_samples: int = 112
    distill_temperature: float = 3.0
    distill_max_teacher_length: int = 512
    teacher_batch_size: int = 8
    teacher_do_sample: bool = False
    teacher_sampling_temperature: float = 0.7
    teacher_top_p: float = 0.95
    seed: int = 42
    teacher_prompt_template: str | None = None
    chat_template: str | None = None
    add_eos_token: bool = True
    mixed_precision: str | None = None
    trust_remote_code: bool = False
    token: str | None = None
    allow_pickle_weights: bool = False
    teacher_url: str | None = None
    teacher_api_key_env: str | None = None
    teacher_concurrency: int = 8
    teacher_timeout: float = 120.0

    @property
    def prompt_template(self) -> str:
        return self.teacher_prompt_template if self.teacher_prompt_template is not None else "{input}"


def teacher_dtype(device: torch.device, mixed_precision: str | None = None) -> torch.dtype:
    """bfloat16 where the hardware has it (a GPU with bf16, or a CPU run that asked for bf16), else float32.

    The teacher only runs forward, so bfloat16 costs it no optimizer precision; its log-probabilities are
    taken in float32 from the bfloat16 logits.
    """
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if mixed_precision == "bf16":
        return torch.bfloat16
    return torch.float32
