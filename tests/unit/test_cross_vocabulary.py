"""The loss between a teacher and a student with different vocabularies (Note [Across vocabularies]), against a
naive float64 reference: the teacher's full distribution carried over to the student's vocabulary by hand, one
token at a time (each to its first piece), then the divergence at T over the student's vocabulary."""

from __future__ import annotations

import pytest
import torch
from test_losses import BETA, naive_rows
from torch import Tensor

from aitraining.chunked import chunked_token_loss_sums
from aitraining.losses import DIVERGENCES, teacher_divergence, token_losses
from aitraining.metrics import kl_and_top1
from aitraining.signal import CrossTargets, VocabularyMap, teacher_targets_from_logits

VT, VS, N = 30, 24, 4


def random_map(seed: int, shared: int = 16, pieces: bool = False) -> VocabularyMap:
    """A one-to-one map of `shared` random teacher ids onto random student ids; with `pieces`, two in three of the
    other teacher ids also read as a random student id (their first piece: many-to-one), the rest as nothing."""
    g = torch.Generator().manual_seed(seed)
    t_ids = torch.randperm(VT, generator=g)[:shared]
    s_ids = torch.randperm(VS, generator=g)[:shared]
    to_student = torch.full((VT,), -1, dtype=torch.long)
    to_student[t_ids] = s_ids
    first = to_student.clone()
    if pieces:  # half of them onto shared student ids (" dist" of " distillation" is often a token of both)
        for t in range(VT):
            if first[t] < 0 and t % 3:
                pick = s_ids if t % 2 else torch.arange(VS)
                first[t] = int(pick[torch.randint(0, len(pick), (1,), generator=g)])
    return VocabularyMap(to_student, first, VS)


def naive_projected(teacher_logits: Tensor, vocab: VocabularyMap) -> Tensor:
    """(N, VS) float64: each teacher token's probability added to its first piece's, one token at a time; the
    tokens with no piece dropped and each row renormalized."""
    pt = torch.softmax(teacher_logits.double(), -1)
    out = torch.zeros(pt.shape[0], VS, dtype=torch.float64)
    for r in range(pt.shape[0]):
        for t in range(VT):
            if vocab.first_piece[t] >= 0:
                out[r, int(vocab.first_piece[t])] += pt[r, t]
    return out / out.sum(-1, keepdim=True)


def tempered(p: Tensor, T: float) -> Tensor:
    """A distribution (rows of probabilities, float64) at temperature T: p^(1/T), renormalized."""
    q = p ** (1.0 / T)
    return q / q.sum(-1, keepdim=True)


def logits(seed: int, v: int, n: int = N, scale: float = 2.0) -> Tensor:
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * scale


def cross(t_logits: Tensor, vocab: VocabularyMap, k: int, m: int, tau: float, offsets: Tensor | None = None,
          aligned: Tensor | None = None) -> CrossTargets:
    """What the cache holds for teacher logits: their projection onto the student's vocabulary, as sparse targets."""
    targets = teacher_targets_from_logits(vocab.project(t_logits), k, samples=m, tau=tau, offsets=offsets)
    aligned = torch.ones(len(targets), dtype=torch.bool) if aligned is None else aligned
    return CrossTargets(targets, aligned)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("pieces", [False, True])
