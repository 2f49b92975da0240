"""The loss between a teacher and a student with different vocabularies (Note [Across vocabularies]), against a
naive float64 reference: both full distributions at T, projected by hand onto the shared tokens, the lost bucket
and nothing else."""

from __future__ import annotations

import pytest
import torch
from test_losses import BETA, naive_rows
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

VT, VS, N = 30, 24, 4


def random_map(seed: int, shared: int = 16, pieces: bool = False) -> VocabularyMap:
    """A one-to-one map of `shared` random teacher ids onto random student ids; with `pieces`, two in three of the
    other teacher ids also read as a random student id (their first piece: many-to-one), the rest as nothing."""
    g = torch.Generator().manual_seed(seed)
    t_ids = torch.randperm(VT, generator=g)[:shared]
    s_ids = torch.randperm(VS, generator=g)[:shared]
    to_student = torch.full((VT,), -1, dtype=torch.long)
    to_student[t_ids] = s_ids
    unshared = torch.ones(VS, dtype=torch.bool)
    unshared[s_ids] = False
    first = to_student.clone()
    if pieces:  # half of them onto shared student ids (" dist" of " distillation" is often a token of both)
        for t in range(VT):
            if first[t] < 0 and t % 3:
                pick = s_ids if t % 2 else torch.arange(VS)
                first[t] = int(pick[torch.randint(0, len(pick), (1,), generator=g)])
    return VocabularyMap(to_student, unshared, first)


def naive_events(student_logits: Tensor, teacher_logits: Tensor, vocab: VocabularyMap, T: float,
                 heads: list[set[int]] | None = None) -> list[tuple[list[float], list[float]]]:
    """Per row, (student, teacher) probabilities over the same events, in float64, one token at a time. A teacher
    token in the row's head (all of them when `heads` is None) is the event of its first piece (lost if it has
    none); a tail token is the event of its first piece if a head token reads as that piece, else its own shared
    id, else lost. A student id is its own event if the head reads as it or it is shared, else lost."""
    ps = torch.softmax(student_logits.double() / T, -1)
    pt = torch.softmax(teacher_logits.double() / T, -1)
    rows = []
    for r in range(ps.shape[0]):
        head = set(range(VT)) if heads is None else heads[r]
        pieces = {int(vocab.first_piece[t]) for t in head if vocab.first_piece[t] >= 0}
        q: dict[object, float] = {}
        for t in range(VT):
            f, own = int(vocab.first_piece[t]), int(vocab.to_student[t])
            key = f if (t in head or f in pieces) and f >= 0 else own if t not in head and own >= 0 else "lost"
            q[key] = q.get(key, 0.0) + pt[r, t].item()
        p: dict[object, float] = {}
        for j in range(ps.shape[1]):
            key = j if j in pieces or (j < VS and not vocab.student_unshared[j]) else "lost"
            p[key] = p.get(key, 0.0) + ps[r, j].item()
        keys = sorted(set(p) | set(q), key=str)
        rows.append(([p.get(x, 0.0) for x in keys], [q.get(x, 0.0) for x in keys]))
    return rows


def naive_projection(student_logits: Tensor, teacher_logits: Tensor, vocab: VocabularyMap, T: float) -> tuple[Tensor, Tensor]:
    rows = naive_events(student_logits, teacher_logits, vocab, T)
    return (torch.tensor([a for a, _ in rows], dtype=torch.float64), torch.tensor([b for _, b in rows], dtype=torch.float64))


def torch_projection(z: Tensor, vocab: VocabularyMap, T: float) -> Tensor:
    """The student side of `naive_projection` (whole head) in float64 torch, for autograd: the events in the same
    (sorted) order."""
    ps = torch.softmax(z / T, -1)
    pieces = sorted({int(x) for x in vocab.first_piece.tolist() if x >= 0})
    own = [j for j in range(z.shape[1]) if j in pieces or (j < VS and not vocab.student_unshared[j])]
    lost = [j for j in range(z.shape[1]) if j not in own]
    keys = sorted([*own, "lost"], key=str)
    cols = [ps[:, lost].sum(-1) if x == "lost" else ps[:, x] for x in keys]
    return torch.stack(cols, -1)


def logits(seed: int, v: int, n: int = N, scale: float = 2.0) -> Tensor:
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * scale


def cross(t_logits: Tensor, vocab: VocabularyMap, k: int, m: int, tau: float, offsets: Tensor | None = None,
          aligned: Tensor | None = None) -> CrossTargets:
    targets = teacher_targets_from_logits(t_logits, k, samples=m, tau=tau, offsets=offsets)
    aligned = torch.ones(len(targets), dtype=torch.bool) if aligned is None else aligned
    return CrossTargets(targets, aligned, vocab)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("pieces", [False, True])
def test_full_head_is_the_naive_projection(kind: str, temperature: float, pieces: bool) -> None:
    """With the whole teacher vocabulary in the head the loss is the divergence of the two projected
    distributions, exactly (value and gradient, against autograd through the float64 reference); with first
    pieces, every teacher token reading as the same student token adds to that token's bucket."""
    vocab = random_map(0, pieces=pieces)
    s, t = logits(1, VS), logits(2, VT)
    targets = cross(t, vocab, VT, 0, temperature)
    z = s.clone().requires_grad_(True)
    got = teacher_divergence(z, targets, temperature, kind, BETA)
    want_s, want_t = naive_projection(s, t, vocab, temperature)
    torch.testing.assert_close(got.double(), naive_rows(want_s, want_t, kind, BETA), atol=1e-5, rtol=1e-5)
    got.sum().backward()
    zd = s.double().clone().requires_grad_(True)
    ref = _torch_divergence(torch_projection(zd, vocab, temperature), want_t, kind)
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
    for kind in ("forward_kl", "skew_kl", "jsd"):
        z1, z2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        a = teacher_divergence(z1, same, 3.0, kind, BETA)
        b = teacher_divergence(z2, CrossTargets(same, torch.ones(N, dtype=torch.bool), vocab), 3.0, kind, BETA)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        a.sum().backward()
        b.sum().backward()
        torch.testing.assert_close(z2.grad, z1.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "skew_kl"])
