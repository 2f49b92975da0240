"""A ``.gguf`` model: its file parsed once per load, and its dequantized weights made a plain model that can be
trained and saved."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import gguf

from aitraining.models.rebuild import plain_config, rebuild

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

# Note [Reading a GGUF once]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~
# transformers reads a .gguf's metadata (for the bundled teacher, a 49,152-entry vocabulary and its merges, one
# Python object per entry) every time it needs anything from the file: for the config (our size check of a
# teacher, and again inside the model's load), for the tokenizer and for the weights; and while it maps the
# weights it rebuilds gguf's table of tensor names once per submodule (397 times for SmolLM2). Measured on the
# bundled teacher (two cores, nothing else running): its tokenizer and weights took transformers 15.3 s; under a
# profiler, the weights' load was about half reading the metadata (twice), a third the name table and a tenth
# dequantizing. In one block, tokenizer and weights take 5.4 s. Within a `gguf_parsed_once` block the file is
# read once (the reader is kept, keyed by path, size and modification time, until the outermost block ends: a
# parsed vocabulary is one Python object per entry, so it is not kept past the loading) and the name table built
# once per (architecture, depth). Every load of a .gguf runs in such a block; `load_tokenizer_and_model` loads both in
# one outer block (`gguf_parsed_once` nests), which reads the file once for both. Reader and table are read-only to
# transformers, so the weights are the same to the bit (test_models.py: test_materialize_gguf_round_trip loads
# the file both ways).
_GGUF_READERS: dict[tuple[str, int, int], Any] | None = None  # a dict only inside the outermost block


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Within this block, gguf's reader and tensor-name table are built once per file (Note [Reading a GGUF once])."""
    global _GGUF_READERS
    if _GGUF_READERS is not None:  # an outer block is reading already
        yield
        return
    readers: dict[tuple[str, int, int], Any] = {}
    real_reader, real_names = gguf.GGUFReader, gguf.get_tensor_name_map

    def reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:  # another mode than read-only: not ours to share
            return real_reader(path, *args, **kwargs)
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
        if key not in readers:
            readers[key] = real_reader(path)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(real_names)
    _GGUF_READERS = readers
    try:
        yield
    finally:
        _GGUF_READERS = None
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_names


def quiet_gguf_dtype_advice(record: logging.LogRecord) -> bool:
    return "weights packed is fastest in float32" not in record.getMessage()


def _is_gguf_model(model: PreTrainedModel) -> bool:
    """Whether a model still carries the GGUF quantization marker that blocks ``save_pretrained``."""
    quantization = getattr(model.config, "quantization_config", None)
    if quantization is None:
        return False
    method = (
        quantization.get("quant_method")
        if isinstance(quantization, dict)
        else (getattr(quantization, "quant_method", None))
    )
    # QuantizationMethod is a str enum, so this also matches the enum member.
    return method is not None and str(getattr(method, "value", method)) == "gguf"


def materialize(model: PreTrainedModel) -> PreTrainedModel:
    """Return a model that ``save_pretrained`` accepts.

    transformers dequantizes a ``.gguf`` into ordinary float weights but keeps the model flagged as
    GGUF-quantized, and refuses to save it. Such a model is rebuilt from its config (without the
    quantization entry) and given the same state dict. Any other model is returned unchanged.
    """
    if not _is_gguf_model(model):
        return model
    fresh = rebuild(model, plain_config(model.config), lambda key: key)
    log.debug("materialized GGUF model %s", getattr(model.config, "name_or_path", ""))
    return fresh
