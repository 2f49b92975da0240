"""What a run shows: the rows held out by default, the model card's measured figures, the pictures, and the
comparison section and table."""

from __future__ import annotations

import pytest

from aitraining import card, compare, judge, plots
from aitraining.data.examples import MIN_ROWS_TO_HOLD_OUT, held_out_rows
from aitraining.errors import UserError
from aitraining.metrics import paired_difference
from aitraining.params import LLMTrainingParams

PNG = b"\x89PNG\r\n\x1a\n"


def test_held_out_rows_are_seeded_stated_and_never_taken_from_small_data():
    picked = held_out_rows(200, 0.05, seed=7)
    assert len(picked) == 10 and picked == sorted(picked) and len(set(picked)) == 10
    assert held_out_rows(200, 0.05, seed=7) == picked  # the same seed, the same rows
    assert held_out_rows(200, 0.05, seed=8) != picked
    assert len(held_out_rows(30, 0.05, seed=0)) == 2  # round(1.5) (banker's) -> 2
    assert len(held_out_rows(MIN_ROWS_TO_HOLD_OUT, 0.01, seed=0)) == 1  # at least one
    assert held_out_rows(MIN_ROWS_TO_HOLD_OUT - 1, 0.5, seed=0) == []
    assert held_out_rows(1000, 0.0, seed=0) == []
    assert len(held_out_rows(20, 0.99, seed=0)) == 19  # always one row left to train on


def test_compare_baseline_needs_distillation_on_the_logits():
    with pytest.raises(UserError, match="--compare-baseline compares a distilled student"):
        LLMTrainingParams(model="m", data_path="d", compare_baseline=True)
    with pytest.raises(UserError, match="--distill-mode sequence"):
        LLMTrainingParams(model="m", data_path="d", teacher_model="t", use_distillation=True, compare_baseline=True,
                          distill_mode="sequence")
    with pytest.raises(UserError, match=r"--holdout-share must be in \[0, 1\), got 1.0"):
        LLMTrainingParams(model="m", data_path="d", holdout_share=1.0)
    with pytest.raises(UserError, match="--eval-steps must be >= 1, got 0"):
        LLMTrainingParams(model="m", data_path="d", eval_steps=0)


METRICS = [
    {"step": 0, "epoch": 0, "eval_ce": 9.5, "eval_perplexity": 13360.0, "eval_kl_to_teacher": 15.2,
     "eval_top1_agreement": 0.01, "eval_n_tokens": 40},
    {"step": 5, "epoch": 0.5, "loss": 6.1, "kd": 0.9, "ce": 7.0, "tokens": 300, "lr": 1e-4},
    {"step": 10, "epoch": 1.0, "loss": 4.0, "kd": 0.6, "ce": 5.0, "tokens": 280, "lr": 0.0},
    {"step": 10, "epoch": 1, "eval_ce": 5.25, "eval_perplexity": 190.57, "eval_kl_to_teacher": 4.4,
     "eval_top1_agreement": 0.19, "eval_n_tokens": 40},
]


def test_model_card_shows_held_out_figures_before_and_after_not_the_last_logging_window(tmp_path):
    params = LLMTrainingParams(model="student", teacher_model="teacher", data_path="d.jsonl", use_distillation=True)
    final = {"step": 10, "loss": 4.0, "lr": 0.0, "tokens": 280, "train_s": 12.5, "teacher_cache_bytes_per_token": 984}
    card.write_model_card(str(tmp_path), params.public_dict(), final, METRICS, n_train=90, n_valid=5, pictures=["training_curves.png"])
    text = (tmp_path / "README.md").read_text()
    assert "On the 5 held-out rows" in text and "held out for evaluation: 5 rows" in text
    assert "| KL(teacher ‖ student) per response token | 15.2000 | 4.4000 |" in text
    assert "| top-1 agreement with the teacher | 1.0% | 19.0% |" in text
    assert "| teacher cache bytes per token | 984 |" in text
    assert "| lr | 0 |" not in text and "| tokens |" not in text  # the logging window's bookkeeping is no result
    assert "![training curves](training_curves.png)" in text

    card.write_model_card(str(tmp_path), params.public_dict(), final, METRICS[1:3], n_train=95, n_valid=0)
    assert "No rows were held out" in (tmp_path / "README.md").read_text()


RESULT = {
    "held_out_rows": 3, "held_out_tokens": 40,
    "models": {role: {"kl_to_teacher": kl, "top1_agreement": a, "perplexity": p, "rouge_l": r, "parameters": n,
                      "disk_bytes": d, "tokens_per_s": t, "answers": [f"{role} answer {i}" for i in range(3)],
                      "ce": 1.0}
               for role, kl, a, p, r, n, d, t in (("distilled", 4.4, 0.19, 190.0, 0.12, 56_000_000, 224 << 20, 80.0),
                                                  ("baseline", 6.7, 0.15, 800.0, 0.11, 56_000_000, 224 << 20, 81.0),
                                                  ("teacher", 0.0, 1.0, 2.1, 0.95, 135_000_000, 540 << 20, 30.0))},
    "prompts": ["Say | hi", "two", "three"], "references": ["teacher | one", "t2", "t3"],
}


