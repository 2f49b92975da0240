"""AutoTrainProject: the documented Python entry point. It runs the same function as the CLI."""

from __future__ import annotations

from aitraining.errors import UserError
from aitraining.params import LLMTrainingParams
from aitraining.train import run


class AutoTrainProject:
    """`AutoTrainProject(params=params, backend="local", process=True).create()` runs the job in this
    process and returns the project folder (an absolute path)."""

    BACKENDS = ("local",)

    def __init__(self, params: LLMTrainingParams, backend: str = "local", process: bool = True) -> None:
        if not isinstance(params, LLMTrainingParams):
            raise UserError("AutoTrainProject(params=...) needs an LLMTrainingParams")
        if backend not in self.BACKENDS:
            raise UserError(f"backend must be one of {', '.join(self.BACKENDS)}, got '{backend}'")
        self.params = params
        self.backend = backend
        self.process = process

    def create(self) -> str:
        return run(self.params)
