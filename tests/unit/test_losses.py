"""Tests for aitraining.losses against naive references written straight from the definitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from aitraining.chunked import LinearHead, chunked_token_loss_sums
from aitraining.losses import (
    DIVERGENCES,
    TEACHER_LOG_FLOOR,
    bucket_log_probs,
    divergence,
    teacher_divergence,
    token_losses,
)
from aitraining.signal import DenseTargets, TeacherTargets, systematic_sample, teacher_targets_from_logits

INF = float("inf")
BETA = 0.3  # deliberately not 0.5 so that the asymmetric roles of beta are exercised


# ---------------------------------------------------------------------------------------------------------
# Naive references: python floats (double precision), one bucket at a time.
# ---------------------------------------------------------------------------------------------------------


def naive_kl(p: list[float], q: list[float]) -> float:
    total = 0.0
    for pi, qi in zip(p, q, strict=True):
        if pi == 0.0:
            continue  # 0 * log 0 = 0
        if qi == 0.0:
            return INF
        total += pi * math.log(pi / qi)
    return total


def naive_divergence(p_s: list[float], p_t: list[float], kind: str, beta: float) -> float:
    if kind == "forward_kl":
        return naive_kl(p_t, p_s)
    if kind == "reverse_kl":
        return naive_kl(p_s, p_t)
    if kind == "jsd":
        m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s, strict=True)]
        return beta * naive_kl(p_t, m) + (1 - beta) * naive_kl(p_s, m)
    if kind == "skew_kl":
        m = [beta * a + (1 - beta) * b for a, b in zip(p_t, p_s, strict=True)]
        return naive_kl(p_t, m)
    if kind == "skew_reverse_kl":
        m = [beta * b + (1 - beta) * a for a, b in zip(p_t, p_s, strict=True)]
        return naive_kl(p_s, m)
    if kind == "tvd":
        return 0.5 * sum(abs(a - b) for a, b in zip(p_t, p_s, strict=True))
    raise AssertionError(kind)


def naive_rows(p_s: Tensor, p_t: Tensor, kind: str, beta: float) -> Tensor:
    """Row-wise naive divergence of (N, B) probability tensors."""
    return torch.tensor(
        [naive_divergence(s.tolist(), t.tolist(), kind, beta) for s, t in zip(p_s, p_t, strict=True)],
        dtype=torch.float64,
    )


def dense_probs(logits: Tensor, temperature: float) -> Tensor:
    return torch.softmax(logits.double() / temperature, dim=-1)


def naive_buckets(probs: Tensor, ids: Tensor) -> Tensor:
    """(N, V) probabilities -> (N, k + 1): probs at ids, then the sum over every other id."""
    rows = []
    for p, row_ids in zip(probs.tolist(), ids.tolist(), strict=True):
        chosen = set(row_ids)
        tail = sum(pj for j, pj in enumerate(p) if j not in chosen)
        rows.append([p[i] for i in row_ids] + [tail])
    return torch.tensor(rows, dtype=torch.float64)


def random_logits(seed: int, n: int = 5, v: int = 11, scale: float = 2.0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale


def with_zero_probs(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Put exact zero probabilities (-inf logits) in some rows.

    Row 0: both zero on the same ids. Row 1: teacher zero only. Row 2: student zero only.
    """
    student, teacher = student.clone(), teacher.clone()
    student[0, [1, 4]] = -INF
    teacher[0, [1, 4]] = -INF
    teacher[1, [0, 2, 7]] = -INF
    student[2, [3, 5]] = -INF
    return student, teacher


