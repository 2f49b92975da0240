"""Teachers and students with different tokenizers: how to tell, and which tokens cover the same text.

Two tokenizers are *the same* when they give every token string the same id and split text the same way; the
vocabulary alone is not enough (a tokenizer can share another's vocabulary and differ in its normalizer or
pre-tokenizer, and then the teacher's position i is not the student's). `match_tokenizers` decides from the
tokenizers themselves, never from model names, and says why.

When they differ, a response is tokenized by both, and the tokens are aligned by the characters they cover
(offset mappings): see Note [Span alignment].
"""

from __future__ import annotations

import bisect
import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from aitraining.signal import VocabularyMap

# Text that tokenizers are known to split differently: whitespace runs, digits, accents, emoji, CJK, code.
PROBE_TEXTS = (
    "Hello  world!\n\nThe year 2026 had 365 days; 3.14159 is pi.",
    "  leading spaces, trailing tabs\t\t and\r\nwindows lines  ",
    "naïve café, Ünïcödé, ß, İstanbul, ﬁ ligature, e\u0301 combining",
    "emoji 🙂👍🏽 👨‍👩‍👧 and 日本語のテキスト, 中文, 한국어",
    "def f(x):\n    return x ** 2  # comment\n",
)


@dataclass(frozen=True)
class TokenizerMatch:
    same: bool
    reason: str


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def match_tokenizers(student: Any, teacher: Any) -> TokenizerMatch:
    """Whether the teacher's token ids mean what the student's mean, with the reason in words.

    Same token-to-id map and the same ids for every probe text: the same. A model's ``config.vocab_size`` may
    exceed its tokenizer's (padded embedding rows); that does not change which id a token gets.
    """
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if s_vocab != t_vocab:
        same_id = sum(1 for tok, i in s_vocab.items() if t_vocab.get(tok) == i)
        return TokenizerMatch(False, f"different vocabularies: the student's has {len(s_vocab):,} tokens, the "
                                     f"teacher's {len(t_vocab):,}, and {same_id:,} token strings have the same id in both")
    for text in PROBE_TEXTS:
        if _ids(student, text) != _ids(teacher, text):
            return TokenizerMatch(False, f"the same {len(s_vocab):,}-token vocabulary, but they split {text[:40]!r} "
                                         "differently (another normalizer or pre-tokenizer)")
    return TokenizerMatch(True, f"the same {len(s_vocab):,}-token vocabulary and the same splits of the probe texts")


# Note [Span alignment]
# ~~~~~~~~~~~~~~~~~~~~~
# Each token is given the characters up to the right edge of its offset span: token i covers
# (end[i-1], end[i]]. Only right edges are used because tokenizers disagree about left edges (some trim the
# leading space out of a token's offsets, others keep it, SentencePiece's "▁" may or may not count), while the
# right edge is where the token's text ends for all of them. Edges are made non-decreasing.
#
# Byte-level tokenizers may cut one character into several tokens; every piece then reports the whole
# character's span, so its right edge is the character's end although its bytes stop inside it. Such a token
# is *cut*: the next token starts before its right edge. A cut edge is never a boundary (the next token holds
# the rest of the character), and the next token also covers that character.
#
# A *group* is a shortest run of student tokens and a run of teacher tokens that end at the same character:
# the boundaries of the groups are exactly the uncut right edges that both tokenizations have (tokens that
# add no character stay with the group before). Where the two split the text the same way a group is one
# token against one token (the common case for shared words); elsewhere it is m tokens against n covering the
# same characters, and the loss compares the two sides as spans. `covering` gives, for one student token, the
# teacher tokens whose characters overlap its own.


@dataclass(frozen=True)
class Edges:
    """Right edge of every token's characters (non-decreasing) and which tokens end inside a character."""

    ends: tuple[int, ...]
    cut: frozenset[int] = frozenset()

    @classmethod
    def from_offsets(cls, offsets: Sequence[tuple[int, int]], length: int | None = None) -> Edges:
        """From a fast tokenizer's offset mapping; ``length`` (the text's) extends the last edge over trailing
        characters that a tokenizer left out of its offsets."""
        ends: list[int] = []
        last = 0
        for _, end in offsets:
            last = max(last, int(end))
            ends.append(last)
        cut = frozenset(i for i in range(len(offsets) - 1) if int(offsets[i + 1][0]) < ends[i])
        if ends and length is not None:
            ends[-1] = max(ends[-1], length)
        return cls(tuple(ends), cut)

    def chars(self, i: int) -> tuple[int, int]:
        """The characters ``[start, end)`` that token ``i`` covers, or holds part of."""
        start = self.ends[i - 1] if i else 0
        if i - 1 in self.cut or start == self.ends[i]:
            start -= 1  # it holds the rest (or another piece) of the character before its edge
        return max(start, 0), self.ends[i]

    def boundaries(self) -> dict[int, int]:
        """Character position -> number of tokens before it, for every edge a group may end at."""
        out: dict[int, int] = {}
        for i, end in enumerate(self.ends):
            if i not in self.cut and (i + 1 == len(self.ends) or self.ends[i + 1] > end):
                out[end] = i + 1
        return out


