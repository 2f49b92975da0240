"""Distillation losses: divergences between a teacher and a student next-token distribution.

Everything here is a pure function of tensors; the trainer decides which positions count (response
tokens only) and hands over only those rows.

The per-token loss is

    loss = alpha * T^2 * D(p_t^T || p_s^T) + (1 - alpha) * CE(p_s^1, label)

where ``p^T = softmax(z / T)``. The ``T^2`` factor keeps the gradient of the soft term on the same scale as
the hard term when the temperature changes (the gradient of a divergence of tempered softmaxes w.r.t. the
logits shrinks like ``1 / T^2``).

The teacher reaches the loss in one of two forms: `TeacherTargets` (sparse, what the cache stores) or
`DenseTargets` (the live teacher's hidden states and output head: the exact full-vocabulary distribution).

Note [Teacher signal]
~~~~~~~~~~~~~~~~~~~~~
Storing the teacher's full distribution for every token is too expensive (V up to 262k), so the cache keeps,
per position, what a server could also return plus a small random sample:

- the HEAD: the top-k token ids at T = 1 and their log-probabilities at T = 1 (what vLLM and OpenAI-compatible
  servers return as ``logprobs``);
- the TAIL: the log of the mass outside the head at T = 1, and ``log sum_{j in tail} p_j^(1/tau)``, the tail's
  unnormalized mass at the sampling temperature tau (= the distillation temperature);
- m SAMPLES of the tail: ids drawn by systematic sampling from the tail's tempered distribution
  ``t_j = p_j^(1/tau) / sum_tail p^(1/tau)`` (one uniform offset, m evenly spaced points on the CDF), merged
  into distinct ids with their counts, each with its log-probability at T = 1.

Why samples: at the documented T = 3 the teacher's tempered distribution is flat; the top-64 carry about 9 % of
its mass on this project's teacher (benchmarks/quality.py), so a top-k cache whose rest is one "tail" bucket
(the previous design, still used when m = 0) tells the student only how much mass goes elsewhere, never where.
The dense loss sees every tail token. Tempering keeps the ranking, so a top-k taken at T = 1 has the very same
ids and bucket masses: the temperature at which the head is cached changes nothing, the tail's shape does.

The loss at T = tau (forward KL, the default divergence) uses the chain rule of KL:
``KL(p_t || p_s) = KL over the k + 1 buckets + c * KL(t || s)``, c the teacher's tail mass, t and s the two
tail distributions. The bucket term is exact (the tail mass at tau is stored). The draws come from t, so the
mean over draws of ``log t(j) - log s(j)`` is an unbiased estimate of KL(t || s) (Anshumann et al., "Sparse Logit
Sampling", ACL 2025: top-k caches are biased, sampled ones are not). Its gradient is NOT taken from that mean:
with the same draws reused every epoch, the student would learn the draws themselves (the minimizer of a fixed
sample's cross-entropy is the sample: measured, a tiny student's held-out KL rose 3.5x where the dense loss
halved it). Instead the gradient comes from ``mean over draws of (r_j - 1) log s(j)``, with ``r_j = s(j) / t(j)``
held constant: its expectation is the exact gradient ``(s - t) / T``, and it is exactly zero wherever the
student's tail matches the teacher's, whatever was drawn (a control variate with the student's own tail). The
ratio is capped at 50 so that a token the student overweights by orders of magnitude cannot blow up a step.
Systematic sampling keeps every expectation and spreads the draws evenly (lower variance than independent
draws).

Skew KL (DistiLLM's ``KL(p || beta p + (1 - beta) q)``) is, like forward KL, a sum over tokens of the teacher's
probability times a function of both, so its tail part is c times an expectation over t that the same draws
estimate without bias; its gradient comes from the same kind of surrogate (`_sampled_divergence`). The other
divergences weigh tokens by the student's probability (reverse KL, JSD's student half, the skew reverse KL) or
are not expectations (TVD), which teacher draws cannot estimate, so for them (and when m = 0, or at a
temperature other than tau, such as T = 1 for evaluation) the tail is one bucket of exactly known mass: k + 1
buckets that sum to 1, the student projected onto the same buckets (its probabilities on the head ids plus its
total mass elsewhere). That is a true divergence of two distributions over the same events and, by the
data-processing inequality, a lower bound of the full-vocabulary one; with k = V the tail is empty (log-prob
-inf) and it equals the dense loss exactly.

Tail masses are logsumexps over the entries outside the head, never ``log(1 - sum(p))``, which cancels
catastrophically when the head holds almost all of the mass (the common case for a confident teacher).

Note [Across vocabularies]
~~~~~~~~~~~~~~~~~~~~~~~~~~
A teacher with another tokenizer writes the same answer in other tokens. Its answer is decoded, re-tokenized
for the student, and both token lists are aligned by the characters they cover (align.py, Note [Span
alignment]). A student token gets a teacher position when a teacher token starts at the same character and the
student's token is its first piece (below): the same token where both vocabularies have it, " Portug" where the
teacher wrote " Portuguese". Both then predict text starting with the student's token from the same preceding
text. Other student tokens (inside a teacher token, or split otherwise) learn from their label alone.

At such a position the two next-token distributions live on different vocabularies. The teacher's is carried
over to the student's when it is cached (`VocabularyMap.project`): each teacher token's probability goes to the
student token its text starts with, itself where both vocabularies have it (matched by the bytes it stands for,
"Ġ" and "▁" and byte pieces normalized; the teacher's EOS is the student's), else the longest student token that
its bytes start with (" Portuguese" is " Portug" to a student without the word, "\n\n" is "\n"). The result P
is the teacher's probability that the answer goes on with text starting with each student token, which is what
the student's next-token distribution predicts. (The teacher's other special tokens have no piece; their mass,
normally nil inside an answer, is dropped and P renormalized.) From there everything is the same-vocabulary
path: P's head, tail mass and tail samples are cached (Note [Teacher signal]; the cache's key holds the student's
vocabulary map), the temperature softens P, and the documented divergences compare P^T and the student's p^T.
With identical vocabularies P is the teacher's own distribution.

Why project before caching rather than compare in the teacher's ids (the previous design, measured on
benchmarks/cross_tokenizer.py): a cache in the teacher's ids holds the teacher's head and samples of its tail;
the tail tokens that the student writes otherwise and that read as no head token then formed one "lost" bucket,
and at T = 3 that bucket held 41 % of the teacher's mass (SmolLM2 and Llama 2's tokenizer: head buckets 9 %,
shared rest 50 %). The loss could only say "this much goes to text you write otherwise". Projected first, that
mass lands on the student tokens that begin the text, and the head and samples are drawn from P itself, with
the estimates and tests of one vocabulary. The student came closer to the teacher's text at the same cost
(KL per byte 1.170 and 1.158 against 1.195 and 1.191, seeds 0 and 1; BENCHMARKS.md).

What first pieces miss: a student token longer than every teacher token that starts its text ("▁International"
where the teacher writes " Intern" + "ational") is no teacher token's first piece, so P holds nothing on it; the
teacher's probability of that longer text would need its following positions. A position whose label is such a
token has no teacher row (its label would have P = 0), but elsewhere P still puts nothing on those tokens.

Why the temperature softens P rather than summing the teacher's tempered token masses: the documented T is a
property of the distribution the student learns, here P; tempering P is exactly the same-vocabulary loss
applied to it, and P at T = 1 is all the cache needs (its tail mass at T is computed from P when cached).

Why first pieces rather than one bucket for all the text only one vocabulary writes: a student that only learns
how much mass goes "elsewhere" puts it on whichever of its own odd tokens is cheapest (runs of spaces, measured:
its greedy answers began with them), while "\n\n" read as "\n" teaches the right token. Why not a
vocabulary-free distance for the rest (ULD's sorted probabilities): it matches the shapes of the two
distributions and ignores which token is which.

Note [Sum reduction]
~~~~~~~~~~~~~~~~~~~~
`chunked_token_loss_sums` returns SUMS over positions, not means. The trainer divides by the global number
of response tokens in the optimizer step (over all micro-batches and all data-parallel ranks). A per-micro-
batch mean would weight a token in a short micro-batch more than one in a long micro-batch, so gradient
accumulation and data parallelism would give different gradients from one big batch; sum-then-divide-by-
the-global-count makes every response token weigh exactly the same however the batch is split.

Note [Zero-probability buckets]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Rows may hold -inf log-probs (an empty tail when k = V, masked vocabulary entries, unused sample slots). We
use the convention ``0 * log 0 = 0``. Autograd through ``torch.where`` still evaluates the gradient of the
branch that was not taken, and ``0 * inf`` or ``exp(-inf - -inf)`` there turns into NaN, so every expression
that could see -inf on an untaken branch gets its inputs replaced by a harmless finite value first.

A KL term with p > 0 where q = 0 is genuinely +inf (e.g. reverse KL where the teacher's logit is -inf but
the student's is not). The value is reported as +inf, but the term enters autograd as a constant: its
derivative would be inf, which log_softmax's backward turns into inf - inf = NaN, and would even poison
rows whose upstream gradient is 0 (0 * inf). Gradients therefore stay finite and cover the finite terms.

Training cannot use an infinite loss, though (a run stops on a loss that is not finite), and a teacher that
masks part of its vocabulary (-inf logits) makes reverse KL infinite wherever the student puts any mass there.
So the training loss (`teacher_divergence`) floors the teacher's log-probabilities at TEACHER_LOG_FLOOR for
reverse KL only: a token the teacher rules out costs the student 100 nats per unit of its mass there, a large,
finite push away from it. The floor is below every normal float32 probability (the smallest is e^-87.3), so
only probabilities the float32 softmax holds as zero or subnormal are raised to e^-100; the other divergences are finite at teacher zeros and are left exact. `divergence` itself stays exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from aitraining.params import DIVERGENCE_KINDS

DIVERGENCES: tuple[str, ...] = DIVERGENCE_KINDS  # one list, the documented --distill-loss choices

# Kinds that mix the two distributions with weight beta; beta at 0 or 1 makes them degenerate
# (identically 0 or plain KL) and log(beta) would be -inf.
_MIXING_KINDS: frozenset[str] = frozenset({"jsd", "skew_kl", "skew_reverse_kl"})

_NEG_INF = float("-inf")
TEACHER_LOG_FLOOR = -100.0  # Note [Zero-probability buckets]
_FIELDS = ("ids", "logp", "sample_logp", "counts", "tail_logp", "tail_lognorm")
# Cap of the student-to-teacher probability ratio at a sampled id in the tail's gradient (Note [Teacher signal]):
# only a student that puts over 50x the teacher's share on a drawn token is pushed down less hard than exactly.
_MAX_RATIO = 50.0
# Divergences whose tail the samples estimate (Note [Teacher signal]); the others see the tail as one bucket.
_SAMPLED_KINDS: frozenset[str] = frozenset({"forward_kl", "skew_kl"})


@dataclass
class TeacherTargets:
    """The teacher's sparse distribution at N positions: head, tail mass and tail samples (Note [Teacher signal]).

    Attributes:
        ids: (N, k + m) int64: the top-k ids at T = 1 (distinct, most likely first), then m sampled tail ids
            (distinct, none in the head; slots with count 0 are unused).
        logp: (N, k) float32: log-probabilities at T = 1 of the head ids.
        sample_logp: (N, m) float32: log-probabilities at T = 1 of the sampled ids.
        counts: (N, m) float32: how often each sampled id was drawn; they sum to m when the tail is not empty.
        tail_logp: (N,) float32: log of the mass outside the head at T = 1; -inf when the head covers everything.
        tail_lognorm: (N,) float32: ``log sum_{j outside the head} p_j^(1/tau)``.
        tau: the temperature the tail was sampled at (and `tail_lognorm` taken at).
    """

    ids: Tensor
    logp: Tensor
    sample_logp: Tensor
    counts: Tensor
    tail_logp: Tensor
    tail_lognorm: Tensor
    tau: float = 1.0

    def __post_init__(self) -> None:
        n, k, m = self.logp.shape[0], self.logp.shape[-1], self.counts.shape[-1]
        if (self.logp.dim() != 2 or self.counts.dim() != 2 or self.ids.shape != (n, k + m)
                or self.counts.shape[0] != n or self.sample_logp.shape != self.counts.shape):
            raise ValueError(
                f"TeacherTargets: ids must be (N, k + m) for logp (N, k) and sample_logp, counts (N, m); got ids "
                f"{tuple(self.ids.shape)}, logp {tuple(self.logp.shape)}, sample_logp {tuple(self.sample_logp.shape)}, "
                f"counts {tuple(self.counts.shape)}"
            )
        if self.tail_logp.shape != (n,) or self.tail_lognorm.shape != (n,):
            raise ValueError(
                f"TeacherTargets: tail_logp and tail_lognorm must be (N,) = ({n},); got "
                f"{tuple(self.tail_logp.shape)} and {tuple(self.tail_lognorm.shape)}"
            )

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def k(self) -> int:
        """Number of head ids."""
        return self.logp.shape[1]

    @property
    def m(self) -> int:
        """Number of sample slots."""
        return self.counts.shape[1]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> TeacherTargets:
        return TeacherTargets(fn(self.ids), fn(self.logp), fn(self.sample_logp), fn(self.counts), fn(self.tail_logp),
                              fn(self.tail_lognorm), self.tau)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TeacherTargets:
        """Move every tensor to ``device``."""
        return self._map(lambda x: x.to(device, non_blocking=non_blocking))

    def index(self, sel: Tensor | slice) -> TeacherTargets:
        """Select rows with a bool mask (N,), an index tensor, or a slice."""
        return self._map(lambda x: x[sel])

    @staticmethod
    def cat(parts: list[TeacherTargets]) -> TeacherTargets:
        """Concatenate along rows; all parts must share k, m and tau."""
        if not parts:
            raise ValueError("TeacherTargets.cat: need at least one part")
        shapes = {(p.k, p.m, p.tau) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"TeacherTargets.cat: parts differ in (k, m, tau): {sorted(shapes)}")
        return TeacherTargets(
            *(torch.cat([getattr(p, f) for p in parts]) for f in _FIELDS),
            tau=parts[0].tau,
        )

    def bucket_log_probs(self, temperature: float) -> Tensor:
        """The teacher's k + 1 bucket log-probs at T = 1 or T = tau (the temperatures whose tail mass is stored):
        ``softmax`` over ``cat(logp / T, tail mass at T)``, (N, k + 1) float32."""
        if temperature == 1.0:
            tail = self.tail_logp
        elif math.isclose(temperature, self.tau):
            tail = self.tail_lognorm
        else:
            raise ValueError(f"teacher targets hold the tail mass at T = 1 and T = {self.tau:g} only, not {temperature:g}")
        b = torch.cat([self.logp.float() / temperature, tail.float().unsqueeze(-1)], dim=-1)
        return b - torch.logsumexp(b, dim=-1, keepdim=True)


@dataclass
class DenseTargets:
    """The live teacher at N positions: its final hidden states and its output head, so that its exact
    full-vocabulary logits are made one chunk at a time inside the loss (never for the whole batch).

    Attributes:
        hidden: (N, H) the teacher's final hidden states at the positions that predict the student's tokens.
        head: the teacher's output head (its tensors; no gradient flows into the teacher).
        vocab: the real vocabulary size; logits of padded embedding rows beyond it are no tokens and are cut.
    """

    hidden: Tensor
    head: LinearHead
    vocab: int

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DenseTargets:
        return DenseTargets(self.hidden.to(device, non_blocking=non_blocking), self.head, self.vocab)

    def index(self, sel: Tensor | slice) -> DenseTargets:
        return DenseTargets(self.hidden[sel], self.head, self.vocab)

    @torch.no_grad()
    def logits(self, width: int) -> Tensor:
        """(N, width) float32 teacher logits, -inf beyond the real vocabulary (padded rows are no tokens)."""
        z = self.head(self.hidden).float()[:, : self.vocab]
        if width < z.shape[-1]:
            raise ValueError(f"the student's vocabulary ({width}) is smaller than the teacher's ({z.shape[-1]})")
        return F.pad(z, (0, width - z.shape[-1]), value=_NEG_INF)


@dataclass
class VocabularyMap:
    """How a teacher's token ids read in a student's vocabulary (Note [Across vocabularies]).

    Attributes:
        to_student: (V_teacher,) int64: the student id of the token that stands for the same text, -1 where the
            student has none (one-to-one on the ids it keeps).
        first_piece: (V_teacher,) int64: the student id that a teacher token's text starts with in the student's
            tokens (itself where shared; the longest student token its bytes start with otherwise; -1 for special
            tokens).
        student_size: the student's vocabulary size.
    """

    to_student: Tensor
    first_piece: Tensor
    student_size: int

    def project(self, teacher_logits: Tensor) -> Tensor:
        """The teacher's distribution over the student's vocabulary (Note [Across vocabularies]): each teacher
        token's probability added to its first piece's; (N, V_teacher) logits -> (N, student_size) float32
        log-probs, -inf where no teacher token reads as the id. The mass of tokens with no piece (the teacher's
        special tokens other than its EOS) is dropped: each row is renormalized over what the student can write."""
        # Over the whole row first, so that a logit that is no number (NaN, +inf) breaks the row even at a token
        # with no piece (`teacher_targets_from_logits` then refuses it).
        logp = F.log_softmax(teacher_logits.float(), dim=-1)
        piece = self.first_piece.to(logp.device)
        keep = piece >= 0
        logp, piece = logp[:, keep], piece[keep].expand(logp.shape[0], -1)
        # A logsumexp per student id: the sum is taken below each id's largest term, so that no term underflows
        # (float32's exp stops at e^-103; tempered at T = 3 such a token still counts).
        shape = (logp.shape[0], self.student_size)
        top = torch.full(shape, _NEG_INF, device=logp.device).scatter_reduce_(1, piece, logp, "amax")
        top = torch.where(torch.isneginf(top), 0.0, top)
        mass = torch.zeros(shape, device=logp.device).scatter_add_(1, piece, (logp - top.gather(1, piece)).exp())
        return F.log_softmax(mass.log() + top, dim=-1)


@dataclass
class CrossTargets:
    """A teacher with another vocabulary, at the student's N positions (Note [Across vocabularies]).

    Attributes:
        teacher: the teacher's sparse targets in the student's vocabulary (its distribution projected onto it when
            cached, `VocabularyMap.project`), one row per student position: that of the teacher position that
            predicts the same text, a placeholder row where there is none.
        aligned: (N,) bool: whether the student position has a teacher position predicting the same token.
    """

    teacher: TeacherTargets
    aligned: Tensor

    def __post_init__(self) -> None:
        if self.aligned.shape != (len(self.teacher),):
            raise ValueError(f"CrossTargets: aligned must be ({len(self.teacher)},), got {tuple(self.aligned.shape)}")

    def __len__(self) -> int:
        return len(self.teacher)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CrossTargets:
        return CrossTargets(self.teacher.to(device, non_blocking), self.aligned.to(device, non_blocking=non_blocking))

    def index(self, sel: Tensor | slice) -> CrossTargets:
        return CrossTargets(self.teacher.index(sel), self.aligned[sel])

    @staticmethod
    def cat(parts: list[CrossTargets]) -> CrossTargets:
        if not parts:
            raise ValueError("CrossTargets.cat: need at least one part")
        return CrossTargets(TeacherTargets.cat([p.teacher for p in parts]), torch.cat([p.aligned for p in parts]))


Targets = TeacherTargets | DenseTargets | CrossTargets


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_kind(kind: str, beta: float) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; allowed: {', '.join(DIVERGENCES)}")
    if kind in _MIXING_KINDS and not 0.0 < beta < 1.0:
        raise ValueError(f"divergence {kind!r} needs 0 < beta < 1, got {beta}")


def _tempered_log_softmax(logits: Tensor, temperature: float) -> Tensor:
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    return F.log_softmax(z, dim=-1)


def _log_mass_outside(logp: Tensor, ids: Tensor) -> Tensor:
    """log(sum of exp(logp) over the columns not in ``ids``): (N, V), (N, k) -> (N,).

    Masking by scatter keeps autograd NaN-free when every column is in ``ids``: logsumexp's backward of an
    all -inf row is NaN, but scatter's backward zeroes exactly those masked columns.
    """
    return torch.logsumexp(logp.scatter(-1, ids, _NEG_INF), dim=-1)


def systematic_sample(logq: Tensor, m: int, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """m draws per row from ``softmax``-normalized ``logq`` by systematic sampling, merged into distinct ids.

    The draws are the points ``(offset + i) / m``, i = 0..m-1, on each row's CDF: every id j is drawn
    ``m * q_j`` times in expectation (as with independent draws), but never more than one draw away from it.

    Args:
        logq: (N, V) log-weights (need not be normalized); -inf marks ids that must never be drawn. A row of
            all -inf draws nothing (its counts are 0).
        m: draws per row, >= 1.
        offsets: (N,) in [0, 1): each row's random offset.

    Returns:
        (ids (N, m) int64, counts (N, m) float32): distinct ids in ascending order, then unused slots (id 0,
        count 0).
    """
    n, v = logq.shape
    norm = torch.logsumexp(logq.float(), dim=-1, keepdim=True)
    empty = torch.isneginf(norm).squeeze(-1)
    q = torch.exp(logq.float() - torch.where(torch.isneginf(norm), 0.0, norm))
    cdf = q.cumsum(-1)
    points = (offsets.float().view(-1, 1).to(cdf.device) + torch.arange(m, device=cdf.device)) / m
    # Scaled by each row's total so that rounding in the cumulative sum can never push a point past the end.
    drawn = torch.searchsorted(cdf, points * cdf[:, -1:], right=True).clamp(max=v - 1)
    # Sorted rows: a new id starts wherever it differs from its left neighbour; slot = how many started so far.
    new = torch.ones_like(drawn, dtype=torch.bool)
    new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = new.long().cumsum(-1) - 1
    counts = torch.zeros(n, m, dtype=torch.float32, device=drawn.device).scatter_add_(1, slot, torch.ones_like(points))
    ids = torch.zeros(n, m, dtype=torch.long, device=drawn.device).scatter_(1, slot, drawn)
    counts[empty] = 0.0
    ids[empty] = 0
    return ids, counts


class NonFiniteTeacher(ValueError):
    """Teacher logits that are no distribution (+inf, NaN, or all -inf at a position)."""


@torch.no_grad()
def teacher_targets_from_logits(
    logits: Tensor, k: int, *, samples: int = 0, tau: float = 1.0, offsets: Tensor | None = None
) -> TeacherTargets:
    """The sparse teacher signal of full-vocabulary teacher logits (Note [Teacher signal]).

    All in float32 whatever the input dtype; the result carries no gradient (the teacher is frozen).

    Args:
        logits: (N, V) teacher logits, any float dtype.
        k: head size, >= 1; clipped to V. With k >= V the tail is empty (-inf) and nothing is sampled.
        samples: m, tail draws per row (0: head and tail mass only).
        tau: temperature of the sampling distribution and of `tail_lognorm`, > 0.
        offsets: (N,) in [0, 1), the systematic sampler's offsets; uniform random when None.

    Returns:
        TeacherTargets with k' = min(k, V) head ids and m sample slots.
    """
    if logits.dim() != 2:
        raise ValueError(f"teacher logits must be (N, V), got shape {tuple(logits.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    _check_temperature(tau)
    broken = ~torch.isfinite(logits.amax(-1))  # a row's max is NaN, +inf or (all masked) -inf: one pass
    if broken.any():  # a bfloat16 overflow, or broken weights: nothing here is a distribution
        raise NonFiniteTeacher(f"teacher logits are not finite at {int(broken.sum())} of {len(broken)} positions "
                               "(+inf or NaN, or nothing but -inf)")
    logp = F.log_softmax(logits.float(), dim=-1)
    k = min(k, logp.shape[-1])
    head_logp, head_ids = logp.topk(k, dim=-1)
    outside = logp.scatter(-1, head_ids, _NEG_INF)
    tail_logp = torch.logsumexp(outside, dim=-1)
    logq = outside / tau
    tail_lognorm = torch.logsumexp(logq, dim=-1)
    n = logp.shape[0]
    if samples:
        if offsets is None:
            offsets = torch.rand(n)
        sample_ids, counts = systematic_sample(logq, samples, offsets)
    else:
        sample_ids = torch.zeros(n, 0, dtype=torch.long, device=logp.device)
        counts = torch.zeros(n, 0, dtype=torch.float32, device=logp.device)
    return TeacherTargets(
        ids=torch.cat([head_ids, sample_ids], dim=-1), logp=head_logp, sample_logp=logp.gather(-1, sample_ids),
        counts=counts, tail_logp=tail_logp, tail_lognorm=tail_lognorm, tau=float(tau),
    )


def bucket_log_probs(student_logits: Tensor, ids: Tensor, temperature: float) -> Tensor:
    """Project the student's tempered distribution onto the teacher's k + 1 buckets.

    ``out[:, :k] = log_softmax(z / T)`` gathered at ``ids``;
    ``out[:, k] = log sum_{j not in ids} softmax(z / T)_j`` (-inf when ids cover the vocabulary).

    Args:
        student_logits: (N, V) logits, any float dtype (computed in float32).
        ids: (N, k) int64, distinct within each row.
        temperature: T > 0.

    Returns:
        (N, k + 1) float32 log-probs; gradients stay finite even when the tail bucket is empty.
    """
    _check_temperature(temperature)
    logp = _tempered_log_softmax(student_logits, temperature)
    top = logp.gather(-1, ids)
    tail = _log_mass_outside(logp, ids)
    return torch.cat([top, tail.unsqueeze(-1)], dim=-1)


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) = sum_b p_b (log p_b - log q_b) over the last dim, with 0 * log 0 = 0.

    Buckets with p = 0 contribute 0. Buckets with p > 0 = q contribute +inf (the true value) as a constant:
    differentiating through an infinite term would give NaN (inf - inf in log_softmax's backward, or
    0 * inf when the row's upstream gradient is 0), which would poison the other rows' gradients too.
    """
    support = logp > _NEG_INF
    finite = support & (logq > _NEG_INF)
    logp_safe = torch.where(support, logp, 0.0)
    logq_safe = torch.where(finite, logq, 0.0)
    terms = torch.where(finite, logp_safe.exp() * (logp_safe - logq_safe), 0.0)
    terms = torch.where(support & ~finite, float("inf"), terms)
    return terms.sum(-1)