# ---------------------------------------------------------------------------------------------------------
# divergence vs. naive, dense
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("zeros", [False, True])
def test_dense_divergence_matches_naive(kind: str, temperature: float, seed: int, zeros: bool) -> None:
    s, t = random_logits(seed)
    if zeros:
        s, t = with_zero_probs(s, t)
    got = divergence(
        F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1), kind, BETA
    )
    want = naive_rows(dense_probs(s, temperature), dense_probs(t, temperature), kind, BETA)
    assert got.dtype == torch.float32
    assert got.shape == (5,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    if zeros:
        # The zero-probability rows must hit the infinite cases exactly where the maths says so.
        assert math.isinf(want[1]) == (kind == "reverse_kl")
        assert math.isinf(want[2]) == (kind == "forward_kl")


def plain_divergence(p_s: Tensor, p_t: Tensor, kind: str, beta: float) -> Tensor:
    """Textbook formulas on strictly positive (N, B) probabilities; rows -> (N,)."""

    def kl(p: Tensor, q: Tensor) -> Tensor:
        return (p * (p / q).log()).sum(-1)

    if kind == "forward_kl":
        return kl(p_t, p_s)
    if kind == "reverse_kl":
        return kl(p_s, p_t)
    if kind == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    if kind == "skew_kl":
        return kl(p_t, beta * p_t + (1 - beta) * p_s)
    if kind == "skew_reverse_kl":
        return kl(p_s, beta * p_s + (1 - beta) * p_t)
    return 0.5 * (p_t - p_s).abs().sum(-1)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_dense_gradient_matches_plain_formula(kind: str, temperature: float) -> None:
    # The NaN guards (torch.where, sanitized inputs) must not change the gradient where nothing is zero.
    s, t = random_logits(16)
    s_got = s.clone().requires_grad_(True)
    s_ref = s.double().requires_grad_(True)
    got = divergence(F.log_softmax(s_got / temperature, -1), F.log_softmax(t / temperature, -1), kind, BETA)
    ref = plain_divergence(torch.softmax(s_ref / temperature, -1), dense_probs(t, temperature), kind, BETA)
    (got * torch.arange(1.0, 6.0)).sum().backward()
    (ref * torch.arange(1.0, 6.0, dtype=torch.float64)).sum().backward()
    assert s_got.grad is not None
    assert s_ref.grad is not None
    torch.testing.assert_close(s_got.grad.double(), s_ref.grad, rtol=1e-4, atol=1e-6)


def test_identical_distributions_give_zero() -> None:
    s, _ = random_logits(3)
    logp = F.log_softmax(s, dim=-1)
    for kind in DIVERGENCES:
        torch.testing.assert_close(divergence(logp, logp, kind), torch.zeros(5), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# sparse (k + 1 buckets)
# ---------------------------------------------------------------------------------------------------------


def dense_and_sparse(s: Tensor, t: Tensor, k: int, temperature: float, kind: str) -> tuple[Tensor, Tensor]:
    dense = divergence(
        F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1), kind, BETA
    )
    targets = teacher_targets_from_logits(t, k, tau=temperature)
    sparse = divergence(
        bucket_log_probs(s, targets.ids, temperature), targets.bucket_log_probs(temperature), kind, BETA
    )
    return dense, sparse


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("zeros", [False, True])
def test_sparse_full_k_equals_dense(kind: str, temperature: float, zeros: bool) -> None:
    s, t = random_logits(4)
    if zeros:
        s, t = with_zero_probs(s, t)
    s_dense = s.clone().requires_grad_(True)
    s_sparse = s.clone().requires_grad_(True)
    dense, _ = dense_and_sparse(s_dense, t, 11, temperature, kind)
    _, sparse = dense_and_sparse(s_sparse, t, 11, temperature, kind)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    dense.sum().backward()
    sparse.sum().backward()
    assert s_sparse.grad is not None
    assert s_dense.grad is not None
    torch.testing.assert_close(s_sparse.grad, s_dense.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("k", [1, 4, 10])
def test_sparse_matches_naive_buckets(kind: str, temperature: float, k: int) -> None:
    s, t = random_logits(5)
    targets = teacher_targets_from_logits(t, k, tau=temperature)
    got = divergence(
        bucket_log_probs(s, targets.ids, temperature), targets.bucket_log_probs(temperature), kind, BETA
    )
    want = naive_rows(
        naive_buckets(dense_probs(s, temperature), targets.ids),
        naive_buckets(dense_probs(t, temperature), targets.ids),
        kind,
        BETA,
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_bucket_log_probs_shape_and_normalization() -> None:
    s, t = random_logits(6)
    targets = teacher_targets_from_logits(t, 4, tau=2.0)
    b = bucket_log_probs(s.to(torch.bfloat16), targets.ids, 2.0)
    assert b.shape == (5, 5)
    assert b.dtype == torch.float32
    torch.testing.assert_close(torch.logsumexp(b, -1), torch.zeros(5), atol=1e-6, rtol=0)
    full = bucket_log_probs(s, torch.arange(11).expand(5, 11), 1.0)
    assert torch.isneginf(full[:, -1]).all()
    torch.testing.assert_close(full[:, :-1], F.log_softmax(s, -1))


# ---------------------------------------------------------------------------------------------------------
# teacher_targets_from_logits
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("k", [1, 3, 11, 50])
def test_teacher_targets(k: int, tau: float) -> None:
    """The head and the tail mass are taken at T = 1 whatever tau; the tail's norm at tau."""
    _, t = random_logits(7)
    targets = teacher_targets_from_logits(t, k, tau=tau)
    kk = min(k, 11)
    assert targets.ids.shape == (5, kk)
    assert targets.ids.dtype == torch.int64
    assert targets.logp.dtype == torch.float32
    assert targets.tail_logp.shape == (5,)
    assert not targets.logp.requires_grad
    for temperature in {1.0, tau}:
        buckets = targets.bucket_log_probs(temperature)
        torch.testing.assert_close(torch.logsumexp(buckets, -1), torch.zeros(5), atol=1e-6, rtol=0)
        torch.testing.assert_close(buckets.double().exp(), naive_buckets(dense_probs(t, temperature), targets.ids),
                                   rtol=1e-5, atol=1e-7)
    probs = dense_probs(t, 1.0)
    for row in range(5):
        order = sorted(range(11), key=lambda j: -probs[row, j].item())
        assert targets.ids[row].tolist() == order[:kk]
        tail_mass = sum(probs[row, j].item() for j in order[kk:])
        tail_norm = sum(probs[row, j].item() ** (1 / tau) for j in order[kk:])
        if kk == 11:
            assert targets.tail_logp[row].item() == -INF
            assert targets.tail_lognorm[row].item() == -INF
        else:
            assert math.isclose(targets.tail_logp[row].exp().item(), tail_mass, rel_tol=1e-5)
            assert math.isclose(targets.tail_lognorm[row].exp().item(), tail_norm, rel_tol=1e-5)
        torch.testing.assert_close(
            targets.logp[row].double(), probs[row, order[:kk]].log(), rtol=1e-5, atol=1e-6
        )
    with pytest.raises(ValueError, match="tail mass at T = 1"):
        targets.bucket_log_probs(tau + 0.5)


def test_teacher_targets_bf16_input() -> None:
    _, t = random_logits(8)
    t16 = t.to(torch.bfloat16)
    targets = teacher_targets_from_logits(t16, 4, tau=2.0)
    assert targets.logp.dtype == torch.float32
    assert targets.tail_logp.dtype == torch.float32
    ref = teacher_targets_from_logits(t16.float(), 4, tau=2.0)
    torch.testing.assert_close(targets.logp, ref.logp)
    torch.testing.assert_close(targets.tail_logp, ref.tail_logp)
    torch.testing.assert_close(torch.logsumexp(targets.bucket_log_probs(2.0), -1), torch.zeros(5))


def test_teacher_tail_is_stable_for_tiny_mass() -> None:
    # The tail mass (~e^-100) is far below float32 resolution of 1 - sum(p); logsumexp still gets it.
    t = torch.tensor([[100.0, 0.0, 0.0]])
    targets = teacher_targets_from_logits(t, 1, tau=1.0)
    assert math.isclose(targets.tail_logp.item(), -100.0 + math.log(2.0), rel_tol=1e-5)


def test_teacher_targets_rejects_bad_args() -> None:
    with pytest.raises(ValueError, match="k must be"):
        teacher_targets_from_logits(torch.zeros(2, 3), 0, tau=1.0)
    with pytest.raises(ValueError, match="temperature"):
        teacher_targets_from_logits(torch.zeros(2, 3), 2, tau=0.0)
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        teacher_targets_from_logits(torch.zeros(3), 2, tau=1.0)


def test_teacher_targets_container() -> None:
    _, t = random_logits(9)
    targets = teacher_targets_from_logits(t, 3, tau=1.0)
    mask = torch.tensor([True, False, True, False, True])
    picked = targets.index(mask)
    assert len(picked) == 3
    assert picked.k == 3
    torch.testing.assert_close(picked.logp, targets.logp[mask])
    joined = TeacherTargets.cat([targets.index(torch.tensor([0, 1])), targets.index(torch.tensor([2, 3, 4]))])
    assert torch.equal(joined.ids, targets.ids)
    torch.testing.assert_close(joined.tail_logp, targets.tail_logp)
    moved = targets.to("cpu")
    assert torch.equal(moved.ids, targets.ids)
    with pytest.raises(ValueError, match=r"differ in \(k, m, tau\)"):
        TeacherTargets.cat([targets, teacher_targets_from_logits(t, 2, tau=1.0)])
    with pytest.raises(ValueError, match="ids must be"):
        TeacherTargets(targets.ids, targets.logp[:, :2], targets.sample_logp, targets.counts, targets.tail_logp,
                       targets.tail_lognorm)


# ---------------------------------------------------------------------------------------------------------
# NaN-free gradients
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("k", [11, 4])
def test_no_nan_gradients_full_k_and_zero_buckets(kind: str, k: int) -> None:
    s, t = random_logits(10)
    # Zeros on the same ids on both sides (plus the empty tail when k = V) are finite for every kind.
    s[:, [2, 6]] = -INF
    t[:, [2, 6]] = -INF
    # A teacher-only zero: in its own bucket (k = V) reverse KL is truly +inf for that row; with k < V it
    # falls into the tail bucket together with positive-mass ids and everything stays finite.
    t[3, 9] = -INF
    student = s.clone().requires_grad_(True)
    targets = teacher_targets_from_logits(t, k, tau=2.0)
    d = divergence(bucket_log_probs(student, targets.ids, 2.0), targets.bucket_log_probs(2.0), kind, BETA)
    assert not torch.isnan(d).any()
    assert torch.isinf(d[3]).item() == (kind == "reverse_kl" and k == 11)
    assert torch.isfinite(d[:3]).all()
    # Even with an infinite row in the batch the gradient must have no NaN (nor inf).
    d.sum().backward()
    assert student.grad is not None
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_no_nan_gradients_on_log_prob_leaves(kind: str) -> None:
    # -inf directly in the leaves: the gradient w.r.t. both inputs must have no NaN.
    s_raw = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.0, 0.8], [0.0, 1.0, 0.0]]).log()
    t_raw = torch.tensor([[0.5, 0.5, 0.0], [0.6, 0.0, 0.4], [0.0, 0.3, 0.7]]).log()
    s = s_raw.clone().requires_grad_(True)
    t = t_raw.clone().requires_grad_(True)
    d = divergence(s, t, kind, BETA)
    assert torch.isfinite(d[:2]).all()
    assert torch.isinf(d[2]).item() == (kind == "forward_kl")  # teacher mass 0.7 where the student has 0
    d.sum().backward()
    assert s.grad is not None
    assert t.grad is not None
    assert torch.isfinite(s.grad).all()
    assert torch.isfinite(t.grad).all()


