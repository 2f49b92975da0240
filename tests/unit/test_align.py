"""Teachers and students with different tokenizers: detection, and alignment of tokens by character spans.

Real tokenizers of four families (the bundled SmolLM2 BPE, Llama 3's byte-level BPE, Llama 2's SentencePiece,
Qwen2's BPE with an NFC normalizer) and two trained here with other vocabularies and merges (byte-level BPE,
SentencePiece-style BPE that splits digits), over text that they split very differently. The alignment is
checked against a naive reference that knows nothing of offsets: the places where decoding a prefix of each
tokenization gives the same text.
"""

from __future__ import annotations

import itertools
import json
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import torch

from aitraining.align import (
    PROBE_TEXTS,
    Edges,
    ResponseAligner,
    align_edges,
    align_ends,
    align_text,
    match_tokenizers,
    shared_vocabulary,
    token_bytes,
    vocabulary_map,
)

TEXTS = [
    *PROBE_TEXTS,
    "🌟🌟🌟🌟🌟 I'm just a friendly AI designed to make people laugh. 🌟",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaa bbbbbbbbbbbb 1234567890123456789 0.000001 1e-9 -42",
    "Ελληνικά и русский текст — “quotes” … ‘single’ «guillemets» العربية हिन्दी",
    "https://example.com/a/b?c=1&d=%20x user@example.org C:\\Windows\\path",
    "tabs\tand\u00a0no-break\u2003em space\u200bzero width\n\n\n\nfour newlines",
    "!!!???... ---- ==== **** #### ````",
    "e\u0301 decomposed and \u00e9 composed, Hangul \u1100\u1161 jamo",
]
LEADING_SPACE = ["  two leading spaces", "\n\nnewlines first", " one"]