def _log_mixture(loga: Tensor, logb: Tensor, weight: float) -> Tensor:
    """log(weight * a + (1 - weight) * b) elementwise for log-probs a, b and 0 < weight < 1.

    Where both are zero the result is -inf; logaddexp's backward there would be NaN (exp(-inf - -inf)), so
    its inputs are sanitized on those entries.
    """
    x = loga + math.log(weight)
    y = logb + math.log1p(-weight)
    both_zero = torch.isneginf(x) & torch.isneginf(y)
    mixed = torch.logaddexp(torch.where(both_zero, 0.0, x), torch.where(both_zero, 0.0, y))
    return torch.where(both_zero, _NEG_INF, mixed)


def divergence(
    student_logp: Tensor, teacher_logp: Tensor, kind: str = "forward_kl", beta: float = 0.5
) -> Tensor:
    """D(teacher || student) between normalized distributions over the same buckets.

    With p_t = exp(teacher_logp), p_s = exp(student_logp), sums over the last dim:

    - ``forward_kl``:      sum p_t (log p_t - log p_s)
    - ``reverse_kl``:      sum p_s (log p_s - log p_t)
    - ``jsd``:             m = beta p_t + (1 - beta) p_s;  beta KL(p_t || m) + (1 - beta) KL(p_s || m)
    - ``skew_kl``:         KL(p_t || beta p_t + (1 - beta) p_s)        (DistiLLM's skew KL)
    - ``skew_reverse_kl``: KL(p_s || beta p_s + (1 - beta) p_t)
    - ``tvd``:             0.5 sum |p_t - p_s|

    ``0 * log 0 = 0``; -inf entries (zero probability) on either side never produce NaN in the value or
    the gradient (see Note [Zero-probability buckets]). A KL term with p > 0 = q makes the row +inf, as it
    should be; that term is a constant for autograd, so gradients stay finite (and cover the finite terms).

    Args:
        student_logp: (N, B) log-probs (rows sum to 1 in probability space).
        teacher_logp: (N, B) log-probs over the same buckets.
        kind: one of DIVERGENCES.
        beta: mixing weight in (0, 1) for jsd, skew_kl, skew_reverse_kl; ignored otherwise.

    Returns:
        (N,) float32.
    """
    _check_kind(kind, beta)
    if student_logp.shape != teacher_logp.shape:
        raise ValueError(
            f"divergence: student and teacher log-probs differ in shape: {tuple(student_logp.shape)} "
            f"vs {tuple(teacher_logp.shape)}"
        )
    s = student_logp.float()
    t = teacher_logp.float()
    if kind == "forward_kl":
        return _kl(t, s)
    if kind == "reverse_kl":
        return _kl(s, t)
    if kind == "jsd":
        m = _log_mixture(t, s, beta)
        return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)
    if kind == "skew_kl":
        return _kl(t, _log_mixture(t, s, beta))
    if kind == "skew_reverse_kl":
        return _kl(s, _log_mixture(s, t, beta))
    # tvd: exp(-inf) = 0 with a zero (not NaN) gradient, so no sanitizing is needed.
    return 0.5 * (t.exp() - s.exp()).abs().sum(-1)


