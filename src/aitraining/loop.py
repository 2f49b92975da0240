"""The training loop: optimizer steps over seeded epochs, read top to bottom as batch -> student -> teacher targets ->
loss -> backward -> clip -> step -> log -> eval -> save.

Note [One reduction]: each micro-batch returns the *sum* of its per-token losses. Before an optimizer step,
the trained tokens of every micro-batch of the accumulation window on every process are counted, and each sum
is divided by that global count (times the number of processes, because data parallelism averages
gradients). So 1 x 8, 4 x 2 and 2 processes x 4 all give the gradient of one big batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from aitraining import heap
from aitraining.batches import Item, collate, epoch_micro_batches, forward_cost_in_tokens, length_groups, windows
from aitraining.data.examples import Example
from aitraining.errors import Interrupted, UserError
from aitraining.metrics import response_metrics
from aitraining.models.heads import causal_lm
from aitraining.models.load import count_parameters
from aitraining.objective import Objective
from aitraining.onpolicy import OnPolicy
from aitraining.padding import pad_id
from aitraining.runfolder import RunFolder
from aitraining.signal import Targets
from aitraining.teacher import DistillPath, TeacherSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopSettings:
    """What the loop reads of a run's settings: the training flags, named as the parameters (the defaults are the
    documented ones)."""

    model: str | None = None
    epochs: int = 1
    batch_size: int = 2
    lr: float = 3e-5
    warmup_ratio: float = 0.1
    gradient_accumulation: int = 1
    optimizer: str = "adamw_torch"
    scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    loss_chunk_size: int | None = None
    logging_steps: int = 10
    eval_steps: int | None = None
    eval_max_rows: int = 64
    resume_from_checkpoint: str | None = None
    log: str = "none"
    distill_temperature: float = 3.0
    distill_alpha: float = 0.7
    distill_loss: str = "forward_kl"
    distill_beta: float = 0.5


@dataclass
class Prepared:
    """What training needs from the data: the student's token sequences (training and held-out), the teacher
    signal (None without distillation) and how it was made."""

    tokenizer: Any
    train_items: list[Item]
    valid_items: list[Item]
    source: TeacherSource | None = None
    path: DistillPath | None = None
    timings: dict[str, float] = field(default_factory=dict)
    valid_examples: list[Example] = field(default_factory=list)
    judge_source: TeacherSource | None = None  # a teacher that held-out evaluation reads where training has none (the baseline)
    on_policy: OnPolicy | None = None  # with --distill-on-policy

    @property
    def pad_id(self) -> int:
        return pad_id(self.tokenizer)


@dataclass
class Fitted:
    model: Any
    last: dict[str, Any]
    train_s: float  # the whole loop, held-out evaluation included
    eval_s: float = 0.0  # of which held-out evaluation


def fit(model: Any, data: Prepared, settings: LoopSettings, folder: RunFolder, accelerator: Any, *,
        show_progress: bool, tracker_config: dict[str, Any] | None = None) -> Fitted:
    """The training loop: optimizer steps over seeded epochs (Note [One reduction]), metrics every
    --logging-steps, held-out evaluation every --eval-steps and at each epoch's end, a checkpoint per epoch;
    Ctrl-C saves a checkpoint to resume from; a loss that is not finite stops the run before it reaches the
    weights."""
    source, train_items, on_policy = data.source, data.train_items, data.on_policy
    objective = Objective(model, temperature=settings.distill_temperature,
                          alpha=settings.distill_alpha if source is not None else 0.0, kind=settings.distill_loss,
                          beta=settings.distill_beta, chunk_size=settings.loss_chunk_size)
    optimizer = _optimizer(objective, settings)
    world, rank = accelerator.num_processes, accelerator.process_index
    micro_per_epoch = len(epoch_micro_batches(len(train_items), settings.batch_size, settings.seed, 0, rank, world))
    steps_per_epoch = math.ceil(micro_per_epoch / settings.gradient_accumulation)
    from transformers import get_scheduler  # lazy: it imports transformers' trainer (seconds)

    total_steps = steps_per_epoch * settings.epochs
    scheduler = get_scheduler(settings.scheduler, optimizer, num_warmup_steps=math.ceil(settings.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    # The scheduler stays unprepared: accelerate would step it once per process.
    objective, optimizer = accelerator.prepare(objective, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    global_step = 0
    if settings.resume_from_checkpoint:
        ckpt = folder.find_checkpoint(settings.resume_from_checkpoint)
        accelerator.load_state(ckpt)
        global_step = folder.checkpoint_step(ckpt)
        log.info("resumed from %s at step %d", ckpt, global_step)
    if settings.log != "none":
        accelerator.init_trackers(os.path.basename(folder.path), config=tracker_config or {})

    student = accelerator.unwrap_model(objective).model
    evaluation = _Evaluation(data, settings, folder, accelerator)
    per_forward = forward_cost_in_tokens(accelerator.device, world)
    bar = tqdm(total=total_steps, initial=global_step, desc="training", unit="step", disable=not show_progress)
    log.info("student: %s (%s parameters), %d training rows, %d steps", settings.model,
             f"{count_parameters(causal_lm(model)):,}", len(train_items), total_steps)
    started = time.time()
    tokens_seen = 0
    window_stats = _Stats()
    last: dict[str, Any] = {}
    if global_step == 0:
        evaluation(student, step=0, epoch=0)  # the "before" of every before/after comparison
    try:
        for epoch in range(global_step // steps_per_epoch, settings.epochs):
            objective.train()
            micro = epoch_micro_batches(len(train_items), settings.batch_size, settings.seed, epoch, rank, world)
            for w_index, window in enumerate(windows(micro, settings.gradient_accumulation)):
                if epoch * steps_per_epoch + w_index < global_step:
                    continue  # already done before the checkpoint we resumed from
                batches = [[train_items[i] for i in mb] for mb in window]
                own = on_policy is not None and on_policy.chosen(global_step)
                if own:  # the student's own answers replace the data's (onpolicy.py)
                    batches = [on_policy.answer(student, rows, step=global_step, micro=m) if rows else rows
                               for m, rows in enumerate(batches)]
                    window_stats.on_policy_steps += 1
                count = torch.tensor(float(sum(len(it.input_ids) - max(it.n_prompt, 1) for rows in batches for it in rows)),
                                     device=accelerator.device)
                global_count = accelerator.reduce(count, reduction="sum").item()
                passes = [[rows[i] for i in group] for rows in batches
                          for group in length_groups([len(it.input_ids) for it in rows], per_forward)]
                # One autocast region for the step's passes: it keeps the weights' low-precision copies until it
                # exits, so they are cast once a step rather than once a pass (the weights change only at the step).
                with accelerator.autocast():
                    for m_index, rows in enumerate(passes):
                        weight = 1.0
                        if not rows:  # this rank ran out of rows: still join the collective backward, with weight 0
                            rows, weight = [train_items[0]], 0.0
                        tensors = {k: v.to(accelerator.device) for k, v in collate(rows, data.pad_id).items()}
                        sync = m_index == len(passes) - 1
                        with contextlib.nullcontext() if sync else accelerator.no_sync(objective):
                            teacher = (on_policy.targets(rows) if own else
                                       None if source is None else source.targets(rows))
                            loss_sum, kd_sum, ce_sum, n_tok = objective(**tensors, teacher=teacher, weight=weight,
                                                                        labels_are_own=own)
                            if not torch.isfinite(loss_sum.detach()).item():
                                raise UserError(_diverged(global_step + 1, loss_sum.item(), folder))
                            accelerator.backward(loss_sum * world / max(global_count, 1.0))
                        window_stats.add(loss_sum.item(), kd_sum.item() * weight,
                                         0.0 if own else ce_sum.item() * weight, n_tok.item() * weight, labelled=not own)
                        tokens_seen += int(tensors["attention_mask"].sum().item() * weight)
                grad_norm = (accelerator.clip_grad_norm_(objective.parameters(), settings.max_grad_norm)
                             if settings.max_grad_norm > 0 else None)
                if grad_norm is not None and not math.isfinite(float(grad_norm)):
                    raise UserError(_diverged(global_step + 1, float(grad_norm), folder, what="gradient norm"))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                heap.return_freed_memory()  # Note [Heap growth]
                global_step += 1
                bar.update(1)
                if global_step % settings.logging_steps == 0 or global_step == total_steps:
                    last = {
                        "step": global_step,
                        "epoch": round(global_step / steps_per_epoch, 4),
                        **window_stats.mean(accelerator),
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm) if grad_norm is not None else None,
                        "tokens_per_s": round(tokens_seen / max(time.time() - started, 1e-9), 1),
                        "elapsed_s": round(time.time() - started, 2),
                    }
                    window_stats = _Stats()
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                    folder.log_metrics(last, accelerator)
                if settings.eval_steps and global_step % settings.eval_steps == 0 and global_step % steps_per_epoch:
                    evaluation(student, step=global_step, epoch=round(global_step / steps_per_epoch, 4))
                    objective.train()
            ev = evaluation(student, step=global_step, epoch=epoch + 1)
            last.update({f"eval_{k}": v for k, v in ev.items()})
            folder.save_checkpoint(accelerator, global_step, epoch + 1)
    except Exception:
        bar.close()  # the one-line message (a stop, a full disk) starts on a line of its own
        raise
    except KeyboardInterrupt:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
        folder.save_checkpoint(accelerator, global_step, None)
        raise Interrupted(
            f"interrupted at step {global_step}; a checkpoint was saved: rerun the same command with "
            "--resume-from-checkpoint latest to continue"
        ) from None
    bar.close()
    if settings.log != "none":
        accelerator.end_training()
    return Fitted(student, last, round(time.time() - started, 2), round(evaluation.seconds, 2))


def _diverged(step: int, value: float, folder: RunFolder, what: str = "loss") -> str:
    kept = folder.checkpoints()
    where = f"the last good checkpoint is {folder.file(kept[-1])}" if kept else "no checkpoint was written yet"
    return (f"the {what} became {value} at step {step}; the step was not applied and {where}; lower --lr, use "
            "--mixed-precision no, or check the data and teacher for broken rows")


class _Evaluation:
    """Held-out metrics during training (metrics.response_metrics) on at most --eval-max-rows held-out rows,
    written to metrics.jsonl (and the tracker) as eval_*."""

    def __init__(self, data: Prepared, settings: LoopSettings, folder: RunFolder, accelerator: Any) -> None:
        self.items = data.valid_items[: settings.eval_max_rows]
        self.data, self.settings, self.folder, self.accelerator = data, settings, folder, accelerator
        self.seconds = 0.0  # spent evaluating, for the run's time split

    def __call__(self, model: Any, *, step: int, epoch: float) -> dict[str, Any]:
        if not self.items:
            return {}
        started = time.time()
        def batches() -> Iterator[tuple[dict[str, torch.Tensor], Targets | None]]:
            for s in range(0, len(self.items), self.settings.batch_size):
                rows = self.items[s : s + self.settings.batch_size]
                teacher = self.data.source or self.data.judge_source
                yield collate(rows, self.data.pad_id), None if teacher is None else teacher.targets(rows)

        ev = response_metrics(model, batches(), chunk_size=self.settings.loss_chunk_size or 512)
        self.folder.log_metrics({"step": step, "epoch": epoch, **{f"eval_{k}": v for k, v in ev.items()}}, self.accelerator)
        self.seconds += time.time() - started
        return ev


# ------------------------------------------------------------------------------------ stage 4: finishing


class _Stats:
    """Sums over the steps of one logging window: loss and kd per trained token, ce per labelled token (the
    student's own on-policy answers have no labels), and how many steps were on-policy."""

    def __init__(self) -> None:
        self.loss = self.kd = self.ce = self.n = self.n_labelled = 0.0
        self.on_policy_steps = 0

    def add(self, loss: float, kd: float, ce: float, n: float, *, labelled: bool = True) -> None:
        self.loss += loss
        self.kd += kd
        self.ce += ce
        self.n += n
        self.n_labelled += n if labelled else 0.0

    def mean(self, accelerator: Any) -> dict[str, Any]:
        t = accelerator.reduce(torch.tensor([self.loss, self.kd, self.ce, self.n, self.n_labelled],
                                            device=accelerator.device), "sum")
        loss, kd, ce, n, n_labelled = t.tolist()
        n = max(n, 1.0)
        out: dict[str, Any] = {"loss": round(loss / n, 6), "kd": round(kd / n, 6),
                               "ce": round(ce / n_labelled, 6) if n_labelled else None, "tokens": int(n)}
        if self.on_policy_steps:
            out["on_policy_steps"] = self.on_policy_steps
        return out


def _optimizer(objective: torch.nn.Module, settings: LoopSettings) -> torch.optim.Optimizer:
    trainable = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2]
    no_decay = [p for n, p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr)
    # The fused kernel: the same update in one pass over each tensor (0.04 s a step against 0.27 s for the
    # 56.6M-parameter benchmark student on a 2-core CPU, 6 % of its training time).
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for _, p in trainable)
    return torch.optim.AdamW(groups, lr=settings.lr, fused=fused or None)
