"""The loss over the vocabulary in chunks of positions: full-vocabulary logits exist for one chunk at a time.

Note [Sum reduction]
~~~~~~~~~~~~~~~~~~~~
`chunked_token_loss_sums` returns SUMS over positions, not means. The trainer divides by the global number
of response tokens in the optimizer step (over all micro-batches and all data-parallel ranks). A per-micro-
batch mean would weight a token in a short micro-batch more than one in a long micro-batch, so gradient
accumulation and data parallelism would give different gradients from one big batch; sum-then-divide-by-
the-global-count makes every response token weigh exactly the same however the batch is split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from aitraining.closed_form import token_losses_with_grad
from aitraining.losses import check_kind, token_losses
from aitraining.signal import Targets, check_temperature


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
        loss_and_grad: Callable[[Tensor, slice], tuple[Tensor, Tensor, Tensor, Tensor] | None],
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
        grad_w: Tensor | None = None  # made by the first chunk's product: no zero fill of a vocabulary-sized tensor
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
            z = F.linear(h, w, None if bias is None else bias.detach())
            closed = None if softcap else loss_and_grad(z, sl)  # Note [Closed-form gradient] in closed_form.py
            if closed is not None:
                loss, kd, ce, grad_f = closed  # float32: the weight's gradient takes it as it is
                grad_z = grad_f.to(z.dtype)
            else:
                z.requires_grad_(True)
                with torch.enable_grad():
                    loss, kd, ce = loss_fn(head.cap(z), sl)
                (grad_z,) = torch.autograd.grad(loss, z)
                grad_f = grad_z.float()
            if grad_h is not None:
                grad_h[sl] = (grad_z @ w.to(grad_z.dtype)).to(hidden.dtype)
            if need_w:
                if grad_w is None:
                    with torch.autocast(weight.device.type, enabled=False):  # float32, as addmm_ below
                        grad_w = torch.mm(grad_f.t(), h.float())
                else:
                    grad_w.addmm_(grad_f.t(), h.float())
            if grad_b is not None:
                grad_b += grad_f.sum(0)
            sums += torch.stack([loss.detach(), kd.detach(), ce.detach()])
            del z, grad_z, grad_f, loss
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
        return (None, None, None, None, *out)


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
    check_kind(kind, beta)
    check_temperature(temperature)
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

    def loss_and_grad(logits: Tensor, sl: slice) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        t = None if teacher is None else teacher.index(sl)
        return token_losses_with_grad(logits, labels[sl], t, temperature=temperature, alpha=alpha, kind=kind, beta=beta)

    if isinstance(head, LinearHead) and torch.is_grad_enabled():
        # Note [Gradient in forward]: with the head given as tensors, each chunk's gradients are taken right
        # after its loss and the chunk's logits freed before the next: no chunk is recomputed in backward
        # (checkpointing would run the head matmul and the softmax passes twice) and the weight gradient
        # is accumulated in place rather than as one vocabulary-sized temporary per chunk.
        return _FusedLinearLoss.apply(loss_fn, loss_and_grad, chunk_size, head.softcap, hidden, head.weight, head.bias)

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