# ---------------------------------------------------------------------------------------------------------
# token_losses
# ---------------------------------------------------------------------------------------------------------


def test_token_losses_formula_by_hand() -> None:
    s, t = random_logits(11)
    labels = torch.tensor([0, 3, 10, 5, 7])
    alpha, temperature, kind = 0.3, 2.0, "jsd"
    targets = teacher_targets_from_logits(t, 4, tau=temperature)
    loss, kd, ce = token_losses(
        s, labels, targets, temperature=temperature, alpha=alpha, kind=kind, beta=BETA
    )
    p1 = dense_probs(s, 1.0)
    ce_ref = torch.tensor([-math.log(p1[i, labels[i]].item()) for i in range(5)], dtype=torch.float64)
    kd_ref = naive_rows(
        naive_buckets(dense_probs(s, temperature), targets.ids),
        naive_buckets(dense_probs(t, temperature), targets.ids),
        kind,
        BETA,
    )
    loss_ref = alpha * temperature**2 * kd_ref + (1 - alpha) * ce_ref
    for got in (loss, kd, ce):
        assert got.shape == (5,)
        assert got.dtype == torch.float32
    torch.testing.assert_close(ce.double(), ce_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd.double(), kd_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-5, atol=1e-6)


def test_token_losses_alpha_zero_and_no_teacher_are_cross_entropy() -> None:
    s, t = random_logits(12)
    labels = torch.tensor([1, 2, 3, 4, 5])
    ce_ref = F.cross_entropy(s, labels, reduction="none")
    targets = teacher_targets_from_logits(t, 3, tau=2.0)
    for teacher, alpha in ((targets, 0.0), (None, 0.0), (None, 0.7)):
        loss, kd, ce = token_losses(s, labels, teacher, temperature=2.0, alpha=alpha)
        torch.testing.assert_close(loss, ce_ref)
        torch.testing.assert_close(ce, ce_ref)
        assert torch.equal(kd, torch.zeros(5))