def _trained_tokenizers() -> dict[str, Any]:
    """Two tokenizers trained here, on text holding every character of TEXTS (no unknown tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [unicodedata.normalize(form, t) for t in [*TEXTS, *LEADING_SPACE] for form in ("NFC", "NFD")] * 3 + ["the quick brown fox jumps over the lazy dog " * 4]
    out: dict[str, Any] = {}

    bytelevel = Tokenizer(models.BPE())
    bytelevel.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bytelevel.decoder = decoders.ByteLevel()
    bytelevel.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    out["trained-bytelevel"] = PreTrainedTokenizerFast(tokenizer_object=bytelevel)

    spm = Tokenizer(models.BPE())
    spm.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True)])
    spm.decoder = decoders.Metaspace()
    spm.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=700, show_progress=False))
    out["trained-metaspace"] = PreTrainedTokenizerFast(tokenizer_object=spm)
    return out


@pytest.fixture(scope="module")
def tokenizers(real_tokenizers: dict[str, Any]) -> dict[str, Any]:
    return {**real_tokenizers, **_trained_tokenizers()}


LOSSLESS = {"smollm2", "llama-bpe", "qwen2", "trained-bytelevel"}  # decode(encode(text)) == text


def _decoded(tok: Any, ids: list[int]) -> str:
    return tok.decode(ids, clean_up_tokenization_spaces=False)


def _naive_groups(s_tok: Any, s_ids: list[int], t_tok: Any, t_ids: list[int]) -> list[tuple[int, int, int, int]]:
    """Where a prefix of each tokenization decodes to the same text (a partial character never counts)."""
    def prefixes(tok: Any, ids: list[int]) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in range(1, len(ids) + 1):
            text = _decoded(tok, ids[:a]).lstrip()
            if "\ufffd" not in text:
                out[text] = a  # the longest prefix: pieces that add no text belong to the group before
        return out

    s_pre, t_pre = prefixes(s_tok, s_ids), prefixes(t_tok, t_ids)
    common = sorted((a, t_pre[text]) for text, a in s_pre.items() if text in t_pre)
    groups, last = [], (0, 0)
    for a, b in common:
        groups.append((last[0], a, last[1], b))
        last = (a, b)
    return groups


PAIRS = list(itertools.combinations(
    ["smollm2", "llama-bpe", "llama-spm", "qwen2", "trained-bytelevel", "trained-metaspace"], 2))


@pytest.mark.parametrize(("student", "teacher"), PAIRS)
def test_groups_equal_the_naive_prefix_reference(tokenizers: dict[str, Any], student: str, teacher: str) -> None:
    s_tok, t_tok = tokenizers[student], tokenizers[teacher]
    differently_split = 0
    for text in TEXTS:
        s_ids, t_ids, al = align_text(s_tok, t_tok, text)
        assert list(al.groups) == _naive_groups(s_tok, s_ids, t_tok, t_ids), text
        assert s_ids == list(s_tok(unicodedata.normalize("NFC", text), add_special_tokens=False)["input_ids"])
        differently_split += len(al.groups) - al.one_to_one
    assert differently_split > 0  # the pairs do split these texts differently somewhere


@pytest.mark.parametrize(("student", "teacher"), [p for p in PAIRS if set(p) <= LOSSLESS])
def test_every_group_edge_is_where_both_decodings_reach_the_same_text(
    tokenizers: dict[str, Any], student: str, teacher: str
) -> None:
    s_tok, t_tok = tokenizers[student], tokenizers[teacher]
    for text in [*TEXTS, *LEADING_SPACE]:
        text = unicodedata.normalize("NFC", text)
        s_ids, t_ids, al = align_text(s_tok, t_tok, text)
        assert al.groups[-1][1] == len(s_ids) and al.groups[-1][3] == len(t_ids)
        for s0, s1, t0, t1 in al.groups:
            assert s0 < s1 and t0 < t1
            edge = al.student.ends[s1 - 1]
            assert edge == al.teacher.ends[t1 - 1]
            assert _decoded(s_tok, s_ids[:s1]) == text[:edge] == _decoded(t_tok, t_ids[:t1])


def _chars(edges: Edges, j: int) -> set[int]:
    start = edges.ends[j - 1] if j else 0
    own = set(range(start, edges.ends[j])) or {edges.ends[j] - 1}  # a later byte piece: its character
    return own | ({start - 1} if j - 1 in edges.cut else set())  # the rest of a character cut before it


@pytest.mark.parametrize(("student", "teacher"), PAIRS)
def test_covering_is_every_teacher_token_sharing_a_character(tokenizers: dict[str, Any], student: str, teacher: str) -> None:
    for text in [*TEXTS, *LEADING_SPACE]:
        s_ids, t_ids, al = align_text(tokenizers[student], tokenizers[teacher], text)
        for i in range(len(s_ids)):
            mine = _chars(al.student, i)
            naive = [j for j in range(len(t_ids)) if mine & _chars(al.teacher, j)]
            assert list(al.covering(i)) == naive, (text, i)


def test_align_ends_by_hand() -> None:
    # "internationalization": student in-ter-national-ization, teacher inter-nation-alization.
    al = align_ends([2, 5, 13, 20], [5, 11, 20])
    assert al.groups == ((0, 2, 0, 1), (2, 4, 1, 3))
    assert al.one_to_one == 0
    assert list(al.covering(2)) == [1, 2] and list(al.covering(0)) == [0]
    # "éa" with "é" cut into two byte tokens against one token each: the cut edge is no boundary.
    cut = Edges.from_offsets([(0, 1), (0, 1), (1, 2)])
    assert cut.ends == (1, 1, 2) and cut.cut == {0}
    al = align_edges(cut, Edges((1, 2)))
    assert al.groups == ((0, 2, 0, 1), (2, 3, 1, 2))
    assert list(al.covering(1)) == [0]
    # "éa" as [é-byte-1] [é-byte-2 + a] against [é] [a]: one group of everything.
    al = align_edges(Edges.from_offsets([(0, 1), (0, 2)]), Edges((1, 2)))
    assert al.groups == ((0, 2, 0, 2),)
    assert list(al.covering(1)) == [0, 1]
    # Offsets that go back (a token of no text inside the response) keep the edges non-decreasing.
    assert Edges.from_offsets([(0, 3), (0, 0), (3, 5)]).ends == (3, 3, 5)
    assert align_ends([], []).groups == ()
    with pytest.raises(ValueError, match="different text"):
        align_ends([3], [4])


def test_detection_from_the_tokenizers_not_the_names(tokenizers: dict[str, Any], smol_tokenizer_dir: str) -> None:
    from transformers import AutoTokenizer

    same = match_tokenizers(tokenizers["smollm2"], AutoTokenizer.from_pretrained(smol_tokenizer_dir))
    assert same.same and "49,152" in same.reason
    other = match_tokenizers(tokenizers["smollm2"], tokenizers["llama-bpe"])
    assert not other.same and "49,152" in other.reason and f"{len(tokenizers['llama-bpe'].get_vocab()):,}" in other.reason
    # The same vocabulary with another pre-tokenizer (digits one by one) is not the same tokenizer.
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = tokenizers["trained-bytelevel"].backend_tokenizer
    changed = type(backend).from_str(backend.to_str())
    changed.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), changed.pre_tokenizer])
    verdict = match_tokenizers(tokenizers["trained-bytelevel"], PreTrainedTokenizerFast(tokenizer_object=changed))
    assert not verdict.same and "split" in verdict.reason


def test_a_slow_tokenizer_is_refused_with_the_fix(tokenizers: dict[str, Any]) -> None:
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="not a fast tokenizer.*tokenizer.json"):
        align_text(Slow(), tokenizers["smollm2"], "text")


ALL = ["smollm2", "llama-bpe", "llama-spm", "qwen2", "trained-bytelevel", "trained-metaspace"]


@pytest.mark.parametrize("name", ALL)
def test_token_bytes_spell_out_every_text(tokenizers: dict[str, Any], name: str) -> None:
    tok = tokenizers[name]
    table = token_bytes(tok)
    for text in [*TEXTS, *LEADING_SPACE]:
        text = unicodedata.normalize("NFC", text)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        spelled = b"".join(table[i] or b"<special>" for i in ids).decode("utf-8")
        assert spelled in (text, " " + text)  # SentencePiece-style tokenizers add a leading space


def test_shared_vocabulary_pairs_tokens_of_the_same_text(tokenizers: dict[str, Any]) -> None:
    smol, llama3, llama2 = tokenizers["smollm2"], tokenizers["llama-bpe"], tokenizers["llama-spm"]
    s, t = shared_vocabulary(smol, llama3)
    pairs = dict(zip(s, t, strict=True))
    assert len(pairs) > 20_000  # both byte-level BPEs on English-heavy data
    for word in [" the", " distillation", "ing", "\n\n", "123", " 🙂"]:
        s_ids = smol(word, add_special_tokens=False)["input_ids"]
        t_ids = llama3(word, add_special_tokens=False)["input_ids"]
        if len(s_ids) == 1 and len(t_ids) == 1:
            assert pairs[s_ids[0]] == t_ids[0], word
    # Across conventions: SentencePiece "▁the" is byte-level "Ġthe"; "<0x0A>" is a newline.
    s, t = shared_vocabulary(llama2, llama3)
    pairs = dict(zip(s, t, strict=True))
    assert pairs[llama2.convert_tokens_to_ids("▁the")] == llama3.convert_tokens_to_ids("Ġthe")
    assert pairs[llama2.convert_tokens_to_ids("<0x0A>")] == llama3.convert_tokens_to_ids("Ċ")
    # A plain piece wins over a byte-fallback piece of the same byte.
    assert llama2.convert_tokens_to_ids("▁") in pairs and llama2.convert_tokens_to_ids("<0x20>") not in pairs
    # The same tokenizer pairs every ordinary token with itself.
    s, t = shared_vocabulary(smol, smol)
    special = {i for i, t in smol.added_tokens_decoder.items() if t.special}
    assert s == t == [i for i in range(len(smol)) if i not in special] and len(special) == 17


# ------------------------------------------------------------------------ a teacher's answer in the student's


def _written_piece(s_tok: Any, s_bytes: list[bytes | None], s_known: set[bytes], theirs: bytes | None) -> bytes | None:
    """The naive reference of a first piece: the student token whose offsets start right after a newline put before
    the text (a token the student has is itself); the longest known prefix for bytes that are no whole UTF-8 text or
    where the newline and the text merge."""
    if not theirs or theirs in s_known:
        return theirs
    longest = next((theirs[:e] for e in range(len(theirs), 0, -1) if theirs[:e] in s_known), None)
    try:
        text = theirs.decode("utf-8")
    except UnicodeDecodeError:
        return longest
    enc = s_tok("\n" + text, add_special_tokens=False, return_offsets_mapping=True)
    first = next(((i, a) for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True) if a >= 1 and b > a),
                 None)
    if first is None or first[1] != 1:
        return longest
    return s_bytes[first[0]]


@pytest.mark.parametrize("student", ["llama-bpe", "llama-spm", "qwen2", "trained-bytelevel", "trained-metaspace"])
def test_response_rows_predict_the_same_text_from_the_same_text(tokenizers: dict[str, Any], student: str) -> None:
    """Every student answer token given a teacher row: the teacher's token there starts with its bytes, and it is
    the token the student's tokenizer writes first for the teacher token's text (its first piece, found here from
    the tokenizer's offsets; the longest student token the bytes start with where they are no whole text), and the
    text before it is
    the same in both (decoded prefixes, the naive reference); the student's tokens are its own tokenization of
    the answer, ended with its EOS where the teacher ended."""
    s_tok, t_tok = tokenizers[student], tokenizers["smollm2"]
    aligner = ResponseAligner(s_tok, t_tok)
    s_bytes, t_bytes = token_bytes(s_tok), token_bytes(t_tok)
    s_known = {b for b in s_bytes if b}
    aligned = total = longer_pieces = 0
    for text in TEXTS:
        text = unicodedata.normalize("NFC", text)
        t_ids = t_tok(text, add_special_tokens=False)["input_ids"]
        for ended in (True, False):
            got = aligner(t_ids + [t_tok.eos_token_id] if ended else t_ids, ended)
            with_eos = ended and s_tok.eos_token_id is not None  # the trained tokenizers have none
            body = got.student_ids[:-1] if with_eos else got.student_ids
            assert body == s_tok(text, add_special_tokens=False)["input_ids"]
            if with_eos:
                assert got.student_ids[-1] == s_tok.eos_token_id and got.teacher_rows[-1] == len(t_ids)
            for i, row in enumerate(got.teacher_rows[: len(body)]):
                if row < 0:
                    continue
                theirs = t_bytes[t_ids[row]]
                assert theirs.startswith(s_bytes[body[i]])
                assert s_bytes[body[i]] == _written_piece(s_tok, s_bytes, s_known, theirs), (text, i, row)
                longer_pieces += s_bytes[body[i]] != theirs
                before_s = b"".join(s_bytes[x] or b"" for x in body[:i]).decode("utf-8", "replace").lstrip()
                before_t = b"".join(t_bytes[x] or b"" for x in t_ids[:row]).decode("utf-8", "replace").lstrip()
                assert before_s == before_t, (text, i, row)
            # And every student token that starts where a teacher token does and is its first piece has the row.
            _, _, alignment = align_text(s_tok, t_tok, text)
            for s0, _, t0, _ in alignment.groups:
                piece = _written_piece(s_tok, s_bytes, s_known, t_bytes[t_ids[t0]])
                if piece is not None and piece == s_bytes[body[s0]]:
                    assert got.teacher_rows[s0] == t0, (text, s0, t0)
            aligned += got.aligned
            total += len(got.student_ids)
    # These texts are chosen to split differently (and the trained vocabularies are tiny); plain English aligns far
    # more (about 80 % of the tokens between SmolLM2 and Llama 2, measured in BENCHMARKS.md).
    assert aligned / total > (0.15 if student.startswith("trained") else 0.3)
    assert longer_pieces > 0  # some teacher tokens are longer than the student's piece of them


def test_response_rows_stop_where_the_teacher_wrote_other_ids_than_it_reads(tokenizers: dict[str, Any]) -> None:
    """A teacher may generate a split that its tokenizer would not make (" hello" as " hel" + "lo"): its cached
    rows are those of the ids it wrote, so rows past the first difference are never used."""
    s_tok, t_tok = tokenizers["llama-bpe"], tokenizers["smollm2"]
    aligner = ResponseAligner(s_tok, t_tok)
    canon = t_tok(" say hello to the world", add_special_tokens=False)["input_ids"]
    hello = t_tok.convert_tokens_to_ids("Ġhello")
    at = canon.index(hello)
    odd = canon[:at] + t_tok(" hel", add_special_tokens=False)["input_ids"] + t_tok("lo", add_special_tokens=False)["input_ids"] + canon[at + 1 :]
    assert t_tok.decode(odd) == t_tok.decode(canon)
    got = aligner(odd, False)
    assert [r for r in got.teacher_rows if r >= 0] == list(range(at))
    assert aligner(canon, False).aligned == len(canon)


def test_vocabulary_map_is_one_to_one_and_maps_the_end(tokenizers: dict[str, Any]) -> None:
    s_tok, t_tok = tokenizers["llama-spm"], tokenizers["smollm2"]
    vocab = vocabulary_map(s_tok, t_tok)
    mapped = vocab.to_student[vocab.to_student >= 0]
    assert len(set(mapped.tolist())) == len(mapped) > 15_000
    assert int(vocab.to_student[t_tok.eos_token_id]) == s_tok.eos_token_id
    assert vocab.student_size == len(s_tok) and int(mapped.max()) < len(s_tok)
    # Every teacher token but its control tokens (<|im_start|>, <repo_name>, ...) reads as some student token.
    pieceless = {i for i in range(len(t_tok)) if vocab.first_piece[i] < 0}
    assert pieceless and pieceless <= set(t_tok.added_tokens_decoder) - {t_tok.eos_token_id}
    assert int(vocab.to_student[t_tok.convert_tokens_to_ids("Ġthe")]) == s_tok.convert_tokens_to_ids("▁the")


def test_written_first_pieces_are_where_the_students_tokenizer_puts_the_text(tokenizers: dict[str, Any]) -> None:
    """A teacher token the student lacks reads, with pieces="written", as the token the student's own tokenizer
    writes first for its text ("ration" is "r" + "ation" to Llama 2's tokenizer, not the longest piece "rat"). On real
    text, where both tokenizers start a token at the same character and the teacher's token is not the student's,
    that piece is the student's token there (nearly always), and the longest piece is not, a third of the time."""
    s_tok, t_tok = tokenizers["llama-spm"], tokenizers["smollm2"]
    longest, written = (vocabulary_map(s_tok, t_tok, pieces=p) for p in ("longest", "written"))
    assert torch.equal(longest.to_student, written.to_student)
    ration = t_tok.convert_tokens_to_ids("ration")
    assert s_tok.convert_ids_to_tokens(int(longest.first_piece[ration])) == "rat"
    assert s_tok.convert_ids_to_tokens(int(written.first_piece[ration])) == "r"
    with pytest.raises(ValueError, match="pieces"):
        vocabulary_map(s_tok, t_tok, pieces="shortest")
    # Real answers: the first 40 of the human-written pairs the benchmarks ship.
    pairs = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "user_oriented_pairs.jsonl"
    text = "\n\n".join(json.loads(line)["response"] for line in pairs.read_text(encoding="utf-8").splitlines()[:40])
    s_ids, t_ids, alignment = align_text(s_tok, t_tok, text)
    agree = {"longest": 0, "written": 0}
    starts = 0
    for s0, _, t0, _ in alignment.groups:
        if int(written.to_student[t_ids[t0]]) >= 0:
            continue  # a shared token is itself either way
        starts += 1
        agree["longest"] += int(longest.first_piece[t_ids[t0]]) == s_ids[s0]
        agree["written"] += int(written.first_piece[t_ids[t0]]) == s_ids[s0]
    # Measured: 227 of 228 written, 145 longest (the longest piece is where the student writes text a third less often).
    assert starts > 100 and agree["written"] >= 0.95 * starts and agree["longest"] <= 0.8 * starts, (agree, starts)
