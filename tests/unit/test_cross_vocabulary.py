"""The loss between a teacher and a student with different vocabularies (Note [Across vocabularies]), against a
naive float64 reference: both full distributions at T, projected by hand onto the shared tokens, the lost bucket
and nothing else."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from aitraining.evaluate import kl_and_top1
from aitraining.losses import (
    DIVERGENCES,
    CrossTargets,
    VocabularyMap,
    chunked_token_loss_sums,
    cross_bucket_log_probs,
    teacher_divergence,
    teacher_targets_from_logits,
    token_losses,
)
from test_losses import BETA, naive_rows

VT, VS, N = 30, 24, 4


def random_map(seed: int, shared: int = 16) -> VocabularyMap:
    """A one-to-one map of `shared` random teacher ids onto random student ids."""
    g = torch.Generator().manual_seed(seed)
    t_ids = torch.randperm(VT, generator=g)[:shared]
    s_ids = torch.randperm(VS, generator=g)[:shared]
    to_student = torch.full((VT,), -1, dtype=torch.long)
    to_student[t_ids] = s_ids
    unshared = torch.ones(VS, dtype=torch.bool)
    unshared[s_ids] = False
    return VocabularyMap(to_student, unshared)


def naive_projection(student_logits: Tensor, teacher_logits: Tensor, vocab: VocabularyMap, T: float) -> tuple[Tensor, Tensor]:
    """(student, teacher) probabilities over [the student's ids that a teacher id maps to, in teacher-id order;
    the lost bucket], in float64, one number at a time."""
    ps = torch.softmax(student_logits.double() / T, -1)
    pt = torch.softmax(teacher_logits.double() / T, -1)
    pairs = [(t, int(s)) for t, s in enumerate(vocab.to_student.tolist()) if s >= 0]
    s_rows, t_rows = [], []
    for r in range(ps.shape[0]):
        s_row = [ps[r, s].item() for _, s in pairs]
        t_row = [pt[r, t].item() for t, _ in pairs]
        s_rows.append(s_row + [sum(ps[r, j].item() for j in range(ps.shape[1]) if j >= VS or vocab.student_unshared[j])])
        t_rows.append(t_row + [sum(pt[r, j].item() for j in range(VT) if vocab.to_student[j] < 0)])
    return torch.tensor(s_rows, dtype=torch.float64), torch.tensor(t_rows, dtype=torch.float64)


def logits(seed: int, v: int, n: int = N, scale: float = 2.0) -> Tensor:
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * scale


def cross(t_logits: Tensor, vocab: VocabularyMap, k: int, m: int, tau: float, offsets: Tensor | None = None,
          aligned: Tensor | None = None) -> CrossTargets:
    targets = teacher_targets_from_logits(t_logits, k, samples=m, tau=tau, offsets=offsets)
    aligned = torch.ones(len(targets), dtype=torch.bool) if aligned is None else aligned
    return CrossTargets(targets, aligned, vocab)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_full_head_is_the_naive_projection(kind: str, temperature: float) -> None:
    """With the whole teacher vocabulary in the head the loss is the divergence of the two projected
    distributions, exactly (value and gradient, against autograd through the float64 reference)."""
    vocab = random_map(0)
    s, t = logits(1, VS), logits(2, VT)
    targets = cross(t, vocab, VT, 0, temperature)
    z = s.clone().requires_grad_(True)
    got = teacher_divergence(z, targets, temperature, kind, BETA)
    want_s, want_t = naive_projection(s, t, vocab, temperature)
    torch.testing.assert_close(got.double(), naive_rows(want_s, want_t, kind, BETA), atol=1e-5, rtol=1e-5)
    got.sum().backward()
    zd = s.double().clone().requires_grad_(True)
    ps = torch.softmax(zd / temperature, -1)
    shared_s = [int(x) for x in vocab.to_student.tolist() if x >= 0]
    proj_s = torch.cat([ps[:, shared_s], ps[:, vocab.student_unshared].sum(-1, keepdim=True)], -1)
    ref = _torch_divergence(proj_s, want_t, kind)
    ref.sum().backward()
    torch.testing.assert_close(z.grad.double(), zd.grad, atol=1e-5, rtol=1e-4)


def _torch_divergence(ps: Tensor, pt: Tensor, kind: str) -> Tensor:
    def kl(p: Tensor, q: Tensor) -> Tensor:
        return torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.log()), 0.0).sum(-1)

    if kind == "forward_kl":
        return kl(pt, ps)
    if kind == "reverse_kl":
        return kl(ps, pt)
    if kind == "jsd":
        m = BETA * pt + (1 - BETA) * ps
        return BETA * kl(pt, m) + (1 - BETA) * kl(ps, m)
    if kind == "skew_kl":
        return kl(pt, BETA * pt + (1 - BETA) * ps)
    if kind == "skew_reverse_kl":
        return kl(ps, BETA * ps + (1 - BETA) * pt)
    return 0.5 * (pt - ps).abs().sum(-1)


def test_identity_map_is_the_same_vocabulary_loss() -> None:
    """Every id mapped onto itself: the cross-vocabulary loss is the same-vocabulary one (buckets and the
    sampled tail alike), value and gradient."""
    v = 40
    vocab = VocabularyMap(torch.arange(v), torch.zeros(v, dtype=torch.bool))
    s, t = logits(3, v), logits(4, v)
    offsets = torch.full((N,), 0.37)
    same = teacher_targets_from_logits(t, 5, samples=9, tau=3.0, offsets=offsets)
    for kind in ("forward_kl", "jsd"):
        z1, z2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        a = teacher_divergence(z1, same, 3.0, kind, BETA)
        b = teacher_divergence(z2, CrossTargets(same, torch.ones(N, dtype=torch.bool), vocab), 3.0, kind, BETA)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        a.sum().backward()
        b.sum().backward()
        torch.testing.assert_close(z2.grad, z1.grad, atol=1e-6, rtol=1e-5)


def test_sampled_tail_is_unbiased_for_the_projected_forward_kl() -> None:
    """A small head and tail samples: averaged over the sampler's offset, the value and the gradient are those of
    the exact projected forward KL (the lost share of the tail is estimated from the draws themselves)."""
    vocab = random_map(5, shared=20)
    g = torch.Generator().manual_seed(6)
    t = torch.randn(3, VT, generator=g) * 2
    # The student near the teacher's projection (within the ratio cap, where the gradient estimate is exact).
    s = torch.randn(3, VS, generator=g)
    for ti, si in enumerate(vocab.to_student.tolist()):
        if si >= 0:
            s[:, si] = t[:, ti] + 0.5 * torch.randn(3, generator=g)
    T, R = 3.0, 400
    want_s, want_t = naive_projection(s, t, vocab, T)
    want = naive_rows(want_s, want_t, "forward_kl", BETA)
    zd = s.double().clone().requires_grad_(True)
    ps = torch.softmax(zd / T, -1)
    shared_s = [int(x) for x in vocab.to_student.tolist() if x >= 0]
    proj = torch.cat([ps[:, shared_s], ps[:, vocab.student_unshared].sum(-1, keepdim=True)], -1)
    _torch_divergence(proj, want_t, "forward_kl").sum().backward()
    kl_sum = torch.zeros(3, dtype=torch.float64)
    grad_sum = torch.zeros(3, VS, dtype=torch.float64)
    for r in range(R):
        targets = cross(t, vocab, 3, 24, T, offsets=torch.full((3,), (r + 0.5) / R))
        z = s.clone().requires_grad_(True)
        kd = teacher_divergence(z, targets, T, "forward_kl")
        kd.sum().backward()
        kl_sum += kd.detach().double()
        grad_sum += z.grad.double()
    torch.testing.assert_close(kl_sum / R, want, atol=5e-3, rtol=0.02)
    torch.testing.assert_close(grad_sum / R, zd.grad, atol=3e-3, rtol=0)


def test_unaligned_positions_have_no_distillation_term() -> None:
    vocab = random_map(7)
    s, t = logits(8, VS), logits(9, VT)
    aligned = torch.tensor([True, False, True, False])
    targets = cross(t, vocab, 4, 8, 3.0, aligned=aligned)
    z = s.clone().requires_grad_(True)
    kd = teacher_divergence(z, targets, 3.0, "forward_kl")
    assert kd[1].item() == 0.0 and kd[3].item() == 0.0 and kd[0].item() > 0 and kd[2].item() > 0
    kd.sum().backward()
    assert z.grad[1].abs().max().item() == 0.0 and z.grad[3].abs().max().item() == 0.0
    assert z.grad[0].abs().max().item() > 0


def test_padded_student_rows_count_as_lost_text() -> None:
    """Logits wider than the student's tokenizer (padded embedding rows): those ids are no tokens; the loss
    treats them as text the teacher cannot name, like any unshared id, and stays finite."""
    vocab = random_map(10)
    s = torch.cat([logits(11, VS), logits(12, 6)], dim=-1)  # 6 padded rows
    t = logits(13, VT)
    want_s, want_t = naive_projection(s, t, vocab, 2.0)
    for kind in ("forward_kl", "reverse_kl"):
        got = teacher_divergence(s, cross(t, vocab, VT, 4, 2.0), 2.0, kind)
        torch.testing.assert_close(got.double(), naive_rows(want_s, want_t, kind, BETA), atol=1e-5, rtol=1e-5)


def test_evaluation_at_t1_from_targets_cached_at_t3() -> None:
    """The in-training evaluation (T = 1) of a cache taken at tau = 3: a bucket KL at most the exact projected
    KL (data processing), close to it with a full head, and the teacher's top-1 read in the student's ids."""
    vocab = random_map(14)
    s, t = logits(15, VS), logits(16, VT)
    want_s, want_t = naive_projection(s, t, vocab, 1.0)
    exact = naive_rows(want_s, want_t, "forward_kl", BETA)
    kl, top1, counted = kl_and_top1(s, cross(t, vocab, 6, 16, 3.0, offsets=torch.full((N,), 0.5)))
    assert counted.all()
    assert (kl.double() <= exact + 1e-5).all()
    full, _, _ = kl_and_top1(s, cross(t, vocab, VT, 0, 3.0))
    torch.testing.assert_close(full.double(), exact, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(top1, vocab.to_student[t.argmax(-1)])
    st, tt = cross_bucket_log_probs(s, cross(t, vocab, 6, 16, 3.0, offsets=torch.full((N,), 0.5)), 1.0)
    torch.testing.assert_close(st.exp().sum(-1), torch.ones(N), atol=1e-5, rtol=0)
    torch.testing.assert_close(tt.exp().sum(-1), torch.ones(N), atol=1e-5, rtol=0)


def test_chunked_sums_take_cross_targets() -> None:
    """The chunked (fused) loss slices cross-vocabulary targets chunk by chunk like any other: the sums equal
    the unchunked per-token losses."""
    vocab = random_map(17)
    g = torch.Generator().manual_seed(18)
    hidden = torch.randn(7, 8, generator=g)
    weight = torch.randn(VS, 8, generator=g)
    labels = torch.randint(0, VS, (7,), generator=g)
    t = logits(19, VT, n=7)
    targets = cross(t, vocab, 4, 8, 3.0, aligned=torch.tensor([True, True, False, True, False, True, True]))
    from aitraining.losses import LinearHead

    loss, kd, ce = chunked_token_loss_sums(hidden, LinearHead(weight), labels, targets, chunk_size=3,
                                           temperature=3.0, alpha=0.7)
    ref_loss, ref_kd, ref_ce = token_losses(hidden @ weight.T, labels, targets, temperature=3.0, alpha=0.7)
    torch.testing.assert_close(loss, ref_loss.sum(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(kd, ref_kd.sum(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ce, ref_ce.sum(), atol=1e-4, rtol=1e-5)
