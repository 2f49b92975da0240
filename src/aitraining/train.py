"""One training run, top to bottom: check inputs -> data -> teacher (once) -> student -> loop -> save.

`run(params)` is the one entry point; the CLI and `AutoTrainProject` both call it.

Note (one reduction): each micro-batch returns the *sum* of its per-token losses. Before an optimizer
step, the trained tokens of every micro-batch of the accumulation window on every process are counted,
and each sum is divided by that global count (times the number of processes, because data parallelism
averages gradients). So 1 x 8, 4 x 2 and 2 processes x 4 all give the gradient of one big batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from aitraining import data as data_mod
from aitraining import models
from aitraining.errors import Interrupted, UserError
from aitraining.losses import Targets
from aitraining.objective import Objective, causal_lm
from aitraining.params import LLMTrainingParams

log = logging.getLogger("aitraining")

RUN_FILE = "run.json"
PARAMS_FILE = "training_params.json"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.json"


# ------------------------------------------------------------------------------------------ project folder


def _identity_hash(params: LLMTrainingParams) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(params.run_identity(), sort_keys=True).encode()).hexdigest()[:16]


def check_project_dir(params: LLMTrainingParams) -> str:
    """The project folder to use; refuses (before anything is written) a folder holding a different run or
    other files, unless --overwrite."""
    path = os.path.abspath(params.project_name)
    if os.path.isfile(path):
        raise UserError(f"--project-name '{params.project_name}' is a file; pass a folder path")
    if os.path.isdir(path) and os.listdir(path) and not params.overwrite:
        run_path = os.path.join(path, RUN_FILE)
        if not os.path.exists(run_path):
            raise UserError(
                f"--project-name '{params.project_name}' already exists and holds files of something else; "
                "choose a new folder or pass --overwrite"
            )
        with open(run_path, encoding="utf-8") as f:
            previous = json.load(f)
        if previous.get("identity") != _identity_hash(params):
            status = previous.get("status", "unfinished")
            raise UserError(
                f"--project-name '{params.project_name}' holds a different {status} run; choose a new folder, "
                "or pass --overwrite to replace it"
            )
    return path


def open_project_dir(path: str, params: LLMTrainingParams) -> None:
    """Create the folder; checkpoints of another run (kept only with --overwrite) are removed so that they
    can never be resumed into this one."""
    run_path = os.path.join(path, RUN_FILE)
    if os.path.exists(run_path):
        with open(run_path, encoding="utf-8") as f:
            previous = json.load(f)
        if previous.get("identity") != _identity_hash(params):
            for name in os.listdir(path):
                if name.startswith("checkpoint-"):
                    shutil.rmtree(os.path.join(path, name))
    os.makedirs(path, exist_ok=True)
    if not params.resume_from_checkpoint:
        metrics = os.path.join(path, METRICS_FILE)
        if os.path.exists(metrics):  # a fresh start: the earlier curve is kept beside, not appended to
            os.replace(metrics, os.path.join(path, "metrics.previous.jsonl"))
        if any(d.startswith("checkpoint-") for d in os.listdir(path)):
            log.warning("%s holds checkpoints of an earlier start of this run; starting from scratch "
                        "(--resume-from-checkpoint latest would continue it)", path)


def _write_run_file(project: str, params: LLMTrainingParams, status: str, **extra: Any) -> None:
    record = {"identity": _identity_hash(params), "status": status, **extra}
    tmp = os.path.join(project, RUN_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, os.path.join(project, RUN_FILE))


# ------------------------------------------------------------------------------------------------ batches


@dataclass
class Item:
    """A student sequence, of which positions >= n_prompt are trained, and where its teacher signal is."""

    input_ids: list[int]
    n_prompt: int
    target_key: str | None = None
    teacher_prompt: list[int] | None = None
    teacher_rows: list[int] | None = None  # per response token, its teacher row (another vocabulary; -1: none)


def collate(items: Sequence[Item], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):
        ids[i, : len(it.input_ids)] = torch.tensor(it.input_ids)
        mask[i, : len(it.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "n_prompt": torch.tensor([it.n_prompt for it in items])}


def batch_targets(items: Sequence[Item], source: Any) -> Targets | None:
    """The teacher at the batch's trained positions, in the order the loss takes them (row by row)."""
    return None if source is None else source.targets(items)


