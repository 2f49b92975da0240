"""The student's loss as training computes it (`Objective`: chunked, fused, from the cache or a live teacher)
against a float64 loss written from the definition with `model(...).logits` and the teacher's full
distribution, on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from aitraining.losses import TeacherTargets, teacher_targets_from_logits
from aitraining.objective import Objective
from aitraining.params import LLMTrainingParams
from aitraining.teacher import LiveTeacher, Teacher
from aitraining.train import Item, collate

T, ALPHA = 3.0, 0.7


def tiny(tokenizer, folder: Path, layers: int, seed: int, sharpen: float = 1.0) -> str:
    config = LlamaConfig(vocab_size=len(tokenizer) + 64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.mul_(sharpen)  # a peaked teacher: its distribution is worth matching
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def setup(smol_tokenizer_dir, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    root = tmp_path_factory.mktemp("objective")
    student = tiny(tok, root / "student", 2, 0)
    teacher = tiny(tok, root / "teacher", 3, 1, sharpen=6.0)
    g = torch.Generator().manual_seed(3)
    # Three rows of different lengths and prompts; the teacher reads each response after a prompt of its own.
    items = []
    for n_prompt, n_resp in ((4, 5), (7, 3), (2, 6)):
        ids = torch.randint(0, len(tok), (n_prompt + n_resp,), generator=g).tolist()
        teacher_prompt = torch.randint(0, len(tok), (n_prompt + 2,), generator=g).tolist()
        items.append(Item(ids, n_prompt, None, teacher_prompt))
    return tok, student, teacher, items


def naive_loss(student: LlamaForCausalLM, teacher_probs: list[torch.Tensor], items: list[Item]) -> torch.Tensor:
    """Sum over response tokens of alpha T^2 KL(p_t^T || p_s^T) + (1 - alpha) CE, in float64, from the model's
    full logits; `teacher_probs[i]` is (n_response, V) for item i, already at T."""
    total = torch.zeros((), dtype=torch.float64)
    for it, p_t in zip(items, teacher_probs, strict=True):
        logits = student(input_ids=torch.tensor([it.input_ids])).logits[0].double()
        z = logits[it.n_prompt - 1 : len(it.input_ids) - 1]
        labels = torch.tensor(it.input_ids[it.n_prompt :])
        log_ps = F.log_softmax(z / T, -1)
        kl = (p_t * (torch.log(p_t.clamp_min(1e-300)) - log_ps)).where(p_t > 0, 0.0).sum(-1)
        ce = F.cross_entropy(z, labels, reduction="none")
        total = total + (ALPHA * T**2 * kl + (1 - ALPHA) * ce).sum()
    return total


def teacher_logits(teacher_dir: str, items: list[Item], vocab: int) -> list[torch.Tensor]:
    """The teacher's float64 logits at the positions predicting each response token, read after its own prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float64)
    out = []
    for it in items:
        seq = it.teacher_prompt + it.input_ids[it.n_prompt :]
        z = model(input_ids=torch.tensor([seq])).logits[0, len(it.teacher_prompt) - 1 : len(seq) - 1, :vocab]
        out.append(z.detach())
    return out


def objective_loss(student_dir: str, items: list[Item], targets, pad: int, chunk_size: int) -> tuple[float, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir)
    objective = Objective(model, temperature=T, alpha=ALPHA, chunk_size=chunk_size)
    loss, _, _, n = objective(**collate(items, pad), teacher=targets)
    loss.backward()
    assert n.item() == sum(len(it.input_ids) - it.n_prompt for it in items)
    return loss.item(), model.lm_head.weight.grad.clone()


def reference(student_dir: str, items: list[Item], probs: list[torch.Tensor]) -> tuple[float, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float64)
    loss = naive_loss(model, probs, items)
    loss.backward()
    return loss.item(), model.lm_head.weight.grad.float()


def padded(p: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(p, (0, width - p.shape[-1]))


@pytest.mark.parametrize("chunk_size", [2, 64])
def test_live_teacher_objective_equals_the_float64_dense_loss(setup, chunk_size):
    """A live teacher: the exact loss over the full vocabulary (padded embedding rows excluded)."""
    tok, student, teacher_dir, items = setup
    params = LLMTrainingParams(model=student, teacher_model=teacher_dir, data_path="x", use_distillation=True,
                               teacher_source="live", mixed_precision="no")
    live = LiveTeacher(Teacher(params, torch.device("cpu")))
    width = len(tok) + 64
    probs = [padded(F.softmax(z / T, -1), width) for z in teacher_logits(teacher_dir, items, len(tok))]
    got, grad = objective_loss(student, items, live.targets(items), tok.pad_token_id, chunk_size)
    want, want_grad = reference(student, items, probs)
    assert got == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-3, atol=1e-6)


def test_cached_full_head_equals_the_float64_dense_loss(setup):
    """The cache's form with a head covering the whole vocabulary holds the teacher's full distribution."""
    tok, student, teacher_dir, items = setup
    logits = teacher_logits(teacher_dir, items, len(tok))
    targets = TeacherTargets.cat([teacher_targets_from_logits(z.float(), len(tok), samples=4, tau=T) for z in logits])
    width = len(tok) + 64
    got, grad = objective_loss(student, items, targets, tok.pad_token_id, 3)
    want, want_grad = reference(student, items, [padded(F.softmax(z / T, -1), width) for z in logits])
    assert got == pytest.approx(want, rel=1e-4)
    torch.testing.assert_close(grad, want_grad, rtol=1e-3, atol=1e-6)


def test_cached_sampled_tail_objective_equals_the_pure_loss_on_full_float64_logits(setup):
    """The default cache (head + sampled tail): what the chunked, fused objective computes from the model's
    hidden states equals `token_losses` (tested against the definition in test_losses.py) applied to
    `model(...).logits` in float64 at the response positions; and the estimate's head is exact."""
    from transformers import AutoModelForCausalLM

    from aitraining.losses import token_losses

    tok, student, teacher_dir, items = setup
    logits = teacher_logits(teacher_dir, items, len(tok))
    parts = [teacher_targets_from_logits(z.float(), 16, samples=40, tau=T) for z in logits]
    for z, t in zip(logits, parts, strict=True):
        exact = F.softmax(z / T, -1).gather(1, t.ids[:, :16])
        torch.testing.assert_close(t.bucket_log_probs(T)[:, :16].double().exp(), exact, rtol=1e-4, atol=1e-7)
    got, grad = objective_loss(student, items, TeacherTargets.cat(parts), tok.pad_token_id, 4)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float64)
    want = torch.zeros((), dtype=torch.float64)
    for it, t in zip(items, parts, strict=True):
        z = model(input_ids=torch.tensor([it.input_ids])).logits[0, it.n_prompt - 1 : len(it.input_ids) - 1]
        loss, _, _ = token_losses(z, torch.tensor(it.input_ids[it.n_prompt :]), t, temperature=T, alpha=ALPHA)
        want = want + loss.sum()
    want.backward()
    assert got == pytest.approx(want.item(), rel=1e-4)
    torch.testing.assert_close(grad, model.lm_head.weight.grad.float(), rtol=1e-3, atol=1e-6)