def test_sampled_tail_is_unbiased_for_the_projected_divergence(kind: str) -> None:
    """A small head and tail samples: averaged over the sampler's offset, the value and the gradient are those of
    the exact projected forward (or skew) KL (the lost share of the tail is estimated from the draws themselves),
    and far from the loss that sees the rest as one bucket."""
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
    want = naive_rows(want_s, want_t, kind, BETA)
    zd = s.double().clone().requires_grad_(True)
    _torch_divergence(torch_projection(zd, vocab, T), want_t, kind).sum().backward()
    kl_sum = torch.zeros(3, dtype=torch.float64)
    grad_sum = torch.zeros(3, VS, dtype=torch.float64)
    for r in range(R):
        targets = cross(t, vocab, 3, 24, T, offsets=torch.full((3,), (r + 0.5) / R))
        z = s.clone().requires_grad_(True)
        kd = teacher_divergence(z, targets, T, kind, BETA)
        kd.sum().backward()
        kl_sum += kd.detach().double()
        grad_sum += z.grad.double()
    torch.testing.assert_close(kl_sum / R, want, atol=5e-3, rtol=0.02)
    # (The gradient's largest entry is 0.022 for forward KL, 0.011 for skew KL; the rest as one bucket with its
    # split still estimated from the draws is 0.0024 off for skew KL, the sampled rest 0.0003.)
    torch.testing.assert_close(grad_sum / R, zd.grad, atol=1e-3, rtol=0)
    # The rest as one bucket (no draws) is not that loss: what the draws add is measurable here.
    bucket = teacher_divergence(s, cross(t, vocab, 3, 0, T), T, kind, BETA).double()
    assert (bucket - want).abs().max() > 0.25 * want.abs().max()


def test_unaligned_positions_have_no_distillation_term() -> None:
    vocab = random_map(7)
    s, t = logits(8, VS), logits(9, VT)
    aligned = torch.tensor([True, False, True, False])
    with torch.random.fork_rng(devices=[]):  # the tail draws: the same whatever ran before
        torch.manual_seed(0)
        targets = cross(t, vocab, 4, 8, 3.0, aligned=aligned)
    z = s.clone().requires_grad_(True)
    kd = teacher_divergence(z, targets, 3.0, "forward_kl")
    # An aligned position has a term (the sampled tail's estimate may make it negative); an unaligned one has none.
    assert kd[1].item() == 0.0 and kd[3].item() == 0.0 and kd[0].item() != 0 and kd[2].item() != 0
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


def test_tail_draws_reading_as_a_head_bucket_join_it() -> None:
    """A small head, first pieces (many-to-one) and tail samples: averaged over the sampler's offset, the loss
    is the forward KL over the events of the row's head (`naive_events` with each row's top-k): tail tokens
    reading as a head bucket's student token add to it, other shared ones are the rest, the others lost."""
    vocab = random_map(23, shared=14, pieces=True)
    g = torch.Generator().manual_seed(24)
    t = torch.randn(3, VT, generator=g) * 2
    s = torch.randn(3, VS, generator=g)
    T, k, R = 3.0, 6, 400
    heads = [set(row.tolist()) for row in t.topk(k, -1).indices]
    want = torch.tensor([naive_rows(torch.tensor([a]), torch.tensor([b]), "forward_kl", BETA).item()
                         for a, b in naive_events(s, t, vocab, T, heads)], dtype=torch.float64)
    got = torch.zeros(3, dtype=torch.float64)
    for r in range(R):
        got += teacher_divergence(s, cross(t, vocab, k, 24, T, offsets=torch.full((3,), (r + 0.5) / R)), T,
                                  "forward_kl").double()
    torch.testing.assert_close(got / R, want, atol=1e-2, rtol=0.03)
    # And with the whole vocabulary in the head the bucket KL at T = 1 is exactly that of the events.
    full, _, _ = kl_and_top1(s, cross(t, vocab, VT, 0, 3.0))
    a, b = naive_projection(s, t, vocab, 1.0)
    torch.testing.assert_close(full.double(), naive_rows(a, b, "forward_kl", BETA), atol=1e-5, rtol=1e-5)


def test_positions_without_a_teacher_learn_from_their_label_with_full_weight() -> None:
    """alpha balances the teacher against the label where there is a teacher; a student token whose text the
    teacher splits otherwise has only its label, with weight 1 (as without distillation); alpha = 1 ignores labels."""
    vocab = random_map(30)
    s, t = logits(31, VS), logits(32, VT)
    labels = torch.tensor([1, 2, 3, 4])
    aligned = torch.tensor([True, False, True, False])
    targets = cross(t, vocab, 5, 8, 3.0, aligned=aligned)
    loss, kd, ce = token_losses(s, labels, targets, temperature=3.0, alpha=0.7)
    torch.testing.assert_close(loss[~aligned], ce[~aligned])
    torch.testing.assert_close(loss[aligned], 0.7 * 9 * kd[aligned] + 0.3 * ce[aligned])
    loss1, kd1, _ = token_losses(s, labels, targets, temperature=3.0, alpha=1.0)
    assert (loss1[~aligned] == 0).all() and torch.equal(loss1[aligned], 9 * kd1[aligned])