def test_token_losses_alpha_one_is_pure_kd() -> None:
    s, t = random_logits(13)
    labels = torch.tensor([1, 2, 3, 4, 5])
    targets = teacher_targets_from_logits(t, 3, tau=2.0)
    loss, kd, ce = token_losses(s.to(torch.bfloat16), labels, targets, temperature=2.0, alpha=1.0)
    torch.testing.assert_close(loss, 4.0 * kd)
    assert (ce > 0).all()


def test_token_losses_rejects_bad_args() -> None:
    s, t = random_logits(14)
    labels = torch.zeros(5, dtype=torch.int64)
    targets = teacher_targets_from_logits(t, 3, tau=1.0)
    with pytest.raises(ValueError, match="forward_kl"):
        token_losses(s, labels, targets, alpha=0.5, kind="kl")
    with pytest.raises(ValueError, match="alpha"):
        token_losses(s, labels, targets, alpha=1.5)
    with pytest.raises(ValueError, match="teacher has 2 rows"):
        token_losses(s, labels, targets.index(torch.tensor([0, 1])), alpha=0.5)


# ---------------------------------------------------------------------------------------------------------
# chunked_token_loss_sums
# ---------------------------------------------------------------------------------------------------------


class SoftcappedHead(torch.nn.Module):
    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return 5.0 * torch.tanh(self.proj(h) / 5.0)


def chunk_setup(n: int, with_teacher: bool) -> tuple[Tensor, SoftcappedHead, Tensor, TeacherTargets | None]:
    torch.manual_seed(15)
    hidden = torch.randn(n, 6)
    head = SoftcappedHead(6, 13)
    labels = torch.randint(0, 13, (n,))
    # With tail samples at tau = T: forward KL takes the sampled form, the other kinds the buckets.
    teacher = (teacher_targets_from_logits(torch.randn(n, 13) * 3, 4, samples=5, tau=2.0, offsets=torch.rand(n))
               if with_teacher else None)
    return hidden, head, labels, teacher


