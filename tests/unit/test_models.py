"""Tests for aitraining.models: resolving, loading, materializing, pruning and adapting models."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from aitraining.errors import UserError
from aitraining.models.gguf import materialize
from aitraining.models.layers import kept_layer_indices
from aitraining.models.load import (
    ModelSource,
    count_parameters,
    load_causal_lm,
    load_tokenizer,
    resolve_model_source,
)
from aitraining.models.lora import apply_lora
from aitraining.models.prune import depth_prune, prune_to_folder


def _logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` for a batch of token ids, without gradients."""
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _prompt_ids(tokenizer_dir: str) -> torch.Tensor:
    """A short chat-formatted prompt as a (1, T) id tensor."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a primary colour."}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(text, return_tensors="pt").input_ids


def _lora_target(param_name: str) -> str:
    """The wrapped module's name in a LoRA parameter name such as ``...q_proj.lora_A.default.weight``."""
    parts = param_name.split(".")
    return next(parts[i - 1] for i, part in enumerate(parts) if part.startswith("lora_"))


def _write_tiny_gguf(path: Path, *, layers: int = 3, hidden: int = 32, vocab: int = 96) -> Path:
    """Write a small random float32 Llama ``.gguf`` (no tokenizer), so GGUF loading is testable in ~1 s."""
    import gguf

    heads, kv_heads, ffn = 4, 2, 2 * hidden
    kv_width = kv_heads * hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    rng = np.random.default_rng(0)
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (vocab, hidden),
        "output_norm.weight": (hidden,),
    }
    for i in range(layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (hidden, hidden),
            f"blk.{i}.attn_k.weight": (kv_width, hidden),
            f"blk.{i}.attn_v.weight": (kv_width, hidden),
            f"blk.{i}.attn_output.weight": (hidden, hidden),
            f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.ffn_gate.weight": (ffn, hidden),
            f"blk.{i}.ffn_up.weight": (ffn, hidden),
            f"blk.{i}.ffn_down.weight": (hidden, ffn),
        }
    for name, shape in shapes.items():
        # Norm weights near 1 and small projections keep the random model numerically tame.
        scale, offset = (0.1, 1.0) if len(shape) == 1 else (0.05, 0.0)
        writer.add_tensor(name, (offset + scale * rng.standard_normal(shape)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny6_dir(tiny_model_factory: Callable[..., str]) -> str:
    """A six-layer tiny Llama folder shared by the pruning tests."""
    return tiny_model_factory(n_layers=6, seed=1)


# --- resolve_model_source ---------------------------------------------------------------------------


def test_resolve_hf_folder(tiny_model_factory: Callable[..., str]) -> None:
    folder = tiny_model_factory()
    assert resolve_model_source(folder) == ModelSource(folder=folder, gguf_file=None, is_local=True)


def test_resolve_gguf_file(tmp_path: Path) -> None:
    gguf = tmp_path / "model.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")
    source = resolve_model_source(str(gguf))
    assert source == ModelSource(folder=str(tmp_path), gguf_file="model.Q4_0.gguf", is_local=True)


def test_resolve_bundled_gguf(bundled_gguf: str) -> None:
    source = resolve_model_source(bundled_gguf)
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert os.path.join(source.folder, source.gguf_file) == bundled_gguf


def test_resolve_folder_with_one_gguf(tmp_path: Path) -> None:
    (tmp_path / "only.gguf").write_bytes(b"GGUF")
    (tmp_path / "notes.txt").write_text("not a model", encoding="utf-8")
    assert resolve_model_source(str(tmp_path)) == ModelSource(str(tmp_path), "only.gguf", True)


def test_resolve_folder_with_two_ggufs_is_ambiguous(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match=r"--model: .*several \.gguf files \(a\.gguf, b\.gguf\)"):
        resolve_model_source(str(tmp_path))


def test_resolve_folder_without_model(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--student: .*no config\.json and no \.gguf"):
        resolve_model_source(str(tmp_path), flag="--student")


def test_resolve_plain_file_is_not_a_model(tmp_path: Path) -> None:
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(UserError, match=r"--model: .*not a \.gguf"):
        resolve_model_source(str(weights))


def test_resolve_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An empty working directory guarantees the id cannot collide with a relative path.
    monkeypatch.chdir(tmp_path)
    source = resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert source == ModelSource("HuggingFaceTB/SmolLM2-135M-Instruct", None, False)


@pytest.mark.parametrize(
    "name",
    [
        "./no-such-model",
        "../no-such-model",
        "/no/such/model",
        "~/no-such-aitraining-model",
        "missing.gguf",
        "models/missing.gguf",
        "not a hub id",
        "",
    ],
)
def test_resolve_missing_local_path(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as caught:
        resolve_model_source(name, flag="--teacher")
    message = str(caught.value)
    assert message.startswith("--teacher: ")
    assert "\n" not in message
    if name.strip():
        assert message == (
            f"--teacher: model path '{name}' does not exist; "
            "pass a local model folder, a .gguf file or a hub id"
        )


# --- loading ----------------------------------------------------------------------------------------


def test_load_causal_lm_tiny_folder(tiny_model_factory: Callable[..., str]) -> None:
    folder = tiny_model_factory(n_layers=2)
    model = load_causal_lm(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 2
    assert model.dtype == torch.float32
    assert model is materialize(model)  # a normal model needs no rebuild

    half = load_causal_lm(folder, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_tiny_factory_is_deterministic(tiny_model_factory: Callable[..., str]) -> None:
    first = load_causal_lm(tiny_model_factory(seed=3))
    second = load_causal_lm(tiny_model_factory(seed=3))
    other = load_causal_lm(tiny_model_factory(seed=4))
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(first.state_dict()[weight], second.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])


def test_load_causal_lm_without_weights_is_user_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    with pytest.raises(UserError, match=r"^--student: could not load a causal language model from") as caught:
        load_causal_lm(str(tmp_path), flag="--student")
    assert "\n" not in str(caught.value)


def test_load_tokenizer_sets_missing_pad_token(
    tiny_model_factory: Callable[..., str], tmp_path: Path
) -> None:
    folder = tiny_model_factory(path=tmp_path / "no-pad")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).pad_token is None

    loaded = load_tokenizer(folder)
    assert loaded.pad_token == loaded.eos_token is not None
    assert loaded.chat_template


def test_load_tokenizer_missing_path_names_flag(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^--teacher: model path"):
        load_tokenizer(str(tmp_path / "absent.gguf"), flag="--teacher")


# --- materialize ------------------------------------------------------------------------------------


def test_load_causal_lm_gguf_is_saveable(tmp_path: Path) -> None:
    gguf_path = _write_tiny_gguf(tmp_path / "tiny.gguf")
    quantized = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    with pytest.raises(ValueError):
        quantized.save_pretrained(str(tmp_path / "refused"))

    model = load_causal_lm(str(gguf_path))
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.arange(12).unsqueeze(0)
    expected = _logits(quantized, ids)
    torch.testing.assert_close(_logits(model, ids), expected, rtol=0, atol=0)
    for key, tensor in quantized.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key
    for (key, buffer), (_, copied) in zip(quantized.named_buffers(), model.named_buffers(), strict=True):
        assert torch.equal(buffer, copied), key

    model.save_pretrained(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=0, atol=0)

    # The folder now holds one gguf, so it resolves too.
    assert load_causal_lm(str(tmp_path)).config.num_hidden_layers == 3


def test_a_gguf_is_read_once_per_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers reads a .gguf for the config and again for the weights; our loads read it once, nested blocks
    share the reading, and nothing is kept after the outermost one (Note [Reading a GGUF once])."""
    import gguf

    from aitraining.models import gguf as gguf_module

    gguf_path = str(_write_tiny_gguf(tmp_path / "tiny.gguf"))
    real, reads = gguf.GGUFReader, []
    monkeypatch.setattr(gguf, "GGUFReader", lambda path, *a, **k: reads.append(path) or real(path, *a, **k))
    AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    assert len(reads) == 2  # what the block saves: transformers' own load reads the file twice
    reads.clear()
    load_causal_lm(gguf_path)
    assert len(reads) == 1 and not gguf_module._GGUF_READERS
    reads.clear()
    with gguf_module.gguf_parsed_once():
        load_causal_lm(gguf_path)
        load_causal_lm(gguf_path)
        assert len(gguf_module._GGUF_READERS) == 1
    assert len(reads) == 1 and not gguf_module._GGUF_READERS


def test_tokenizer_and_model_load_in_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """`load_tokenizer_and_model` loads both inside one block (so a .gguf is read once), with the caller's flags."""
    from aitraining.models import gguf as gguf_module
    from aitraining.models import load as load_module

    seen = []
    monkeypatch.setattr(load_module, "load_tokenizer", lambda name, **kw: seen.append((gguf_module._GGUF_READERS, kw)) or "tok")
    monkeypatch.setattr(load_module, "load_causal_lm", lambda name, **kw: seen.append((gguf_module._GGUF_READERS, kw)) or "lm")
    got = load_module.load_tokenizer_and_model("x.gguf", trust_remote_code=True, token="t", flag="--teacher-model",
                                               allow_pickle=True)
    assert got == ("tok", "lm") and seen[0][0] is not None and seen[0][0] is seen[1][0]
    assert seen[0][1] == {"trust_remote_code": True, "token": "t", "flag": "--teacher-model"}
    assert seen[1][1] == {"trust_remote_code": True, "token": "t", "flag": "--teacher-model", "allow_pickle": True}


def test_depth_prune_of_gguf_model_is_saveable(tmp_path: Path) -> None:
    _write_tiny_gguf(tmp_path / "tiny.gguf")
    quantized = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    pruned = depth_prune(quantized, 2)
    pruned.save_pretrained(str(tmp_path / "pruned"))
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned")).config.num_hidden_layers == 2


@pytest.mark.slow  # dequantizing the real 135M gguf takes ~13-20 s on a small CPU box
def test_materialize_gguf_round_trip(bundled_gguf: str, smol_tokenizer_dir: str, tmp_path: Path) -> None:
    folder, name = os.path.split(bundled_gguf)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    with pytest.raises(ValueError):
        quantized.save_pretrained(str(tmp_path / "refused"))

    model = materialize(quantized)
    assert model is not quantized
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert count_parameters(model) == count_parameters(quantized)

    ids = _prompt_ids(smol_tokenizer_dir)
    expected = _logits(quantized, ids)
    torch.testing.assert_close(_logits(model, ids), expected, rtol=0, atol=0)

    model.save_pretrained(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"))
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=0, atol=0)

    # Our loader reads the file once and shares gguf's name table (Note [Reading a GGUF once]): the same weights to
    # the bit as transformers' own reading above, and gguf is left as it was.
    import gguf

    from aitraining.models import gguf as gguf_module

    ours = load_causal_lm(bundled_gguf).state_dict()
    plain = model.state_dict()
    assert ours.keys() == plain.keys() and all(torch.equal(ours[k], plain[k]) for k in plain)
    assert isinstance(gguf.GGUFReader, type) and not hasattr(gguf.get_tensor_name_map, "cache_info")
    assert not gguf_module._GGUF_READERS  # the parsed vocabulary is not kept past the loading


def test_smol_teacher_dir_matches_bundled_config(smol_teacher_dir: str) -> None:
    model = load_causal_lm(smol_teacher_dir)
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert model.config.vocab_size == 49152
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert load_tokenizer(smol_teacher_dir).chat_template


# --- depth pruning ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "keep", "expected"),
    [
        (6, 3, [0, 2, 5]),
        (6, 6, [0, 1, 2, 3, 4, 5]),
        (6, 1, [0]),
        (6, 2, [0, 5]),
        (30, 8, [0, 4, 8, 12, 17, 21, 25, 29]),
    ],
)
def test_kept_layer_indices(total: int, keep: int, expected: list[int]) -> None:
    assert kept_layer_indices(total, keep) == expected


def test_depth_prune_keeps_evenly_spaced_layers(tiny6_dir: str, tmp_path: Path) -> None:
    model = load_causal_lm(tiny6_dir)
    pruned = depth_prune(model, 3)

    assert len(model.model.layers) == 6  # the source is left alone
    assert pruned.config.num_hidden_layers == 3
    assert len(pruned.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2]
    source = model.state_dict()
    target = pruned.state_dict()
    for new, old in enumerate([0, 2, 5]):
        prefix_new, prefix_old = f"model.layers.{new}.", f"model.layers.{old}."
        names = [k for k in target if k.startswith(prefix_new)]
        assert names
        for key in names:
            assert torch.equal(target[key], source[prefix_old + key[len(prefix_new) :]]), key
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(target[key], source[key])
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight

    ids = _prompt_ids(tiny6_dir)
    generated = pruned.generate(ids, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids))
    assert generated.shape == (1, ids.shape[1] + 4)

    pruned.save_pretrained(str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert reloaded.config.num_hidden_layers == 3
    torch.testing.assert_close(_logits(reloaded, ids), _logits(pruned, ids), rtol=0, atol=0)


def test_depth_prune_all_layers_is_identity(tiny6_dir: str) -> None:
    model = load_causal_lm(tiny6_dir)
    ids = _prompt_ids(tiny6_dir)
    torch.testing.assert_close(_logits(depth_prune(model, 6), ids), _logits(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("keep", [0, -1, 7])
def test_depth_prune_rejects_bad_layer_count(tiny6_dir: str, keep: int) -> None:
    model = load_causal_lm(tiny6_dir)
    with pytest.raises(UserError, match=r"^--num-layers: must be between 1 and 6"):
        depth_prune(model, keep)


def test_depth_prune_slices_layer_types(tmp_path: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    layer_types = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=16,
        layer_types=layer_types,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    pruned = depth_prune(model, 3)
    assert pruned.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]

    pruned.save_pretrained(str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert reloaded.config.layer_types == pruned.config.layer_types
    ids = torch.arange(20).unsqueeze(0)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(pruned, ids), rtol=0, atol=0)


def test_layers_swapped_in_place_give_the_pruned_model(tiny6_dir: str) -> None:
    """choose_layers measures a pruned model by swapping layers in place: exactly the model depth_prune builds,
    with sliding-window layer types sliced too, and the model restored afterwards."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from aitraining.models.choose import _answer_log_probs, _Calibration, _kl_without, _kls_without_each, _only_layers

    config = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
                         num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                         layer_types=["full_attention", "sliding_attention"] * 2 + ["full_attention"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        qwen = Qwen2ForCausalLM(config).eval()
    for model, kept, ids in ((load_causal_lm(tiny6_dir), [0, 3, 5], _prompt_ids(tiny6_dir)),
                             (qwen, [1, 2, 4], torch.arange(3, 23).unsqueeze(0))):
        whole = _logits(model, ids)
        with _only_layers(model, kept):
            swapped = _logits(model, ids)
        torch.testing.assert_close(swapped, _logits(depth_prune(model, len(kept), kept=kept), ids), rtol=0, atol=0)
        assert not torch.equal(swapped, whole)
        torch.testing.assert_close(_logits(model, ids), whole, rtol=0, atol=0)
        # Each trial of choose_layers starts from the state entering the dropped layer: the same as running the
        # whole pruned stack.
        cal = _Calibration(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool), torch.empty(0))
        cal.reference = _answer_log_probs(model, cal)
        direct = [_kl_without(model, cal, [k for k in kept if k != j]) for j in kept]
        assert _kls_without_each(model, cal, kept, lambda: None) == pytest.approx(direct, rel=1e-5, abs=1e-7)
        assert len(set(direct)) == len(kept)
    assert qwen.config.num_hidden_layers == 5 and len(qwen.config.layer_types) == 5


def test_choose_layers_drops_the_layers_that_do_nothing(tiny6_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers 1, 2 and 4 write nothing into the residual stream: keeping 3 must keep 0, 3 and 5 (evenly spaced
    layers would be 0, 2, 5), and the pruned model then answers exactly as the whole one."""
    from aitraining.models import choose as choose_module
    from aitraining.models.choose import choose_layers

    model = load_causal_lm(tiny6_dir)
    for i in (1, 2, 4):
        torch.nn.init.zeros_(model.model.layers[i].self_attn.o_proj.weight)
        torch.nn.init.zeros_(model.model.layers[i].mlp.down_proj.weight)
    tokenizer = AutoTokenizer.from_pretrained(tiny6_dir)
    seen = []
    real = choose_module._calibration

    def calibration(*args: Any, **kwargs: Any) -> Any:
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(choose_module, "_calibration", calibration)
    choice = choose_layers(model, tokenizer, 3, prompts=["Name a colour.", "Hi"], max_new_tokens=6)
    # The model answered the prompts themselves, in its chat template.
    texts = tokenizer.batch_decode(seen[0].input_ids)
    assert "user\nName a colour.<|im_end|>" in texts[0] and "user\nHi<|im_end|>" in texts[1]
    assert choice.kept == [0, 3, 5]
    assert choice.kl == pytest.approx(0, abs=1e-6) and choice.even_kl > 1e-4
    assert 0 < choice.tokens <= 12


def test_depth_prune_bundled_teacher(smol_teacher_dir: str) -> None:
    teacher = load_causal_lm(smol_teacher_dir)
    student = depth_prune(teacher, 8)
    assert student.config.num_hidden_layers == 8
    assert len(student.model.layers) == 8
    assert torch.equal(
        student.model.layers[7].mlp.down_proj.weight, teacher.model.layers[29].mlp.down_proj.weight
    )
    assert count_parameters(student) < count_parameters(teacher)
    ids = _prompt_ids(smol_teacher_dir)
    generated = student.generate(ids, max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(ids))
    assert generated.shape[1] == ids.shape[1] + 3


def test_prune_to_folder(tiny6_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output = tmp_path / "student"
    assert prune_to_folder(tiny6_dir, 2, str(output), layers="even") == str(output)

    model = AutoModelForCausalLM.from_pretrained(str(output))
    assert model.config.num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(str(output)).chat_template
    assert any(output.glob("*.safetensors"))
    readme = (output / "README.md").read_text(encoding="utf-8")
    assert tiny6_dir in readme and "layers 0, 5" in readme and "evenly spaced" in readme and "distillation" in readme

    from aitraining.models import prune as prune_module

    real = prune_module.choose_layers  # measured on two short answers (the 16 prompts cost seconds of a CPU)
    monkeypatch.setattr(prune_module, "choose_layers",
                        lambda *a, **k: real(*a, **{**k, "prompts": ["Hi", "Name a colour."], "max_new_tokens": 6}))
    measured = tmp_path / "measured"
    prune_to_folder(tiny6_dir, 2, str(measured))  # the default: layers chosen by measurement
    assert AutoModelForCausalLM.from_pretrained(str(measured)).config.num_hidden_layers == 2
    assert "chosen by measurement: KL(original || pruned)" in (measured / "README.md").read_text(encoding="utf-8")
    assert "to 2 calibration prompts (" in (measured / "README.md").read_text(encoding="utf-8")


def test_calibration_prompts_from_the_users_data(tmp_path: Path) -> None:
    """--calibration-data: the user turns of any documented row format, at most n of them spread over the file."""
    from aitraining.models.choose import calibration_prompts

    def write(name: str, rows: list[dict[str, Any]]) -> str:
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return str(tmp_path / name)

    prompts = write("prompts.jsonl", [{"text": f"prompt {i}"} for i in range(40)])
    assert calibration_prompts(prompts, n=100) == [f"prompt {i}" for i in range(40)]
    assert calibration_prompts(prompts, n=4) == ["prompt 0", "prompt 10", "prompt 20", "prompt 30"]
    assert calibration_prompts(write("pairs.jsonl", [{"prompt": "a pair's prompt", "response": "its answer"}])) == [
        "a pair's prompt"]
    chats = write("chats.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first turn"},
                      {"role": "assistant", "content": "ok"}, {"role": "user", "content": "the last question"}]},
        {"messages": [{"role": "user", "content": "asked"}, {"role": "assistant", "content": "answered"}]}])
    assert calibration_prompts(chats) == ["the last question", "asked"]
    with pytest.raises(UserError, match=r"^--calibration-data: .*missing"):
        calibration_prompts(str(tmp_path / "missing.jsonl"))


def test_prune_measures_on_the_calibration_data(tiny6_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`aitraining prune --calibration-data`: the layers are measured on the user's prompts (the model answers
    those), the README says so; with --layers even or a missing file: one line, exit 2, nothing written."""
    from aitraining.cli import main
    from aitraining.models import prune as prune_module

    data = tmp_path / "mine.jsonl"
    data.write_text('{"text": "Bonjour, comment vas-tu ?"}\n{"text": "Compte jusqu\'a trois."}\n', encoding="utf-8")
    asked: list[list[str]] = []
    real = prune_module.choose_layers

    def spy(*a: Any, **k: Any) -> Any:
        asked.append(list(k["prompts"]))
        return real(*a, **{**k, "max_new_tokens": 4})

    monkeypatch.setattr(prune_module, "choose_layers", spy)
    output = tmp_path / "student"
    assert main(["prune", "--model", tiny6_dir, "--num-layers", "2", "--output", str(output),
                 "--calibration-data", str(data)]) == 0
    assert asked == [["Bonjour, comment vas-tu ?", "Compte jusqu'a trois."]]
    assert f"2 calibration prompts from `{data}`" in (output / "README.md").read_text(encoding="utf-8")
    capsys.readouterr()
    for extra in (["--layers", "even"], ["--calibration-data", str(tmp_path / "none.jsonl")]):
        argv = ["prune", "--model", tiny6_dir, "--num-layers", "2", "--output", str(tmp_path / "bad"),
                "--calibration-data", str(data), *extra]
        assert main(argv) == 2
        err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("Loading weights")]
        assert len(err) == 1 and err[0].startswith("aitraining: error: --calibration-data: "), err
    assert not (tmp_path / "bad").exists() and len(asked) == 1


def test_prune_to_folder_refuses_non_empty_output(tiny6_dir: str, tmp_path: Path) -> None:
    output = tmp_path / "busy"
    output.mkdir()
    (output / "keep.txt").write_text("user data", encoding="utf-8")
    with pytest.raises(UserError) as caught:
        prune_to_folder(tiny6_dir, 2, str(output))  # refused before any layer is measured
    assert "--output" in str(caught.value) and "--overwrite" in str(caught.value)

    # With overwrite, stale weights go but unrelated files stay.
    (output / "model-00001-of-00009.safetensors").write_bytes(b"stale")
    prune_to_folder(tiny6_dir, 3, str(output), overwrite=True, layers="even")  # the folder is the point here
    assert (output / "keep.txt").exists()
    assert not (output / "model-00001-of-00009.safetensors").exists()
    assert AutoModelForCausalLM.from_pretrained(str(output)).config.num_hidden_layers == 3


def test_prune_keeps_the_layers_given(tiny6_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from aitraining.cli import main

    output = tmp_path / "given"
    assert main(["prune", "--model", tiny6_dir, "--num-layers", "3", "--layers", "5,0,3", "--output", str(output)]) == 0
    student, teacher = load_causal_lm(str(output)), load_causal_lm(tiny6_dir)
    assert torch.equal(student.model.layers[1].mlp.down_proj.weight, teacher.model.layers[3].mlp.down_proj.weight)
    assert "layers 0, 3, 5 (0-based), as given to `aitraining prune --layers`" in (output / "README.md").read_text()
    capsys.readouterr()
    for bad in ("0,3", "0,3,3", "0,3,6", "first,3,5"):
        assert main(["prune", "--model", tiny6_dir, "--num-layers", "3", "--layers", bad, "--output",
                     str(tmp_path / "bad")]) == 2
        err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("Loading weights")]
        assert len(err) == 1 and err[0].startswith("aitraining: error: --layers: ") and bad in err[0], err
    assert not (tmp_path / "bad").exists()


def test_prune_to_folder_refuses_file_output(tiny6_dir: str, tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match=r"^--output: "):
        prune_to_folder(tiny6_dir, 2, str(target), overwrite=True)


# --- vocabularies, LoRA, parameter counts -----------------------------------------------------------


def test_an_added_token_makes_a_different_tokenizer(smol_tokenizer_dir: str) -> None:
    from aitraining.align import match_tokenizers

    first = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    second = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    assert match_tokenizers(first, second).same
    second.add_tokens(["<aitraining-extra-token>"])
    assert not match_tokenizers(first, second).same


@pytest.mark.parametrize("targets", ["q_proj,v_proj", " q_proj , v_proj ", ["q_proj", "v_proj"]])
def test_apply_lora_trains_only_adapters(
    tiny_model_factory: Callable[..., str], targets: str | list[str]
) -> None:
    model = load_causal_lm(tiny_model_factory())
    peft_model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=targets)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert {_lora_target(name) for name in trainable} == {"q_proj", "v_proj"}
    assert 0 < count_parameters(peft_model, trainable_only=True) < count_parameters(peft_model)


def test_apply_lora_all_linear(tiny_model_factory: Callable[..., str]) -> None:
    peft_model = apply_lora(
        load_causal_lm(tiny_model_factory()), r=2, alpha=4, dropout=0.1, target_modules="all-linear"
    )
    wrapped = {_lora_target(name) for name, p in peft_model.named_parameters() if p.requires_grad}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= wrapped


def test_apply_lora_unknown_module_is_user_error(tiny_model_factory: Callable[..., str]) -> None:
    with pytest.raises(UserError, match="LoRA target modules"):
        apply_lora(
            load_causal_lm(tiny_model_factory()), r=2, alpha=4, dropout=0.0, target_modules="no_such_proj"
        )


def test_count_parameters_counts_tied_weights_once(tiny_model_factory: Callable[..., str]) -> None:
    model = load_causal_lm(tiny_model_factory())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    expected = sum(t.numel() for k, t in model.state_dict().items() if k != "lm_head.weight")
    assert count_parameters(model) == expected
    assert count_parameters(model, trainable_only=True) == expected

    for parameter in model.model.layers.parameters():
        parameter.requires_grad_(False)
    frozen = sum(p.numel() for p in model.model.layers.parameters())
    assert count_parameters(model, trainable_only=True) == expected - frozen


# ------------------------------------------------------------------------------------------------ transplant


def test_transplant_rows_are_the_means_of_the_old_pieces(tiny_model_factory: Callable[..., str],
                                                         real_tokenizers: dict, tmp_path: Path) -> None:
    """A tiny SmolLM2-tokenizer model given Llama 2's tokenizer: a shared token keeps its row, a token the old
    vocabulary writes in two pieces gets their mean, a byte-fallback piece the old byte's row, EOS the old EOS's;
    a text whose tokens all exist in both gets the very same logits on those tokens; saved and reloaded through
    the command line, with the old chat template."""
    from aitraining.cli import main

    folder = tiny_model_factory(n_layers=1, seed=4)
    old, new = AutoTokenizer.from_pretrained(folder), real_tokenizers["llama-spm"]
    new_folder = tmp_path / "spm-tokenizer"
    new.save_pretrained(new_folder)
    out = tmp_path / "transplanted"
    assert main(["transplant", "--model", folder, "--tokenizer", str(new_folder), "--output", str(out)]) == 0
    a, b = AutoModelForCausalLM.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(out)
    got_tok = AutoTokenizer.from_pretrained(out)
    assert b.config.vocab_size == len(new) == 32000 and got_tok.chat_template == old.chat_template
    assert b.config.eos_token_id == new.eos_token_id
    wa, wb = a.get_input_embeddings().weight, b.get_input_embeddings().weight

    def row(tok: Any, piece: str) -> int:
        return tok.convert_tokens_to_ids(piece)

    torch.testing.assert_close(wb[row(new, "▁the")], wa[row(old, "Ġthe")])
    torch.testing.assert_close(wb[row(new, "<0x0A>")], wa[row(old, "Ċ")])
    torch.testing.assert_close(wb[new.eos_token_id], wa[old.eos_token_id])
    two = [t for t in new.get_vocab() if t.startswith("▁") and len(old(t.replace("▁", " "), add_special_tokens=False)["input_ids"]) == 2]
    piece = sorted(two)[0]
    ids = old(piece.replace("▁", " "), add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(wb[row(new, piece)], wa[ids].mean(0))
    text_new = [row(new, p) for p in ("▁the", "▁cat", "▁is", "▁on", "▁the")]
    text_old = [row(old, p) for p in ("Ġthe", "Ġcat", "Ġis", "Ġon", "Ġthe")]
    with torch.no_grad():
        za = a(torch.tensor([text_old])).logits[0]
        zb = b(torch.tensor([text_new])).logits[0]
    torch.testing.assert_close(zb[:, text_new], za[:, text_old], atol=1e-5, rtol=1e-5)
    assert main(["transplant", "--model", folder, "--tokenizer", str(new_folder), "--output", str(out)]) == 2


# ------------------------------------------------------------------------------------------- hostile folders


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_paths_inside_a_model_folder_are_never_followed(tiny_model_factory: Callable[..., str], tmp_path: Path) -> None:
    """A config that names another model (its _name_or_path, the tokenizer's name_or_path) loads the folder the
    user named, not the one its files point to."""
    import json

    named = Path(tiny_model_factory(n_layers=1, seed=11, path=tmp_path / "named"))
    elsewhere = Path(tiny_model_factory(n_layers=1, seed=12, path=tmp_path / "elsewhere"))
    for name in ("config.json", "tokenizer_config.json"):
        cfg = json.loads((named / name).read_text())
        cfg["_name_or_path"] = cfg["name_or_path"] = str(elsewhere)
        (named / name).write_text(json.dumps(cfg))
    model = load_causal_lm(str(named))
    want = _weights(named)
    for key, value in model.state_dict().items():
        if key in want:
            assert torch.equal(value, want[key]), key
    assert not torch.equal(_weights(named)["model.embed_tokens.weight"], _weights(elsewhere)["model.embed_tokens.weight"])
    load_tokenizer(str(named))


def test_model_code_in_a_folder_never_runs_without_trust_remote_code(tiny_model_factory: Callable[..., str],
                                                                      tmp_path: Path) -> None:
    """A config whose auto_map names code beside it (or in another repository) is refused with one line, and the
    code is never imported: the marker it would write stays absent."""
    import json

    folder = Path(tiny_model_factory(n_layers=1, seed=13, path=tmp_path / "hostile"))
    marker = tmp_path / "code-ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    # A known architecture: its own code is used, the folder's is ignored.
    assert type(load_causal_lm(str(folder))).__name__ == "LlamaForCausalLM" and not marker.exists()
    # Only the folder's code could build it: refused.
    del cfg["model_type"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"^--model: ") as e:
        load_causal_lm(str(folder))
    assert "\n" not in str(e.value) and not marker.exists(), str(e.value)
    assert "trust-remote-code" in str(e.value) or "trust_remote_code" in str(e.value), str(e.value)


def test_save_model_folder_writes_aside_and_replaces(tiny_model_factory: Callable[..., str], tmp_path: Path) -> None:
    """The model and its tokenizer as a safetensors folder, renamed into place: whatever was there is replaced,
    nothing is left beside it."""
    from aitraining.models.folders import save_model_folder

    source = Path(tiny_model_factory(n_layers=1, seed=14, path=tmp_path / "source"))
    out = tmp_path / "copy"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"old")
    assert save_model_folder(str(source), str(out)) == str(out)
    assert not (out / "stale.bin").exists() and not (tmp_path / "copy.tmp").exists()
    want, got = _weights(source), _weights(out)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert load_tokenizer(str(out))("hi")["input_ids"] == load_tokenizer(str(source))("hi")["input_ids"]
