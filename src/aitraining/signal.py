"""The teacher's signal as the loss reads it: its sparse form (head, tail mass, tail samples), its dense form (a
live teacher), across vocabularies, and how the sparse form is made from a teacher's logits.

Every teacher source (the cache, a live model, a server) hands the student one of these types; the losses
(losses.py) and the metrics (metrics.py) only ever read them.

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
student token its text starts with when the student writes it: itself where both vocabularies have it (matched by
the bytes it stands for, "Ġ" and "▁" and byte pieces normalized; the teacher's EOS is the student's), else the
token the student's own tokenizer writes first for that text ("ration" is "r" + "ation" to Llama 2's tokenizer,
" Portuguese" is " Portug" + "uese", "\n\n" is "\n" + "\n"; align.vocabulary_map). The result P is the
teacher's probability that the answer goes on with text the student would write starting with each token, which
is what the student's next-token distribution predicts. (The teacher's other special tokens have no piece; their
mass, normally nil inside an answer, is dropped and P renormalized.) From there everything is the
same-vocabulary path: P's head, tail mass and tail samples are cached (Note [Teacher signal]; the cache's key holds
the student's vocabulary map), the temperature softens P, and the documented divergences compare P^T and the
student's p^T. With identical vocabularies P is the teacher's own distribution.

Why the piece the student's tokenizer writes, not the longest student token the text starts with (the design until
2026-12-07, measured by benchmarks/cross_tokenizer_why.py and benchmarks/cross_tokenizer.py; BENCHMARKS.md,
"Issue 30"): byte-pair merges do not take the longest piece. Where SmolLM2 and Llama 2 both start a token and the
teacher's is not the student's, the longest piece was the student's own token 145 times in 228 (40 real answers),
the written one 227 times. On the teacher's own continuations (its first token drawn at T = 3, as the loss weighs
it), the longest pieces put 21 % of the mass on a token other than the one the student's tokenizer writes there
(18 % on a longer one: "rat" where it writes "r"), the written ones 5 %. A student taught the longest pieces wrote
worse greedy answers than the one trained on the teacher's text (ROUGE-L -0.016, interval -0.031 to -0.001); one
taught the written pieces writes as well as it (BENCHMARKS.md).

Why project before caching rather than compare in the teacher's ids (the previous design, measured on
benchmarks/cross_tokenizer.py): a cache in the teacher's ids holds the teacher's head and samples of its tail;
the tail tokens that the student writes otherwise and that read as no head token then formed one "lost" bucket,
and at T = 3 that bucket held 41 % of the teacher's mass (SmolLM2 and Llama 2's tokenizer: head buckets 9 %,
shared rest 50 %). The loss could only say "this much goes to text you write otherwise". Projected first, that
mass lands on the student tokens that begin the text, and the head and samples are drawn from P itself, with
the estimates and tests of one vocabulary. The student came closer to the teacher's text at the same cost
(KL per byte 1.170 and 1.158 against 1.195 and 1.191, seeds 0 and 1; BENCHMARKS.md).

What first pieces miss: a student token longer than the teacher token that starts its text ("▁International"
where the teacher writes " Intern" + "ational") is no teacher token's first piece, so P holds nothing on it; the
teacher's probability of that longer text would need its following positions (measured: 0.3 % of the sampled
mass, and 0.16 % of the answer tokens). A position whose label is such a token has no teacher row (its label would
have P = 0), but elsewhere P still puts nothing on those tokens. Nor is a text's first piece always the same in
context: a teacher token that ends inside a word is read as if the word ended there.

Why the temperature softens P rather than summing the teacher's tempered token masses: the documented T is a
property of the distribution the student learns, here P; tempering P is exactly the same-vocabulary loss
applied to it, and P at T = 1 is all the cache needs (its tail mass at T is computed from P when cached).

Why first pieces rather than one bucket for all the text only one vocabulary writes: a student that only learns
how much mass goes "elsewhere" puts it on whichever of its own odd tokens is cheapest (runs of spaces, measured:
its greedy answers began with them), while "\n\n" read as "\n" teaches the right token. Why not a
vocabulary-free distance for the rest (ULD's sorted probabilities): it matches the shapes of the two
distributions and ignores which token is which.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_NEG_INF = float("-inf")
_FIELDS = ("ids", "logp", "sample_logp", "counts", "tail_logp", "tail_lognorm")


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
        head: the teacher's output head, hidden (n, H) -> logits (n, V) (no gradient flows into the teacher).
        vocab: the real vocabulary size; logits of padded embedding rows beyond it are no tokens and are cut.
    """

    hidden: Tensor
    head: Callable[[Tensor], Tensor]
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
            tokens (itself where shared; the token the student's tokenizer writes first for its text otherwise; -1
            for special tokens).
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


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


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
    check_temperature(tau)
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