@pytest.mark.parametrize("with_teacher", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
def test_chunked_equals_unchunked(chunk_size: int, with_teacher: bool) -> None:
    hidden, head, labels, teacher = chunk_setup(7, with_teacher)
    kwargs = {"temperature": 2.0, "alpha": 0.6, "kind": "skew_kl", "beta": BETA}

    h_ref = hidden.clone().requires_grad_(True)
    loss, kd, ce = token_losses(head(h_ref), labels, teacher, **kwargs)
    loss.sum().backward()
    assert head.proj.weight.grad is not None
    w_grad_ref = head.proj.weight.grad.clone()
    head.zero_grad()

    h = hidden.clone().requires_grad_(True)
    loss_sum, kd_sum, ce_sum = chunked_token_loss_sums(
        h, head, labels, teacher, chunk_size=chunk_size, **kwargs
    )
    assert loss_sum.shape == ()
    assert loss_sum.dtype == torch.float32
    assert not kd_sum.requires_grad
    assert not ce_sum.requires_grad
    torch.testing.assert_close(loss_sum, loss.sum())
    torch.testing.assert_close(kd_sum, kd.sum())
    torch.testing.assert_close(ce_sum, ce.sum())
    loss_sum.backward()
    assert h.grad is not None
    assert h_ref.grad is not None
    assert head.proj.weight.grad is not None
    torch.testing.assert_close(h.grad, h_ref.grad)
    torch.testing.assert_close(head.proj.weight.grad, w_grad_ref)


def test_chunked_recomputes_logits_in_backward() -> None:
    # Checkpointing means the head runs once per chunk in forward and once more per chunk in backward
    # (instead of keeping every chunk's logits alive between the two).
    hidden, head, labels, teacher = chunk_setup(7, True)
    calls: list[int] = []

    def counting_head(h: Tensor) -> Tensor:
        calls.append(h.shape[0])
        return head(h)

    h = hidden.clone().requires_grad_(True)
    loss_sum, _, _ = chunked_token_loss_sums(h, counting_head, labels, teacher, chunk_size=3, alpha=0.5)
    assert calls == [3, 3, 1]
    loss_sum.backward()
    assert sorted(calls) == [1, 1, 3, 3, 3, 3]


def test_chunked_empty_is_zero_and_backward_works() -> None:
    hidden, head, labels, teacher = chunk_setup(0, True)
    h = hidden.requires_grad_(True)
    loss_sum, kd_sum, ce_sum = chunked_token_loss_sums(h, head, labels, teacher, alpha=0.5, temperature=2.0)
    for x in (loss_sum, kd_sum, ce_sum):
        assert x.shape == ()
        assert x.item() == 0.0
    assert loss_sum.requires_grad
    loss_sum.backward()
    assert h.grad is not None
    assert h.grad.shape == (0, 6)
    assert head.proj.weight.grad is not None
    assert torch.equal(head.proj.weight.grad, torch.zeros(13, 6))


def test_chunked_without_grad() -> None:
    hidden, head, labels, teacher = chunk_setup(5, True)
    with torch.no_grad():
        loss_sum, _, _ = chunked_token_loss_sums(hidden, head, labels, teacher, chunk_size=2, alpha=0.5)
        loss, _, _ = token_losses(head(hidden), labels, teacher, alpha=0.5)
    torch.testing.assert_close(loss_sum, loss.sum())


# ---------------------------------------------------------------------------------------------------------
# pinned values and validation
# ---------------------------------------------------------------------------------------------------------

# torch.manual_seed(0); student = randn(4, 16); teacher = randn(4, 16); k = 5; T = 2; beta = 0.5.
PINNED_MEANS: dict[str, float] = {
    "forward_kl": 0.1856020,
    "reverse_kl": 0.1469479,
    "jsd": 0.03987388,
    "skew_kl": 0.03561161,
    "skew_reverse_kl": 0.04413616,
    "tvd": 0.2408569,
}


def pinned_divergences() -> dict[str, float]:
    torch.manual_seed(0)
    student = torch.randn(4, 16)
    teacher = torch.randn(4, 16)
    targets = teacher_targets_from_logits(teacher, 5, tau=2.0)
    s = bucket_log_probs(student, targets.ids, 2.0)
    t = targets.bucket_log_probs(2.0)
    return {kind: divergence(s, t, kind, 0.5).mean().item() for kind in DIVERGENCES}


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_pinned_values(kind: str) -> None:
    assert pinned_divergences()[kind] == pytest.approx(PINNED_MEANS[kind], rel=1e-5)


def test_invalid_kind_and_beta() -> None:
    logp = F.log_softmax(torch.randn(2, 3), -1)
    with pytest.raises(ValueError, match="allowed: forward_kl, reverse_kl"):
        divergence(logp, logp, "kl")
    for kind in ("jsd", "skew_kl", "skew_reverse_kl"):
        for beta in (0.0, 1.0):
            with pytest.raises(ValueError, match="beta"):
                divergence(logp, logp, kind, beta)
    with pytest.raises(ValueError, match="differ in shape"):
        divergence(logp, logp[:, :2], "tvd")


# ---------------------------------------------------------------------------------------------------------
# fused path: gradients taken in forward (the head given as a LinearHead)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("chunk_size", [1, 3, 100])
@pytest.mark.parametrize("with_teacher", [True, False])
def test_fused_equals_checkpointed(kind: str, chunk_size: int, with_teacher: bool) -> None:
    hidden, head, labels, teacher = chunk_setup(7, with_teacher)
    kwargs = {"temperature": 2.0, "alpha": 0.6, "kind": kind, "beta": BETA, "chunk_size": chunk_size}
    h_ref = hidden.clone().requires_grad_(True)
    ref = chunked_token_loss_sums(h_ref, head, labels, teacher, **kwargs)
    (ref[0] * 0.5).backward()
    w_ref = head.proj.weight.grad.clone()
    head.zero_grad()
    h = hidden.clone().requires_grad_(True)
    out = chunked_token_loss_sums(h, LinearHead(head.proj.weight, softcap=5.0), labels, teacher, **kwargs)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b.detach())
    (out[0] * 0.5).backward()  # the incoming gradient scales what forward computed
    torch.testing.assert_close(h.grad, h_ref.grad)
    torch.testing.assert_close(head.proj.weight.grad, w_ref)


