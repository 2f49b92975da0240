"""Model folders this package writes: the output folder's checks, and a plain safetensors copy of any model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from aitraining.errors import UserError
from aitraining.models.load import load_tokenizer_and_model

# Files a previous checkpoint may have left in an output folder; stale shards next to a fresh save would
# make from_pretrained load a mix of two models.
STALE_WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "*.bin.index.json",
)


def clear_stale_weights(output: Path) -> None:
    """Remove old weight files from ``output`` so a new save cannot mix with an earlier checkpoint."""
    for pattern in STALE_WEIGHT_PATTERNS:
        for stale in output.glob(pattern):
            stale.unlink()


def output_folder(output: str, overwrite: bool) -> Path:
    """The folder a command writes a model to: refused if it is a file, or not empty without ``overwrite``."""
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--output: '{output}' is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--output: folder '{output}' is not empty; pick a new folder or pass --overwrite")
    return out


def save_model_folder(name: str, folder: str) -> str:
    """A model (folder, .gguf file or hub id) saved with its tokenizer as a plain safetensors folder, written
    aside and renamed into place (an interrupted save leaves nothing half-written). For a GGUF file this is the
    dequantizing done once: a .gguf is read and dequantized again at every load (about 5 s for the bundled
    teacher's tokenizer and weights, Note [Reading a GGUF once] in gguf.py), where the folder loads in a second."""
    aside = folder.rstrip(os.sep) + ".tmp"
    shutil.rmtree(aside, ignore_errors=True)
    tokenizer, model = load_tokenizer_and_model(name)
    tokenizer.save_pretrained(aside)
    model.save_pretrained(aside)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(aside, folder)
    return folder