def teacher_divergence(
    student_logits: Tensor, teacher: Targets, temperature: float, kind: str = "forward_kl", beta: float = 0.5
) -> Tensor:
    """D(teacher_T || student_T) per position, (N,) float32, for either form of the teacher.

    - `DenseTargets`: over the full vocabulary (exact).
    - `TeacherTargets`, forward KL at T = tau with samples: the buckets exactly plus the sampled estimate of
      the tail's KL (`_sampled_divergence`; skew KL likewise).
    - `TeacherTargets` otherwise: over the k + 1 buckets (head ids and one tail bucket; exact tail mass).
    - `CrossTargets` (a teacher with another vocabulary, projected onto the student's): the same, where aligned.

    See Note [Teacher signal] and Note [Across vocabularies].
    """
    if isinstance(teacher, DenseTargets):
        t = _tempered_log_softmax(teacher.logits(student_logits.shape[-1]), temperature)
        return divergence(_tempered_log_softmax(student_logits, temperature), _floored(t, kind), kind, beta)
    if isinstance(teacher, CrossTargets):  # already in the student's vocabulary: as above, where aligned
        kd = teacher_divergence(student_logits, teacher.teacher, temperature, kind, beta)
        return torch.where(teacher.aligned, kd, 0.0)
    if kind in _SAMPLED_KINDS and teacher.m > 0 and math.isclose(temperature, teacher.tau):
        return _sampled_divergence(student_logits, teacher, temperature, kind, beta)
    student = bucket_log_probs(student_logits, teacher.ids[:, : teacher.k], temperature)
    return divergence(student, _floored(teacher.bucket_log_probs(temperature), kind), kind, beta)