def test_fused_runs_the_head_matmul_once_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    hidden, head, labels, teacher = chunk_setup(7, True)
    calls: list[int] = []
    real_linear = F.linear

    def counting_linear(h: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        calls.append(h.shape[0])
        return real_linear(h, w, b)

    monkeypatch.setattr(F, "linear", counting_linear)
    h = hidden.clone().requires_grad_(True)
    loss_sum, _, _ = chunked_token_loss_sums(h, LinearHead(head.proj.weight, softcap=5.0), labels, teacher,
                                             chunk_size=3, alpha=0.5)
    loss_sum.backward()
    assert calls == [3, 3, 1]


def test_fused_with_a_frozen_head_and_a_frozen_input() -> None:
    hidden, head, labels, teacher = chunk_setup(5, True)
    head.requires_grad_(False)
    h = hidden.clone().requires_grad_(True)
    loss_sum, _, _ = chunked_token_loss_sums(h, LinearHead(head.proj.weight, softcap=5.0), labels, teacher,
                                             chunk_size=2, alpha=0.5)
    loss_sum.backward()
    assert h.grad is not None and head.proj.weight.grad is None
    head.requires_grad_(True)
    loss_sum, _, _ = chunked_token_loss_sums(hidden, LinearHead(head.proj.weight, softcap=5.0), labels, teacher,
                                             chunk_size=2, alpha=0.5)
    loss_sum.backward()
    assert head.proj.weight.grad is not None and torch.isfinite(head.proj.weight.grad).all()


def test_fused_with_a_bias_matches_autograd() -> None:
    hidden, _, labels, teacher = chunk_setup(6, True)
    lin = torch.nn.Linear(6, 13)
    h_ref = hidden.clone().requires_grad_(True)
    loss, _, _ = token_losses(lin(h_ref), labels, teacher, temperature=2.0, alpha=0.5)
    loss.sum().backward()
    refs = (h_ref.grad, lin.weight.grad.clone(), lin.bias.grad.clone())
    lin.zero_grad()
    h = hidden.clone().requires_grad_(True)
    loss_sum, _, _ = chunked_token_loss_sums(h, LinearHead(lin.weight, lin.bias), labels, teacher, chunk_size=4,
                                             temperature=2.0, alpha=0.5)
    loss_sum.backward()
    for got, want in zip((h.grad, lin.weight.grad, lin.bias.grad), refs, strict=True):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------------------
# the sampled tail (Note [Teacher signal])
# ---------------------------------------------------------------------------------------------------------


def test_systematic_sample_draws_each_id_floor_or_ceil_of_its_share() -> None:
    g = torch.Generator().manual_seed(20)
    logq = torch.randn(6, 30, generator=g) * 2
    logq[:, :4] = -INF  # never drawn (the head)
    logq[5] = -INF  # an empty tail: nothing drawn
    m = 17
    ids, counts = systematic_sample(logq, m, torch.rand(6, generator=g))
    q = torch.softmax(logq[:5].double(), -1)
    assert ids.shape == counts.shape == (6, m)
    assert torch.equal(counts[5], torch.zeros(m)) and torch.equal(ids[5], torch.zeros(m, dtype=torch.long))
    for row in range(5):
        used = counts[row] > 0
        drawn = ids[row][used].tolist()
        assert drawn == sorted(set(drawn)) and min(drawn) >= 4  # distinct, ascending, never a -inf id
        assert not used[used.sum():].any()  # used slots first
        assert counts[row].sum().item() == m
        got = torch.zeros(30, dtype=torch.float64).index_add_(0, ids[row][used], counts[row][used].double())
        share = m * q[row]
        assert ((got >= share.floor() - 1e-9) & (got <= share.ceil() + 1e-9)).all(), (got, share)


def dense_value_and_grad(s: Tensor, t: Tensor, T: float, kind: str) -> tuple[Tensor, Tensor]:
    """The exact full-vocabulary divergence at T per row, from its definition (naive, float64), and its gradient
    w.r.t. the student's logits, by autograd of the plain float64 formula."""
    p_s, p_t = dense_probs(s, T), dense_probs(t, T)
    z = s.double().clone().requires_grad_(True)
    plain_divergence(torch.softmax(z / T, -1), p_t, kind, BETA).sum().backward()
    return naive_rows(p_s, p_t, kind, BETA), z.grad


@pytest.mark.parametrize("kind", ["forward_kl", "skew_kl"])
@pytest.mark.parametrize("k", [1, 4])
def test_sampled_tail_value_and_gradient_are_unbiased(k: int, kind: str) -> None:
    """Averaged over the sampler's offset (a fine grid of it), the sampled divergence and its gradient w.r.t.
    the student's logits are the exact full-vocabulary ones."""
    g = torch.Generator().manual_seed(21)
    # A student within the ratio cap of its teacher (no drawn token over 50x the teacher's share): exact there.
    t = torch.randn(3, 40, generator=g) * 3
    s = t + torch.randn(3, 40, generator=g) * 2
    T, m, R = 3.0, 6, 1000
    want_value, want_grad = dense_value_and_grad(s, t, T, kind)
    value_sum = torch.zeros(3, dtype=torch.float64)
    grad_sum = torch.zeros(3, 40, dtype=torch.float64)
    for r in range(R):
        targets = teacher_targets_from_logits(t, k, samples=m, tau=T, offsets=torch.full((3,), (r + 0.5) / R))
        z = s.clone().requires_grad_(True)
        kd = teacher_divergence(z, targets, T, kind, BETA)
        kd.sum().backward()
        value_sum += kd.detach().double()
        grad_sum += z.grad.double()
    torch.testing.assert_close(value_sum / R, want_value, atol=2e-3, rtol=0)
    torch.testing.assert_close(grad_sum / R, want_grad, atol=2e-4, rtol=0)
    # The buckets alone (what the other divergences read) are far from it: the samples carry the tail.
    buckets = teacher_divergence(s, teacher_targets_from_logits(t, k, samples=0, tau=T), T, kind, BETA)
    assert (want_value - buckets.double()).abs().max() > 0.05


@pytest.mark.parametrize("kind", ["forward_kl", "skew_kl"])
def test_sampled_tail_gradient_is_zero_where_the_student_is_the_teacher(kind: str) -> None:
    """Whatever was drawn, a student equal to its teacher gets no gradient (the draws are never learned)."""
    _, t = random_logits(27, v=40)
    for offset in (0.05, 0.5, 0.95):
        targets = teacher_targets_from_logits(t, 3, samples=7, tau=2.0, offsets=torch.full((5,), offset))
        z = t.clone().requires_grad_(True)
        kd = teacher_divergence(z, targets, 2.0, kind, BETA)
        kd.sum().backward()
        assert z.grad.abs().max().item() < 1e-6
        assert kd.abs().max().item() < 1e-5


def test_a_far_overweighted_draw_is_pushed_down_with_a_capped_ratio() -> None:
    """A student with 1000x the teacher's share on a drawn tail token: pushed down (positive gradient on its
    logit), by a ratio capped at 50, so that one token cannot blow up a step."""
    t = torch.zeros(1, 20)
    t[0, 0] = 5.0
    targets = teacher_targets_from_logits(t, 1, samples=4, tau=1.0, offsets=torch.tensor([0.5]))
    drawn = targets.ids[0, 1].item()
    s = t.clone()
    s[0, drawn] += math.log(1000.0)
    z = s.clone().requires_grad_(True)
    teacher_divergence(z, targets, 1.0, "forward_kl").sum().backward()
    assert 0 < z.grad[0, drawn].item() < 50 * targets.counts[0, 0].item() / 4


def test_sampled_forward_kl_is_buckets_plus_the_tail_estimate() -> None:
    """The value from the definition: KL over the k + 1 buckets, plus the teacher's tail mass times the mean over
    draws of log t(j) - log s(j) (t, s: the tail distributions), in float64; and the gradient's form."""
    s, t = random_logits(22, n=4, v=30)
    T, k = 2.5, 3
    targets = teacher_targets_from_logits(t, k, samples=8, tau=T, offsets=torch.tensor([0.1, 0.4, 0.7, 0.95]))
    z = s.clone().requires_grad_(True)
    kd = teacher_divergence(z, targets, T, "forward_kl")
    p_s, p_t = dense_probs(s, T), dense_probs(t, T)
    head = targets.ids[:, :k]
    buckets = naive_rows(naive_buckets(p_s, head), naive_buckets(p_t, head), "forward_kl", BETA)
    want, want_grad = [], []
    for row in range(4):
        outside = torch.ones(30, dtype=torch.bool)
        outside[head[row]] = False
        c_t, c_s = p_t[row][outside].sum(), p_s[row][outside].sum()
        draws = [(j, n) for j, n in zip(targets.ids[row, k:].tolist(), targets.counts[row].tolist(), strict=True) if n > 0]
        assert sum(n for _, n in draws) == 8
        tail_kl = sum(n / 8 * math.log((p_t[row, j] / c_t) / (p_s[row, j] / c_s)) for j, n in draws)
        want.append(buckets[row].item() + c_t.item() * tail_kl)
        # d/dz of c_t * mean_draws (r_j - 1) log s(j), r_j constant, plus the buckets' exact gradient.
        grad = torch.zeros(30, dtype=torch.float64)
        b_s = naive_buckets(p_s[row : row + 1], head[row : row + 1])[0]
        b_t = naive_buckets(p_t[row : row + 1], head[row : row + 1])[0]
        for i, j in enumerate(head[row].tolist()):
            grad[j] += (p_s[row, j] - b_t[i]) / T
        grad[outside] += p_s[row][outside] * (1 - b_t[-1] / b_s[-1]) / T
        for j, n in draws:
            r = (p_s[row, j] / c_s) / (p_t[row, j] / c_t)
            d_log_s = -(p_s[row] / c_s) * outside
            d_log_s[j] += 1
            grad += c_t * n / 8 * (r - 1) * d_log_s / T
        want_grad.append(grad)
    torch.testing.assert_close(kd.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    kd.sum().backward()
    torch.testing.assert_close(z.grad.double(), torch.stack(want_grad), rtol=1e-4, atol=1e-6)
    loss, kd2, _ = token_losses(s, torch.zeros(4, dtype=torch.long), targets, temperature=T, alpha=1.0)
    torch.testing.assert_close(loss, T**2 * kd2)  # alpha * T^2 on it, as on every divergence


@pytest.mark.parametrize("kind", [k for k in DIVERGENCES if k not in ("forward_kl", "skew_kl")])
def test_other_divergences_see_the_sampled_tail_as_one_bucket(kind: str) -> None:
    s, t = random_logits(23, v=30)
    targets = teacher_targets_from_logits(t, 4, samples=8, tau=2.0)
    got = teacher_divergence(s, targets, 2.0, kind, BETA)
    want = naive_rows(naive_buckets(dense_probs(s, 2.0), targets.ids[:, :4]),
                      naive_buckets(dense_probs(t, 2.0), targets.ids[:, :4]), kind, BETA)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_forward_kl_at_another_temperature_than_the_samples_uses_buckets() -> None:
    """At T = 1 (what evaluation uses) the samples, drawn for tau, are not an estimate: buckets, exact."""
    s, t = random_logits(24, v=30)
    targets = teacher_targets_from_logits(t, 4, samples=8, tau=3.0)
    got = teacher_divergence(s, targets, 1.0, "forward_kl")
    want = naive_rows(naive_buckets(dense_probs(s, 1.0), targets.ids[:, :4]),
                      naive_buckets(dense_probs(t, 1.0), targets.ids[:, :4]), "forward_kl", BETA)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_full_head_with_samples_is_the_dense_loss_and_nan_free() -> None:
    s, t = random_logits(25)
    t[:, 3] = -INF
    targets = teacher_targets_from_logits(t, 11, samples=4, tau=2.0)
    assert torch.equal(targets.counts, torch.zeros(5, 4))  # nothing left to sample
    z = s.clone().requires_grad_(True)
    kd = teacher_divergence(z, targets, 2.0, "forward_kl")
    torch.testing.assert_close(kd, divergence(F.log_softmax(s / 2.0, -1), F.log_softmax(t / 2.0, -1)), rtol=1e-5, atol=1e-6)
    kd.sum().backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_dense_targets_are_the_full_vocabulary_divergence(kind: str) -> None:
    """A live teacher's hidden states and head: its logits cut to the real vocabulary (padded rows are no
    tokens), every student id compared."""
    g = torch.Generator().manual_seed(26)
    hidden, w = torch.randn(5, 6, generator=g), torch.randn(14, 6, generator=g)
    s = torch.randn(5, 14, generator=g) * 2
    dense = DenseTargets(hidden, LinearHead(w), vocab=11)
    got = teacher_divergence(s, dense, 2.0, kind, BETA)
    t = (hidden @ w.T)[:, :11]
    p_t = torch.cat([dense_probs(t, 2.0), torch.zeros(5, 3, dtype=torch.float64)], -1)
    if kind == "reverse_kl":  # the training loss floors the teacher at e^-100 (Note [Zero-probability buckets])
        p_t = p_t.clamp(min=math.exp(TEACHER_LOG_FLOOR))
    want = naive_rows(dense_probs(s, 2.0), p_t, kind, BETA)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got).all()
    assert torch.equal(dense.index(slice(1, 3)).hidden, hidden[1:3]) and len(dense) == 5


# ------------------------------------------------------------------ the closed-form gradient (Note [Closed-form gradient])


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_the_closed_form_gradient_is_autograds(alpha: float, temperature: float) -> None:
    from aitraining.closed_form import token_losses_with_grad
    from aitraining.signal import teacher_targets_from_logits

    torch.manual_seed(0)
    n, v = 12, 300
    teacher = teacher_targets_from_logits(torch.randn(n, v) * 3, 16, samples=40, tau=temperature,
                                          offsets=torch.rand(n))
    z = (torch.randn(n, v) * 2).requires_grad_(True)
    labels = torch.randint(0, v, (n,))
    labels[3] = -100  # an ignored label: no label loss there, the teacher's term still counts
    for t in (teacher, None):
        loss, kd, ce = token_losses(z, labels, t, temperature=temperature, alpha=alpha)
        (want,) = torch.autograd.grad(loss.sum(), z)
        got = token_losses_with_grad(z.detach(), labels, t, temperature=temperature, alpha=alpha)
        assert got is not None
        for a, b in zip(got[:3], (loss.sum(), kd.sum(), ce.sum()), strict=True):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a, b)
        torch.testing.assert_close(got[3], want, rtol=1e-4, atol=1e-6)


def test_the_closed_form_gradient_declines_what_it_does_not_cover() -> None:
    from aitraining.closed_form import token_losses_with_grad
    from aitraining.signal import teacher_targets_from_logits

    n, v = 4, 50
    teacher = teacher_targets_from_logits(torch.randn(n, v), 8, samples=10, tau=3.0, offsets=torch.rand(n))
    z, labels = torch.randn(n, v), torch.randint(0, v, (n,))
    assert token_losses_with_grad(z, labels, teacher, temperature=3.0, alpha=0.5, kind="reverse_kl") is None
    assert token_losses_with_grad(z, labels, teacher, temperature=1.0, alpha=0.5) is None  # not at tau
    whole = teacher_targets_from_logits(torch.randn(n, v), v, samples=10, tau=3.0, offsets=torch.rand(n))
    assert token_losses_with_grad(z, labels, whole, temperature=3.0, alpha=0.5) is None  # no tail: no draws
    peaked = z.scatter(-1, teacher.ids[:, :8], 1e4)  # the student's tail mass underflows to 0 in float32
    assert token_losses_with_grad(peaked, labels, teacher, temperature=3.0, alpha=0.5) is None