def student_items(
    examples: Sequence[data_mod.Example], teacher_items: Sequence[Any], tokenizer: Any, params: LLMTrainingParams,
    chat_template: str | None, aligner: Any = None,
) -> list[Item | None]:
    """The student's sequence of each example: its own prompt rendering + the response ids the teacher scored,
    or, for a teacher with another tokenizer (`aligner`: an `align.ResponseAligner`), the answer's text in the
    student's tokens with the teacher row of each."""
    items: list[Item | None] = []
    for i, (ex, t) in enumerate(zip(examples, teacher_items, strict=True)):
        if t is None or ex.messages is None:
            items.append(None)
            continue
        prompt, special = data_mod.render_prompt(tokenizer, ex.messages, params.student_prompt_template, chat_template)
        response, rows = t.response_ids, None
        if aligner is not None:
            aligned = aligner(t.response_ids, t.ended)
            response, rows = aligned.student_ids, aligned.teacher_rows
        seq = data_mod.build_sequence(
            data_mod.encode(tokenizer, prompt, add_special_tokens=special),
            response,
            block_size=params.block_size,
            example_index=i,
        )
        if seq is None:
            items.append(None)
            continue
        kept = None if rows is None else rows[: len(seq.input_ids) - seq.n_prompt]
        items.append(Item(seq.input_ids, seq.n_prompt, t.target_key, t.teacher_prompt, kept))
    return items