def _floored(teacher_logp: Tensor, kind: str) -> Tensor:
    """Reverse KL's teacher log-probs floored at TEACHER_LOG_FLOOR (Note [Zero-probability buckets])."""
    return teacher_logp.clamp(min=TEACHER_LOG_FLOOR) if kind == "reverse_kl" else teacher_logp


def _sampled_divergence(student_logits: Tensor, teacher: TeacherTargets, temperature: float, kind: str,
                        beta: float) -> Tensor:
    """Forward or skew KL at T = tau from the head, the tail mass and the tail samples (Note [Teacher signal]).

    Both are sums over tokens of the teacher's probability times a function of the two probabilities, so their
    tail part is the teacher's tail mass c times an expectation over its tail t, which the draws estimate without
    bias: that is the value. The gradient is taken from a surrogate whose expectation is the exact gradient and
    which is exactly zero wherever the student's tail matches the teacher's, whatever was drawn: the plain
    estimate's gradient plus ``mean over draws of r_j log s(j)`` (times 1 - beta for skew KL), r_j = s(j) / t(j)
    held constant, whose expected gradient is zero (a control variate with the student's own tail).

    - forward KL, by the chain rule: ``KL over the k + 1 buckets + c * KL(t || s)``; the buckets are exact and
      ``mean over draws of log t(j) - log s(j)`` estimates KL(t || s); the surrogate is
      ``mean over draws of (r_j - 1) log s(j)``, in expectation (s - t) / T.
    - skew KL, ``KL(p || beta p + (1 - beta) q)``: the head ids' terms exactly, plus c times the mean over draws
      of ``log p_j - log m_j`` (m the mixture); the surrogate is ``mean over draws of -log m_j + (1 - beta) r_j
      log s(j)``.
    """
    ls = _tempered_log_softmax(student_logits, temperature)
    k = teacher.k
    head_ids = teacher.ids[:, :k]
    s_tail = _log_mass_outside(ls, head_ids)
    teacher_b = teacher.bucket_log_probs(temperature)
    used = teacher.counts > 0
    w = teacher.counts / teacher.counts.sum(-1, keepdim=True).clamp(min=1.0)
    log_s = torch.where(used, ls.gather(-1, teacher.ids[:, k:]) - s_tail.unsqueeze(-1), 0.0)
    log_t = torch.where(used, teacher.sample_logp.float() / temperature - teacher.tail_lognorm.float().unsqueeze(-1), 0.0)
    if kind == "forward_kl":
        head = _kl(teacher_b, torch.cat([ls.gather(-1, head_ids), s_tail.unsqueeze(-1)], dim=-1))
    else:  # skew_kl
        head_t = teacher_b[:, :k]
        head = _kl(head_t, _log_mixture(head_t, ls.gather(-1, head_ids), beta))
    return head + _sampled_tail_term(w, used, log_t, log_s, teacher_b[:, -1], s_tail, kind, beta)


