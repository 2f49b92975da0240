"""The machine a run trains on: its precision and the Accelerate state of the process."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 matmuls natively (AVX512-BF16 or AMX): the kernel's `flags` lines of
    `cpuinfo` name avx512_bf16 or amx_bf16. False where the file cannot be read (not Linux)."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    flags = {word for line in lines if line.split(":")[0].strip() == "flags" for word in line.split(":", 1)[1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_mixed_precision(choice: str | None) -> str:
    """The precision a run uses: the user's choice, else bfloat16 where the hardware has it.

    bfloat16 autocast is the faster choice on CPUs with native bfloat16 matmuls at the same held-out quality
    (benchmarks/utilization.py; figures in BENCHMARKS.md). `--mixed-precision no` keeps float32 everywhere.
    """
    if choice is not None:
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_bf16() else "no"


def accelerator(mixed_precision: str, log: str, project_dir: str) -> Any:
    """The run's Accelerator. accelerate keeps its state per process; a second run in the same process (the Python
    API, tests) may ask for another precision. The process group (PartialState) is kept."""
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(),
                       log_with=None if log == "none" else log, project_dir=project_dir)
