"""Distillation end to end: the teacher runs once, its cache equals its live distribution, teacher and
student are aligned on the response tokens of the real tokenizer, and the student moves toward the teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import write_jsonl
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from aitraining.cli import main
from aitraining.data import Example, encode, render_prompt
from aitraining.params import LLMTrainingParams
from aitraining.teacher import TargetCache, Teacher, prepare_teacher

pytestmark = pytest.mark.e2e


def params_for(student: str, teacher: str, data: str, project: Path, **kw) -> LLMTrainingParams:
    base = dict(model=student, teacher_model=teacher, data_path=data, project_name=str(project), use_distillation=True,
                distill_max_teacher_length=12)
    return LLMTrainingParams(**{**base, **kw})


@pytest.mark.parametrize("sample", [False, True])
def test_generation_targets_equal_a_scoring_pass_of_the_real_teacher(smol_teacher_dir, tmp_path, sample):
    """The distribution recorded during generation is the teacher's distribution on prompt + response,
    greedy or sampled (the sampling warpers run after the recorder)."""
    params = params_for(smol_teacher_dir, smol_teacher_dir, "x.jsonl", tmp_path / "p", distill_top_k=16,
                        distill_max_teacher_length=10, teacher_batch_size=3, teacher_do_sample=sample,
                        teacher_sampling_temperature=1.5)
    torch.manual_seed(0)
    teacher = Teacher(params, torch.device("cpu"))
    # Settings a teacher may ship in its generation_config: they must not reach what is recorded.
    teacher.model.generation_config.repetition_penalty = 1.5
    teacher.model.generation_config.top_k = 3
    teacher.model.generation_config.temperature = 0.3
    examples = [Example(messages=[{"role": "user", "content": p}]) for p in
                ["What is the capital of Italy?", "Name three fruits.", "Say hi."]]
    prompts = [teacher.prompt_ids(ex) for ex in examples]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    generated = teacher.generate(prompts)
    for prompt, (response, recorded) in zip(prompts, generated, strict=True):
        assert len(response) == len(recorded) > 0
        live = teacher.score([(prompt, response)])[0]
        torch.testing.assert_close(recorded.logp, live.logp, atol=2e-3, rtol=0)
        torch.testing.assert_close(recorded.tail_logp, live.tail_logp, atol=2e-3, rtol=0)
        # Ids agree wherever neighbouring log-probs are not a near tie.
        gaps = (live.logp[:, :-1] - live.logp[:, 1:]).abs() > 1e-3
        assert (recorded.ids[:, :-1] == live.ids[:, :-1])[gaps].all()
        if not sample:  # greedy decoding picked the teacher's top-1 token at every step
            assert recorded.ids[:, 0].tolist() == response
    if sample:  # hot sampling leaves the greedy path somewhere
        assert any(rec.ids[:, 0].tolist() != resp for resp, rec in generated)


def test_cached_targets_equal_live_targets_and_alignment_on_the_real_tokenizer(tiny_teacher, tiny_student, tmp_path):
    """Templates that end mid-word and responses starting with a space: the student's trained tokens are
    exactly the teacher's response tokens, and the cache holds the teacher's live distribution on them."""
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "Name a colour", "response": " Blue, like the sky."},
        {"prompt": "Say {input} and {0} literally", "response": "{input} and {0}"},
        {"prompt": "Count to three", "response": "1, 2, 3"},
    ])
    project = tmp_path / "proj"
    project.mkdir()
    params = params_for(tiny_student, tiny_teacher, data, project, chat_template="none",
                        teacher_prompt_template="<|system|>You are helpful.<|user|>{input}<|assistant|>",
                        student_prompt_template="Question: {input}\nAnsw", distill_top_k=8)
    from aitraining.data import load_examples

    examples, _ = load_examples(params)
    tok = AutoTokenizer.from_pretrained(tiny_student)
    items, cache = prepare_teacher(params, examples, tok, str(project), torch.device("cpu"), show_progress=False)
    teacher = Teacher(params, torch.device("cpu"))
    for ex, item in zip(examples, items, strict=True):
        assert item is not None
        assert tok.decode(item.response_ids) == ex.response + tok.eos_token
        student_prompt, special = render_prompt(tok, ex.messages, params.student_prompt_template, None)
        assert student_prompt.endswith("\nAnsw") and "{input}" not in student_prompt.replace(ex.response, "")
        student_ids = encode(tok, student_prompt, add_special_tokens=special) + item.response_ids
        assert student_ids[-len(item.response_ids):] == item.response_ids
        teacher_prompt = teacher.prompt_ids(ex)
        assert tok.decode(teacher_prompt).startswith("<|system|>You are helpful.<|user|>")
        live = teacher.score([(teacher_prompt, item.response_ids)])[0]
        cached = cache.get(item.target_key)
        torch.testing.assert_close(cached.logp, live.logp, atol=1e-5, rtol=0)
        torch.testing.assert_close(cached.tail_logp, live.tail_logp, atol=1e-5, rtol=0)
        assert torch.equal(cached.ids, live.ids)


def test_teacher_runs_once_whatever_the_epochs_and_is_reused(tiny_student, tiny_teacher, prompts_file, tmp_path, monkeypatch):
    calls = {"generate": 0, "score": 0, "load": 0}
    real_generate, real_score = Teacher.generate, Teacher.score

    def counting(name, real):
        def wrapper(self, *a, **k):
            calls[name] += 1
            return real(self, *a, **k)
        return wrapper

    monkeypatch.setattr(Teacher, "generate", counting("generate", real_generate))
    monkeypatch.setattr(Teacher, "score", counting("score", real_score))
    import aitraining.models as models_mod

    real_load = models_mod.load_causal_lm

    def load(name, **kw):
        if kw.get("flag") == "--teacher-model":
            calls["load"] += 1
        return real_load(name, **kw)

    monkeypatch.setattr(models_mod, "load_causal_lm", load)
    real_tok = models_mod.load_tokenizer
    calls["tokenizer"] = 0

    def load_tok(name, **kw):
        if kw.get("flag") == "--teacher-model":
            calls["tokenizer"] += 1
        return real_tok(name, **kw)

    monkeypatch.setattr(models_mod, "load_tokenizer", load_tok)
    args = ["llm", "--train", "--model", tiny_student, "--teacher-model", tiny_teacher, "--data-path", prompts_file,
            "--use-distillation", "--distill-max-teacher-length", "6", "--teacher-batch-size", "4", "--batch-size", "4"]
    assert main([*args, "--project-name", str(tmp_path / "one"), "--epochs", "1"]) == 0
    once = dict(calls)
    assert once == {"generate": 2, "score": 0, "load": 1, "tokenizer": 1}  # the tokenizer too, once per run
    assert main([*args, "--project-name", str(tmp_path / "three"), "--epochs", "3"]) == 0
    assert calls["generate"] == 4 and calls["load"] == 2  # three epochs cost the teacher what one did
    # A rerun in the same folder (or a resume) finds every response and target cached: no teacher at all.
    assert main([*args, "--project-name", str(tmp_path / "three"), "--epochs", "3"]) == 0
    assert calls["generate"] == 4 and calls["load"] == 2


def test_interrupted_generation_keeps_what_was_written(tiny_student, tiny_teacher, prompts_file, tmp_path, monkeypatch):
    params = params_for(tiny_student, tiny_teacher, prompts_file, tmp_path / "p", teacher_batch_size=3)
    (tmp_path / "p").mkdir()
    from aitraining.data import load_examples

    examples, _ = load_examples(params)
    tok = AutoTokenizer.from_pretrained(tiny_student)
    real_generate = Teacher.generate
    state = {"n": 0}

    def flaky(self, prompts):
        state["n"] += 1
        if state["n"] == 2:
            raise KeyboardInterrupt
        return real_generate(self, prompts)

    monkeypatch.setattr(Teacher, "generate", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_teacher(params, examples, tok, str(tmp_path / "p"), torch.device("cpu"), show_progress=False)
    written = (tmp_path / "p" / "teacher_outputs.jsonl").read_text().splitlines()
    assert len(written) == 3
    # A torn half-line and stray bytes past the index, as a kill mid-write leaves them.
    with open(tmp_path / "p" / "teacher_outputs.jsonl", "a") as f:
        f.write('{"key": "trunc')
    cache_dir = next((tmp_path / "p" / "teacher_cache").iterdir())
    with open(cache_dir / "tail.f32", "ab") as f:
        f.write(b"\x00\x01")
    with open(cache_dir / "index.jsonl", "a") as f:
        f.write('{"key": "torn", "sta')
    monkeypatch.setattr(Teacher, "generate", real_generate)
    counted = {"prompts": 0}

    def counting(self, prompts):
        counted["prompts"] += len(prompts)
        return real_generate(self, prompts)

    monkeypatch.setattr(Teacher, "generate", counting)
    items, cache = prepare_teacher(params, examples, tok, str(tmp_path / "p"), torch.device("cpu"), show_progress=False)
    assert counted["prompts"] == len(examples) - 3
    assert all(it is not None and it.target_key in cache for it in items)
    assert (cache_dir / "tail.f32").stat().st_size == cache.n_tokens * 4
    # Everything written after the torn index line is found again by the next run: nothing is redone.
    counted["prompts"] = 0

    def no_scoring(self, pairs):
        raise AssertionError("the teacher scored again what the cache holds")

    monkeypatch.setattr(Teacher, "score", no_scoring)
    again_items, again = prepare_teacher(params, examples, tok, str(tmp_path / "p"), torch.device("cpu"),
                                         show_progress=False)
    assert counted["prompts"] == 0 and len(again.entries) == len(cache.entries)


def test_the_student_moves_toward_the_teacher(tiny_student, tiny_teacher, tmp_path):
    """End-to-end CLI run: KL(teacher || student) on held-out prompts falls, top-1 agreement rises."""
    data = tmp_path / "data"
    prompts = [f"Tell me fact number {i} about {topic}." for i in range(6) for topic in ("cats", "rivers", "stars")]
    write_jsonl(data / "train.jsonl", [{"text": p} for p in prompts[:15]])
    write_jsonl(data / "valid.jsonl", [{"text": p} for p in prompts[15:]])
    project = tmp_path / "kd"
    assert main(["llm", "--train", "--model", tiny_student, "--teacher-model", tiny_teacher, "--data-path", str(data),
                 "--valid-split", "valid", "--project-name", str(project), "--use-distillation", "--distill-alpha", "1",
                 "--distill-max-teacher-length", "16", "--epochs", "4", "--lr", "3e-3", "--batch-size", "5"]) == 0
    evals = [json.loads(x) for x in (project / "metrics.jsonl").read_text().splitlines() if "eval_kl_to_teacher" in x]
    assert evals[0]["epoch"] == 0 and evals[-1]["epoch"] == 4
    assert evals[-1]["eval_kl_to_teacher"] < 0.5 * evals[0]["eval_kl_to_teacher"]
    assert evals[-1]["eval_top1_agreement"] >= evals[0]["eval_top1_agreement"]


def _tiny_with(tokenizer, folder: Path, vocab_size: int, seed: int, *, boost_padding: bool = False) -> str:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if boost_padding:
        with torch.no_grad():  # padded rows would win every top-k if they were not cut off
            model.lm_head.weight[len(tokenizer):] = model.lm_head.weight[: vocab_size - len(tokenizer)] * 0 + 5.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_padded_embedding_rows_are_the_same_vocabulary(smol_tokenizer_dir, prompts_file, tmp_path):
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    student = _tiny_with(tok, tmp_path / "s", len(tok), 0)
    teacher = _tiny_with(tok, tmp_path / "t", len(tok) + 128, 1, boost_padding=True)
    project = tmp_path / "padded"
    assert main(["llm", "--train", "--model", student, "--teacher-model", teacher, "--data-path", prompts_file,
                 "--project-name", str(project), "--use-distillation", "--distill-max-teacher-length", "4"]) == 0
    cache = TargetCache(str(next((project / "teacher_cache").iterdir())), {"k": 64}, readonly=True)
    key = next(iter(cache.entries))
    assert int(cache.get(key).ids.max()) < len(tok)


def test_a_different_tokenizer_is_a_clear_error(smol_tokenizer_dir, tiny_student, prompts_file, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.train_from_iterator(["a small corpus for a small tokenizer"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"]))
    other = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")
    teacher = _tiny_with(other, tmp_path / "other", len(other), 2)
    project = tmp_path / "x"
    capsys.readouterr()
    assert main(["llm", "--train", "--model", tiny_student, "--teacher-model", teacher, "--data-path", prompts_file,
                 "--project-name", str(project), "--use-distillation"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different tokenizer" in err[0]


def test_bundled_teacher_prune_then_distill(bundled_gguf, shared_data, tmp_path):
    """The real thing, small: an 8-layer student cut from the bundled SmolLM2 teacher, distilled on real prompts."""
    student = tmp_path / "student"
    assert main(["prune", "--model", bundled_gguf, "--num-layers", "8", "--output", str(student)]) == 0
    rows = [json.loads(x) for x in (shared_data / "self_instruct_seed_prompts.jsonl").read_text().splitlines()[:6]]
    data = write_jsonl(tmp_path / "real.jsonl", rows)
    project = tmp_path / "smol-distilled"
    assert main(["llm", "--train", "--model", str(student), "--teacher-model", bundled_gguf, "--data-path", data,
                 "--project-name", str(project), "--use-distillation", "--distill-max-teacher-length", "24",
                 "--epochs", "2", "--batch-size", "3", "--lr", "1e-4", "--logging-steps", "1"]) == 0
    outputs = [json.loads(x) for x in (project / "teacher_outputs.jsonl").read_text().splitlines()]
    assert len(outputs) == 6 and all(o["response"].strip() for o in outputs)
    metrics = [json.loads(x) for x in (project / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert metrics[-1]["kd"] < metrics[0]["kd"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(project)
    assert model.config.num_hidden_layers == 8


def test_documented_advice_is_given_as_warnings(tiny_student, tiny_teacher, prompts_file, tmp_path, caplog):
    caplog.set_level("WARNING", logger="aitraining")
    assert main(["llm", "--train", "--model", tiny_student, "--teacher-model", tiny_teacher, "--data-path", prompts_file,
                 "--project-name", str(tmp_path / "w"), "--use-distillation", "--distill-temperature", "6",
                 "--distill-alpha", "1", "--distill-max-teacher-length", "4"]) == 0
    text = caplog.text
    assert "4x" in text and "outside the recommended 2.0-4.0" in text and "labels are ignored" in text


def test_repeated_rows_cost_the_teacher_once(tiny_student, tiny_teacher, tmp_path, monkeypatch):
    rows = [{"text": "Say one."}, {"text": "Say two."}] * 3 + [{"prompt": "Name it.", "response": "It."}] * 3
    data = write_jsonl(tmp_path / "rep.jsonl", [{"text": r["text"]} for r in rows if "text" in r])
    pairs = write_jsonl(tmp_path / "rep_pairs.jsonl", [r for r in rows if "prompt" in r])
    seen = {"generated": 0, "scored": 0}
    real_generate, real_score = Teacher.generate, Teacher.score

    def generate(self, prompts):
        seen["generated"] += len(prompts)
        return real_generate(self, prompts)

    def score(self, pairs_):
        seen["scored"] += len(pairs_)
        return real_score(self, pairs_)

    monkeypatch.setattr(Teacher, "generate", generate)
    monkeypatch.setattr(Teacher, "score", score)
    tok = AutoTokenizer.from_pretrained(tiny_student)
    from aitraining.data import load_examples

    for path, name in ((data, "g"), (pairs, "s")):
        params = params_for(tiny_student, tiny_teacher, path, tmp_path / name, distill_max_teacher_length=4)
        (tmp_path / name).mkdir()
        examples, _ = load_examples(params)
        items, cache = prepare_teacher(params, examples, tok, str(tmp_path / name), torch.device("cpu"), show_progress=False)
        assert all(it is not None and it.target_key in cache for it in items)
    assert seen == {"generated": 2, "scored": 1}
    assert len((tmp_path / "g" / "teacher_outputs.jsonl").read_text().splitlines()) == 2
