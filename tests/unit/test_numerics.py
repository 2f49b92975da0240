"""Numerics at the edges: no NaN or inf reaches the weights.

A teacher with -inf logits (masked or padded vocabulary rows), peaked rows that a bfloat16 teacher writes near its
range, temperatures from 0.05 to 20, every divergence, the cached (sparse) and the live (dense) teacher, a student
whose logits are huge: the loss and every gradient stay finite. A teacher whose logits are not finite at all (+inf,
NaN: a bfloat16 overflow) is refused with a message, never cached.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from aitraining.chunked import LinearHead, chunked_token_loss_sums
from aitraining.params import DIVERGENCE_KINDS
from aitraining.signal import DenseTargets, teacher_targets_from_logits

V, H, N = 96, 16, 12


def hostile_teacher_logits(seed: int) -> torch.Tensor:
    """(N, V) teacher logits: the last 8 ids masked (-inf) everywhere, row 0 one-hot-like (a gap of 2e4, what a
    bfloat16 teacher writes at the edge of its precision), row 1 flat, row 2 with only two finite entries."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g) * 4
    z[:, -8:] = -math.inf
    z[0] = -1e4
    z[0, 3] = 1e4
    z[1, : V - 8] = 0.0
    z[2] = -math.inf
    z[2, 5], z[2, 9] = 2.0, -1.0
    return z.to(torch.bfloat16).float()


def student(seed: int, scale: float) -> tuple[torch.Tensor, LinearHead, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * scale).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * scale).requires_grad_(True)
    labels = torch.randint(0, V - 8, (N,), generator=g)
    return hidden, LinearHead(weight), labels


@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
@pytest.mark.parametrize(("temperature", "scale"), [(0.05, 30.0), (1.0, 1.0), (3.0, 1.0), (20.0, 30.0)])
@pytest.mark.parametrize("source", ["cache", "live"])
def test_the_loss_and_its_gradients_stay_finite(kind: str, temperature: float, source: str, scale: float) -> None:
    """scale 30: student logits in the thousands, at the temperatures that sharpen (0.05) and flatten (20) most."""
    z = hostile_teacher_logits(0)
    hidden, head, labels = student(1, scale)
    if source == "cache":
        teacher = teacher_targets_from_logits(z, 4, samples=8, tau=temperature, offsets=torch.full((N,), 0.37))
    else:  # a live teacher whose head writes z: one-hot hidden states, head weight z^T (-inf as the lowest float)
        teacher = DenseTargets(torch.eye(N), LinearHead(z.T.contiguous().nan_to_num(neginf=-3e38)), V)
    loss, kd, ce = chunked_token_loss_sums(hidden, head, labels, teacher, chunk_size=5, temperature=temperature,
                                           alpha=0.7, kind=kind, beta=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(kd) and torch.isfinite(ce), (loss, kd, ce)
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize("bad", [math.inf, math.nan, "every entry -inf"])
def test_a_teacher_whose_logits_are_not_finite_is_refused(bad: float | str) -> None:
    z = hostile_teacher_logits(0)
    if isinstance(bad, str):
        z[4] = -math.inf
    else:
        z[4, 7] = bad
    with pytest.raises(ValueError, match=r"teacher logits are not finite at 1 of 12 positions"):
        teacher_targets_from_logits(z, 4, samples=8)


def test_a_teacher_that_overflows_stops_the_run_before_anything_is_cached(tiny_model_factory, tmp_path, capsys) -> None:
    """End to end: a teacher whose output head holds an inf (what a bfloat16 overflow leaves) is refused with one
    line, exit 2, and no target of it reaches the cache."""
    from safetensors.torch import load_file, save_file

    from aitraining.cli import main

    teacher = tiny_model_factory(n_layers=2, seed=5, path=tmp_path / "teacher")
    student = tiny_model_factory(n_layers=1, seed=6, path=tmp_path / "student")
    weights = load_file(str(tmp_path / "teacher" / "model.safetensors"))
    name = next(n for n in weights if n.endswith("embed_tokens.weight"))  # tied: the output head too
    weights[name][17, 0] = math.inf
    save_file(weights, str(tmp_path / "teacher" / "model.safetensors"), metadata={"format": "pt"})
    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"text": "Say {i}."}}\n' for i in range(4)))
    capsys.readouterr()
    rc = main(["llm", "--train", "--model", student, "--teacher-model", teacher, "--data-path", str(data), "--project-name",
               str(tmp_path / "p"), "--use-distillation", "--distill-max-teacher-length", "4", "--mixed-precision", "no"])
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("aitraining: error:")]
    assert rc == 2 and len(said) == 1 and "Traceback" not in err, err
    assert "--teacher-model: teacher logits are not finite at 4 of 4 positions" in said[0]
    assert "computed in float32; its weights hold values that are not finite" in said[0]
    cached = list((tmp_path / "p").rglob("targets.bin"))
    assert all(p.stat().st_size == 0 for p in cached)


def test_empty_and_overlong_responses_train_to_finite_weights(tiny_model_factory, tmp_path) -> None:
    """Responses that are empty or longer than --block-size, fine-tuned and distilled at T = 0.05 and 20: finite
    weights, and the run says nothing is wrong."""
    from safetensors.torch import load_file

    from aitraining.cli import main

    student = tiny_model_factory(n_layers=1, seed=2, path=tmp_path / "student")
    teacher = tiny_model_factory(n_layers=2, seed=3, path=tmp_path / "teacher")
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": "Hi", "response": ""}, {"prompt": "Count.", "response": " ".join(map(str, range(400)))},
            {"prompt": "Ok?", "response": "Ok."}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for extra in ([], ["--use-distillation", "--teacher-model", teacher, "--distill-temperature", "0.05"],
                  ["--use-distillation", "--teacher-model", teacher, "--distill-temperature", "20", "--distill-loss",
                   "reverse_kl"]):
        project = tmp_path / f"p{len(extra)}{extra[-1] if extra else ''}"
        assert main(["llm", "--train", "--model", student, "--data-path", str(data), "--project-name", str(project),
                     "--block-size", "32", "--epochs", "2", "--lr", "1e-2", "--batch-size", "2", *extra]) == 0
        for name, w in load_file(str(project / "model.safetensors")).items():
            assert torch.isfinite(w).all(), (extra, name)
