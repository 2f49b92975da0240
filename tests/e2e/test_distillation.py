"""Distillation end to end: the teacher runs once, its cache equals its live distribution, teacher and
student are aligned on the response tokens of the real tokenizer, and the student moves toward the teacher."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import PAIRS, assert_same_weights, capture_loss_inputs, other_tokenizer_student, sharpened, write_jsonl
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from aitraining.align import vocabulary_map
from aitraining.batches import StudentSettings
from aitraining.cli import main
from aitraining.data.examples import DataSettings, Example, read_examples
from aitraining.models.load import load_tokenizer
from aitraining.objective import Objective, target_positions
from aitraining.params import LLMTrainingParams
from aitraining.teacher import TeacherSettings, choose_path, open_source
from aitraining.teacher.cache import TargetCache
from aitraining.teacher.engine import Engine

pytestmark = pytest.mark.e2e


def params_for(student: str, teacher: str, data: str, project: Path, **kw) -> LLMTrainingParams:
    base = dict(model=student, teacher_model=teacher, data_path=data, project_name=str(project), use_distillation=True,
                distill_max_teacher_length=12)
    return LLMTrainingParams(**{**base, **kw})


def engine_for(params: LLMTrainingParams) -> Engine:
    """The run's teacher in this process, on the CPU."""
    return Engine(params.settings(TeacherSettings), torch.device("cpu"))


def training_examples(params: LLMTrainingParams) -> list[Example]:
    return read_examples(params.settings(DataSettings)).train


def prepare_source(params: LLMTrainingParams, examples: list[Example], student_tokenizer, project_dir: str):
    """The teacher phase as a run does it (on the CPU): the path from the two tokenizers, the run's source, its
    `prepare`; returns (items, source)."""
    settings = params.settings(TeacherSettings)
    teacher_tokenizer = load_tokenizer(settings.teacher_model, flag="--teacher-model")
    path = choose_path(student_tokenizer, teacher_tokenizer, mode=settings.distill_mode, source=settings.teacher_source)
    source = open_source(settings, project_dir=project_dir, device=torch.device("cpu"), path=path,
                         tokenizer=teacher_tokenizer)
    return source.prepare(examples, show_progress=False), source


@pytest.mark.parametrize("sample", [False, True])
def test_generation_targets_equal_a_scoring_pass_of_the_real_teacher(smol_teacher_dir, tmp_path, sample):
    """The distribution recorded during generation is the teacher's distribution on prompt + response,
    greedy or sampled (the sampling warpers run after the recorder)."""
    params = params_for(smol_teacher_dir, smol_teacher_dir, "x.jsonl", tmp_path / "p", distill_top_k=16,
                        distill_tail_samples=32, distill_max_teacher_length=10, teacher_batch_size=3, teacher_do_sample=sample,
                        teacher_sampling_temperature=1.5)
    torch.manual_seed(0)
    teacher = engine_for(params)
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
        torch.testing.assert_close(recorded.tail_lognorm, live.tail_lognorm, atol=2e-3, rtol=0)
        # Head ids agree wherever neighbouring log-probs are not a near tie.
        gaps = (live.logp[:, :-1] - live.logp[:, 1:]).abs() > 1e-3
        k = recorded.k
        assert (recorded.ids[:, : k - 1] == live.ids[:, : k - 1])[gaps].all()
        # The tail samples depend on the prompt and the position only: the same draws, but for the odd point
        # that the two passes' last bits put on either side of a boundary.
        same = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(recorded.ids[:, k:], live.ids[:, k:], strict=True))
        assert same >= 0.95 * recorded.ids[:, k:].numel()
        if not sample:  # greedy decoding picked the teacher's top-1 token at every step
            assert recorded.ids[:, 0].tolist() == response
    if sample:  # hot sampling leaves the greedy path somewhere
        assert any(rec.ids[:, 0].tolist() != resp for resp, rec in generated)


def _strip_bos(tok, text: str) -> str:
    return text[len(tok.bos_token):] if tok.bos_token and text.startswith(tok.bos_token) else text


def capture_teacher_scoring(monkeypatch) -> list[tuple[list[int], list[int]]]:
    """What the teacher really scores: (its prompt ids, the response ids) of every row it reads."""
    scored: list[tuple[list[int], list[int]]] = []
    real_hidden = Engine.hidden

    def hidden(self, pairs):
        scored.extend((list(a), list(b)) for a, b in pairs)
        return real_hidden(self, pairs)

    monkeypatch.setattr(Engine, "hidden", hidden)
    return scored


