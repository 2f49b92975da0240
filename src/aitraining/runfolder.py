"""The project folder's bookkeeping: which run it holds, its checkpoints, its metrics and its final files.

A project folder belongs to one run, known by the digest of the parameters that make a run what it is
(`LLMTrainingParams.run_identity`). `run.json` says whose it is and how far it got; `metrics.jsonl` holds the
curve; `checkpoint-N/` the states to resume from; the model, tokenizer and model card land at the top.

Every file that a kill could leave half-written is written aside and renamed into place (`run.json`,
checkpoints), so a reader sees the previous complete version or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aitraining.errors import UserError

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
PARAMS_FILE = "training_params.json"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
LOCK_FILE = ".lock"


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # no space, over quota, file size limit


# Note [Nearly full]: a filesystem refuses writes before statvfs reports zero free bytes (ext4 keeps blocks for
# delayed allocation and metadata): a checkpoint write here failed with about 36 MiB still reported free. Under
# this much, a write that failed is taken for a full disk.
NEARLY_FULL = 64 * 2**20


def _disk_full(error: BaseException, path: str) -> OSError | None:
    """A write that failed because the disk is full, as an OSError(ENOSPC), whatever raised it: torch.save reports
    one as a RuntimeError ("iostream error"). Judged by the error itself, or by the disk having under
    NEARLY_FULL bytes left when the write failed (Note [Nearly full])."""
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        return error
    if not isinstance(error, (OSError, RuntimeError)):
        return None
    try:
        free = shutil.disk_usage(path if os.path.exists(path) else os.path.dirname(path)).free
    except OSError:
        return None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) if free < NEARLY_FULL else None


@contextlib.contextmanager
def _written_aside(aside: str) -> Iterator[None]:
    """Around the writing of a folder that is renamed into place afterwards: if the writing fails (a full disk, an
    interrupt), the half-written folder goes, so what was in place stays; a full disk is raised as one."""
    try:
        yield
    except BaseException as e:
        full = _disk_full(e, aside)
        shutil.rmtree(aside, ignore_errors=True)
        if full is not None:
            raise full from e
        raise


def checkpoint_time(folder: str) -> float:
    """When a checkpoint was completed: its trainer_state.json is written last."""
    state = os.path.join(folder, STATE_FILE)
    return os.path.getmtime(state if os.path.exists(state) else folder)


@dataclass(frozen=True)
class FolderSettings:
    """What the project folder reads of a run: the flags named as the parameters, and the run's `identity` and
    `record` (the parameters as written to training_params.json: never the token)."""

    project_name: str
    identity: str
    record: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    resume_from_checkpoint: str | None = None
    save_total_limit: int = 1
    use_distillation: bool = False
    peft: bool = False
    merge_adapter: bool = False


class RunFolder:
    """One run's project folder. `check` refuses a folder of something else before anything is written;
    `open` makes it this run's."""

    def __init__(self, settings: FolderSettings, *, is_main: bool = True) -> None:
        self.settings = settings
        self.path = os.path.abspath(settings.project_name)
        self.is_main = is_main

    @property
    def name(self) -> str:
        """How pictures and tables name this run."""
        return "distilled" if self.settings.use_distillation else "fine-tuned"

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # ------------------------------------------------------------------------------------------ whose folder

    def check(self) -> None:
        """Refuse (before anything is written) a folder holding a different run or other files, unless
        --overwrite."""
        given = self.settings.project_name
        if os.path.isfile(self.path):
            raise UserError(f"--project-name '{given}' is a file; pass a folder path")
        held = [n for n in os.listdir(self.path) if n != LOCK_FILE] if os.path.isdir(self.path) else []
        if not held or self.settings.overwrite:
            return
        if not os.path.exists(self.file(RUN_FILE)):
            raise UserError(f"--project-name '{given}' already exists and holds files of something else; "
                            "choose a new folder or pass --overwrite")
        previous = _read_json(self.file(RUN_FILE))
        if previous.get("identity") != self.settings.identity:
            raise UserError(f"--project-name '{given}' holds a different {previous.get('status', 'unfinished')} run; "
                            "choose a new folder, or pass --overwrite to replace it")

    def open(self) -> None:
        """Create the folder and claim it: the lock first (a second process on the same folder is refused
        before it writes anything), then checkpoints of another run (kept only with --overwrite) are removed so
        that they can never be resumed into this one; a fresh start keeps the earlier curve beside."""
        if self.is_main:
            os.makedirs(self.path, exist_ok=True)
            self.lock()
            recorded = self._recorded_identity()
            if recorded is not None and recorded != self.settings.identity:
                for name in os.listdir(self.path):
                    if name.startswith(CHECKPOINT_PREFIX):
                        shutil.rmtree(self.file(name))
            os.makedirs(self.path, exist_ok=True)
            if not self.settings.resume_from_checkpoint:
                if os.path.exists(self.file(METRICS_FILE)):
                    os.replace(self.file(METRICS_FILE), self.file("metrics.previous.jsonl"))
                if self.checkpoints():
                    log.warning("%s holds checkpoints of an earlier start of this run; starting from scratch "
                                "(--resume-from-checkpoint latest would continue it)", self.path)
            self.write_text(PARAMS_FILE, json.dumps(self.settings.record, indent=2, sort_keys=True))
            self.write_run_file("running")
            self.open_log()

    def lock(self) -> None:
        """Hold an exclusive lock on the folder for as long as this run lives (the kernel drops it when the
        process ends, however it ends)."""
        import fcntl  # lazy: POSIX only, and only a run that claims a folder needs it

        if getattr(self, "_lock", None) is not None:
            return
        handle = open(self.file(LOCK_FILE), "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"--project-name '{self.settings.project_name}' is in use by a run that is still going "
                            f"({holder}); wait for it to end, or choose another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self._lock = handle

    def disk_full(self, error: OSError) -> UserError:
        """The message of a run stopped by a full disk: what was kept, and how to go on."""
        where = os.path.relpath(error.filename, self.path) if isinstance(error.filename, str) else "a file"
        kept = self.checkpoints()
        last = f"the last complete checkpoint ({kept[-1]}) is kept" if kept else "no checkpoint had been written yet"
        return UserError(f"the disk holding {self.path} is full ({os.strerror(error.errno or 0).lower()}, writing "
                         f"{where}); the teacher's outputs written so far are kept and {last}: free space, then run "
                         "the same command again with --resume-from-checkpoint latest")

    def release(self) -> None:
        handle = getattr(self, "_lock", None)
        if handle is not None:
            handle.close()
            self._lock = None

    def write_run_file(self, status: str, **extra: Any) -> None:
        if not self.is_main:
            return
        self.write_json(RUN_FILE, {"identity": self.settings.identity, "status": status, **extra})

    def write_json(self, name: str, record: Any) -> str:
        """A JSON file of the folder, written aside then renamed (never torn)."""
        return self.write_text(name, json.dumps(record, indent=2, ensure_ascii=False))

    def write_text(self, name: str, text: str) -> str:
        """A file of the folder, written aside then renamed (never torn)."""
        path = self.file(name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
        return path

    def open_log(self) -> None:
        """The package's log also goes to this folder's train.log (appended; on the main process only)."""
        if not self.is_main:
            return
        root = logging.getLogger("aitraining")
        for h in list(root.handlers):
            if isinstance(h, logging.FileHandler):
                root.removeHandler(h)
                h.close()
        handler = logging.FileHandler(self.file("train.log"), encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)

    # --------------------------------------------------------------------------------------------- metrics

    def log_metrics(self, record: dict[str, Any], accelerator: Any = None) -> None:
        """One line of metrics.jsonl, and the same numbers to the experiment tracker (if any)."""
        if self.is_main:
            with open(self.file(METRICS_FILE), "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if accelerator is not None and accelerator.trackers:
            accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def metrics(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.file(METRICS_FILE)):
            return []
        out = []
        with open(self.file(METRICS_FILE), encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line torn by a kill or a full disk: that record is lost, not the run
                    continue
        return out

    # ----------------------------------------------------------------------------------------- checkpoints

    def checkpoints(self) -> list[str]:
        """Complete checkpoint folders, oldest first by time (a restarted run's step 50 is newer than an old
        run's step 120)."""
        found = [d for d in os.listdir(self.path) if d.startswith(CHECKPOINT_PREFIX) and not d.endswith(".tmp")]
        return sorted(found, key=lambda d: checkpoint_time(self.file(d)))

    def _recorded_identity(self) -> str | None:
        """The identity of the run this folder's run.json records, or None without one."""
        return _read_json(self.file(RUN_FILE)).get("identity") if os.path.exists(self.file(RUN_FILE)) else None

    def resumable(self) -> bool:
        """Whether the folder holds a complete checkpoint of this same run (its run.json names this run)."""
        return self._recorded_identity() == self.settings.identity and bool(self.checkpoints())

    def find_checkpoint(self, choice: str) -> str:
        if choice != "latest":
            return choice
        found = self.checkpoints()
        if not found:
            raise UserError(f"--resume-from-checkpoint latest: no checkpoint in '{self.path}'; start without it")
        return self.file(found[-1])

    def save_checkpoint(self, accelerator: Any, step: int, epoch: int | None) -> None:
        """Save the training state as checkpoint-<step>: written aside, renamed into place once complete (a kill
        mid-save leaves the previous checkpoint as the latest), then the oldest beyond --save-total-limit go."""
        final = self.file(f"{CHECKPOINT_PREFIX}{step}")
        aside = final + ".tmp"
        if self.is_main:
            shutil.rmtree(aside, ignore_errors=True)
        accelerator.wait_for_everyone()
        with _written_aside(aside):
            accelerator.save_state(aside, safe_serialization=True)
            if self.is_main:
                with open(os.path.join(aside, STATE_FILE), "w", encoding="utf-8") as f:
                    json.dump({"global_step": step, "epoch": epoch, "identity": self.settings.identity}, f, indent=2)
        if self.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(aside, final)
            older = [d for d in reversed(self.checkpoints()) if d != os.path.basename(final)]
            for old in older[max(self.settings.save_total_limit - 1, 0) :]:
                shutil.rmtree(self.file(old), ignore_errors=True)
        accelerator.wait_for_everyone()

    @staticmethod
    def checkpoint_step(folder: str) -> int:
        return int(_read_json(os.path.join(folder, STATE_FILE))["global_step"])

    # -------------------------------------------------------------------------------------------- finished

    def save_model(self, model: Any, tokenizer: Any) -> None:
        """The trained student as a transformers folder (safetensors); a LoRA run saves its adapter, and with
        --merge-adapter the merged model too (the adapter then in adapter/)."""
        if self.settings.peft and self.settings.merge_adapter:
            self._save_aside(model, self.file("adapter"))
            model = model.merge_and_unload()
        self._save_aside(model, self.path)
        tokenizer.save_pretrained(self.path)

    def _save_aside(self, model: Any, folder: str) -> None:
        """save_pretrained into a folder beside, then each file renamed into place: a full disk or a kill leaves no
        torn weights file where a user would load one."""
        aside = self.file(".saving.tmp")
        shutil.rmtree(aside, ignore_errors=True)
        with _written_aside(aside):
            model.save_pretrained(aside, safe_serialization=True)
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(aside):
            os.replace(os.path.join(aside, name), os.path.join(folder, name))
        os.rmdir(aside)