@dataclass(frozen=True)
class Alignment:
    """Groups of student and teacher tokens covering the same characters (Note [Span alignment]).

    ``groups[g] = (s0, s1, t0, t1)``: student tokens ``s0:s1`` and teacher tokens ``t0:t1`` cover the same
    text; groups are in order and partition both token lists.
    """

    groups: tuple[tuple[int, int, int, int], ...]
    student: Edges
    teacher: Edges

    @property
    def one_to_one(self) -> int:
        """How many groups are one student token against one teacher token."""
        return sum(1 for s0, s1, t0, t1 in self.groups if s1 - s0 == 1 and t1 - t0 == 1)

    def covering(self, i: int) -> range:
        """The teacher tokens whose characters overlap student token ``i``'s (never empty)."""
        start, end = self.student.chars(i)
        ends = self.teacher.ends
        lo = bisect.bisect_right(ends, start)  # the first teacher token ending after `start`
        hi = lo
        while hi + 1 < len(ends) and self.teacher.chars(hi + 1)[0] < end:  # and each one starting before `end`
            hi += 1
        return range(lo, hi + 1)


def align_edges(student: Edges, teacher: Edges) -> Alignment:
    """Group two tokenizations of one text at the boundaries they share (Note [Span alignment]).

    Both must end at the same character (the end of the text); raises ValueError otherwise.
    """
    if not student.ends or not teacher.ends:
        if student.ends or teacher.ends:
            raise ValueError("one tokenization is empty and the other is not")
        return Alignment((), student, teacher)
    if student.ends[-1] != teacher.ends[-1]:
        raise ValueError(f"the tokenizations cover different text: {student.ends[-1]} vs {teacher.ends[-1]} characters")
    s_at, t_at = student.boundaries(), teacher.boundaries()
    groups: list[tuple[int, int, int, int]] = []
    s0 = t0 = 0
    for pos in sorted(s_at.keys() & t_at.keys()):
        groups.append((s0, s_at[pos], t0, t_at[pos]))
        s0, t0 = s_at[pos], t_at[pos]
    return Alignment(tuple(groups), student, teacher)


def align_ends(student_ends: Sequence[int], teacher_ends: Sequence[int]) -> Alignment:
    """`align_edges` for tokens that never cut a character."""
    return align_edges(Edges(tuple(student_ends)), Edges(tuple(teacher_ends)))


