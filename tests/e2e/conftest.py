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
