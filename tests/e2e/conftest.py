"""Fixtures of the end-to-end tests: small datasets written in the test, the shared real prompts, tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import PAIRS, REAL_DATA, write_jsonl


@pytest.fixture
def pairs_file(tmp_path: Path) -> str:
    return write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])


@pytest.fixture
def prompts_file(tmp_path: Path) -> str:
    return write_jsonl(tmp_path / "prompts.jsonl", [{"text": p} for p, _ in PAIRS])


@pytest.fixture
def real_data() -> Path:
    """The real prompts the repository ships (benchmarks/data)."""
    return REAL_DATA


@pytest.fixture(scope="session")
def tiny_student(tiny_model_factory) -> str:
    return tiny_model_factory(n_layers=2, seed=0)


@pytest.fixture(scope="session")
def tiny_teacher(tiny_model_factory) -> str:
    return tiny_model_factory(n_layers=3, hidden=64, seed=1)


@pytest.fixture(scope="session")
def brief_teacher(tiny_teacher, tmp_path_factory) -> str:
    """The tiny teacher fine-tuned (with this project, 40 steps) on the test pairs, whose answers are a few words
    and an end-of-sequence token: the documented examples that leave --distill-max-teacher-length at 512 then run
    as written in seconds (a random teacher writes all 512 tokens of every answer)."""
    from aitraining.cli import main

    folder = tmp_path_factory.mktemp("brief-teacher")
    data = write_jsonl(folder / "pairs.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS] * 4)
    assert main(["llm", "--train", "--model", tiny_teacher, "--data-path", data, "--project-name", str(folder / "model"),
                 "--epochs", "10", "--lr", "2e-2", "--batch-size", "8", "--mixed-precision", "no", "--seed", "0"]) == 0
    return str(folder / "model")
