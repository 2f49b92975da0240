"""Distillation losses: divergences between a teacher and a student next-token distribution, per position.

Everything here is a pure function of tensors; the trainer decides which positions count (response
tokens only) and hands over only those rows (chunked.py computes them chunk by chunk).

The per-token loss is

    loss = alpha * T^2 * D(p_t^T || p_s^T) + (1 - alpha) * CE(p_s^1, label)

where ``p^T = softmax(z / T)``. The ``T^2`` factor keeps the gradient of the soft term on the same scale as
the hard term when the temperature changes (the gradient of a divergence of tempered softmaxes w.r.t. the
logits shrinks like ``1 / T^2``).

The teacher reaches the loss in one of the forms of signal.py: `TeacherTargets` (sparse, what the cache stores:
Note [Teacher signal] there says how its tail is estimated), `DenseTargets` (the live teacher's hidden states and
output head: the exact full-vocabulary distribution) or `CrossTargets` (another vocabulary, projected).

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

import torch
import torch.nn.functional as F
from torch import Tensor

from aitraining.params import DIVERGENCE_KINDS
from aitraining.signal import CrossTargets, DenseTargets, Targets, TeacherTargets, check_temperature

DIVERGENCES: tuple[str, ...] = DIVERGENCE_KINDS  # one list, the documented --distill-loss choices

# Kinds that mix the two distributions with weight beta; beta at 0 or 1 makes them degenerate
# (identically 0 or plain KL) and log(beta) would be -inf.
_MIXING_KINDS: frozenset[str] = frozenset({"jsd", "skew_kl", "skew_reverse_kl"})

_NEG_INF = float("-inf")
TEACHER_LOG_FLOOR = -100.0  # Note [Zero-probability buckets]
# Cap of the student-to-teacher probability ratio at a sampled id in the tail's gradient (Note [Teacher signal] in signal.py):
# only a student that puts over 50x the teacher's share on a drawn token is pushed down less hard than exactly.
_MAX_RATIO = 50.0
# Divergences whose tail the samples estimate (Note [Teacher signal] in signal.py); the others see the tail as one bucket.
_SAMPLED_KINDS: frozenset[str] = frozenset({"forward_kl", "skew_kl"})


def check_kind(kind: str, beta: float) -> None:
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
    check_temperature(temperature)
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
    check_kind(kind, beta)
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

    See Note [Teacher signal] and Note [Across vocabularies] in signal.py.
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
    """Forward or skew KL at T = tau from the head, the tail mass and the tail samples (Note [Teacher signal] in signal.py).

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


def _check_loss_settings(kind: str, beta: float, temperature: float, alpha: float) -> None:
    check_kind(kind, beta)
    check_temperature(temperature)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")


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
    _check_loss_settings(kind, beta, temperature, alpha)
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