def epoch_micro_batches(n_items: int, params: LLMTrainingParams, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This process's micro-batches of one epoch: a seeded shuffle, cut into global batches of
    batch_size x world rows, of which this rank takes its slice (possibly empty at the very end)."""
    g = torch.Generator().manual_seed(params.seed + epoch)
    order = torch.randperm(n_items, generator=g).tolist()
    size = params.batch_size
    out = []
    for start in range(0, n_items, size * world):
        out.append(order[start + rank * size : start + (rank + 1) * size])
    return out


def windows(micro: list[list[int]], accumulation: int) -> list[list[list[int]]]:
    return [micro[i : i + accumulation] for i in range(0, len(micro), accumulation)]


# ------------------------------------------------------------------------------------------------- the run


def _preflight(params: LLMTrainingParams) -> None:
    """Everything that can be checked before a file is written or a model is loaded."""
    models.resolve_model_source(params.model or "", flag="--model")
    if params.use_distillation:
        models.resolve_model_source(params.teacher_model or "", flag="--teacher-model")
    if params.resume_from_checkpoint and params.resume_from_checkpoint != "latest":
        if not os.path.isdir(params.resume_from_checkpoint):
            raise UserError(
                f"--resume-from-checkpoint: '{params.resume_from_checkpoint}' is not a folder; pass a checkpoint "
                "folder from the project, or 'latest'"
            )
    if params.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on this machine")
    if params.log != "none":
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}[params.log]
        import importlib.util

        if importlib.util.find_spec(module) is None:
            raise UserError(f"--log {params.log} needs the '{module}' package: pip install {module}, or use --log none")


def _checkpoint_time(folder: str) -> float:
    """When a checkpoint was completed: its trainer_state.json is written last."""
    state = os.path.join(folder, STATE_FILE)
    return os.path.getmtime(state if os.path.exists(state) else folder)


def _find_checkpoint(project: str, choice: str) -> str:
    if choice != "latest":
        return choice
    found = sorted(
        (d for d in os.listdir(project) if d.startswith("checkpoint-")),
        key=lambda d: _checkpoint_time(os.path.join(project, d)),
    )
    if not found:
        raise UserError(f"--resume-from-checkpoint latest: no checkpoint in '{project}'; start without it")
    return os.path.join(project, found[-1])


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_mixed_precision(choice: str | None) -> str:
    """The precision a run uses: the user's choice, else bfloat16 where the hardware has it.

    Measured on this project's CPU machine (benchmarks/utilization.py): bfloat16 autocast trained the
    student 1.55x faster and ran the teacher 2.5x faster than float32, at the same held-out quality
    (label loss 9.83 vs 9.80 nats). `--mixed-precision no` keeps float32 everywhere.
    """
    if choice is not None:
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_bf16() else "no"


def release_freed_memory_to_the_system(threshold: int = 1 << 16) -> bool:
    """Serve allocations of `threshold` bytes and more with their own memory maps (glibc only; False elsewhere).

    Note [Heap growth]: glibc raises its mmap threshold to the size of the largest block freed, up to 32 MiB, so
    after the first steps every activation, logits chunk and gradient buffer of a training step comes from the
    heap; batches of varying shapes then leave holes that the heap never gives back. Measured on this project's
    machine (22 steps of the 8-layer student): resident memory climbed from 1.5 to 3.4 GB this way; with a fixed
    64 KiB threshold it stayed at 1.6 GB, at the same speed. Setting the threshold turns the adjustment off.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not os.uname().sysname == "Linux":
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def run(params: LLMTrainingParams, *, show_progress: bool = True) -> str:
    """Run the whole job; returns the project folder."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    release_freed_memory_to_the_system()

    if params.mixed_precision is None:
        params = params.model_copy(update={"mixed_precision": resolve_mixed_precision(None)})
    _preflight(params)
    # Tied embeddings are saved once in checkpoints; accelerate reports that at every save. Expected, so quiet.
    logging.getLogger("accelerate.utils.other").addFilter(lambda r: "Removed shared tensor" not in r.getMessage())
    train_examples, valid_examples = data_mod.load_examples(params)
    project = check_project_dir(params)

    # accelerate keeps its state per process; a second run in the same process (the Python API, tests) may
    # ask for another precision. The process group (PartialState) is kept.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=params.mixed_precision or "no",
        cpu=not torch.cuda.is_available(),
        log_with=None if params.log == "none" else params.log,
        project_dir=project,
    )
    is_main = accelerator.is_main_process
    show_progress = show_progress and is_main
    set_seed(params.seed)
    tokenizer = models.load_tokenizer(params.model or "", trust_remote_code=params.trust_remote_code, token=params.token)
    chat_template = data_mod.resolve_chat_template(tokenizer, params.chat_template)

    def start_project() -> None:
        if is_main:
            open_project_dir(project, params)
            params.save_json(os.path.join(project, PARAMS_FILE))
            _write_run_file(project, params, "running")
        accelerator.wait_for_everyone()
        _setup_file_log(project, is_main)
        log.info("project folder: %s", project)

    # Data -> token sequences (the teacher writes missing responses and is cached here, once).
    source = None
    timings: dict[str, float] = {}
    run_started = time.time()
    path = None
    if params.use_distillation:
        from aitraining.teacher import choose_path, prepare_teacher

        teacher_tokenizer = models.load_tokenizer(
            params.teacher_model or "", trust_remote_code=params.trust_remote_code, token=params.token,
            flag="--teacher-model",
        )
        path = choose_path(params, tokenizer, teacher_tokenizer)
        aligner = None
        if not path.same_tokenizer:
            from aitraining.align import ResponseAligner

            aligner = ResponseAligner(tokenizer, teacher_tokenizer, text_only=not path.needs_targets)
        start_project()
        log.info("distillation: %s", path.describe())
        all_examples = train_examples + valid_examples
        teacher_started = time.time()
        teacher_items, source = prepare_teacher(
            params,
            all_examples,
            tokenizer,
            project,
            accelerator.device,
            is_main=is_main,
            wait=accelerator.wait_for_everyone,
            show_progress=show_progress,
            teacher_tokenizer=teacher_tokenizer,
            path=path,
            vocab=aligner.vocab if aligner is not None and path.needs_targets else None,
        )
        timings["teacher_s"] = round(time.time() - teacher_started, 2)
        items = student_items(all_examples, teacher_items, tokenizer, params, chat_template, aligner)
        if path.mode == "cross-vocabulary":
            rows = [r for it in items if it is not None and it.teacher_rows for r in it.teacher_rows]
            share = sum(r >= 0 for r in rows) / max(len(rows), 1)
            timings["aligned_token_share"] = round(share, 4)
            log.info("across vocabularies: %.1f%% of the student's answer tokens have a teacher position predicting the "
                     "same text (%d shared tokens); the rest learn from the labels only", 100 * share,
                     int((aligner.vocab.to_student >= 0).sum()))
        train_items = [it for it in items[: len(train_examples)] if it is not None]
        valid_items = [it for it in items[len(train_examples) :] if it is not None]
    else:
        seqs, _ = data_mod.tokenize_for_sft(train_examples, tokenizer, params, chat_template)
        train_items = [Item(s.input_ids, s.n_prompt) for s in seqs]
        vseqs, _ = data_mod.tokenize_for_sft(valid_examples, tokenizer, params, chat_template)
        valid_items = [Item(s.input_ids, s.n_prompt) for s in vseqs]
    dropped = len(train_examples) - len(train_items)
    if not train_items:
        raise UserError(
            f"--data-path: none of the {len(train_examples)} training rows fits --block-size {params.block_size} "
            "with at least one response token; raise --block-size or shorten the prompts"
        )
    if dropped:
        log.warning("%d of %d training rows dropped: the prompt leaves no room in --block-size %d",
                    dropped, len(train_examples), params.block_size)
    if not params.use_distillation:
        start_project()

    # The student.
    model = models.load_causal_lm(
        params.model or "", dtype=torch.float32, trust_remote_code=params.trust_remote_code, token=params.token
    )
    if params.use_distillation:
        _advise(params, model)
    if params.peft:
        model = models.apply_lora(
            model, r=params.lora_r, alpha=params.lora_alpha, dropout=params.lora_dropout,
            target_modules=params.target_modules,
        )
    objective = Objective(
        model,
        temperature=params.distill_temperature,
        alpha=params.distill_alpha if source is not None else 0.0,
        kind=params.distill_loss,
        beta=params.distill_beta,
        chunk_size=params.loss_chunk_size,
    )
    optimizer = _optimizer(objective, params)
    world, rank = accelerator.num_processes, accelerator.process_index
    micro_per_epoch = len(epoch_micro_batches(len(train_items), params, 0, rank, world))
    steps_per_epoch = math.ceil(micro_per_epoch / params.gradient_accumulation)
    total_steps = steps_per_epoch * params.epochs
    from transformers import get_scheduler

    scheduler = get_scheduler(
        params.scheduler,
        optimizer,
        num_warmup_steps=math.ceil(params.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    # The scheduler stays unprepared: accelerate would step it once per process.
    objective, optimizer = accelerator.prepare(objective, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    global_step = 0
    if params.resume_from_checkpoint:
        ckpt = _find_checkpoint(project, params.resume_from_checkpoint)
        accelerator.load_state(ckpt)
        with open(os.path.join(ckpt, STATE_FILE), encoding="utf-8") as f:
            global_step = json.load(f)["global_step"]
        log.info("resumed from %s at step %d", ckpt, global_step)
    if params.log != "none":
        accelerator.init_trackers(os.path.basename(project), config=params.public_dict())

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    metrics_path = os.path.join(project, METRICS_FILE)
    bar = tqdm(total=total_steps, initial=global_step, desc="training", unit="step", disable=not show_progress)
    n_params = models.count_parameters(causal_lm(model))
    log.info("student: %s (%s parameters), %d training rows, %d steps", params.model, f"{n_params:,}",
             len(train_items), total_steps)
    started = time.time()
    tokens_seen = 0
    window_stats = _Stats()
    last: dict[str, Any] = {}
    if valid_items and global_step == 0:
        # The "before" of every before/after comparison: the untrained student on the validation rows.
        ev = _evaluate(accelerator.unwrap_model(objective).model, valid_items, source, params, pad_id)
        _log_metrics(metrics_path, {"step": 0, "epoch": 0, **{f"eval_{k}": v for k, v in ev.items()}}, accelerator, is_main)
    try:
        for epoch in range(global_step // steps_per_epoch, params.epochs):
            objective.train()
            micro = epoch_micro_batches(len(train_items), params, epoch, rank, world)
            for w_index, window in enumerate(windows(micro, params.gradient_accumulation)):
                if epoch * steps_per_epoch + w_index < global_step:
                    continue  # already done before the checkpoint we resumed from
                count = torch.tensor(float(sum(
                    sum(len(train_items[i].input_ids) - max(train_items[i].n_prompt, 1) for i in mb) for mb in window
                )), device=accelerator.device)
                global_count = accelerator.reduce(count, reduction="sum").item()
                for m_index, mb in enumerate(window):
                    weight = 1.0
                    if not mb:  # this rank ran out of rows: still join the collective backward, with weight 0
                        mb, weight = [0], 0.0
                    rows = [train_items[i] for i in mb]
                    tensors = {k: v.to(accelerator.device) for k, v in collate(rows, pad_id).items()}
                    sync = m_index == len(window) - 1
                    ctx = contextlib.nullcontext() if sync else accelerator.no_sync(objective)
                    with ctx, accelerator.autocast():
                        loss_sum, kd_sum, ce_sum, n_tok = objective(
                            **tensors, teacher=batch_targets(rows, source), weight=weight
                        )
                        accelerator.backward(loss_sum * world / max(global_count, 1.0))
                    window_stats.add(loss_sum.item(), kd_sum.item() * weight, ce_sum.item() * weight, n_tok.item() * weight)
                    tokens_seen += int(tensors["attention_mask"].sum().item() * weight)
                grad_norm = accelerator.clip_grad_norm_(objective.parameters(), params.max_grad_norm) if params.max_grad_norm > 0 else None
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                bar.update(1)
                if global_step % params.logging_steps == 0 or global_step == total_steps:
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
                    _log_metrics(metrics_path, last, accelerator, is_main)
            if valid_items:
                ev = _evaluate(accelerator.unwrap_model(objective).model, valid_items, source, params, pad_id)
                last.update({f"eval_{k}": v for k, v in ev.items()})
                _log_metrics(metrics_path, {"step": global_step, "epoch": epoch + 1, **{f"eval_{k}": v for k, v in ev.items()}},
                             accelerator, is_main)
            _save_checkpoint(accelerator, project, params, global_step, epoch + 1)
    except KeyboardInterrupt:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
        _save_checkpoint(accelerator, project, params, global_step, None)
        raise Interrupted(
            f"interrupted at step {global_step}; a checkpoint was saved: rerun the same command with "
            "--resume-from-checkpoint latest to continue"
        ) from None
    bar.close()
    if params.log != "none":
        accelerator.end_training()

    accelerator.wait_for_everyone()
    if is_main:
        final = dict(last)
        if params.use_distillation:
            cache = getattr(source, "cache", None)
            if cache is not None:
                final["teacher_cache_tokens"] = cache.n_tokens
                final["teacher_cache_bytes_per_token"] = cache.bytes_per_token
        final["train_s"] = round(time.time() - started, 2)
        final.update(timings)
        final["total_s"] = round(time.time() - run_started, 2)
        described = path.describe() if path is not None else None
        _save_final(accelerator.unwrap_model(objective).model, tokenizer, project, params, final,
                    n_train=len(train_items), n_valid=len(valid_items), distill_path=described)
        _write_run_file(project, params, "finished", final_metrics=final,
                        **({"distill_path": described} if described else {}))
    accelerator.wait_for_everyone()
    return project


# ------------------------------------------------------------------------------------------------ helpers


class _Stats:
    def __init__(self) -> None:
        self.loss = self.kd = self.ce = self.n = 0.0

    def add(self, loss: float, kd: float, ce: float, n: float) -> None:
        self.loss += loss
        self.kd += kd
        self.ce += ce
        self.n += n

    def mean(self, accelerator: Any) -> dict[str, float]:
        t = accelerator.reduce(torch.tensor([self.loss, self.kd, self.ce, self.n], device=accelerator.device), "sum")
        loss, kd, ce, n = t.tolist()
        n = max(n, 1.0)
        return {"loss": round(loss / n, 6), "kd": round(kd / n, 6), "ce": round(ce / n, 6), "tokens": int(n)}


def _log_metrics(path: str, record: dict[str, Any], accelerator: Any, is_main: bool) -> None:
    if is_main:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    if accelerator.trackers:
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])


def _optimizer(objective: torch.nn.Module, params: LLMTrainingParams) -> torch.optim.Optimizer:
    trainable = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2]
    no_decay = [p for n, p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": params.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if params.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=params.lr)
    return torch.optim.AdamW(groups, lr=params.lr)


def _parameter_count(name: str, params: LLMTrainingParams) -> int | None:
    """Parameters of a model from its config alone (built on the meta device: no weights are read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = models.resolve_model_source(name, flag="--teacher-model")
    kwargs: dict[str, Any] = {"trust_remote_code": params.trust_remote_code, "token": params.token}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        config = AutoConfig.from_pretrained(source.folder, **kwargs)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=params.trust_remote_code)
    except Exception:  # advice only: a model we cannot size is no error
        return None
    return models.count_parameters(model)


def _advise(params: LLMTrainingParams, student: Any) -> None:
    """The documented advice, as warnings."""
    teacher_n = _parameter_count(params.teacher_model or "", params)
    student_n = models.count_parameters(student)
    if teacher_n is not None and teacher_n < 4 * student_n:
        log.warning(
            "the teacher has %.1fx the student's parameters (%s vs %s); distillation works best with a teacher "
            "4x or more larger", teacher_n / student_n, f"{teacher_n:,}", f"{student_n:,}",
        )
    if not 2.0 <= params.distill_temperature <= 4.0:
        log.warning("--distill-temperature %g is outside the recommended 2.0-4.0", params.distill_temperature)
    if params.distill_alpha == 0.0:
        log.warning("--distill-alpha 0: only the label loss is used, the teacher's distribution is ignored")
    if params.distill_alpha == 1.0:
        log.warning("--distill-alpha 1: only the distillation loss is used, the labels are ignored")


def _evaluate(model: Any, items: list[Item], source: Any, params: LLMTrainingParams, pad_id: int) -> dict[str, Any]:
    from aitraining.evaluate import response_metrics

    def batches() -> Iterator[tuple[dict[str, torch.Tensor], Targets | None]]:
        for s in range(0, len(items), params.batch_size):
            rows = items[s : s + params.batch_size]
            yield collate(rows, pad_id), batch_targets(rows, source)

    return response_metrics(model, batches(), chunk_size=params.loss_chunk_size or 512)


def _save_checkpoint(accelerator: Any, project: str, params: LLMTrainingParams, step: int, epoch: int | None) -> None:
    path = os.path.join(project, f"checkpoint-{step}")
    accelerator.save_state(path, safe_serialization=True)
    if accelerator.is_main_process:
        with open(os.path.join(path, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump({"global_step": step, "epoch": epoch, "identity": _identity_hash(params)}, f, indent=2)
        # Newest first by time, not by step: a restarted run's step 50 is newer than an old run's step 120.
        found = sorted(
            (d for d in os.listdir(project) if d.startswith("checkpoint-") and d != os.path.basename(path)),
            key=lambda d: _checkpoint_time(os.path.join(project, d)),
            reverse=True,
        )
        for old in found[max(params.save_total_limit - 1, 0) :]:
            shutil.rmtree(os.path.join(project, old), ignore_errors=True)
    accelerator.wait_for_everyone()


def _save_final(
    model: Any, tokenizer: Any, project: str, params: LLMTrainingParams, final: dict[str, Any], *, n_train: int, n_valid: int,
    distill_path: str | None = None,
) -> None:
    from aitraining.card import write_model_card

    if params.peft:
        if params.merge_adapter:
            model.save_pretrained(os.path.join(project, "adapter"), safe_serialization=True)
            merged = model.merge_and_unload()
            merged.save_pretrained(project, safe_serialization=True)
        else:
            model.save_pretrained(project, safe_serialization=True)
    else:
        model.save_pretrained(project, safe_serialization=True)
    tokenizer.save_pretrained(project)
    write_model_card(project, params, final, n_train=n_train, n_valid=n_valid, distill_path=distill_path)


def _setup_file_log(project: str, is_main: bool) -> None:
    if not is_main:
        return
    handler = logging.FileHandler(os.path.join(project, "train.log"), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for h in list(log.handlers):
        if isinstance(h, logging.FileHandler):
            log.removeHandler(h)
            h.close()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
