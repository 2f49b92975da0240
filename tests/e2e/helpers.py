"""Helpers of the end-to-end tests: small datasets written in the test, and comparing trained models."""

from __future__ import annotations

import json
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