def test_comparison_table_verdict_samples_and_card_section(tmp_path):
    lines = compare.table(RESULT)
    assert lines[2] == "| distilled | 4.400 | 19.0% | 190.00 | 0.120 | - | 56,000,000 | 224 MiB | 80.0 |"
    looping = {**RESULT, "models": {**RESULT["models"], "distilled": {**RESULT["models"]["distilled"], "repetition": 0.25}}}
    assert compare.table(looping)[2] == "| distilled | 4.400 | 19.0% | 190.00 | 0.120 | 25.0% | 56,000,000 | 224 MiB | 80.0 |"
    assert compare.verdict(RESULT).startswith("the distilled student is closer to the teacher than the baseline: "
                                              "KL 4.400 vs 6.700 (0.66x)")
    worse = {**RESULT, "models": {**RESULT["models"], "distilled": {**RESULT["models"]["distilled"], "kl_to_teacher": 7.0}}}
    assert "NOT closer" in compare.verdict(worse)

    compare.write_samples(str(tmp_path / "samples.md"), RESULT)
    samples = (tmp_path / "samples.md").read_text()
    assert "## 1. Say | hi" in samples and "| teacher's response | teacher \\| one |" in samples
    assert "| baseline | baseline answer 2 |" in samples

    record = judge.without_answers(RESULT)
    assert "answers" not in record["models"]["distilled"] and record["samples"][1]["distilled"] == "distilled answer 1"

    params = LLMTrainingParams(model="s", teacher_model="t", data_path="d", use_distillation=True)
    card.write_model_card(str(tmp_path), params.public_dict(), {}, METRICS, n_train=9, n_valid=3)
    for _ in range(2):  # a second comparison replaces the first, never stacks
        card.add_comparison(str(tmp_path), lines, compare.verdict(RESULT), ["comparison.png"])
    text = (tmp_path / "README.md").read_text()
    assert text.count("## With and without distillation") == 1
    assert "![comparison](comparison.png)" in text and text.index("## With and without") < text.index("## Use")


def test_repeated_trigrams_counted_by_hand():
    from aitraining.metrics import repeated_trigrams

    # "a b c a b c": trigrams abc, bca, cab, abc; the last repeats the first: 1 of 4.
    assert repeated_trigrams("a b c a b c") == 0.25
    assert repeated_trigrams("the list of the list of the list of") == 4 / 7  # 7 trigrams, 3 distinct
    assert repeated_trigrams("no loop here at all") == 0.0 and repeated_trigrams("two words") == 0.0


def drawn_figures(monkeypatch) -> list:
    """The matplotlib figures the pictures save, kept to be read back."""
    from matplotlib.figure import Figure

    figures, real = [], Figure.savefig

    def savefig(self, *args, **kwargs):
        figures.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


