"""Helpers of the end-to-end tests: small datasets written in the test, and comparing trained models."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

# The repository's copies of the shared real prompts (benchmarks/data/README.md): a clone has them.
REAL_DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data"

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


def other_tokenizer_student(tokenizer, folder: Path) -> str:
    """A tiny Llama with the given tokenizer (the tests use Llama 2's SentencePiece, 32,000 tokens, against the
    SmolLM2 byte-level BPE, 49,152, of the tiny teachers and the bundled one)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def sharpened(teacher: str, folder: Path, factor: float = 8.0) -> str:
    """A copy of a tiny random teacher whose logits are `factor` times larger: a random model's next-token
    distribution is nearly uniform, so its KL at T = 1 to any student is too small to show learning."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        model.model.norm.weight.mul_(factor)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(folder)
    return str(folder)


# ------------------------------------------------------------------ float64 references of what a run computed


def float64_logits(folder: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The logits of the model saved in `folder`, computed in float64 (B, L, V)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float64).eval()
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def answer_positions(attention_mask: torch.Tensor, n_prompt: torch.Tensor) -> list[tuple[int, int]]:
    """(row, position) of every position that predicts an answer token, row by row: position t predicts token
    t + 1, and the answer is tokens n_prompt .. length - 1."""
    out = []
    for r in range(attention_mask.shape[0]):
        length = int(attention_mask[r].sum())
        out.extend((r, t) for t in range(max(int(n_prompt[r]) - 1, 0), length - 1))
    return out


def kl_and_ce_on_answers(teacher: str, model: str, call: tuple) -> tuple[float, float]:
    """Per answer position of one recorded loss call (`capture_loss_inputs`), in float64 over the full vocabulary:
    the mean KL(teacher || model) at T = 1 and the model's mean label loss."""
    input_ids, mask, n_prompt = call[:3]
    p = torch.log_softmax(float64_logits(teacher, input_ids, mask), -1)
    q = torch.log_softmax(float64_logits(model, input_ids, mask), -1)
    positions = answer_positions(mask, n_prompt)
    kl = sum(float((p[r, t].exp() * (p[r, t] - q[r, t])).sum()) for r, t in positions)
    ce = -sum(float(q[r, t, input_ids[r, t + 1]]) for r, t in positions)
    return kl / len(positions), ce / len(positions)


def metrics(project: str | os.PathLike) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(project) / "metrics.jsonl").read_text().splitlines()]


def cached_forward_kl(student_logits: torch.Tensor, targets, i: int, temperature: float) -> float:
    """The cached signal's forward KL at one position, by its definition (signal.py, Note [Teacher signal]), in
    float64 and one term at a time: KL over the k head ids and the tail as one bucket (teacher and student at T),
    plus the teacher's tail mass times the mean over the tail draws of log t(j) - log s(j), t and s each model's
    distribution within its tail."""
    T = temperature
    ls = torch.log_softmax(student_logits.double() / T, -1)
    k = targets.k
    head = [int(j) for j in targets.ids[i, :k]]
    teacher = torch.cat([targets.logp[i].double() / T, targets.tail_lognorm[i].double().view(1)])
    teacher = teacher - torch.logsumexp(teacher, 0)
    outside = torch.ones_like(ls, dtype=torch.bool)
    outside[head] = False
    s_tail = torch.logsumexp(ls[outside], 0)
    student = torch.cat([ls[head], s_tail.view(1)])
    kl = sum(math.exp(teacher[b]) * (teacher[b] - student[b]) for b in range(k + 1))
    counts = targets.counts[i].double()
    draws = 0.0
    for slot in range(targets.m):
        if counts[slot] > 0:
            j = int(targets.ids[i, k + slot])
            log_t = targets.sample_logp[i, slot].double() / T - targets.tail_lognorm[i].double()
            draws += float(counts[slot] / counts.sum()) * float(log_t - (ls[j] - s_tail))
    return float(kl) + math.exp(teacher[k]) * draws


def capture_loss_inputs(monkeypatch) -> list:
    """What the student's loss really receives, batch by batch: (input_ids, attention_mask, n_prompt, teacher)."""
    batches = []
    from aitraining.objective import Objective

    real_forward = Objective.forward

    def forward(self, input_ids, attention_mask, n_prompt, teacher=None, weight=1.0, labels_are_own=False):
        batches.append((input_ids.clone(), attention_mask.clone(), n_prompt.clone(), teacher))
        return real_forward(self, input_ids, attention_mask, n_prompt, teacher, weight, labels_are_own)

    monkeypatch.setattr(Objective, "forward", forward)
    return batches
