"""The text-level judge (aitraining.judge.TextReference), which compares models whatever their tokenizers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from aitraining.batches import StudentSettings
from aitraining.data.templates import encode, render_prompt
from aitraining.judge import TextReference
from aitraining.models.generate import generate_answers
from aitraining.params import LLMTrainingParams
from aitraining.teacher import TeacherSettings

PROMPTS = ["Name a colour.", "What is two plus two?", "Say hello."]


def _naive_nll(folder: str, prompts: list[str], answers: list[str]) -> float:
    """Sum over rows of -log p(answer tokens | chat-rendered prompt), one full forward per row."""
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    total = 0.0
    for p, a in zip(prompts, answers, strict=True):
        text, special = render_prompt(tok, [{"role": "user", "content": p}], "{input}", tok.chat_template)
        prompt = encode(tok, text, add_special_tokens=special)
        answer = encode(tok, a, add_special_tokens=False)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0].double(), -1)
        total -= sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(answer))
    return total


def test_the_teacher_is_at_zero_and_a_student_at_its_naive_log_likelihood(tiny_model_factory: Callable[..., str]) -> None:
    teacher = tiny_model_factory(n_layers=2, seed=11)
    student = tiny_model_factory(n_layers=1, seed=12)
    tok = AutoTokenizer.from_pretrained(teacher)
    t_model = AutoModelForCausalLM.from_pretrained(teacher)
    answers = []
    for p in PROMPTS:
        text, special = render_prompt(tok, [{"role": "user", "content": p}], "{input}", tok.chat_template)
        out = generate_answers(t_model, [encode(tok, text, add_special_tokens=special)], max_new_tokens=6,
                               stop={tok.eos_token_id}, pad=tok.pad_token_id)[0]
        answers.append(tok.decode(out, skip_special_tokens=True))
    params = LLMTrainingParams(model=student, teacher_model=teacher, data_path="-", use_distillation=True)
    ref = TextReference(params.settings(TeacherSettings), params.settings(StudentSettings),
                        list(zip(PROMPTS, answers, strict=True)))
    n_bytes = sum(len(a.encode()) for a in answers)
    assert ref.bytes == n_bytes > 0
    torch.testing.assert_close(ref.teacher_nll, _naive_nll(teacher, PROMPTS, answers), atol=1e-3, rtol=1e-4)
    own = ref.compare(t_model, tok)
    assert abs(own["kl_per_byte"]) < 1e-6 and all(w.startswith(a) for w, a in zip(own["answers"], answers, strict=True))
    got = ref.compare(AutoModelForCausalLM.from_pretrained(student), AutoTokenizer.from_pretrained(student))
    want = _naive_nll(student, PROMPTS, answers)
    torch.testing.assert_close(got["nll_per_byte"], want / n_bytes, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["kl_per_byte"], (want - ref.teacher_nll) / n_bytes, atol=1e-4, rtol=1e-4)
    assert 0.0 <= got["rouge_l"] <= 1.0 and len(got["answers"]) == len(PROMPTS)
