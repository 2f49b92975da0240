"""The loss's gradient in closed form: the label loss and the default sampled forward KL, summed over positions, with
their gradient w.r.t. the student's logits computed directly (chunked.py uses it for each chunk of the output head).

The values come from the helpers of losses.py; only the gradient is written out here (Note [Closed-form gradient]).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from aitraining.losses import _MAX_RATIO, _NEG_INF, _check_loss_settings, _kl, _sampled_tail_term
from aitraining.signal import Targets, TeacherTargets


def token_losses_with_grad(
    student_logits: Tensor,
    labels: Tensor,
    teacher: Targets | None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.0,
    kind: str = "forward_kl",
    beta: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """`token_losses` summed over positions, with the gradient of the loss sum w.r.t. the logits in closed form:
    (loss_sum, kd_sum, ce_sum, grad (N, V) float32). None where no closed form is written here (then autograd on
    `token_losses` gives it): only the label loss, and forward KL at T = tau on the cached sparse teacher with
    tail draws (the defaults) have one.

    Note [Closed-form gradient]: autograd through `token_losses` walks the vocabulary about twenty times per
    position (casts, two log-softmaxes, the tail's masked logsumexp, and each of their backwards); these sums
    need about ten passes. With s = softmax(z / T), S the student's tail mass (outside the head ids), p the
    teacher's head-bucket probabilities, c its tail mass, w_d, r_d the draws' weights and capped ratios
    (`_sampled_tail_term`):

        d ce / d z_j = softmax(z)_j - [j = label]
        d kd / d z_j = (s_j - p_j [j in head] - B [j in tail] s_j / S + sum_d a_d [j = id_d]) / T,
        B = c (1 + sum_d w_d (r_d - 1)),  a_d = c w_d (r_d - 1).

    The values come from the same helpers as `token_losses`. Rows whose student tail mass is not a finite,
    positive number (an empty tail, or one whose every term underflows in float32) or with a bucket the
    student gives no mass get no closed form (None for the chunk)."""
    _check_loss_settings(kind, beta, temperature, alpha)
    distill = teacher is not None and alpha > 0.0
    if distill and not (type(teacher) is TeacherTargets and kind == "forward_kl" and teacher.m > 0
                        and math.isclose(temperature, teacher.tau)):
        return None
    z = student_logits.detach().float()
    valid = labels != -100
    safe_labels = torch.where(valid, labels, 0).unsqueeze(-1)
    # One shift by the row's maximum serves both temperatures; each exponential is taken once.
    top = z.amax(-1, keepdim=True)
    shifted = z - top
    e1 = shifted.exp()
    sum1 = e1.sum(-1, keepdim=True)
    lse1 = top + sum1.log()
    ce = torch.where(valid, lse1.squeeze(-1) - z.gather(-1, safe_labels).squeeze(-1), 0.0)
    grad = None
    if alpha < 1.0 or not distill:
        grad = e1.mul_(valid.unsqueeze(-1) / sum1)  # softmax, rows of ignored labels zero
        grad.scatter_add_(-1, safe_labels, -valid.float().unsqueeze(-1))
        if distill:
            grad.mul_(1.0 - alpha)
    if not distill:
        assert grad is not None
        return ce.sum(), torch.zeros((), device=z.device), ce.sum(), grad
    t = temperature
    k = teacher.k
    head_ids, sample_ids = teacher.ids[:, :k], teacher.ids[:, k:]
    zt = z / t if t != 1.0 else z
    s = shifted.div_(t).exp_() if t != 1.0 else shifted.exp_()
    sum_t = s.sum(-1, keepdim=True)
    lse_t = top / t + sum_t.log()
    s.div_(sum_t)
    s_tail_part = s.scatter(-1, head_ids, 0.0)
    tail_mass = s_tail_part.sum(-1)
    log_tail = tail_mass.log()
    ls_head = zt.gather(-1, head_ids) - lse_t
    student_b = torch.cat([ls_head, log_tail.unsqueeze(-1)], dim=-1)
    teacher_b = teacher.bucket_log_probs(t)
    # One host read for both checks (a device sync on a GPU): a usable student tail, and mass on every bucket.
    usable = torch.isfinite(tail_mass).all() & (tail_mass > 1e-30).all()
    if not bool(usable & ~((teacher_b > _NEG_INF) & ~torch.isfinite(student_b)).any()):
        return None
    used = teacher.counts > 0
    w = teacher.counts / teacher.counts.sum(-1, keepdim=True).clamp(min=1.0)
    log_s = torch.where(used, zt.gather(-1, sample_ids) - lse_t - log_tail.unsqueeze(-1), 0.0)
    log_t = torch.where(used, teacher.sample_logp.float() / t - teacher.tail_lognorm.float().unsqueeze(-1), 0.0)
    kd = _kl(teacher_b, student_b) + _sampled_tail_term(w, used, log_t, log_s, teacher_b[:, -1], log_tail,
                                                          kind, beta)
    ratio = torch.exp((log_s - log_t).clamp(max=math.log(_MAX_RATIO)))
    c = teacher_b[:, -1].exp()
    a = c.unsqueeze(-1) * w * (ratio - 1.0)  # (N, m); zero where unused (w = 0)
    b = c + a.sum(-1)
    scale = alpha * t  # T^2 * (1 / T): the loss weighs kd by alpha T^2, d zt / d z = 1 / T
    # s - b [tail] s / S, then the head's and the draws' own terms
    kd_grad = s_tail_part.mul_(-(b / tail_mass).unsqueeze(-1)).add_(s)
    kd_grad.scatter_add_(-1, head_ids, -teacher_b[:, :k].exp())
    kd_grad.scatter_add_(-1, sample_ids, a)
    grad = kd_grad.mul_(scale) if grad is None else grad.add_(kd_grad, alpha=scale)
    loss = alpha * t**2 * kd + ((1.0 - alpha) * ce if alpha < 1.0 else 0.0)
    return loss.sum(), kd.sum(), ce.sum(), grad
