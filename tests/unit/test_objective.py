"""The student's loss as training computes it (`Objective`: chunked, fused, from the cache or a live teacher)
against a float64 loss written from the definition with `model(...).logits` and the teacher's full
distribution, on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from aitraining.batches import Item, collate
from aitraining.objective import Objective
from aitraining.params import LLMTrainingParams
from aitraining.signal import TeacherTargets, teacher_targets_from_logits
from aitraining.teacher import TeacherSettings
from aitraining.teacher.engine import Engine
from aitraining.teacher.sources import LiveSource

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


def naive_loss(student: LlamaForCausalLM, teacher_probs: list[torch.Tensor], items: list[Item], *,
               with_labels: bool = True) -> torch.Tensor:
    """Sum over response tokens of alpha T^2 KL(p_t^T || p_s^T) + (1 - alpha) CE, in float64, from the model's
    full logits; `teacher_probs[i]` is (n_response, V) for item i, already at T. `with_labels=False`: the response
    is the student's own (on-policy): no CE term."""
    total = torch.zeros((), dtype=torch.float64)
    for it, p_t in zip(items, teacher_probs, strict=True):
        logits = student(input_ids=torch.tensor([it.input_ids])).logits[0].double()
        z = logits[it.n_prompt - 1 : len(it.input_ids) - 1]
        labels = torch.tensor(it.input_ids[it.n_prompt :])
        log_ps = F.log_softmax(z / T, -1)
        kl = (p_t * (torch.log(p_t.clamp_min(1e-300)) - log_ps)).where(p_t > 0, 0.0).sum(-1)
        ce = F.cross_entropy(z, labels, reduction="none")
        total = total + (ALPHA * T**2 * kl + (1 - ALPHA) * ce * with_labels).sum()
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


def objective_loss(student_dir: str, items: list[Item], targets, pad: int, chunk_size: int, *,
                   labels_are_own: bool = False) -> tuple[float, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir)
    objective = Objective(model, temperature=T, alpha=ALPHA, chunk_size=chunk_size)
    loss, _, _, n = objective(**collate(items, pad), teacher=targets, labels_are_own=labels_are_own)
    loss.backward()
    assert n.item() == sum(len(it.input_ids) - it.n_prompt for it in items)
    return loss.item(), model.lm_head.weight.grad.clone()


def reference(student_dir: str, items: list[Item], probs: list[torch.Tensor], *, with_labels: bool = True
              ) -> tuple[float, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float64)
    loss = naive_loss(model, probs, items, with_labels=with_labels)
    loss.backward()
    return loss.item(), model.lm_head.weight.grad.float()


def padded(p: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(p, (0, width - p.shape[-1]))


def live_teacher(params: LLMTrainingParams, project_dir: Path) -> LiveSource:
    """The teacher kept in memory on the CPU, as a live source."""
    settings = params.settings(TeacherSettings)
    return LiveSource(Engine(settings, torch.device("cpu")), settings, str(project_dir))


@pytest.mark.parametrize("chunk_size", [2, 64])
def test_live_teacher_objective_equals_the_float64_dense_loss(setup, chunk_size, tmp_path):
    """A live teacher: the exact loss over the full vocabulary (padded embedding rows excluded)."""
    tok, student, teacher_dir, items = setup
    params = LLMTrainingParams(model=student, teacher_model=teacher_dir, data_path="x", use_distillation=True,
                               teacher_source="live", mixed_precision="no")
    live = live_teacher(params, tmp_path)
    width = len(tok) + 64
    probs = [padded(F.softmax(z / T, -1), width) for z in teacher_logits(teacher_dir, items, len(tok))]
    got, grad = objective_loss(student, items, live.targets(items), tok.pad_token_id, chunk_size)
    want, want_grad = reference(student, items, probs)
    assert got == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-3, atol=1e-6)


