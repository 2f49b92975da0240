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


def test_the_cpu_detection_reads_the_kernels_flags(tmp_path) -> None:
    """The real detection on the real /proc/cpuinfo agrees with its flags read here, and on written cpuinfo
    files: a flags line naming avx512_bf16 or amx_bf16 is bfloat16, a name only inside another word or another
    field is not, an unreadable file is not."""
    import os

    lines = open("/proc/cpuinfo", encoding="utf-8").read().splitlines() if os.path.exists("/proc/cpuinfo") else []
    flags = {w for line in lines if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    assert hardware.cpu_has_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})

    def cpu(text: str) -> bool:
        (tmp_path / "cpuinfo").write_text(text)
        return hardware.cpu_has_bf16(str(tmp_path / "cpuinfo"))

    head = "processor\t: 0\nmodel name\t: Some CPU\n"
    assert cpu(head + "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert cpu(head + "flags\t\t: fpu sse2 avx2 amx_tile amx_bf16 amx_int8\n")
    assert not cpu(head + "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert not cpu(head + "flags\t\t: fpu avx512_bf16x\nbugs\t\t: avx512_bf16\n")
    assert not hardware.cpu_has_bf16(str(tmp_path / "missing"))