def test_what_the_teacher_scored_is_what_the_student_trained_on(tiny_teacher, tiny_student, tmp_path, monkeypatch):
    """The real sequences of a real run, captured where the teacher reads them and where the student's loss
    takes them: the teacher scored its own prompt rendering + the response; the student trained on its own
    rendering (a template ending mid-word) + the same response ids, exactly those tokens are its labels, and
    the targets its loss received are the teacher's distribution at those positions."""
    rows = [
        {"prompt": "Name a colour", "response": " Blue, like the sky."},
        {"prompt": "Say {input} and {0} literally", "response": "{input} and {0}"},
        {"prompt": "Count to three", "response": "1, 2, 3"},
        {"prompt": "Emoji?", "response": "Sure 🙂  twice\n\n\tand tabs 12345."},
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    scored = capture_teacher_scoring(monkeypatch)
    batches = capture_loss_inputs(monkeypatch)
    template_t = "<|system|>You are helpful.<|user|>{input}<|assistant|>"
    assert main(["llm", "--train", "--model", tiny_student, "--teacher-model", tiny_teacher, "--data-path", data,
                 "--project-name", str(tmp_path / "p"), "--use-distillation", "--chat-template", "none",
                 "--teacher-prompt-template", template_t, "--student-prompt-template", "Question: {input}\nAnsw",
                 "--distill-top-k", "8", "--distill-tail-samples", "6", "--epochs", "1", "--batch-size", "2",
                 "--mixed-precision", "no", "--distill-alpha", "0.5"]) == 0
    tok = AutoTokenizer.from_pretrained(tiny_student)
    responses = {r["prompt"]: tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in rows}
    assert len(scored) == len(rows)
    teacher_prompt_of = {}
    for prompt_ids, response_ids in scored:
        text = _strip_bos(tok, tok.decode(prompt_ids))
        user = text.removeprefix("<|system|>You are helpful.<|user|>").removesuffix("<|assistant|>")
        assert text == template_t.replace("{input}", user) and user in responses
        assert response_ids == responses[user]
        teacher_prompt_of[user] = prompt_ids
    params = params_for(tiny_student, tiny_teacher, data, tmp_path / "x", chat_template="none",
                        teacher_prompt_template=template_t, distill_top_k=8, distill_tail_samples=6,
                        mixed_precision="no")
    teacher = engine_for(params)
    trained = set()
    for input_ids, mask, n_prompt, targets in batches:
        sel = target_positions(mask, n_prompt)
        labels = input_ids[:, 1:][sel[:, :-1]].tolist()
        start = 0
        for row in range(input_ids.shape[0]):
            ids = input_ids[row, : int(mask[row].sum())].tolist()
            n = int(n_prompt[row])
            user = _strip_bos(tok, tok.decode(ids[:n])).removeprefix("Question: ").removesuffix("\nAnsw")
            assert tok.decode(ids[:n]).endswith("Question: " + user + "\nAnsw")
            assert ids[n:] == responses[user]
            assert labels[start : start + len(ids) - n] == ids[n:]  # exactly the response tokens are trained
            got = targets.index(slice(start, start + len(ids) - n))
            live = teacher.score([(teacher_prompt_of[user], ids[n:])])[0]
            torch.testing.assert_close(got.logp, live.logp, atol=8e-3, rtol=0)  # stored in float16
            torch.testing.assert_close(got.tail_logp, live.tail_logp, atol=1e-5, rtol=0)
            torch.testing.assert_close(got.tail_lognorm, live.tail_lognorm, atol=1e-5, rtol=0)
            assert torch.equal(got.ids[:, :8], live.ids[:, :8])
            same = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got.ids[:, 8:], live.ids[:, 8:], strict=True))
            assert same >= 0.9 * got.ids[:, 8:].numel()
            start += len(ids) - n
            trained.add(user)
        assert start == len(labels) == len(targets)
    assert trained == set(responses)


@pytest.mark.slow
def test_teacher_runs_once_whatever_the_epochs_and_is_reused(tiny_student, tiny_teacher, prompts_file, tmp_path, monkeypatch,
                                                            capfd):
    calls = {"generate": 0, "score": 0, "load": 0}
    real_generate, real_score = Engine.generate, Engine.score

    def counting(name, real):
        def wrapper(self, *a, **k):
            calls[name] += 1
            return real(self, *a, **k)
        return wrapper

    monkeypatch.setattr(Engine, "generate", counting("generate", real_generate))
    monkeypatch.setattr(Engine, "score", counting("score", real_score))
    import aitraining.models.load as load_mod

    real_load = load_mod.load_causal_lm

    def load(name, **kw):
        if kw.get("flag") == "--teacher-model":
            calls["load"] += 1
        return real_load(name, **kw)

    real_tok = load_mod.load_tokenizer
    calls["tokenizer"] = 0

    def load_tok(name, **kw):
        if kw.get("flag") == "--teacher-model":
            calls["tokenizer"] += 1
        return real_tok(name, **kw)

    # Patched wherever they are looked up: every module of the package that imported them (all imported first).
    for name in ("cli", "train", "teacher.engine", "judge", "evaluate", "compare", "onpolicy", "models.transplant"):
        importlib.import_module(f"aitraining.{name}")
    for module in [m for name, m in list(sys.modules.items()) if name.startswith("aitraining") and m is not None]:
        for attr, fake, real in (("load_causal_lm", load, real_load), ("load_tokenizer", load_tok, real_tok)):
            if getattr(module, attr, None) is real:
                monkeypatch.setattr(module, attr, fake)
    args = ["llm", "--train", "--model", tiny_student, "--teacher-model", tiny_teacher, "--data-path", prompts_file,
            "--use-distillation", "--distill-max-teacher-length", "6", "--teacher-batch-size", "4", "--batch-size", "4",
            "--token", "hf_DISTILL_SECRET_42"]
    assert main([*args, "--project-name", str(tmp_path / "one"), "--epochs", "1"]) == 0
    once = dict(calls)
    assert once == {"generate": 2, "score": 0, "load": 1, "tokenizer": 1}  # the tokenizer too, once per run
    assert main([*args, "--project-name", str(tmp_path / "three"), "--epochs", "3"]) == 0
    assert calls["generate"] == 4 and calls["load"] == 2  # three epochs cost the teacher what one did
    # A rerun in the same folder (or a resume) finds every response and target cached: no teacher at all.
    assert main([*args, "--project-name", str(tmp_path / "three"), "--epochs", "3"]) == 0
    assert calls["generate"] == 4 and calls["load"] == 2
    # The token reaches neither the disk (teacher cache, outputs, logs, parameters) nor the console.
    said = capfd.readouterr()
    assert "hf_DISTILL_SECRET_42" not in said.out + said.err
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 20 and not [p for p in files if b"hf_DISTILL_SECRET_42" in p.read_bytes()]


