"""The precision a run picks: the user's choice, else bfloat16 where the hardware computes it natively."""

from __future__ import annotations

import pytest

import aitraining.hardware as hardware


@pytest.mark.parametrize("choice", ["no", "bf16", "fp16"])
def test_an_explicit_choice_is_kept(choice: str) -> None:
    assert hardware.resolve_mixed_precision(choice) == choice


@pytest.mark.parametrize("has_bf16, expected", [(True, "bf16"), (False, "no")])
def test_default_follows_the_cpu(monkeypatch: pytest.MonkeyPatch, has_bf16: bool, expected: str) -> None:
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: has_bf16)
    assert hardware.resolve_mixed_precision(None) == expected


def test_the_resolved_precision_is_what_the_project_records(tiny_model_factory, tmp_path, monkeypatch) -> None:
    import json

    from aitraining.cli import main

    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: True)
    student = tiny_model_factory(n_layers=1, seed=3)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "response": "Hello."}) + "\n")
    assert main(["llm", "--train", "--model", student, "--data-path", str(data), "--project-name",
                 str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "training_params.json").read_text())["mixed_precision"] == "bf16"