def _sampled_tail_term(w: Tensor, used: Tensor, log_t: Tensor, log_s: Tensor, t_tail: Tensor, s_tail: Tensor,
                       kind: str, beta: float) -> Tensor:
    """The tail's part of forward or skew KL from the draws (`_sampled_divergence`): its value, with the gradient
    of the surrogate. ``w``: (N, m) the draws' weights (summing to 1 in a row with draws); ``log_t``, ``log_s``:
    each draw's log-probability within the tail under the teacher and the student (0 where unused);
    ``t_tail``, ``s_tail``: (N,) the log of each model's tail mass at T. For forward KL the chain rule leaves
    c * KL(t || s) (the bucket term holds the masses); for skew KL the tail's tokens are summed directly."""
    ratio = torch.exp((log_s - log_t).clamp(max=math.log(_MAX_RATIO))).detach()
    if kind == "forward_kl":
        value = (w * (log_t - log_s)).sum(-1)
        surrogate = (w * (ratio - 1.0) * log_s).sum(-1)
    else:  # skew_kl: the draws' tempered probabilities under each model (tail mass times share of the tail)
        log_p = torch.where(used, t_tail.unsqueeze(-1) + log_t, 0.0)
        log_m = _log_mixture(log_p, torch.where(used, s_tail.unsqueeze(-1) + log_s, 0.0), beta)
        value = (w * (log_p - log_m)).sum(-1)
        surrogate = (w * ((1.0 - beta) * ratio * log_s - log_m)).sum(-1)
    return t_tail.exp() * (value.detach() + surrogate - surrogate.detach())