def test_pictures_are_pngs_of_the_logged_values(tmp_path, monkeypatch):
    """The curves hold the logged values (read back from the lines drawn: one per run and panel, at the logged
    steps; no KD line for a run without a teacher), the bars the judged ones."""
    figures = drawn_figures(monkeypatch)
    baseline = [{**m, "kd": 0.0, "loss": m["loss"] + 1, "eval_kl_to_teacher": 9.0} if "kd" in m else
                {**m, "eval_kl_to_teacher": m["eval_kl_to_teacher"] + 2} for m in METRICS]
    runs = {"distilled": METRICS, "baseline": baseline}
    assert plots.training_curves(str(tmp_path / "curves.png"), runs) == [str(tmp_path / "curves.png")]
    assert plots.comparison_chart(str(tmp_path / "cmp.png"), RESULT) == [str(tmp_path / "cmp.png")]
    for name in ("curves.png", "cmp.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
    curves, bars = figures
    keys = {"training loss": "loss", "distillation term (KD)": "kd", "label term (CE)": "ce",
            "held-out KL(teacher ‖ student)": "eval_kl_to_teacher", "held-out label loss": "eval_ce"}
    drawn = {(ax.get_title(), line.get_label()): [tuple(p) for p in line.get_xydata().tolist()]
             for ax in curves.axes for line in ax.get_lines()}
    expected = {(title, name): [(r["step"], r[key]) for r in recs if r.get(key) is not None]
                for title, key in keys.items() for name, recs in runs.items() if not (key == "kd" and name == "baseline")}
    assert drawn == expected
    assert drawn[("training loss", "distilled")] == [(5, 6.1), (10, 4.0)]
    heights = {(ax.get_title(), ax.get_xticklabels()[i].get_text()): bar.get_height()
               for ax in bars.axes for i, bar in enumerate(ax.patches)}
    assert heights[("KL(teacher ‖ model), lower is better", "baseline")] == 6.7
    assert heights[("ROUGE-L vs the teacher's answers", "distilled")] == 0.12
    assert len(heights) == 12
    assert plots.training_curves(str(tmp_path / "none.png"), {"x": []}) == []


def test_paired_difference_separates_a_real_difference_from_noise():
    """The interval that says whether a ROUGE-L difference is more than the prompts drawn: a consistent gain
    excludes zero, a zero-mean jitter of the same size does not, identical scores give exactly zero; the
    comparison's verdict says which."""
    import random

    rng = random.Random(1)
    base = [[rng.random() for _ in range(100)] for _ in range(3)]
    gain = [[x + 0.05 + rng.gauss(0, 0.02) for x in seed] for seed in base]
    noise = [[x + rng.choice((-0.05, 0.05)) for x in seed] for seed in base]
    got = paired_difference(gain, base)
    assert got["excludes_zero"] and 0.04 < got["ci95"][0] <= got["mean"] <= got["ci95"][1] < 0.06
    assert got["prompts"] == 100 and got["runs"] == 3
    jitter = paired_difference(noise, base)
    assert not jitter["excludes_zero"] and jitter["ci95"][0] < 0 < jitter["ci95"][1]
    same = paired_difference(base, base)
    assert same["mean"] == 0 and same["ci95"] == [0, 0] and not same["excludes_zero"]

    models = {**RESULT["models"], "distilled": {**RESULT["models"]["distilled"], "rouge_l_per_answer": gain[0]},
              "baseline": {**RESULT["models"]["baseline"], "rouge_l_per_answer": base[0]}}
    assert ": a real difference)" in compare.verdict({**RESULT, "models": models})
    models["distilled"] = {**models["distilled"], "rouge_l_per_answer": noise[0]}
    assert "within what the prompts drawn allow" in compare.verdict({**RESULT, "models": models})
    assert "interval" not in compare.verdict(RESULT)  # a result without per-answer scores


TEXT_RESULT = {
    "held_out_rows": 3, "held_out_bytes": 912,
    "models": {role: {"kl_per_byte": kl, "nll_per_byte": kl + 0.16, "rouge_l": r, "repetition": rep, "parameters": n,
                      "disk_bytes": d, "tokens_per_s": t, "answers": [f"{role} answer {i}" for i in range(3)]}
               for role, kl, r, rep, n, d, t in (("distilled", 1.17, 0.09, 0.55, 56_000_000, 224 << 20, 80.0),
                                                 ("baseline", 1.29, 0.105, 0.44, 56_000_000, 224 << 20, 81.0),
                                                 ("teacher", 0.0, 1.0, 0.1, 135_000_000, 540 << 20, 30.0))},
    "prompts": ["one", "two", "three"], "references": ["t1", "t2", "t3"],
}


def test_a_comparison_across_tokenizers_is_told_on_text_and_names_the_better_student(tmp_path):
    """Judged on text (--compare-baseline across tokenizers): the table and verdict speak of nats per byte of the
    teacher's text, the picture draws them, and wherever the baseline is the better student (closer to the teacher,
    or writing closer answers by more than the prompts drawn) the advice says so and names its folder."""
    import random

    assert compare.on_text(TEXT_RESULT) and not compare.on_text(RESULT)
    lines = compare.table(TEXT_RESULT)
    assert "nats per byte above the teacher" in lines[0] and "KL(teacher" not in lines[0]
    assert lines[2] == "| distilled | 1.170 | 1.330 | 0.090 | 55.0% | 56,000,000 | 224 MiB | 80.0 |"
    assert compare.verdict(TEXT_RESULT).startswith(
        "the distilled student is closer to the teacher's text than the baseline (the same student trained on the "
        "teacher's text): 1.170 vs 1.290 nats per byte above the teacher (0.91x)")
    assert plots.comparison_chart(str(tmp_path / "c.png"), TEXT_RESULT, compare.TEXT_METRICS, "t") == [str(tmp_path / "c.png")]
    assert (tmp_path / "c.png").read_bytes().startswith(PNG)

    assert compare.advice(TEXT_RESULT, "/p/baseline") is None  # closer, and no per-answer scores to tell writing by
    rng = random.Random(2)
    base = [rng.random() for _ in range(100)]
    worse = [x - 0.05 + rng.gauss(0, 0.02) for x in base]
    jitter = [x + rng.choice((-0.05, 0.05)) for x in base]

    def with_scores(result, distilled, baseline, **distilled_update):
        m = result["models"]
        return {**result, "models": {**m, "distilled": {**m["distilled"], "rouge_l_per_answer": distilled, **distilled_update},
                                     "baseline": {**m["baseline"], "rouge_l_per_answer": baseline}}}

    said = compare.advice(with_scores(TEXT_RESULT, worse, base), "/p/baseline")
    assert said.startswith("the baseline writes answers closer to the teacher's (ROUGE-L +0.0") and said.endswith("/p/baseline")
    assert compare.advice(with_scores(TEXT_RESULT, jitter, base), "/p/baseline") is None  # inside the noise
    assert compare.advice(with_scores(TEXT_RESULT, base, base, kl_per_byte=1.4), "/p/b").startswith(
        "the baseline is closer to the teacher's text:")
    assert compare.advice(with_scores(RESULT, worse, base, kl_to_teacher=7.0), "/p/b").startswith(
        "the baseline is closer to the teacher and writes answers closer")
    assert compare.advice(RESULT, "/p/b") is None
