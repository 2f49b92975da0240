"""Why, across tokenizers, the distilled student writes worse than the one trained on the teacher's text (issue 30):
measured on the work folder of benchmarks/cross_tokenizer.py (its teacher, its Llama 2 tokenizer student, the
held-out prompts with the teacher's answers, and the runs it trained).

    python benchmarks/cross_tokenizer.py --student-layers measured --seeds 0 --work benchmarks/.work/xtok30
    python benchmarks/cross_tokenizer_why.py --work benchmarks/.work/xtok30 --out benchmarks/results/cross_tokenizer_why.json
    python benchmarks/cross_tokenizer_why.py --quick --out /tmp/why.json   # tiny models, a minute (the tests)

1. **The projection against the teacher in the student's tokens** (no student needed). At a student answer
   position with a teacher row, the cache holds P: the teacher's next-token distribution with each teacher token's
   probability on its first piece in the student's vocabulary (Note [Across vocabularies] in signal.py). What the
   student's next token is, if the teacher writes the text, is Q: the student tokenizer's token at that character
   of the teacher's continuation. Q is sampled: --samples continuations of three teacher tokens from the
   teacher's own context (T = 1, by one cached forward pass over the answer and two batched steps), each put after
   the answer's text so far and tokenized by the student. Each sample says where P puts it (the first piece of
   its first teacher token) and where Q does (the token the student's tokenizer starts there); the share of
   samples where they differ is the mass P misplaces (it bounds the total variation between P and Q), told by
   kind. Also P's and Q's probability of the answer's own student token (the label): their mean difference is
   the bias of P at the label.
2. **The positions without a teacher row**, by kind (every held-out answer).
3. **Where each student's greedy answer parts from the teacher's** (every run in --work/runs). Greedy decoding
   reproduces the teacher's answer up to the first position where the student's most likely token is not the
   teacher's (in the student's tokens), so one teacher-forced pass per answer finds it: where (token index, and
   whether that position has a teacher row), what the student preferred (a shorter piece of the label's text,
   its EOS, a token already written in the answer, something else), and what the teacher's projected P says of
   both. Also top-1 agreement along the teacher's answers at positions with and without a teacher row, and how
   often the student's own greedy answers are not what its tokenizer makes of their text (non-canonical tokens).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _measure import describe_machine, utc_now_iso, write_json  # noqa: E402
from quality import HELDOUT_PROMPTS, N_HELDOUT, read_prompts, teacher_answers  # noqa: E402

LOOKAHEAD = 3  # teacher tokens sampled per continuation: longer than any student token's text in practice


def share(counter: Counter, total: int) -> dict[str, float]:
    return {k: round(v / max(total, 1), 4) for k, v in counter.most_common()}


class Pair:
    """The teacher (float32) and the student's tokenizer, with how one answer reads in both."""

    def __init__(self, teacher: str, student: str) -> None:
        import torch

        from aitraining.align import ResponseAligner, token_bytes, vocabulary_map
        from aitraining.data.examples import Example
        from aitraining.models.load import load_causal_lm, load_tokenizer
        from aitraining.params import LLMTrainingParams
        from aitraining.teacher import TeacherSettings
        from aitraining.teacher.text import TeacherText

        self.s_tok, self.t_tok = load_tokenizer(student), load_tokenizer(teacher)
        self.aligner = ResponseAligner(self.s_tok, self.t_tok)
        self.vocab = self.aligner.vocab
        # Each way of reading a teacher token as its first piece (align.vocabulary_map's `pieces`), with the
        # aligner that gives rows by it.
        self.maps = {"longest": self.vocab, "written": vocabulary_map(self.s_tok, self.t_tok, pieces="written")}
        self.aligners = {"longest": self.aligner, "written": ResponseAligner(self.s_tok, self.t_tok)}
        self.aligners["written"].vocab = self.maps["written"]
        self.s_bytes = token_bytes(self.s_tok)
        params = LLMTrainingParams(model=student, teacher_model=teacher, data_path="-", use_distillation=True)
        self.text = TeacherText(params.settings(TeacherSettings), self.t_tok)
        self.example = lambda p: Example(messages=[{"role": "user", "content": p}])
        self.teacher = load_causal_lm(teacher, dtype=torch.float32).eval()

    def answer(self, text: str, pieces: str = "longest") -> dict[str, Any]:
        """The answer's student tokens, their teacher rows (by the map `pieces`) and the character each starts at;
        the teacher's tokens."""
        import unicodedata

        from aitraining.align import align_text

        text = unicodedata.normalize("NFC", text)
        t_ids = list(self.t_tok(text, add_special_tokens=False)["input_ids"])
        got = self.aligners[pieces](t_ids, ended=False)
        s_ids, t_check, alignment = align_text(self.s_tok, self.t_tok, text)
        assert s_ids == got.student_ids and t_check == t_ids
        starts = [alignment.student.ends[i - 1] if i else 0 for i in range(len(s_ids))]
        return {"text": text, "t_ids": t_ids, "s_ids": s_ids, "rows": got.teacher_rows, "starts": starts,
                "alignment": alignment}

    def student_token_at(self, text: str, at: int) -> int | None:
        """The student tokenizer's token that starts at character `at` of `text`; None if one spans it."""
        from aitraining.align import tokenize_with_edges

        ids, edges = tokenize_with_edges(self.s_tok, text)
        if at == 0:
            return ids[0] if ids else None
        n = edges.boundaries().get(at)
        return ids[n] if n is not None and n < len(ids) else None