def test_full_head_is_the_naive_projection(kind: str, temperature: float, pieces: bool) -> None:
    """With the whole student vocabulary in the head the loss is the divergence between the student at T and the
    teacher's projection at T, exactly (value and gradient, against autograd through the float64 reference);
    with first pieces, every teacher token reading as the same student token adds to it."""
    vocab = random_map(0, pieces=pieces)
    s, t = logits(1, VS), logits(2, VT)
    targets = cross(t, vocab, VS, 0, temperature)
    z = s.clone().requires_grad_(True)
    got = teacher_divergence(z, targets, temperature, kind, BETA)
    want_t = tempered(naive_projected(t, vocab), temperature)
    zd = s.double().clone().requires_grad_(True)
    want_s = torch.softmax(zd / temperature, -1)
    want = naive_rows(want_s.detach(), want_t, kind, BETA)
    if kind == "reverse_kl":  # ids nothing reads as: the training loss floors the teacher there (a large push)
        assert torch.isinf(want).all() and torch.isfinite(got).all()
        return
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    _torch_divergence(want_s, want_t, kind).sum().backward()
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
    """Every id mapped onto itself: the projection is the teacher's distribution, and the loss is the
    same-vocabulary one (buckets and the sampled tail alike), value and gradient."""
    v = 40
    vocab = VocabularyMap(torch.arange(v), torch.arange(v), v)
    s, t = logits(3, v), logits(4, v)
    torch.testing.assert_close(vocab.project(t), torch.log_softmax(t, -1), atol=1e-6, rtol=0)
    offsets = torch.full((N,), 0.37)
    same = teacher_targets_from_logits(t, 5, samples=9, tau=3.0, offsets=offsets)
    for kind in ("forward_kl", "skew_kl", "jsd"):
        z1, z2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        a = teacher_divergence(z1, same, 3.0, kind, BETA)
        b = teacher_divergence(z2, cross(t, vocab, 5, 9, 3.0, offsets=offsets), 3.0, kind, BETA)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        a.sum().backward()
        b.sum().backward()
        torch.testing.assert_close(z2.grad, z1.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "skew_kl"])
def test_sampled_tail_is_unbiased_for_the_projected_divergence(kind: str) -> None:
    """A small head and tail samples of the projected teacher: averaged over the sampler's offset, the value and
    the gradient are those of the exact divergence from the projection, and far from the loss that sees the tail
    as one bucket."""
    vocab = random_map(5, shared=20, pieces=True)
    g = torch.Generator().manual_seed(6)
    t = torch.randn(3, VT, generator=g) * 2
    T, R = 3.0, 400
    p = naive_projected(t, vocab)
    # The student near the teacher's projection (within the ratio cap, where the gradient estimate is exact).
    s = (p.clamp_min(1e-6).log() + 0.5 * torch.randn(3, VS, generator=g, dtype=torch.float64)).float()
    want_t = tempered(p, T)
    zd = s.double().clone().requires_grad_(True)
    want_s = torch.softmax(zd / T, -1)
    want = naive_rows(want_s.detach(), want_t, kind, BETA)
    _torch_divergence(want_s, want_t, kind).sum().backward()
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
    torch.testing.assert_close(grad_sum / R, zd.grad, atol=1e-3, rtol=0)
    # The tail as one bucket (no draws) is not that loss: what the draws add is measurable here.
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