def test_interrupted_generation_keeps_what_was_written(tiny_student, tiny_teacher, prompts_file, tmp_path, monkeypatch):
    params = params_for(tiny_student, tiny_teacher, prompts_file, tmp_path / "p", teacher_batch_size=3)
    (tmp_path / "p").mkdir()
    examples = training_examples(params)
    tok = AutoTokenizer.from_pretrained(tiny_student)
    real_generate = Engine.generate
    state = {"n": 0}

    def flaky(self, prompts, **kw):
        state["n"] += 1
        if state["n"] == 2:
            raise KeyboardInterrupt
        return real_generate(self, prompts, **kw)

    monkeypatch.setattr(Engine, "generate", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_source(params, examples, tok, str(tmp_path / "p"))
    written = (tmp_path / "p" / "teacher_outputs.jsonl").read_text().splitlines()
    assert len(written) == 3
    # A torn half-line and stray bytes past the index, as a kill mid-write leaves them.
    with open(tmp_path / "p" / "teacher_outputs.jsonl", "a") as f:
        f.write('{"key": "trunc')
    cache_dir = next((tmp_path / "p" / "teacher_cache").iterdir())
    with open(cache_dir / "targets.bin", "ab") as f:
        f.write(b"\x00\x01")
    with open(cache_dir / "index.jsonl", "a") as f:
        f.write('{"key": "torn", "sta')
    monkeypatch.setattr(Engine, "generate", real_generate)
    counted = {"prompts": 0}

    def counting(self, prompts, **kw):
        counted["prompts"] += len(prompts)
        return real_generate(self, prompts, **kw)

    monkeypatch.setattr(Engine, "generate", counting)
    items, source = prepare_source(params, examples, tok, str(tmp_path / "p"))
    cache = source.cache
    assert counted["prompts"] == len(examples) - 3
    assert all(it is not None and it.target_key in cache for it in items)
    assert (cache_dir / "targets.bin").stat().st_size == cache.n_tokens * cache.bytes_per_token
    # Everything written after the torn index line is found again by the next run: nothing is redone.
    counted["prompts"] = 0

    def no_scoring(self, pairs):
        raise AssertionError("the teacher scored again what the cache holds")

    monkeypatch.setattr(Engine, "score", no_scoring)
    again_items, again = prepare_source(params, examples, tok, str(tmp_path / "p"))
    assert counted["prompts"] == 0 and len(again.cache.entries) == len(cache.entries)


@pytest.mark.parametrize(("rows", "sample"), [("prompts", False), ("prompts", True), ("pairs", False)])
def test_a_teacher_killed_mid_batch_resumes_in_the_same_batches(tiny_student, tiny_teacher, prompts_file, pairs_file,
                                                                tmp_path, monkeypatch, rows, sample):
    """Stopped after 4 of 8 cached rows (batch 2 of 3 rows half done), while writing answers (prompt rows, greedy or
    sampled) or while scoring given responses (pairs): the rerun runs batch 2 whole again and adds only its
    missing rows, so every answer and every cached target is bit for bit an uninterrupted run's."""
    data = prompts_file if rows == "prompts" else pairs_file
    kw = {"teacher_batch_size": 3, "teacher_do_sample": sample}
    tok = AutoTokenizer.from_pretrained(tiny_student)
    whole_params = params_for(tiny_student, tiny_teacher, data, tmp_path / "whole", **kw)
    examples = training_examples(whole_params)
    (tmp_path / "whole").mkdir()
    _, whole = prepare_source(whole_params, examples, tok, str(tmp_path / "whole"))
    params = params_for(tiny_student, tiny_teacher, data, tmp_path / "killed", **kw)
    (tmp_path / "killed").mkdir()
    real_add, calls = TargetCache.add, {"n": 0}

    def dies_at_the_fifth_row(self, *a):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_add(self, *a)

    monkeypatch.setattr(TargetCache, "add", dies_at_the_fifth_row)
    with pytest.raises(KeyboardInterrupt):
        prepare_source(params, examples, tok, str(tmp_path / "killed"))
    monkeypatch.setattr(TargetCache, "add", real_add)
    _, resumed = prepare_source(params, examples, tok, str(tmp_path / "killed"))

    def answers(folder: str) -> dict[str, list[int]]:
        path = tmp_path / folder / "teacher_outputs.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return {r["key"]: r["response_ids"] for r in map(json.loads, lines)}

    assert answers("killed") == answers("whole")
    assert len(answers("whole")) == (len(examples) if rows == "prompts" else 0)
    assert resumed.cache.entries.keys() == whole.cache.entries.keys() and len(whole.cache.entries) == len(examples)
    for key in whole.cache.entries:
        a, b = resumed.cache.get(key), whole.cache.get(key)
        for name in ("ids", "logp", "sample_logp", "counts", "tail_logp", "tail_lognorm"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (key, name)


def test_the_student_moves_toward_the_teacher(tiny_student, tiny_teacher, tmp_path):
    """End-to-end CLI run with the exact loss (a live teacher) at the documented T and alpha = 1: on held-out
    rows, the exact KL(teacher || student) at T = 1 falls to under 0.65 of the untrained student's. Given
    responses of real text, so that the positions differ (a tiny random teacher writing its own answers repeats
    one token). The cached signal's tail is sampled, which a random teacher (flat over 49k tokens) defeats at
    this size; test_bundled_teacher_prune_then_distill checks the default path on the real teacher."""
    from transformers import AutoModelForCausalLM

    from aitraining.judge import TeacherReference

    tiny_teacher = sharpened(tiny_teacher, tmp_path / "sharp", 4.0)
    data = tmp_path / "data"
    rows = [{"prompt": p, "response": r} for p, r in PAIRS]
    write_jsonl(data / "train.jsonl", rows[:6] * 3)
    write_jsonl(data / "valid.jsonl", rows[6:])
    project = tmp_path / "kd"
    assert main(["llm", "--train", "--model", tiny_student, "--teacher-model", tiny_teacher, "--data-path", str(data),
                 "--project-name", str(project), "--use-distillation", "--distill-alpha", "1", "--epochs", "4",
                 "--lr", "3e-3", "--batch-size", "6", "--teacher-source", "live"]) == 0
    ref_params = params_for(tiny_student, tiny_teacher, str(data / "valid.jsonl"), tmp_path / "r")
    reference = TeacherReference(ref_params.settings(StudentSettings), ref_params.settings(TeacherSettings),
                                 ref_params.settings(DataSettings), str(tmp_path / "r"))
    before = reference.compare(AutoModelForCausalLM.from_pretrained(tiny_student))
    after = reference.compare(AutoModelForCausalLM.from_pretrained(project))
    assert before["n_tokens"] == after["n_tokens"] > 10
    assert after["kl_to_teacher"] < 0.65 * before["kl_to_teacher"]


@pytest.mark.slow
def test_on_policy_steps_train_on_the_students_own_answers_and_resume_to_the_same_weights(
    tiny_student, tiny_teacher, pairs_file, tmp_path, monkeypatch
):
    """--distill-on-policy 0.5 through the CLI: the steps its seeded coin picks train on the student's own answers
    to the data's prompts, without labels, each answer scored by the teacher on exactly those tokens after the
    teacher's own prompt; the other steps train on the data's answers from the cache; metrics count the on-policy
    steps and the model card says so. A run interrupted mid-way and resumed ends with the weights of one that was
    not (the samples depend on the seed and the step only)."""
    import aitraining.loop as loop_mod
    from aitraining.signal import DenseTargets

    seen: list[tuple[list[list[int]], list[int], bool, object]] = []
    real_forward = Objective.forward

    def forward(self, input_ids, attention_mask, n_prompt, teacher=None, weight=1.0, labels_are_own=False):
        rows = [input_ids[r, : int(attention_mask[r].sum())].tolist() for r in range(input_ids.shape[0])]
        seen.append((rows, n_prompt.tolist(), labels_are_own, teacher))
        return real_forward(self, input_ids, attention_mask, n_prompt, teacher, weight, labels_are_own)

    scored = capture_teacher_scoring(monkeypatch)
    monkeypatch.setattr(Objective, "forward", forward)
    args = ["llm", "--train", "--model", tiny_student, "--teacher-model", tiny_teacher, "--data-path", pairs_file,
            "--use-distillation", "--distill-on-policy", "0.5", "--epochs", "2", "--batch-size", "4", "--lr", "1e-3",
            "--mixed-precision", "no", "--logging-steps", "1", "--distill-max-teacher-length", "10",
            "--save-total-limit", "2", "--holdout-share", "0"]
    full = tmp_path / "full"
    assert main([*args, "--project-name", str(full)]) == 0

    tok = AutoTokenizer.from_pretrained(tiny_student)
    data_answers = {tuple((tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:10]) for _, r in PAIRS}
    own_scored = [(tuple(b), a) for a, b in scored if tuple(b) not in data_answers]
    n_own = 0
    for rows, n_prompt, own, teacher in seen:
        answers = [tuple(ids[n:]) for ids, n in zip(rows, n_prompt, strict=True)]
        assert all((a in data_answers) != own for a in answers)
        if own:
            n_own += 1
            assert isinstance(teacher, DenseTargets) and len(teacher) == sum(len(a) for a in answers)
            assert all(len(a) <= 10 for a in answers)
            for ids, n in zip(rows, n_prompt, strict=True):
                teacher_prompt = dict(own_scored)[tuple(ids[n:])]
                assert tok.decode(teacher_prompt).endswith(tok.decode(ids[:n]).removeprefix(tok.bos_token or ""))
    assert 0 < n_own < len(seen) == 4  # seed 42: steps 1, 2 and 4 on-policy
    metrics = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert sum(m.get("on_policy_steps", 0) for m in metrics) == n_own
    assert all(m["ce"] is None for m in metrics if m.get("on_policy_steps"))
    assert "on the student's own sampled answers" in (full / "README.md").read_text()

    calls = {"n": 0}
    real_add = loop_mod._Stats.add

    def add_then_interrupt(self, *a, **kw):
        real_add(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 3:  # in the second epoch, before an on-policy step
            raise KeyboardInterrupt

    monkeypatch.setattr(loop_mod._Stats, "add", add_then_interrupt)
    stopped = tmp_path / "stopped"
    assert main([*args, "--project-name", str(stopped)]) == 130
    monkeypatch.setattr(loop_mod._Stats, "add", real_add)
    assert main([*args, "--project-name", str(stopped), "--resume-from-checkpoint", "latest"]) == 0
    assert_same_weights(str(full), str(stopped), atol=1e-6)


def test_on_policy_needs_the_students_tokenizer_and_a_distillation_term(real_tokenizers, tiny_teacher, tiny_student,
                                                                         prompts_file, tmp_path, capsys):
    student = _other_tokenizer_student(real_tokenizers, tmp_path / "student")
    base = ["llm", "--train", "--teacher-model", tiny_teacher, "--data-path", prompts_file,
            "--project-name", str(tmp_path / "x"), "--distill-on-policy", "0.5"]
    for extra, words in (([ "--model", student, "--use-distillation"], "cross-vocabulary path"),
                         (["--model", tiny_student], "add --use-distillation"),
                         (["--model", tiny_student, "--use-distillation", "--distill-mode", "sequence"], "--distill-mode logits"),
                         (["--model", tiny_student, "--use-distillation", "--distill-alpha", "0"], "--distill-alpha 0")):
        capsys.readouterr()
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--distill-on-policy" in err[0] and words in err[0], err
    assert not (tmp_path / "x").exists()


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
    folder = next((project / "teacher_cache").iterdir())
    cache = TargetCache(str(folder), json.loads((folder / "meta.json").read_text()), readonly=True)
    key = next(iter(cache.entries))
    assert int(cache.get(key).ids.max()) < len(tok)


def _other_tokenizer_student(real_tokenizers, folder: Path) -> str:
    return other_tokenizer_student(real_tokenizers["llama-spm"], folder)


@pytest.mark.slow
def test_a_teacher_with_another_tokenizer_is_distilled_across_vocabularies(real_tokenizers, tiny_teacher, tmp_path, caplog):
    """Another tokenizer is detected from the tokenizers, the run says which path it takes and why (and the model
    card and run file keep it), and the cross-vocabulary loss teaches: with the whole teacher distribution cached
    (k = V, so the loss is the exact projected KL), alpha = 1 and T = 1 (the temperature of the measurement: a tiny
    random teacher's tempered and untempered distributions are too unlike for one to stand for the other), the
    held-out KL to the teacher's distribution projected onto the student's vocabulary falls to under 0.65 of the
    untrained student's (measured: 0.37)."""
    import logging

    student = _other_tokenizer_student(real_tokenizers, tmp_path / "student")
    teacher = sharpened(tiny_teacher, tmp_path / "sharp", 4.0)
    data = tmp_path / "data"
    rows = [{"prompt": p, "response": r} for p, r in PAIRS]
    write_jsonl(data / "train.jsonl", rows[:6] * 3)
    write_jsonl(data / "valid.jsonl", rows[6:])
    project = tmp_path / "kd"
    with caplog.at_level(logging.INFO, logger="aitraining"):
        assert main(["llm", "--train", "--model", student, "--teacher-model", teacher, "--data-path", str(data),
                     "--project-name", str(project), "--use-distillation", "--distill-alpha", "1", "--epochs", "4",
                     "--lr", "3e-3", "--batch-size", "6", "--distill-top-k", "49152", "--distill-tail-samples", "0",
                     "--distill-temperature", "1", "--valid-split", "valid"]) == 0
    said = caplog.text
    assert "across vocabularies" in said and "different vocabularies" in said and "32,000 tokens" in said
    run = json.loads((project / "run.json").read_text())
    assert "across vocabularies" in run["distill_path"]
    assert "Path: logit-level distillation across vocabularies" in (project / "README.md").read_text()
    assert run["final_metrics"]["aligned_token_share"] > 0.6  # plain English: most tokens align
    evals = [r for r in map(json.loads, (project / "metrics.jsonl").read_text().splitlines()) if "eval_kl_to_teacher" in r]
    assert evals[0]["step"] == 0 and len(evals) == 5
    assert evals[-1]["eval_kl_to_teacher"] < 0.65 * evals[0]["eval_kl_to_teacher"]
    assert AutoTokenizer.from_pretrained(project).vocab_size == 32000  # the student keeps its own tokenizer


def test_across_vocabularies_each_student_token_gets_the_teacher_row_of_the_same_text(
        real_tokenizers, tiny_teacher, tmp_path, monkeypatch):
    """The real batches of a cross-vocabulary run, captured at the student's loss: the student trained on its own
    tokens of the answers, and at every student position that has a teacher row, that row is the teacher's
    distribution given its prompt and the answer's text up to that student token (made here independently:
    the student's tokens before it decoded, re-tokenized by the teacher, scored live), projected onto the
    student's vocabulary; the student's label there is the teacher's token there or its first piece."""
    rows = [
        {"prompt": "Name a colour", "response": "Blue, like the sky and the deep ocean."},
        {"prompt": "Count to three", "response": "1, 2, 3 and then 12345."},
        {"prompt": "Emoji?", "response": "Sure 🙂  twice, naïve café.\n\nDone."},
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    student = _other_tokenizer_student(real_tokenizers, tmp_path / "student")
    batches = capture_loss_inputs(monkeypatch)
    assert main(["llm", "--train", "--model", student, "--teacher-model", tiny_teacher, "--data-path", data,
                 "--project-name", str(tmp_path / "p"), "--use-distillation", "--distill-top-k", "8",
                 "--distill-tail-samples", "6", "--epochs", "1", "--batch-size", "3", "--mixed-precision", "no"]) == 0
    s_tok, t_tok = AutoTokenizer.from_pretrained(student), AutoTokenizer.from_pretrained(tiny_teacher)
    params = params_for(student, tiny_teacher, data, tmp_path / "x", distill_top_k=8, distill_tail_samples=6,
                        mixed_precision="no")
    teacher = engine_for(params)
    vocab = vocabulary_map(s_tok, t_tok)
    teacher.projection = vocab
    (input_ids, mask, n_prompt, targets), = batches
    sel = target_positions(mask, n_prompt)
    labels = input_ids[:, 1:][sel[:, :-1]].tolist()
    by_prompt = {r["prompt"]: r["response"] for r in rows}
    start = checked = 0
    for row in range(input_ids.shape[0]):
        ids = input_ids[row, : int(mask[row].sum())].tolist()
        n = int(n_prompt[row])
        prompt = s_tok.decode(ids[:n], skip_special_tokens=True).strip()
        response = by_prompt[prompt]
        assert ids[n:] == s_tok(response, add_special_tokens=False)["input_ids"] + [s_tok.eos_token_id]
        assert labels[start : start + len(ids) - n] == ids[n:]
        got = targets.index(slice(start, start + len(ids) - n))
        t_prompt = teacher.prompt_ids(Example(messages=[{"role": "user", "content": prompt}]))
        t_full = t_tok(response, add_special_tokens=False)["input_ids"]
        live = teacher.score([(t_prompt, t_full + [t_tok.eos_token_id])])[0]
        # The naive reference: where a prefix of the teacher's tokens decodes to the text before student token i.
        at_text = {t_tok.decode(t_full[:j], clean_up_tokenization_spaces=False): j for j in range(len(t_full) + 1)}
        body = ids[n:-1]
        for i in range(len(ids) - n):
            if not got.aligned[i]:
                continue
            prefix = s_tok.decode(body[:i], skip_special_tokens=True, clean_up_tokenization_spaces=False) if i else ""
            j = at_text[prefix]
            assert torch.equal(got.teacher.ids[i, :8], live.ids[j, :8]), (i, prefix)
            torch.testing.assert_close(got.teacher.logp[i], live.logp[j], atol=8e-3, rtol=0)
            label = t_full[j] if j < len(t_full) else t_tok.eos_token_id
            assert int(vocab.first_piece[label]) == ids[n + i]
            checked += 1
        start += len(ids) - n
    assert start == len(labels) == len(targets)
    assert checked > 0.6 * len(labels)


def test_sequence_level_distillation_learns_the_teachers_text(real_tokenizers, tiny_teacher, prompts_file, tmp_path):
    """--distill-mode sequence: the teacher writes the answers, the student (another tokenizer) learns them as
    text; no logits are cached and the distillation term is zero."""
    student = _other_tokenizer_student(real_tokenizers, tmp_path / "student")
    project = tmp_path / "seq"
    assert main(["llm", "--train", "--model", student, "--teacher-model", tiny_teacher, "--data-path", prompts_file,
                 "--project-name", str(project), "--use-distillation", "--distill-mode", "sequence",
                 "--distill-max-teacher-length", "8", "--epochs", "1"]) == 0
    final = json.loads((project / "run.json").read_text())["final_metrics"]
    assert final["kd"] == 0.0 and final["ce"] > 0
    assert not (project / "teacher_cache").exists() or not any((project / "teacher_cache").iterdir())
    assert "sequence-level" in (project / "README.md").read_text()
    outputs = [json.loads(x) for x in (project / "teacher_outputs.jsonl").read_text().splitlines()]
    assert len(outputs) == len(PAIRS)


def test_a_live_teacher_with_another_tokenizer_is_a_clear_error(real_tokenizers, tiny_teacher, prompts_file, tmp_path, capsys):
    student = _other_tokenizer_student(real_tokenizers, tmp_path / "student")
    capsys.readouterr()
    assert main(["llm", "--train", "--model", student, "--teacher-model", tiny_teacher, "--data-path", prompts_file,
                 "--project-name", str(tmp_path / "x"), "--use-distillation", "--teacher-source", "live"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--teacher-source live" in err[0] and "--distill-mode sequence" in err[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_bundled_teacher_prune_then_distill(smol_teacher_dir, real_data, tmp_path):
    """The real thing, small, at the defaults (the cached signal): an 8-layer student cut from the bundled
    SmolLM2 teacher, distilled from it on 8 real prompts, ends closer to its teacher on 3 held-out ones (exact KL at
    T = 1) than it started. The teacher is its weights as a float32 folder: the GGUF file itself as --teacher-model
    is test_quick_start_across_tokenizer_families' (reading and dequantizing it costs about 10 s a run)."""
    from transformers import AutoModelForCausalLM

    from aitraining.judge import TeacherReference

    student = tmp_path / "student"
    # Evenly spaced: measuring which layers to keep takes minutes on a CPU (tests/unit/test_models.py tests it).
    assert main(["prune", "--model", smol_teacher_dir, "--num-layers", "8", "--layers", "even", "--output", str(student)]) == 0
    lines = (real_data / "self_instruct_seed_prompts.jsonl").read_text().splitlines()
    data = write_jsonl(tmp_path / "real.jsonl", [json.loads(x) for x in lines[:8]])
    project = tmp_path / "smol-distilled"
    assert main(["llm", "--train", "--model", str(student), "--teacher-model", smol_teacher_dir, "--data-path", data,
                 "--project-name", str(project), "--use-distillation", "--distill-max-teacher-length", "24",
                 "--epochs", "2", "--batch-size", "4", "--lr", "3e-4", "--logging-steps", "1"]) == 0
    outputs = [json.loads(x) for x in (project / "teacher_outputs.jsonl").read_text().splitlines()]
    assert len(outputs) == 8 and all(o["response"].strip() for o in outputs)
    metrics = [json.loads(x) for x in (project / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert metrics[-1]["kd"] < metrics[0]["kd"]
    model = AutoModelForCausalLM.from_pretrained(project)
    assert model.config.num_hidden_layers == 8
    # Held-out prompts (the last rows of the file) with the teacher's own answers to them.
    prompts = [json.loads(x)["text"] for x in lines[-3:]]
    heldout = tmp_path / "heldout.jsonl"
    params = params_for(str(student), smol_teacher_dir, str(heldout), tmp_path / "r", mixed_precision="no",
                        distill_max_teacher_length=24)
    teacher = engine_for(params)
    answers = teacher.generate([teacher.prompt_ids(Example(messages=[{"role": "user", "content": p}])) for p in prompts],
                               record=False)
    write_jsonl(heldout, [{"prompt": p, "response": teacher.tokenizer.decode(a, skip_special_tokens=True)}
                          for p, (a, _) in zip(prompts, answers, strict=True)])
    teacher.free()
    reference = TeacherReference(params.settings(StudentSettings), params.settings(TeacherSettings),
                                 params.settings(DataSettings), str(tmp_path / "r"))
    before = reference.compare(AutoModelForCausalLM.from_pretrained(student))
    after = reference.compare(model)
    assert after["kl_to_teacher"] < 0.8 * before["kl_to_teacher"], (before["kl_to_teacher"], after["kl_to_teacher"])


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
    real_generate, real_score = Engine.generate, Engine.score

    def generate(self, prompts, **kw):
        seen["generated"] += len(prompts)
        return real_generate(self, prompts, **kw)

    def score(self, pairs_):
        seen["scored"] += len(pairs_)
        return real_score(self, pairs_)

    monkeypatch.setattr(Engine, "generate", generate)
    monkeypatch.setattr(Engine, "score", score)
    tok = AutoTokenizer.from_pretrained(tiny_student)
    for path, name in ((data, "g"), (pairs, "s")):
        params = params_for(tiny_student, tiny_teacher, path, tmp_path / name, distill_max_teacher_length=4)
        (tmp_path / name).mkdir()
        examples = training_examples(params)
        items, source = prepare_source(params, examples, tok, str(tmp_path / name))
        assert all(it is not None and it.target_key in source.cache for it in items)
    assert seen == {"generated": 2, "scored": 1}
    assert len((tmp_path / "g" / "teacher_outputs.jsonl").read_text().splitlines()) == 2


def test_a_changed_teacher_k_sample_count_or_temperature_never_reuses_a_cache(tiny_student, tiny_teacher, tiny_model_factory,
                                                                             pairs_file, tmp_path, monkeypatch):
    """Each setting the cached targets depend on names its own cache: a change scores again (into a new
    folder), the same settings reuse what is there, and the targets served carry the new settings."""
    scored = {"rows": 0}
    real_score = Engine.score

    def score(self, pairs):
        scored["rows"] += len(pairs)
        return real_score(self, pairs)

    monkeypatch.setattr(Engine, "score", score)
    tok = AutoTokenizer.from_pretrained(tiny_student)
    project = tmp_path / "p"
    project.mkdir()
    own_teacher = tiny_model_factory(n_layers=3, hidden=64, seed=1, path=tmp_path / "teacher")

    def prepare(**kw):
        params = params_for(tiny_student, kw.pop("teacher", own_teacher), pairs_file, project, mixed_precision="no",
                            distill_max_teacher_length=6, **kw)
        examples = training_examples(params)
        before = scored["rows"]
        items, source = prepare_source(params, examples, tok, str(project))
        targets = source.cache.get(items[0].target_key)
        return source.cache.folder, scored["rows"] - before, targets

    first, n, t = prepare(distill_top_k=4, distill_tail_samples=3, distill_temperature=3.0)
    assert n == 8 and (t.k, t.m, t.tau) == (4, 3, 3.0)
    assert prepare(distill_top_k=4, distill_tail_samples=3, distill_temperature=3.0)[:2] == (first, 0)
    folders = {first}
    for changed, check in (({"distill_top_k": 5}, lambda t: t.k == 5), ({"distill_tail_samples": 2}, lambda t: t.m == 2),
                           ({"distill_temperature": 2.0}, lambda t: t.tau == 2.0), ({"teacher": tiny_teacher}, None)):
        settings = {"distill_top_k": 4, "distill_tail_samples": 3, "distill_temperature": 3.0, **changed}
        folder, n, t = prepare(**settings)
        assert folder not in folders and n == 8, changed
        assert check is None or check(t)
        folders.add(folder)
    # The teacher's weights replaced in place, at the same path and size: a new cache too.
    tiny_model_factory(n_layers=3, hidden=64, seed=2, path=tmp_path / "teacher")
    folder, n, _ = prepare(distill_top_k=4, distill_tail_samples=3, distill_temperature=3.0)
    assert folder not in folders and n == 8


def test_a_prompt_that_fills_the_block_costs_the_teacher_nothing(tiny_student, tiny_teacher, tmp_path, monkeypatch, caplog):
    """A row whose prompt alone leaves no room in --block-size trains nothing, so the teacher neither answers it
    nor scores it; the other rows are answered, scored and trained as before."""
    long_prompt = " ".join(["word"] * 80)
    seen: dict[str, list[int]] = {"generated": [], "scored": []}
    real_generate, real_score = Engine.generate, Engine.score

    def generate(self, prompts, **kw):
        seen["generated"] += [len(p) for p in prompts]
        return real_generate(self, prompts, **kw)

    def score(self, pairs_):
        seen["scored"] += [len(p) for p, _ in pairs_]
        return real_score(self, pairs_)

    monkeypatch.setattr(Engine, "generate", generate)
    monkeypatch.setattr(Engine, "score", score)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"text": "Say one."}, {"text": long_prompt}, {"text": "Say two."}])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": long_prompt, "response": "It."},
                                                    {"prompt": "Name it.", "response": "It."}])
    for data, name in ((prompts, "g"), (pairs, "s")):
        caplog.clear()
        with caplog.at_level("WARNING"):
            main(["llm", "--train", "--model", tiny_student, "--teacher-model", tiny_teacher, "--data-path", data,
                  "--project-name", str(tmp_path / name), "--use-distillation", "--block-size", "48",
                  "--holdout-share", "0", "--distill-max-teacher-length", "4", "--epochs", "1", "--batch-size", "2",
                  "--mixed-precision", "no"])
        assert "1 of " in caplog.text and "rows dropped" in caplog.text
        assert json.loads((tmp_path / name / "run.json").read_text())["status"] == "finished"
    assert len(seen["generated"]) == 2 and len(seen["scored"]) == 1, seen
    assert max(seen["generated"] + seen["scored"]) < 48  # neither long prompt reached the teacher
    answered = [json.loads(x)["prompt"] for x in (tmp_path / "g" / "teacher_outputs.jsonl").read_text().splitlines()]
    assert sorted(answered) == ["Say one.", "Say two."]
