"""Distillation losses: divergences between a teacher and a student next-token distribution.

Everything here is a pure function of tensors; the trainer decides which positions count (response
tokens only) and hands over only those rows.

The per-token loss is

    loss = alpha * T^2 * D(p_t^T || p_s^T) + (1 - alpha) * CE(p_s^1, label)

where ``p^T = softmax(z / T)``. The ``T^2`` factor keeps the gradient of the soft term on the same scale as
the hard term when the temperature changes (the gradient of a divergence of tempered softmaxes w.r.t. the
logits shrinks like ``1 / T^2``).

Note [Tail bucket]
~~~~~~~~~~~~~~~~~~
Storing or shipping the teacher's full-vocabulary distribution for every token is too expensive (V is
~150k), so the teacher is usually kept SPARSE: its top-k token ids, their log-probabilities at temperature
T, and the log of the remaining mass ``1 - sum(top-k probs)``, the "tail". These are k + 1 buckets that
sum to 1, i.e. a proper distribution over a coarser event space: "token id_1", ..., "token id_k", "any
other token". The student is projected onto the same buckets (its probabilities on id_1..id_k plus its
total mass on every other id), and the divergence is taken between the two (k + 1)-bucket distributions.

Why a tail bucket instead of renormalizing the top-k: without it, the student could put arbitrary mass on
tokens the teacher considers unlikely at no cost, and the two truncated distributions would not be
distributions of the same thing. With the tail bucket the projection is exact bookkeeping of all mass, the
divergence is a true divergence (zero iff the bucket distributions agree, and by the data-processing
inequality a lower bound of the full-vocabulary one), and with k = V the tail bucket is empty on both
sides (probability 0, log-prob -inf) so the sparse loss equals the dense loss exactly.

The tail is computed as a logsumexp over the log-softmax entries outside the top-k, never as
``log(1 - sum(p))``: the latter cancels catastrophically when the top-k holds almost all of the mass,
which is exactly the common case for a confident teacher.

Note [Sum reduction]
~~~~~~~~~~~~~~~~~~~~
`chunked_token_loss_sums` returns SUMS over positions, not means. The trainer divides by the global number
of response tokens in the optimizer step (over all micro-batches and all data-parallel ranks). A per-micro-
batch mean would weight a token in a short micro-batch more than one in a long micro-batch, so gradient
accumulation and data parallelism would give different gradients from one big batch; sum-then-divide-by-
the-global-count makes every response token weigh exactly the same however the batch is split.

Note [Zero-probability buckets]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Rows may hold -inf log-probs (an empty tail when k = V, masked vocabulary entries). We use the convention
``0 * log 0 = 0``. Autograd through ``torch.where`` still evaluates the gradient of the branch that was not
taken, and ``0 * inf`` or ``exp(-inf - -inf)`` there turns into NaN, so every expression that could see
-inf on an untaken branch gets its inputs replaced by a harmless finite value first.

A KL term with p > 0 where q = 0 is genuinely +inf (e.g. reverse KL where the teacher's logit is -inf but
the student's is not). The value is reported as +inf, but the term enters autograd as a constant: its
derivative would be inf, which log_softmax's backward turns into inf - inf = NaN, and would even poison
rows whose upstream gradient is 0 (0 * inf). Gradients therefore stay finite and cover the finite terms.
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

DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")

# Kinds that mix the two distributions with weight beta; beta at 0 or 1 makes them degenerate
# (identically 0 or plain KL) and log(beta) would be -inf.
_MIXING_KINDS: frozenset[str] = frozenset({"jsd", "skew_kl", "skew_reverse_kl"})

_NEG_INF = float("-inf")


@dataclass
class TeacherTargets:
    """Sparse teacher distribution over k + 1 buckets for N positions (see Note [Tail bucket]).

    Attributes:
        ids: (N, k) int64, the teacher's top-k token ids (distinct within a row).
        logp: (N, k) float32, teacher log-probabilities at temperature T of ``ids``.
        tail_logp: (N,) float32, log of the teacher's mass on all other ids; -inf when the tail is empty.

    ``exp(logp).sum(-1) + exp(tail_logp) == 1`` for every row.
    """

    ids: Tensor
    logp: Tensor
    tail_logp: Tensor

    def __post_init__(self) -> None:
        if self.ids.dim() != 2 or self.logp.shape != self.ids.shape:
            raise ValueError(
                f"TeacherTargets: ids and logp must both be (N, k); got {tuple(self.ids.shape)} "
                f"and {tuple(self.logp.shape)}"
            )
        if self.tail_logp.shape != self.ids.shape[:1]:
            raise ValueError(
                f"TeacherTargets: tail_logp must be (N,) = ({self.ids.shape[0]},); "
                f"got {tuple(self.tail_logp.shape)}"
            )

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def k(self) -> int:
        """Number of explicit (non-tail) buckets."""
        return self.ids.shape[1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TeacherTargets:
        """Move all three tensors to ``device``."""
        return TeacherTargets(
            ids=self.ids.to(device, non_blocking=non_blocking),
            logp=self.logp.to(device, non_blocking=non_blocking),
            tail_logp=self.tail_logp.to(device, non_blocking=non_blocking),
        )

    def index(self, sel: Tensor | slice) -> TeacherTargets:
        """Select rows with a bool mask (N,), an index tensor, or a slice."""
        return TeacherTargets(ids=self.ids[sel], logp=self.logp[sel], tail_logp=self.tail_logp[sel])

    @staticmethod
    def cat(parts: list[TeacherTargets]) -> TeacherTargets:
        """Concatenate along rows; all parts must share the same k."""
        if not parts:
            raise ValueError("TeacherTargets.cat: need at least one part")
        ks = {p.k for p in parts}
        if len(ks) != 1:
            raise ValueError(f"TeacherTargets.cat: parts have different k: {sorted(ks)}")
        return TeacherTargets(
            ids=torch.cat([p.ids for p in parts]),
            logp=torch.cat([p.logp for p in parts]),
            tail_logp=torch.cat([p.tail_logp for p in parts]),
        )


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


@torch.no_grad()
def teacher_targets_from_logits(logits: Tensor, k: int, temperature: float) -> TeacherTargets:
    """Sparse teacher targets from full-vocabulary teacher logits.

    ``logp = top-k of log_softmax(logits / T)`` and ``tail_logp = logsumexp`` of the remaining entries,
    all in float32 whatever the input dtype. The result carries no gradient (the teacher is frozen).

    Args:
        logits: (N, V) teacher logits, any float dtype.
        k: number of explicit buckets, >= 1; clipped to V. With k >= V the tail is empty (-inf).
        temperature: T > 0.

    Returns:
        TeacherTargets with ids (N, k') int64, logp (N, k') float32, tail_logp (N,) float32, k' = min(k, V).
    """
    if logits.dim() != 2:
        raise ValueError(f"teacher logits must be (N, V), got shape {tuple(logits.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _check_temperature(temperature)
    logp = _tempered_log_softmax(logits, temperature)
    k = min(k, logp.shape[-1])
    top_logp, ids = logp.topk(k, dim=-1)
    tail = _log_mass_outside(logp, ids)
    return TeacherTargets(ids=ids, logp=top_logp, tail_logp=tail)


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


def teacher_bucket_log_probs(t: TeacherTargets) -> Tensor:
    """The teacher's k + 1 bucket log-probs: ``cat(logp, tail_logp[:, None])``, (N, k + 1) float32."""
    return torch.cat([t.logp.float(), t.tail_logp.float().unsqueeze(-1)], dim=-1)


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