def test_on_policy_answers_are_the_students_own_and_train_alpha_t2_kl_without_labels(setup, tmp_path):
    """On-policy rows (onpolicy.py): the same prompts with the student's own sampled answers, reproducible from
    (seed, step, micro-batch) and leaving the global random state alone; their loss is alpha T^2 KL against the
    teacher's exact distribution on those very tokens, with no label term, equal to the float64 definition."""
    from transformers import AutoModelForCausalLM

    from aitraining.onpolicy import OnPolicy

    tok, student, teacher_dir, items = setup
    params = LLMTrainingParams(model=student, teacher_model=teacher_dir, data_path="x", use_distillation=True,
                               mixed_precision="no")
    on = OnPolicy(live_teacher(params, tmp_path), tok, share=0.5, seed=5, max_new_tokens=6, block_size=64)
    model = AutoModelForCausalLM.from_pretrained(student)
    model.train()
    state = torch.get_rng_state()
    own = on.answer(model, items, step=3, micro=0)
    assert torch.equal(state, torch.get_rng_state()) and model.training
    assert [it.input_ids for it in on.answer(model, items, step=3, micro=0)] == [it.input_ids for it in own]
    assert [it.input_ids for it in on.answer(model, items, step=4, micro=0)] != [it.input_ids for it in own]
    for mine, it in zip(own, items, strict=True):
        assert mine.input_ids[: mine.n_prompt] == it.input_ids[: it.n_prompt] and mine.teacher_prompt == it.teacher_prompt
        answer = mine.input_ids[mine.n_prompt :]
        assert 1 <= len(answer) <= 6 and max(answer) < len(tok)  # never a padded embedding row
        assert answer != it.input_ids[it.n_prompt :]
    boosted = AutoModelForCausalLM.from_pretrained(student)
    with torch.no_grad():
        boosted.lm_head.weight[len(tok) :] *= 300  # padded rows that an unmasked sampler would pick at once
    assert all(max(it.input_ids[it.n_prompt :]) < len(tok) for it in on.answer(boosted, items, step=3, micro=1))
    assert 0.3 < sum(on.chosen(s) for s in range(200)) / 200 < 0.7
    assert [on.chosen(s) for s in range(50)] == [on.chosen(s) for s in range(50)]

    width = len(tok) + 64
    probs = [padded(F.softmax(z / T, -1), width) for z in teacher_logits(teacher_dir, own, len(tok))]
    got, grad = objective_loss(student, own, on.targets(own), tok.pad_token_id, 4, labels_are_own=True)
    want, want_grad = reference(student, own, probs, with_labels=False)
    assert got == pytest.approx(want, rel=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-3, atol=1e-6)
    with_labels, _ = reference(student, own, probs)
    assert with_labels > want * 1.01  # the label term would have counted


def test_an_on_policy_answer_is_scored_up_to_its_first_repeat(setup, tmp_path):
    """onpolicy.py, "Only up to the first repeat": the teacher scores a looping answer up to the token that completes
    its first repeated trigram, and a student's answer that never repeats whole."""
    from transformers import AutoModelForCausalLM

    from aitraining.onpolicy import OnPolicy, until_first_repeat

    assert until_first_repeat([5, 6, 7, 8, 5, 6, 7, 5, 6, 7]) == [5, 6, 7, 8, 5, 6, 7]
    assert until_first_repeat([1, 1, 1, 1, 1]) == [1, 1, 1, 1]  # the trigram overlapping itself
    assert until_first_repeat([1, 2, 1, 2, 3, 1, 3]) == [1, 2, 1, 2, 3, 1, 3]  # bigrams repeat, no trigram does
    tok, student, teacher_dir, items = setup
    params = LLMTrainingParams(model=student, teacher_model=teacher_dir, data_path="x", use_distillation=True,
                               mixed_precision="no")
    on = OnPolicy(live_teacher(params, tmp_path), tok, share=1.0, seed=5, max_new_tokens=9, block_size=64)
    looping = AutoModelForCausalLM.from_pretrained(student)
    word = next(t for t in range(len(tok)) if t not in {tok.eos_token_id, tok.pad_token_id})
    head = torch.nn.Linear(looping.lm_head.in_features, looping.lm_head.out_features, bias=True)
    with torch.no_grad():  # whatever the state, the one token: a student stuck in a loop
        head.weight.zero_()
        head.bias.fill_(-30.0)
        head.bias[word] = 30.0
    looping.lm_head = head
    assert [it.input_ids[it.n_prompt :] for it in on.answer(looping, items, step=0, micro=0)] == [[word] * 4] * len(items)


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