def tokenize_with_edges(tokenizer: Any, text: str) -> tuple[list[int], Edges]:
    """Token ids of ``text`` (no special tokens) and the edges of their characters.

    Needs a fast tokenizer (offset mappings); the slow ones cannot say which characters a token covers.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: character offsets are needed to align "
                         "two vocabularies; save the model's tokenizer.json (tokenizers library) beside it")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    edges = Edges.from_offsets(enc["offset_mapping"], len(text))
    if edges.ends and max(e for _, e in enc["offset_mapping"]) < len(text.rstrip()):
        raise ValueError(f"{type(tokenizer).__name__} offsets do not reach the end of the text")
    return list(enc["input_ids"]), edges


def align_text(student: Any, teacher: Any, text: str) -> tuple[list[int], list[int], Alignment]:
    """Tokenize ``text`` with both tokenizers and align the tokens by character spans.

    The text is put in Unicode NFC first: a tokenizer whose normalizer composes characters (``e`` + combining
    accent into ``é``) maps the composed token's offsets to the first of them only, which would misplace an edge.
    """
    text = unicodedata.normalize("NFC", text)
    s_ids, s_edges = tokenize_with_edges(student, text)
    t_ids, t_edges = tokenize_with_edges(teacher, text)
    return s_ids, t_ids, align_edges(s_edges, t_edges)


# ------------------------------------------------------------------------------------- shared vocabulary


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character for every byte -> that byte.

    Bytes that print as themselves (and are not blank) keep their own character; the other 68 are given the
    characters 256, 257, ... in byte order, so that every token is a printable string.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    keep = set(printable)
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in keep:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The text each token id stands for, as UTF-8 bytes (a byte-level piece may be part of a character);
    ``None`` for special tokens and for pieces this cannot read.

    Two conventions cover the causal LMs in use: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM: every byte
    written as a printable character) and SentencePiece-style pieces (Llama 2, Gemma: "▁" for a space, and
    byte-fallback pieces "<0xNN>"). The convention is read from the tokenizer's decoder.
    """
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    decoder = spec.get("decoder") or {}
    kinds = {d.get("type") for d in [decoder, *decoder.get("decoders", [])]}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)}
    out: list[bytes | None] = []
    if "ByteLevel" in kinds:
        alphabet = _byte_level_alphabet()
        for i, piece in enumerate(pieces):
            if i in special or piece is None or any(c not in alphabet for c in piece):
                out.append(None)
            else:
                out.append(bytes(alphabet[c] for c in piece))
        return out
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(None)
        elif m := _BYTE_FALLBACK.match(piece):
            out.append(bytes([int(m.group(1), 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


def _ids_by_bytes(tok: Any, table: list[bytes | None]) -> dict[bytes, int]:
    """bytes -> the token id writing them; where a vocabulary writes the same bytes twice (a byte-fallback piece
    "<0x20>" and a plain "▁"), the plain piece, which is the one its tokenizer produces."""
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    ids: dict[bytes, int] = {}
    for i, b in enumerate(table):
        if b and (b not in ids or _BYTE_FALLBACK.match(pieces[ids[b]] or "")):
            ids[b] = i
    return ids


def shared_vocabulary(student: Any, teacher: Any, tables: tuple[list[bytes | None], list[bytes | None]] | None = None
                      ) -> tuple[list[int], list[int]]:
    """Pairs of (student id, teacher id) whose tokens stand for the same bytes of text (`_ids_by_bytes`);
    ``tables``: the two `token_bytes` tables when the caller has them."""
    s_table, t_table = tables or (token_bytes(student), token_bytes(teacher))
    s_ids, t_ids = _ids_by_bytes(student, s_table), _ids_by_bytes(teacher, t_table)
    common = sorted(s_ids.keys() & t_ids.keys(), key=lambda b: s_ids[b])
    return [s_ids[b] for b in common], [t_ids[b] for b in common]


# ----------------------------------------------------------------------------------- a response in both


def vocabulary_map(student: Any, teacher: Any,
                   tables: tuple[list[bytes | None], list[bytes | None]] | None = None, *,
                   pieces: str = "written") -> VocabularyMap:
    """How the teacher's ids read in the student's vocabulary (Note [Across vocabularies] in signal.py): the
    one-to-one map of `shared_vocabulary`, with the teacher's EOS read as the student's; and each teacher token's
    first piece in the student's tokens: itself where shared, else (`pieces`) "written": the token the student's
    tokenizer writes first for that text ("ration" is "r" + "ation" to Llama 2's; " Portuguese" is " Portug" +
    "uese"), the longest piece where it cannot tell; "longest" (the design before 2026-12-07, kept to measure
    against): the longest student token that its bytes start with ("rat" of "ration")."""
    s_table, t_table = tables or (token_bytes(student), token_bytes(teacher))
    s_ids, t_ids = shared_vocabulary(student, teacher, (s_table, t_table))
    to_student = torch.full((len(teacher),), -1, dtype=torch.long)
    to_student[torch.tensor(t_ids, dtype=torch.long)] = torch.tensor(s_ids, dtype=torch.long)
    if teacher.eos_token_id is not None and student.eos_token_id is not None:
        to_student[to_student == student.eos_token_id] = -1  # keep the map one-to-one
        to_student[teacher.eos_token_id] = student.eos_token_id
    if pieces not in ("longest", "written"):
        raise ValueError(f"pieces must be 'longest' or 'written', got {pieces!r}")
    by_bytes = _ids_by_bytes(student, s_table)
    first_piece = to_student.clone()
    rest = [i for i, b in enumerate(t_table) if first_piece[i] < 0 and b]
    written = _first_tokens(student, [t_table[i] or b"" for i in rest], s_table) if pieces == "written" else [None] * len(rest)
    for i, got in zip(rest, written, strict=True):
        if got is not None:
            first_piece[i] = got
            continue
        b = t_table[i] or b""
        for end in range(len(b), 0, -1):
            if b[:end] in by_bytes:
                first_piece[i] = by_bytes[b[:end]]
                break
    return VocabularyMap(to_student, first_piece, len(student))


_CONTEXT = "\n"  # the text before each piece: a newline, which tokenizers do not merge with the letters after it


def _first_tokens(student: Any, pieces: list[bytes], s_table: list[bytes | None]) -> list[int | None]:
    """The token the student's tokenizer writes first for each piece of text (put after a newline), where that
    token stands for a prefix of the piece's bytes; None where it cannot tell (a piece that is no whole UTF-8 text,
    a slow tokenizer)."""
    out: list[int | None] = [None] * len(pieces)
    texts, where = [], []
    for k, b in enumerate(pieces):
        try:
            texts.append(_CONTEXT + b.decode("utf-8"))
            where.append(k)
        except UnicodeDecodeError:
            continue
    if not texts or not getattr(student, "is_fast", False):
        return out
    enc = student(texts, add_special_tokens=False, return_offsets_mapping=True)
    for k, ids, offsets in zip(where, enc["input_ids"], enc["offset_mapping"], strict=True):
        n = Edges.from_offsets(offsets).boundaries().get(len(_CONTEXT))
        b = s_table[ids[n]] if n is not None and n < len(ids) else None
        if b and pieces[k].startswith(b):
            out[k] = ids[n]
    return out


@dataclass(frozen=True)
class ResponseAlignment:
    """A teacher's answer in the student's tokens.

    ``student_ids``: the student's tokens of the answer's text (and its EOS where the teacher ended);
    ``teacher_rows[i]``: the teacher position (index into the teacher's answer) that predicts, from the same
    preceding text, a token whose text starts with student token i's (its first piece in the student's tokens:
    usually the same token), or -1 where there is none (no teacher token starts there, or the student's token
    is not the first piece of the teacher's).
    """

    student_ids: list[int]
    teacher_rows: list[int]

    @property
    def aligned(self) -> int:
        return sum(1 for r in self.teacher_rows if r >= 0)


class ResponseAligner:
    """Puts teacher answers (token ids) into a student's tokens, position by position (Note [Span alignment])."""

    def __init__(self, student: Any, teacher: Any, *, text_only: bool = False) -> None:
        """``text_only``: only the student's tokens are wanted (sequence-level distillation), no rows."""
        self.student, self.teacher, self.text_only = student, teacher, text_only
        if not text_only:
            self.vocab = vocabulary_map(student, teacher)

    def __call__(self, teacher_ids: Sequence[int], ended: bool) -> ResponseAlignment:
        """``ended``: the answer's last id is the teacher's stop token (it ended the answer itself); the student's
        tokens then end with the student's EOS."""
        body = list(teacher_ids[:-1] if ended else teacher_ids)
        text = self.teacher.decode(body, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        eos = self.student.eos_token_id
        if self.text_only:
            ids = list(self.student(text, add_special_tokens=False)["input_ids"])
            ids += [eos] if ended and eos is not None else []
            return ResponseAlignment(ids, [-1] * len(ids))
        s_ids, t_ids, alignment = align_text(self.student, self.teacher, text)
        # The teacher's rows are those of the ids it wrote; its own re-reading of the text usually gives the same
        # ids, and past the first difference its positions are not the ones it scored.
        agree = 0
        while agree < min(len(body), len(t_ids)) and body[agree] == t_ids[agree]:
            agree += 1
        rows = [-1] * len(s_ids)
        for s0, _, t0, _ in alignment.groups:
            # Where both start a token at the same character, the student's takes the teacher's row if it is the
            # teacher token's first piece (the same token where both have it; " Portug" of " Portuguese"): both
            # then predict text starting with it from the same text, which is what the projected distribution
            # holds (Note [Across vocabularies] in signal.py).
            if t0 < agree and int(self.vocab.first_piece[t_ids[t0]]) == s_ids[s0]:
                rows[s0] = t0
        if ended and eos is not None:
            s_ids.append(eos)
            rows.append(len(body) if int(self.vocab.to_student[teacher_ids[-1]]) == eos else -1)
        return ResponseAlignment(s_ids, rows)