def token_losses(
    student_logits: Tensor,
    labels: Tensor,
    teacher: Targets | None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.0,
    kind: str = "forward_kl",
    beta: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token distillation loss.

    ``ce = -log softmax(z)[label]`` (T = 1), ``kd = teacher_divergence(...)`` at T,
    ``loss = alpha * T^2 * kd + (1 - alpha) * ce``. Without a teacher, ``kd = 0`` and ``loss = ce``; so too at the
    positions of `CrossTargets` with no teacher position (unless alpha == 1: then they are not trained).
    With ``alpha == 0`` the kd term is not computed (zeros). ``ce`` is always computed (for logging);
    with ``alpha == 1`` it simply has weight 0.

    Args:
        student_logits: (N, V) logits at the positions that count (prompt and padding already removed).
        labels: (N,) int64 next-token ids (an ignore index of -100 yields ce = 0, as in F.cross_entropy).
        teacher: the teacher at the same N positions (sparse or dense), or None.
        temperature: T > 0 for the kd term.
        alpha: weight of the kd term, in [0, 1].
        kind: one of DIVERGENCES.
        beta: mixing weight for jsd / skew kinds.

    Returns:
        (loss, kd, ce), each (N,) float32.
    """
    _check_kind(kind, beta)
    _check_temperature(temperature)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if student_logits.dim() != 2 or labels.shape != student_logits.shape[:1]:
        raise ValueError(
            f"token_losses: expected logits (N, V) and labels (N,); got {tuple(student_logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    ce = F.cross_entropy(student_logits.float(), labels, reduction="none")
    if teacher is None or alpha == 0.0:
        kd = torch.zeros_like(ce)
        return ce, kd, ce
    if len(teacher) != student_logits.shape[0]:
        raise ValueError(
            f"token_losses: teacher has {len(teacher)} rows but student logits have {student_logits.shape[0]}"
        )
    kd = teacher_divergence(student_logits, teacher, temperature, kind, beta)
    soft = (alpha * temperature**2) * kd
    # Skip the zero-weighted ce term so a (theoretically possible) inf ce cannot turn into 0 * inf = NaN.
    loss = soft if alpha == 1.0 else soft + (1.0 - alpha) * ce
    if isinstance(teacher, CrossTargets) and alpha < 1.0:
        # A position with no teacher distribution (the two tokenizers split its text differently) has nothing to
        # balance its label against: it learns from the label with full weight, as without distillation.
        loss = torch.where(teacher.aligned, loss, ce)
    return loss, kd, ce


@dataclass
class LinearHead:
    """An output head ``logits = softcap(h @ weight.T + bias)``, given by its tensors so that the chunked loss
    can take its gradients itself (see Note [Gradient in forward]). Callable like the module it stands for."""

    weight: Tensor
    bias: Tensor | None = None
    softcap: float | None = None

    def __call__(self, h: Tensor) -> Tensor:
        return self.cap(F.linear(h, self.weight, self.bias))

    def cap(self, z: Tensor) -> Tensor:
        return z if not self.softcap else torch.tanh(z / self.softcap) * self.softcap


def auto_chunk_size(vocab: int, budget_bytes: int = 12 * 2**20) -> int:
    """Positions per chunk so that one chunk's float32 logits take about `budget_bytes` (64 to 1024 rows).

    The chunk is sized by memory, not rows: small chunks keep a small fraction of the naive peak at about its
    speed, and larger ones buy no reliable speed (benchmarks/loss_memory.py; figures in BENCHMARKS.md).
    """
    return max(64, min(1024, budget_bytes // (4 * max(vocab, 1))))


class _FusedLinearLoss(torch.autograd.Function):
    """Loss sums over chunks, with the gradients w.r.t. hidden, weight and bias computed chunk by chunk in
    forward: three matmuls per chunk (logits, grad of hidden, grad of weight accumulated in place) and no
    chunk's logits alive after its turn. Backward scales them by the incoming gradient of loss_sum."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        loss_fn: Callable[[Tensor, slice], tuple[Tensor, Tensor, Tensor]],
        chunk_size: int,
        softcap: float | None,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        head = LinearHead(weight, bias, softcap)
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        sums = torch.zeros(3, dtype=torch.float32, device=hidden.device)
        # Under autocast the head would be cast to the lower precision again for every chunk (a detached
        # weight is not in autocast's cache): cast it once.
        w = weight.detach()
        if torch.is_autocast_enabled(w.device.type):
            w = w.to(torch.get_autocast_dtype(w.device.type))
        for start in range(0, hidden.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            h = hidden[sl].detach()
            z = F.linear(h, w, None if bias is None else bias.detach()).requires_grad_(True)
            with torch.enable_grad():
                loss, kd, ce = loss_fn(head.cap(z), sl)
            (grad_z,) = torch.autograd.grad(loss, z)
            if grad_h is not None:
                grad_h[sl] = (grad_z @ w.to(grad_z.dtype)).to(hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(grad_z.t().float(), h.float())
            if grad_b is not None:
                grad_b += grad_z.float().sum(0)
            sums += torch.stack([loss.detach(), kd.detach(), ce.detach()])
            del z, grad_z, loss
        # Kept on ctx rather than saved (they are intermediates, not inputs or outputs) so that backward can
        # drop them: scaled in place and handed over, each is the only copy (a weight-sized one for the head).
        ctx.grads = [grad_h, grad_w, grad_b]
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        kd_sum, ce_sum = sums[1].clone(), sums[2].clone()
        ctx.mark_non_differentiable(kd_sum, ce_sum)  # logged only; the gradient is loss_sum's
        return sums[0], kd_sum, ce_sum

    @staticmethod
    def backward(ctx: Any, g_loss: Tensor, g_kd: Tensor, g_ce: Tensor) -> tuple[Tensor | None, ...]:
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("the fused loss was already backpropagated; its gradients are freed after one backward")
        out = [None if g is None else g.mul_(g_loss).to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)]
        grads.clear()
        return (None, None, None, *out)


def chunked_token_loss_sums(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    labels: Tensor,
    teacher: Targets | None,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    alpha: float = 0.0,
    kind: str = "forward_kl",
    beta: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sums of `token_losses` over N positions, computing the vocabulary projection chunk by chunk.

    Full-vocabulary float32 logits for every position (N x V x 4 bytes, tens of GB for long batches) would
    otherwise be kept alive for backward. With the head given as a `LinearHead` (the usual case), each chunk's
    gradients are taken right after its loss (Note [Gradient in forward]) and its logits freed before the next
    chunk. Any other head (e.g. LoRA on lm_head) runs each chunk under non-reentrant activation checkpointing:
    only the chunk's hidden states are saved and its logits are recomputed in backward, one chunk at a time.

    Args:
        hidden: (N, H) final hidden states at the positions that count.
        head: maps (n, H) -> (n, V) logits (the lm_head, including any final softcapping).
        labels: (N,) int64.
        teacher: the teacher at the N positions (sparse or dense), or None.
        chunk_size: positions per chunk, >= 1.
        temperature, alpha, kind, beta: as in `token_losses`.

    Returns:
        (loss_sum, kd_sum, ce_sum), float32 scalars summed over positions (see Note [Sum reduction]);
        only loss_sum carries a gradient. With N == 0 all are 0, and loss_sum is still attached to the
        graph of ``hidden`` and ``head`` so that backward (and data-parallel gradient hooks) still run.
    """
    _check_kind(kind, beta)
    _check_temperature(temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"chunked_token_loss_sums: expected hidden (N, H) and labels (N,); got {tuple(hidden.shape)} "
            f"and {tuple(labels.shape)}"
        )
    n = hidden.shape[0]
    if teacher is not None and len(teacher) != n:
        raise ValueError(f"chunked_token_loss_sums: teacher has {len(teacher)} rows but hidden has {n}")
    if n == 0:
        # Through the head, not just hidden: every head parameter then gets a (zero) gradient, which DDP
        # needs on ranks whose micro-batch had no response tokens.
        zero = head(hidden).float().sum() * 0.0
        return zero, zero.detach(), zero.detach()

    def loss_fn(logits: Tensor, sl: slice) -> tuple[Tensor, Tensor, Tensor]:
        t = None if teacher is None else teacher.index(sl)
        loss, kd, ce = token_losses(logits, labels[sl], t, temperature=temperature, alpha=alpha, kind=kind, beta=beta)
        return loss.sum(), kd.sum(), ce.sum()

    if isinstance(head, LinearHead) and torch.is_grad_enabled():
        # Note [Gradient in forward]: with the head given as tensors, each chunk's gradients are taken right
        # after its loss and the chunk's logits freed before the next: no chunk is recomputed in backward
        # (checkpointing would run the head matmul and the softmax passes twice) and the weight gradient
        # is accumulated in place rather than as one vocabulary-sized temporary per chunk.
        return _FusedLinearLoss.apply(loss_fn, chunk_size, head.softcap, hidden, head.weight, head.bias)

    use_checkpoint = torch.is_grad_enabled()
    losses: list[Tensor] = []
    kds: list[Tensor] = []
    ces: list[Tensor] = []
    for start in range(0, n, chunk_size):
        sl = slice(start, start + chunk_size)

        def chunk_sums(h: Tensor, sl: slice = sl) -> tuple[Tensor, Tensor, Tensor]:
            return loss_fn(head(h), sl)

        if use_checkpoint:
            loss, kd, ce = checkpoint(chunk_sums, hidden[sl], use_reentrant=False)
        else:
            loss, kd, ce = chunk_sums(hidden[sl])
        losses.append(loss)
        kds.append(kd.detach())
        ces.append(ce.detach())
    return torch.stack(losses).sum(), torch.stack(kds).sum(), torch.stack(ces).sum()
