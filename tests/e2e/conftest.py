"""Helpers of the end-to-end tests: small datasets written in the test, the shared real prompts, and
a way to compare two trained models weight by weight."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

PAIRS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Add 2 and 3.", "2 + 3 = 5."),
    ("Name a primary color.", " Red is a primary color."),
    ("Translate 'thank you' to Spanish.", "Gracias."),
    ("Give a synonym of happy.", "Joyful."),
    ("Is the sun a star?", "Yes, the sun is a star at the centre of our solar system."),
    ("Write a haiku about rain.", "Soft rain on the roof\nwhispers to the sleeping town\nuntil the dawn comes."),
    ("What does CPU stand for?", "Central processing unit."),
]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture
def pairs_file(tmp_path: Path) -> str:
    return write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])


@pytest.fixture
def prompts_file(tmp_path: Path) -> str:
    return write_jsonl(tmp_path / "prompts.jsonl", [{"text": p} for p, _ in PAIRS])


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the shared real prompts are not beside this clone ({SHARED_DATA} is absent)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_student(tiny_model_factory) -> str:
    return tiny_model_factory(n_layers=2, seed=0)


@pytest.fixture(scope="session")
def tiny_teacher(tiny_model_factory) -> str:
    return tiny_model_factory(n_layers=3, hidden=64, seed=1)


def weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "model.safetensors"))


def assert_same_weights(a: str, b: str, atol: float = 1e-6) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def max_weight_change(a: str, b: str) -> float:
    wa, wb = weights(a), weights(b)
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)