def token_losses(
    student_logits: Tensor,
    labels: Tensor,
    teacher: TeacherTargets | None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.0,
    kind: str = "forward_kl",
    beta: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token distillation loss.

    ``ce = -log softmax(z)[label]`` (T = 1), ``kd = divergence(teacher buckets, student buckets at T)``,
    ``loss = alpha * T^2 * kd + (1 - alpha) * ce``. Without a teacher, ``kd = 0`` and ``loss = ce``.
    With ``alpha == 0`` the kd term is not computed (zeros). ``ce`` is always computed (for logging);
    with ``alpha == 1`` it simply has weight 0.

    Args:
        student_logits: (N, V) logits at the positions that count (prompt and padding already removed).
        labels: (N,) int64 next-token ids (an ignore index of -100 yields ce = 0, as in F.cross_entropy).
        teacher: sparse teacher targets for the same N positions, or None.
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
    student_b = bucket_log_probs(student_logits, teacher.ids, temperature)
    kd = divergence(student_b, teacher_bucket_log_probs(teacher), kind=kind, beta=beta)
    soft = (alpha * temperature**2) * kd
    # Skip the zero-weighted ce term so a (theoretically possible) inf ce cannot turn into 0 * inf = NaN.
    loss = soft if alpha == 1.0 else soft + (1.0 - alpha) * ce
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

    Measured (benchmarks/loss_memory.py, 2048 positions, H 576): 64 rows gave 0.10 of the naive peak at
    0.94 of its time at V = 262,144, and 0.17 of the peak at 0.80 of the time at V = 49,152, while 256-1024
    rows held 0.2-0.6 of the peak for no reliable gain in speed. So the chunk is sized by memory, not rows.
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
        for start in range(0, hidden.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            h = hidden[sl].detach()
            z = F.linear(h, weight.detach(), None if bias is None else bias.detach()).requires_grad_(True)
            with torch.enable_grad():
                loss, kd, ce = loss_fn(head.cap(z), sl)
            (grad_z,) = torch.autograd.grad(loss, z)
            if grad_h is not None:
                grad_h[sl] = (grad_z @ weight.detach().to(grad_z.dtype)).to(hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(grad_z.t().float(), h.float())
            if grad_b is not None:
                grad_b += grad_z.float().sum(0)
            sums += torch.stack([loss.detach(), kd.detach(), ce.detach()])
            del z, grad_z, loss
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.needs = (need_h, need_w, need_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        kd_sum, ce_sum = sums[1].clone(), sums[2].clone()
        ctx.mark_non_differentiable(kd_sum, ce_sum)  # logged only; the gradient is loss_sum's
        return sums[0], kd_sum, ce_sum

    @staticmethod
    def backward(ctx: Any, g_loss: Tensor, g_kd: Tensor, g_ce: Tensor) -> tuple[Tensor | None, ...]:
        saved = iter(ctx.saved_tensors)
        out: list[Tensor | None] = []
        for need, dtype in zip(ctx.needs, ctx.dtypes, strict=True):
            out.append((next(saved) * g_loss).to(dtype) if need else None)
        return (None, None, None, *out)


def chunked_token_loss_sums(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    labels: Tensor,
    teacher: TeacherTargets | None,
    *,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    alpha: float = 0.0,
    kind: str = "forward_kl",
    beta: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sums of `token_losses` over N positions, computing the vocabulary projection chunk by chunk.

    Full-vocabulary float32 logits for every position (N x V x 4 bytes, tens of GB for long batches) would
    otherwise be kept alive for backward. Each chunk of ``chunk_size`` positions runs under non-reentrant
    activation checkpointing, so only the chunk's hidden states are saved and its logits are recomputed
    in backward, one chunk at a time.

    Args:
        hidden: (N, H) final hidden states at the positions that count.
        head: maps (n, H) -> (n, V) logits (the lm_head, including any final softcapping).
        labels: (N,) int64.
        teacher: sparse teacher targets for the N positions, or None.
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

    def chunk_sums(
        h: Tensor, lab: Tensor, ids: Tensor | None, logp: Tensor | None, tail: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        t = None if ids is None or logp is None or tail is None else TeacherTargets(ids, logp, tail)
        loss, kd, ce = token_losses(
            head(h), lab, t, temperature=temperature, alpha=alpha, kind=kind, beta=beta
        )
        return loss.sum(), kd.sum(), ce.sum()

    if isinstance(head, LinearHead) and torch.is_grad_enabled():
        # Note [Gradient in forward]: with the head given as tensors, each chunk's gradients are taken right
        # after its loss and the chunk's logits freed before the next: no chunk is recomputed in backward
        # (checkpointing would run the head matmul and the softmax passes twice) and the weight gradient
        # is accumulated in place rather than as one vocabulary-sized temporary per chunk.
        def loss_fn(logits: Tensor, sl: slice) -> tuple[Tensor, Tensor, Tensor]:
            t = None if teacher is None else teacher.index(sl)
            loss, kd, ce = token_losses(logits, labels[sl], t, temperature=temperature, alpha=alpha, kind=kind, beta=beta)
            return loss.sum(), kd.sum(), ce.sum()

        return _FusedLinearLoss.apply(loss_fn, chunk_size, head.softcap, hidden, head.weight, head.bias)

    use_checkpoint = torch.is_grad_enabled()
    losses: list[Tensor] = []
    kds: list[Tensor] = []
    ces: list[Tensor] = []
    for start in range(0, n, chunk_size):
        sl = slice(start, start + chunk_size)
        if teacher is None:
            tids = tlogp = ttail = None
        else:
            tids, tlogp, ttail = teacher.ids[sl], teacher.logp[sl], teacher.tail_logp[sl]
        args = (hidden[sl], labels[sl], tids, tlogp, ttail)
        if use_checkpoint:
            loss, kd, ce = checkpoint(chunk_sums, *args, use_reentrant=False)
        else:
            loss, kd, ce = chunk_sums(*args)
        losses.append(loss)
        kds.append(kd.detach())
        ces.append(ce.detach())
    return torch.stack(losses).sum(), torch.stack(kds).sum(), torch.stack(ces).sum()