def projection_gap(pair: Pair, prompts: list[str], answers: list[str], samples: int, seed: int,
                   temperature: float = 1.0) -> dict[str, Any]:
    """Measurement 1 (module docstring), for each way of reading first pieces (`Pair.maps`), on the same samples:
    the positions are those with a teacher row by either map. `temperature`: the first teacher token is drawn from
    the teacher's distribution at it (what the loss at that T weighs), the rest at T = 1."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    kinds: dict[str, Counter] = {m: Counter() for m in pair.maps}
    label_p: dict[str, list[float]] = {m: [] for m in pair.maps}
    misplaced: dict[str, list[float]] = {m: [] for m in pair.maps}
    label_q: list[float] = []
    eos_t, eos_s = pair.t_tok.eos_token_id, pair.s_tok.eos_token_id
    for prompt, answer in zip(prompts, answers, strict=True):
        a = pair.answer(answer)
        rows = [max(r) for r in zip(*(pair.answer(answer, m)["rows"] for m in pair.maps), strict=True)]
        t_prompt = pair.text.prompt_ids(pair.example(prompt))
        ids = torch.tensor([t_prompt + a["t_ids"]])
        with torch.no_grad():
            out = pair.teacher(input_ids=ids, use_cache=True)
        logits = out.logits[0, len(t_prompt) - 1 :].float()
        logp = torch.log_softmax(logits, -1)
        projected = {m: vocab.project(logits) for m, vocab in pair.maps.items()}
        for i, j in enumerate(rows):
            if j < 0:
                continue
            first = torch.multinomial(torch.softmax(logp[j] / temperature, -1), samples, replacement=True,
                                      generator=gen)
            conts = _continue(pair, out.past_key_values, len(t_prompt) + j, first, gen)
            before = a["text"][: a["starts"][i]]
            counts: Counter = Counter()
            wrong: Counter = Counter()
            for row in conts:
                u1 = row[0]
                if u1 == eos_t:
                    canon = eos_s
                else:
                    upto = row.index(eos_t) if eos_t in row else len(row)
                    canon = pair.student_token_at(before + pair.t_tok.decode(row[:upto]), len(before))
                counts[canon] += 1
                for m, vocab in pair.maps.items():
                    said = int(vocab.first_piece[u1])
                    if canon != said:
                        wrong[m] += 1
                        kinds[m][_kind(pair, said, canon)] += 1
            label = a["s_ids"][i]
            label_q.append(counts[label] / samples)
            for m in pair.maps:
                label_p[m].append(float(projected[m][j, label].exp()))
                misplaced[m].append(wrong[m] / samples)
    n = len(label_q)
    return {
        "answers": len(prompts), "positions": n, "samples_per_position": samples, "lookahead_teacher_tokens": LOOKAHEAD,
        "first_token_temperature": temperature,
        "label_q_sampled": statistics.fmean(label_q) if n else 0.0,
        "by_first_pieces": {m: {
            "misplaced_mass": statistics.fmean(misplaced[m]) if n else 0.0,
            "misplaced_by_kind": {k: round(v / max(n * samples, 1), 5) for k, v in kinds[m].most_common()},
            "label_p_projected": statistics.fmean(label_p[m]) if n else 0.0,
            "label_bias": statistics.fmean(p - q for p, q in zip(label_p[m], label_q, strict=True)) if n else 0.0,
        } for m in pair.maps},
    }


def _continue(pair: Pair, cache: Any, upto: int, first: Any, gen: Any) -> list[list[int]]:
    """Each sampled first token continued by LOOKAHEAD - 1 sampled teacher tokens, from the teacher's cache of
    the answer cut to its first `upto` positions (the distinct prefixes run as one batch per step)."""
    import torch

    rows = [[int(u)] for u in first]
    state = copy.deepcopy(cache)
    if state.get_seq_length() > upto:
        state.crop(upto - state.get_seq_length())  # (a negative count: the tokens taken off its end)
    prefixes: list[tuple[int, ...]] = [()]
    for _ in range(LOOKAHEAD - 1):
        distinct = sorted({tuple(r) for r in rows})
        # Which row of the state each distinct prefix extends (its prefix without the last token).
        parent = [prefixes.index(p[:-1]) for p in distinct]
        state.batch_select_indices(torch.tensor(parent))
        with torch.no_grad():
            out = pair.teacher(input_ids=torch.tensor([[p[-1]] for p in distinct]), cache=state, use_cache=True)
        probs = torch.softmax(out.logits[:, -1].float(), -1)
        state, prefixes = out.past_key_values, distinct
        at = {p: k for k, p in enumerate(distinct)}
        for r in rows:
            r.append(int(torch.multinomial(probs[at[tuple(r)]], 1, generator=gen)))
    return rows


def _kind(pair: Pair, said: int, canon: int | None) -> str:
    if canon is None:
        return "the student's token there also holds the text before (no token starts there)"
    p, c = pair.s_bytes[said] if said >= 0 else None, pair.s_bytes[canon]
    if p is None or c is None:
        return "a special token (EOS) on one side"
    if c.startswith(p):
        return "the student's token is longer than the first piece (it spans teacher tokens)"
    if p.startswith(c):
        return "the student's token is shorter than the first piece (its tokenizer splits the text otherwise)"
    return "other"


def missing_rows(pair: Pair, answers: list[str]) -> dict[str, Any]:
    """Measurement 2: the student positions without a teacher row, by kind, for each map of first pieces."""
    out = {}
    for m in pair.maps:
        kinds: Counter = Counter()
        total = 0
        for answer in answers:
            a = pair.answer(answer, m)
            total += len(a["s_ids"])
            for s0, s1, t0, t1 in a["alignment"].groups:
                for i in range(s0, s1):
                    if a["rows"][i] >= 0:
                        continue
                    if i > s0:
                        kinds["inside a teacher token (no teacher token starts there)"] += 1
                    elif s0 == 0:
                        kinds["the answer's first token"] += 1
                    elif s1 - s0 == 1 and t1 - t0 > 1:
                        kinds["the student's token spans several teacher tokens"] += 1
                    else:
                        kinds["the student's token is not the first piece of the teacher's"] += 1
        out[m] = {"tokens": total, "without_row": sum(kinds.values()) / max(total, 1), "by_kind": share(kinds, total)}
    return out


def parting(pair: Pair, folder: Path, prompts: list[str], answers: list[str]) -> dict[str, Any]:
    """Measurement 3, for the student in `folder`."""
    import torch

    from aitraining.data.templates import encode, render_prompt, resolve_chat_template
    from aitraining.models.load import load_causal_lm

    model = load_causal_lm(str(folder), dtype=torch.float32).eval()
    tok = pair.s_tok
    chat = resolve_chat_template(tok, "auto")
    eos = tok.eos_token_id
    kinds: Counter = Counter()
    where, aligned_at, p_pref_gt_label = [], [], []
    agree = {True: [0, 0], False: [0, 0]}
    for prompt, answer in zip(prompts, answers, strict=True):
        text, special = render_prompt(tok, [{"role": "user", "content": prompt}], "{input}", chat)
        p_ids = encode(tok, text, add_special_tokens=special)
        a = pair.answer(answer)
        ref = a["s_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p_ids + ref])).logits[0, len(p_ids) - 1 : -1].float()
        top = logits.argmax(-1).tolist()
        for i, (t, label) in enumerate(zip(top, ref, strict=True)):
            agree[a["rows"][i] >= 0][0] += t == label
            agree[a["rows"][i] >= 0][1] += 1
        d = next((i for i, (t, label) in enumerate(zip(top, ref, strict=True)) if t != label), None)
        if d is None:
            kinds["never (the whole answer)"] += 1
            continue
        where.append(d)
        pref, label = top[d], ref[d]
        row = a["rows"][d]
        aligned_at.append(row >= 0)
        pb, lb = pair.s_bytes[pref], pair.s_bytes[label]
        if pref == eos:
            kinds["its EOS (stops early)"] += 1
        elif pb and lb and lb.startswith(pb):
            kinds["a shorter piece of the label's text"] += 1
        elif pref in ref[:d]:
            kinds["a token already written in the answer"] += 1
        else:
            kinds["another token"] += 1
        if row >= 0:
            t_prompt = pair.text.prompt_ids(pair.example(prompt))
            with torch.no_grad():
                t_logits = pair.teacher(input_ids=torch.tensor([t_prompt + a["t_ids"][: row + 1]])).logits[0, -1:]
            projected = pair.vocab.project(t_logits.float())[0]
            p_pref_gt_label.append(bool(projected[pref] > projected[label]))
    written = _greedy_canonical(model, tok, prompts, chat)
    n = len(prompts)
    return {
        "answers": n, "parted": len(where),
        "first_parting_token": {"mean": statistics.fmean(where) if where else None,
                                "median": statistics.median(where) if where else None},
        "parting_at_a_teacher_row": statistics.fmean(aligned_at) if aligned_at else None,
        "what_it_preferred": share(kinds, n),
        "teacher_projection_prefers_it_too": statistics.fmean(p_pref_gt_label) if p_pref_gt_label else None,
        "top1_with_teacher_row": agree[True][0] / max(agree[True][1], 1),
        "top1_without_teacher_row": agree[False][0] / max(agree[False][1], 1),
        **written,
    }


def _greedy_canonical(model: Any, tok: Any, prompts: list[str], chat: Any) -> dict[str, float]:
    """The student's greedy answers: how many hold tokens its tokenizer would not make of their text."""
    import torch

    from aitraining.data.templates import encode, render_prompt
    from aitraining.metrics import repeated_trigrams

    off = tokens = odd = 0
    loops = []
    for prompt in prompts:
        text, special = render_prompt(tok, [{"role": "user", "content": prompt}], "{input}", chat)
        p_ids = encode(tok, text, add_special_tokens=special)
        with torch.no_grad():
            out = model.generate(torch.tensor([p_ids]), max_new_tokens=96, do_sample=False,
                                 pad_token_id=tok.eos_token_id)[0, len(p_ids) :].tolist()
        if tok.eos_token_id in out:
            out = out[: out.index(tok.eos_token_id)]
        written = tok.decode(out)
        again = list(tok(written, add_special_tokens=False)["input_ids"])
        tokens += len(out)
        odd += sum(1 for x, y in zip(out, again, strict=False) if x != y) + abs(len(out) - len(again))
        off += out != again
        loops.append(repeated_trigrams(written))
    return {"greedy_answers_non_canonical": off / max(len(prompts), 1),
            "greedy_tokens_differing_from_retokenized": odd / max(tokens, 1),
            "greedy_repeated_trigrams": statistics.fmean(loops) if loops else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(HERE / ".work" / "xtok30"), help="cross_tokenizer.py's --work")
    ap.add_argument("--answers", type=int, default=16, help="held-out answers sampled for measurement 1")
    ap.add_argument("--samples", type=int, default=64, help="teacher continuations per position (measurement 1)")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="measurement 1: the temperature of each continuation's first teacher token (the rest at 1)")
    ap.add_argument("--runs", nargs="*", default=None, help="run folders under --work/runs (default: all)")
    ap.add_argument("--parts", nargs="+", choices=("projection", "rows", "parting"),
                    default=["projection", "rows", "parting"], help="which measurements (1, 2, 3) to make")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "cross_tokenizer_why.json"))
    ap.add_argument("--quick", action="store_true", help="tiny models and 4 answers: for the tests")
    args = ap.parse_args()

    work = Path(args.work)
    if args.quick:
        work, teacher, student, prompts, answers = _quick(work)
        args.answers, args.samples = 2, 8
    else:
        teacher, student = _bundled(work), str(work / "student-llama2-tokenizer")
        prompts = read_prompts(HELDOUT_PROMPTS)[-N_HELDOUT:]
        answers = teacher_answers(teacher, prompts, HERE / ".work" / "quality" / "answers-heldout.json", 64, 16)
    pair = Pair(teacher, student)
    gap = rows = None
    if "projection" in args.parts:
        print(f"1. the projection against the teacher's continuations ({args.answers} answers, {args.samples} "
              "samples)", flush=True)
        gap = projection_gap(pair, prompts[: args.answers], answers[: args.answers], args.samples, args.seed,
                             args.temperature)
        print(json.dumps(gap, indent=1), flush=True)
    if "rows" in args.parts:
        rows = missing_rows(pair, answers)
        print("2. positions without a teacher row:", json.dumps(rows, indent=1), flush=True)
    runs_dir = work / "runs"
    names = [] if "parting" not in args.parts else args.runs if args.runs is not None else sorted(
        p.name for p in runs_dir.glob("*") if (p / "config.json").exists())
    parted = {}
    for name in names:
        print(f"3. where {name}'s greedy answers part from the teacher's", flush=True)
        parted[name] = parting(pair, runs_dir / name, prompts, answers)
        print(json.dumps(parted[name], indent=1), flush=True)
    write_json(args.out, {"benchmark": "cross_tokenizer_why", "date": utc_now_iso(), "machine": describe_machine(),
                          "setup": {"work": str(work), "quick": args.quick, "answers": args.answers,
                                    "samples": args.samples, "temperature": args.temperature, "seed": args.seed},
                          "projection": gap, "missing_rows": rows, "parting": parted})
    print(f"wrote {args.out}")