def test_padded_student_rows_get_no_teacher_mass() -> None:
    """Logits wider than the student's tokenizer (padded embedding rows): those ids are no tokens; the teacher's
    projection puts nothing there and the loss (forward KL) counts the student's mass there as misplaced."""
    vocab = random_map(10, pieces=True)
    s = torch.cat([logits(11, VS), logits(12, 6)], dim=-1)  # 6 padded rows
    t = logits(13, VT)
    want_t = torch.cat([tempered(naive_projected(t, vocab), 2.0), torch.zeros(N, 6, dtype=torch.float64)], -1)
    got = teacher_divergence(s, cross(t, vocab, VS, 4, 2.0), 2.0, "forward_kl")
    want = naive_rows(torch.softmax(s.double() / 2.0, -1), want_t, "forward_kl", BETA)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_evaluation_at_t1_from_targets_cached_at_t3() -> None:
    """The in-training evaluation (T = 1) of a cache taken at tau = 3: a bucket KL at most the exact KL from the
    projection (data processing), equal to it with a full head, and the teacher's top-1 read in the student's ids
    (the most likely first piece, which need not be the teacher's own top token's)."""
    vocab = random_map(14, pieces=True)
    s, t = logits(15, VS), logits(16, VT)
    p = naive_projected(t, vocab)
    exact = naive_rows(torch.softmax(s.double(), -1), p, "forward_kl", BETA)
    kl, top1, counted = kl_and_top1(s, cross(t, vocab, 6, 16, 3.0, offsets=torch.full((N,), 0.5)))
    assert counted.all()
    assert (kl.double() <= exact + 1e-5).all()
    full, _, _ = kl_and_top1(s, cross(t, vocab, VS, 0, 3.0))
    torch.testing.assert_close(full.double(), exact, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(top1, p.argmax(-1))


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
    from aitraining.chunked import LinearHead

    loss, kd, ce = chunked_token_loss_sums(hidden, LinearHead(weight), labels, targets, chunk_size=3,
                                           temperature=3.0, alpha=0.7)
    ref_loss, ref_kd, ref_ce = token_losses(hidden @ weight.T, labels, targets, temperature=3.0, alpha=0.7)
    torch.testing.assert_close(loss, ref_loss.sum(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(kd, ref_kd.sum(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ce, ref_ce.sum(), atol=1e-4, rtol=1e-5)


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



def test_projection_adds_each_teacher_token_to_its_first_piece() -> None:
    """Many teacher tokens reading as one student token add up there; tokens with no piece are dropped; the
    student ids nothing reads as get probability 0 (-inf). Rows of very different scales stay exact (the sum
    is taken below each row's largest probability, so a confident row's small masses do not vanish)."""
    vocab = random_map(40, shared=12, pieces=True)
    t = logits(41, VT, scale=4.0)
    t[0] *= 10.0  # a confident row: probabilities from about 1 down to e^-200
    got = vocab.project(t)
    want = naive_projected(t, vocab)
    assert torch.equal(torch.isneginf(got), want == 0)
    torch.testing.assert_close(got.exp().double(), want, atol=1e-6, rtol=1e-5)
    small = (want > 0) & (want < 1e-20)
    assert small.any()  # the confident row has such masses, and they are right in log space too
    torch.testing.assert_close(got.double()[small], want[small].log(), atol=1e-3, rtol=0)


def test_a_projected_cache_is_named_by_the_student_vocabulary() -> None:
    """The cached targets of a teacher projected onto a student's vocabulary depend on that vocabulary: another
    student tokenizer (here one teacher token read as another piece, or a larger vocabulary) never reads them;
    the same map (rebuilt) does. A k above the vocabulary keeps all of it, under one name."""
    from aitraining.params import LLMTrainingParams, digest
    from aitraining.teacher import TeacherSettings
    from aitraining.teacher.cache import cache_meta as meta_of
    from aitraining.teacher.cache import model_identity
    from aitraining.teacher.settings import teacher_dtype

    params = LLMTrainingParams(model="s", teacher_model="t", data_path="d", project_name="p", use_distillation=True)
    cpu = torch.device("cpu")

    def cache_meta(p: LLMTrainingParams, device: torch.device, vocab: int, projection: VocabularyMap | None = None):
        """The cache's meta for a run's parameters and a teacher on `device` (its identity as `Engine.identity`)."""
        settings = p.settings(TeacherSettings)
        identity = {"teacher": model_identity(settings.teacher_model),
                    "dtype": str(teacher_dtype(device, settings.mixed_precision))}
        return meta_of(identity, settings, vocab, projection)

    vocab = random_map(50, pieces=True)
    name = digest(cache_meta(params, cpu, VT, vocab))
    assert digest(cache_meta(params, cpu, VT, random_map(50, pieces=True))) == name
    other = vocab.first_piece.clone()
    i = int((other >= 0).nonzero()[0])
    other[i] = (other[i] + 1) % VS
    names = {name, digest(cache_meta(params, cpu, VT)),
             digest(cache_meta(params, cpu, VT, VocabularyMap(vocab.to_student, other, VS))),
             digest(cache_meta(params, cpu, VT, VocabularyMap(vocab.to_student, vocab.first_piece, VS + 1)))}
    assert len(names) == 4
    big = params.model_copy(update={"distill_top_k": 10_000})
    assert cache_meta(big, cpu, VT, vocab)["k"] == VS and cache_meta(big, cpu, VT)["k"] == VT


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_broken_teacher_row_stays_broken_through_the_projection(bad: float) -> None:
    """A teacher row that is no distribution (NaN, +inf, or nothing but -inf) is still refused after the
    projection (the run stops before caching it), and only that row; even where the broken logit is a token with
    no piece, whose mass the projection drops."""
    from aitraining.signal import NonFiniteTeacher

    vocab = random_map(60, pieces=True)
    t = logits(61, VT)
    if bad == float("-inf"):
        t[1] = bad
    else:
        t[1, int((vocab.first_piece < 0).nonzero()[0])] = bad
    assert torch.isfinite(vocab.project(t)[[0, 2, 3]].amax(-1)).all()
    with pytest.raises(NonFiniteTeacher, match="at 1 of 4 positions"):
        teacher_targets_from_logits(vocab.project(t), 4)