def _bundled(work: Path) -> str:
    from _setup import bundled_teacher_folder

    if not (work / "student-llama2-tokenizer" / "config.json").exists():
        raise SystemExit(f"{work}: run benchmarks/cross_tokenizer.py --work {work} first (it makes the student)")
    return bundled_teacher_folder()


def _quick(work: Path) -> tuple[Path, str, str, list[str], list[str]]:
    """A tiny teacher and a tiny student with Llama 2's tokenizer, 4 prompts and answers, the student as the run."""
    import shutil

    from quality import tiny_models
    from transformers import AutoTokenizer

    from aitraining.models.transplant import transplant_to_folder
    from fetch_vocabularies import default_dest, fetch

    work = work / "quick"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    teacher, base = tiny_models()
    fetch(default_dest())
    student = str(work / "student")
    transplant_to_folder(base, str(default_dest() / "ggml-vocab-llama-spm.gguf"), student, overwrite=True)
    AutoTokenizer.from_pretrained(student)  # it loads
    prompts = ["Name a colour.", "Count to three.", "Say hello in French.", "What is 2 + 2?"]
    answers = ["Blue, like the sky.", "1, 2, 3.", "Bonjour, naïve café!", "It is 4.\n\nDone."]
    shutil.copytree(student, work / "runs" / "untrained")  # measurement 3 on the student as it starts
    return work, teacher, student, prompts, answers


if __name__ == "__main__":
    main()
