"""The teacher behind an OpenAI-compatible completions server (vLLM, SGLang, llama.cpp's llama-cpp-python): it writes
the answers of prompt-only rows and gives its top-k log-probabilities at every position of a given text; what comes
back is checked against the local teacher tokenizer and goes into the same cache as the in-process teacher's.

Note [Server log-probabilities]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Scoring asks for the prompt + answer text with `echo: true, logprobs: k, max_tokens: 1` (the legacy OpenAI form that
vLLM, SGLang and llama-cpp-python answer), with the one generated token kept from ending the text (`min_tokens`,
`logit_bias` on the end-of-sequence token). The text's tokens are the server's own (`tokenize`), so that what it
scores is what the student trains on. Servers number the entries differently:

- vLLM, SGLang: entry i is the distribution that predicts token i (entry 0 is null), and the generated token comes
  after the text's tokens: len(text tokens) + 1 entries. vLLM keys them by id with `return_tokens_as_token_ids`
  ("token_id:123"), which is asked for.
- llama-cpp-python leaves every token whose id is its BOS's out of the entries (SmolLM2's BOS is <|im_start|>, which
  its chat template writes at every turn). When the evaluated text starts with a BOS (its own or the template's) it
  numbers as vLLM does, the generated token last; otherwise entry i is the distribution *after* token i (it
  predicts token i + 1) and the generated token is missing. Entry 0 is null either way. So the count of entries
  tells the numbering (`_alignment`). Its entries are keyed by the token's text (bytes decoded with errors ignored,
  special tokens as ""), and each also holds the token of its own position.

Every entry's own token must be the local tokenizer's token at that position: a mismatch stops the run, naming the
server, the row and the first differing token. A text key stands for the one token of the local vocabulary that
reads as it; where several do, for the one whose bytes are the text whole (" " is the space token, not one of the
37 space-plus-partial-character tokens), and "" for the end-of-sequence token (the special token a model predicts
inside an answer); other texts read by several tokens stand for none, and their mass stays in the rest.
llama-cpp-python also merges the tokens that read alike under one key: it builds each entry as a dictionary in
descending order, so the key stands at the rank of the most likely of them but keeps the value of the least likely.
A key out of order is given what the ranking and the others' mass allow: at most the value above it, at least the
one below, at most 1 minus the others.

The rest's mass is 1 minus the head's. Its mass at the distillation temperature, which only the whole distribution
gives, is taken as if the rest were tokens as likely as the head's least likely one (the most concentrated rest the
ranking allows; a lower bound of the truth).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from aitraining.align import token_bytes
from aitraining.data.examples import Example
from aitraining.data.templates import render_prompt
from aitraining.errors import UserError, one_line
from aitraining.signal import TeacherTargets
from aitraining.teacher.settings import TeacherSettings
from aitraining.teacher.text import TeacherText

log = logging.getLogger(__name__)

RETRIES = 5  # attempts after the first, with exponential backoff
BACKOFF_S = 1.0
EXTRA_LOGPROBS = 8  # asked beyond k where entries are keyed by text: some texts are no id
_NEG = -9999.0  # how servers write a log-probability of zero in JSON


class ServerError(UserError):
    """The server failed or answered something unusable; the message names it."""


class Client:
    """JSON over HTTP to one server, with a timeout per request and retries with backoff on what may pass (a stall,
    a refused connection, 429 and 5xx); anything else is a one-line error naming the server."""

    def __init__(self, url: str, *, api_key: str | None, timeout: float, retries: int | None = None,
                 backoff: float | None = None) -> None:
        url = url.rstrip("/")
        self.url = url if url.endswith("/v1") else url + "/v1"
        self.root = self.url.removesuffix("/v1")  # where servers keep what the OpenAI protocol lacks (/tokenize)
        self.api_key, self.timeout = api_key, timeout
        self.retries = RETRIES if retries is None else retries
        self.backoff = BACKOFF_S if backoff is None else backoff
        self.requests = 0  # sent, retries included

    def get(self, path: str) -> Any:
        return self._send(self.url + path, path, None)

    def post(self, path: str, body: dict[str, Any], *, root: bool = False) -> Any:
        """POST `body` to the API's `path` (under /v1), or with `root` to the server's own (beside it)."""
        return self._send((self.root if root else self.url) + path, path, json.dumps(body).encode())

    def _send(self, address: str, path: str, data: bytes | None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        where = f"the teacher server {self.url}"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1) * (1 + 0.25 * random.random()))
            request = urllib.request.Request(address, data=data, headers=headers,
                                             method="POST" if data is not None else "GET")
            self.requests += 1
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as e:
                detail = one_line(Exception(e.read().decode("utf-8", "replace") or e.reason), 200)
                if e.code == 429 or e.code >= 500:
                    last = f"answered HTTP {e.code} ({detail})"
                    continue
                raise ServerError(f"{where} refused a request to {path}: HTTP {e.code} ({detail})") from None
            except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as e:
                last = f"did not answer ({one_line(getattr(e, 'reason', e), 120)})"
                continue
            try:
                return json.loads(raw)
            except json.JSONDecodeError as e:
                raise ServerError(f"{where} answered {path} with text that is not JSON ({e.msg} at character "
                                  f"{e.pos}); check --teacher-url names an OpenAI-compatible server") from None
        raise ServerError(f"{where} {last} {self.retries + 1} times (timeout {self.timeout:g} s, backoff from "
                          f"{self.backoff:g} s); check it runs and is reachable, then run the same command again: "
                          "what it answered so far is kept")


class ServerEngine(TeacherText):
    """The teacher served elsewhere: answers and scores by the completions protocol (Note [Server log-probabilities]);
    --teacher-model names its tokenizer, which everything it returns is checked against."""

    def __init__(self, settings: TeacherSettings, tokenizer: Any = None) -> None:
        super().__init__(settings, tokenizer)
        key = None
        if settings.teacher_api_key_env:
            key = os.environ.get(settings.teacher_api_key_env)
            if not key:
                raise UserError(f"--teacher-api-key-env: the environment variable {settings.teacher_api_key_env} is "
                                "not set; export the server's API key in it")
        self.client = Client(settings.teacher_url or "", api_key=key, timeout=settings.teacher_timeout)
        self.concurrency = settings.teacher_concurrency
        self.batch_size = 4 * settings.teacher_concurrency  # requests in flight while finished ones are written
        models = self.client.get("/models").get("data") or []
        if not models:
            raise ServerError(f"the teacher server {self.client.url} serves no model (GET /v1/models is empty)")
        self.model_id = str(models[0].get("id"))
        self.kind = "llama.cpp" if models[0].get("owned_by") == "me" else str(models[0].get("owned_by") or "openai")
        pieces = token_bytes(self.tokenizer)
        self.texts = [("" if b is None else b.decode("utf-8", "ignore")) for b in pieces]  # as the server writes them
        self.id_by_text = _ids_by_text(pieces, self.texts, self.tokenizer.eos_token_id)
        counts: dict[str, int] = {}
        for text in self.texts:
            counts[text] = counts.get(text, 0) + 1
        self.shared_texts = {text for text, n in counts.items() if n > 1}  # keys under which the server merges tokens
        first = self.tokenizer("a")["input_ids"]
        self.auto_bos = first[0] if first and first[0] == self.tokenizer.bos_token_id else None
        log.info("teacher server %s: %s (%s); its answers and top-%d log-probs are cached like the in-process "
                 "teacher's", self.client.url, self.model_id, self.kind, settings.distill_top_k)

    def identity(self) -> dict[str, Any]:
        """The served model and the tokenizer its tokens are read with (not the URL: the same teacher restarted
        elsewhere is the same teacher)."""
        vocab = hashlib.sha256(json.dumps(self.tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()[:24]
        return {"teacher": {"server_model": self.model_id, "vocabulary": vocab}, "dtype": "server"}

    def tokenize(self, text: str) -> list[int]:
        """`text` in the server's own tokens, where it says how it tokenizes (llama-cpp-python's /extras/tokenize,
        vLLM's /tokenize): tokenizers of one model built by two projects split some text otherwise (llama.cpp and
        transformers part "\\n\\n" differently in places for SmolLM2), and what the server scores must be what
        the student trains on. Elsewhere, --teacher-model's tokenizer (each echo checks it)."""
        if self.kind == "llama.cpp":
            ids = self.client.post("/extras/tokenize", {"input": text}, root=True).get("tokens")
        elif self.kind == "vllm":
            ids = self.client.post("/tokenize", {"model": self.model_id, "prompt": text, "add_special_tokens": False},
                                   root=True).get("tokens")
        else:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < self.vocab for i in ids):
            raise ServerError(f"the teacher server {self.client.url} tokenized text into ids outside --teacher-model's "
                              f"{self.vocab:,}-token vocabulary: it serves another tokenizer")
        return ids

    def prompt_ids(self, ex: Example) -> list[int]:
        text, _ = render_prompt(self.tokenizer, ex.messages or [], self.settings.prompt_template, self.chat_template,
                                place=ex.place)
        return self.tokenize(text)

    def response_ids(self, text: str, *, add_eos: bool) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return self.tokenize(text) + ([eos] if add_eos and eos is not None else [])

    def stop_ids(self) -> set[int]:
        return {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()

    def free(self) -> None:
        """Nothing is held here: the server keeps the model."""

    def _map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]:
        """`fn` of each item, `concurrency` requests in flight, yielded in order as they come: what came before a
        failure reaches the caller (and the cache) before the failure does."""
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            yield from pool.map(fn, items)

    def _sampling(self, prompt: list[int]) -> dict[str, Any]:
        s = self.settings
        body: dict[str, Any] = {"temperature": 0.0}
        if s.teacher_do_sample:
            seed = int(hashlib.sha256(json.dumps([s.seed, prompt]).encode()).hexdigest()[:8], 16)
            body = {"temperature": s.teacher_sampling_temperature, "top_p": s.teacher_top_p, "seed": seed}
        if self.kind == "llama.cpp":  # its defaults would change the distribution sampled from
            body.update({"repeat_penalty": 1.0, "top_k": 0, "min_p": 0.0})
        return body

    def generate(self, prompts: Sequence[list[int]], *, record: bool = True
                 ) -> Iterator[tuple[list[int], TeacherTargets | None]]:
        """The server's answers (greedy, or sampled as --teacher-do-sample says), read back into the local teacher
        tokenizer's ids; their targets come from scoring (`score`), which also checks those ids."""

        def one(prompt: list[int]) -> tuple[list[int], None]:
            body = {"model": self.model_id, "prompt": self._text(prompt), "max_tokens": self.settings.distill_max_teacher_length,
                    **self._sampling(prompt)}
            choice = self._choice(self.client.post("/completions", body), "/completions")
            return self.response_ids(choice.get("text") or "", add_eos=choice.get("finish_reason") == "stop"), None

        return self._map(one, prompts)

    def score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> Iterator[TeacherTargets]:
        """The top-k log-probabilities at every response position of each (prompt, response) (Note [Server
        log-probabilities])."""
        return self._map(lambda pair: self._score_one(*pair), pairs)

    def _text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(self._sent(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _sent(self, ids: Sequence[int]) -> list[int]:
        """The ids whose text is sent: without the BOS that the local tokenizer adds by itself (a server adds its own
        where its model wants one); a BOS that the prompt's template writes stays."""
        return list(ids[1:]) if ids and self.auto_bos is not None and ids[0] == self.auto_bos else list(ids)

    def _choice(self, answer: Any, path: str) -> dict[str, Any]:
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not choices or not isinstance(choices[0], dict):
            raise ServerError(f"the teacher server {self.client.url} answered {path} without choices: "
                              f"{one_line(Exception(json.dumps(answer)[:200]))}")
        return choices[0]

    def _score_one(self, prompt: list[int], response: list[int]) -> TeacherTargets:
        k = self.settings.distill_top_k
        ids = self._sent(list(prompt) + list(response))
        asked = k if self.kind == "vllm" else k + EXTRA_LOGPROBS
        body: dict[str, Any] = {"model": self.model_id, "prompt": self._text(ids), "echo": True, "logprobs": asked,
                                "max_tokens": 1, "min_tokens": 1, "temperature": 0.0,
                                "return_tokens_as_token_ids": True}
        if self.tokenizer.eos_token_id is not None:
            body["logit_bias"] = {str(self.tokenizer.eos_token_id): -100}
        choice = self._choice(self.client.post("/completions", body), "/completions")
        logprobs = choice.get("logprobs") or {}
        tokens, entries = logprobs.get("tokens"), logprobs.get("top_logprobs")
        if not isinstance(tokens, list) or not isinstance(entries, list) or len(tokens) != len(entries):
            raise ServerError(f"the teacher server {self.client.url} answered an echo request without per-token "
                              "log-probs (logprobs.tokens, logprobs.top_logprobs); serve the model with "
                              "log-probs of the prompt (llama-cpp-python: --logits_all true)")
        entry_of, expected = self._alignment(ids, len(tokens))
        if entry_of is None:
            raise ServerError(f"the teacher server {self.client.url} read row {self._row(prompt)} as {len(tokens)} "
                              f"tokens where --teacher-model's tokenizer has {len(ids)}: it serves another tokenizer")
        for e, (token, own) in enumerate(zip(tokens, expected, strict=True)):
            if own is not None and self._id_of(token) != own and token != self.texts[own]:
                raise ServerError(f"the teacher server {self.client.url} tokenizes row {self._row(prompt)} otherwise "
                                  f"than --teacher-model: token {e} is {token!r} there and {self.texts[own]!r} "
                                  f"(id {own}) here; serve the same model, or name its tokenizer with --teacher-model")
        rows = []
        for a in range(len(ids) - len(response), len(ids)):
            e = entry_of.get(a)
            head = self._entry(entries[e] if e is not None else None, asked, prompt)
            rows.append((self._projected(head) if self.projection is not None else head)[:k])
        return self._targets(rows, k)

    def _projected(self, head: list[tuple[int, float]]) -> list[tuple[int, float]]:
        """A head in the teacher's ids carried over to the student's vocabulary as the in-process teacher's whole
        distribution is (Note [Across vocabularies] in signal.py): each id's mass to its first piece, merged; the mass
        of ids with no piece (special tokens but the end) left out and the rest renormalized; the rest's mass stays
        the rest."""
        assert self.projection is not None
        merged: dict[int, float] = {}
        dropped = 0.0
        for i, value in head:
            piece = int(self.projection.first_piece[i])
            if piece < 0:
                dropped += math.exp(value)
            else:
                merged[piece] = float(np.logaddexp(merged.get(piece, -math.inf), value))
        scale = math.log(max(1.0 - dropped, 1e-12))
        return sorted(((i, v - scale) for i, v in merged.items()), key=lambda x: -x[1])

    def _alignment(self, ids: list[int], n: int) -> tuple[dict[int, int] | None, list[int | None]]:
        """Which of the `n` entries of an echo predicts each position of `ids`, and which token each entry holds
        (None: the generated one) (Note [Server log-probabilities]). llama-cpp-python leaves every BOS-id token out
        of its entries; it numbers them as the convention when the evaluated text starts with a BOS (its own, or
        the template's) and "after" otherwise, which the count tells apart."""
        if self.kind != "llama.cpp":
            lead = n - len(ids) - 1  # a BOS the server added, echoed first
            if lead not in (0, 1):
                return None, []
            return {a: a + lead for a in range(len(ids))}, [None] * lead + list(ids) + [None]
        bos = self.tokenizer.bos_token_id
        kept = [a for a in range(len(ids)) if ids[a] != bos]
        if n == len(kept) + 1:  # the convention: entry e predicts the token it holds; the generated one is last
            return {a: e for e, a in enumerate(kept)}, [ids[a] for a in kept] + [None]
        if n == len(kept):  # entry e is the distribution after the token it holds
            return {a + 1: e for e, a in enumerate(kept)}, [ids[a] for a in kept]
        return None, []

    def _row(self, prompt: list[int]) -> str:
        return repr(self._text(prompt)[-60:])

    def _id_of(self, key: str) -> int | None:
        if key.startswith("token_id:"):
            return int(key.removeprefix("token_id:"))
        return self.id_by_text.get(key)

    def _entry(self, entry: Any, asked: int, prompt: list[int]) -> list[tuple[int, float]]:
        """One position's head in the teacher's ids: (id, log-prob at T = 1), most likely first, distinct."""
        if not isinstance(entry, dict) or not entry:  # None: the server gave none for that position
            raise ServerError(f"the teacher server {self.client.url} gave no log-probs at a position of row "
                              f"{self._row(prompt)}; serve it with log-probs of the prompt")
        keys, values = list(entry), [float(v) for v in entry.values()]
        given, raised = list(values), []
        for r, key in enumerate(keys[:-1]):
            if key in self.shared_texts and values[r] < values[r + 1]:
                # Several tokens read as this text: the key stands where the most likely of them ranks, with the
                # value of the least likely (Note [Server log-probabilities]). Its own is at most the one above it,
                # at least the one below, and no more than what the others leave.
                rest = math.log(max(1.0 - sum(math.exp(v) for j, v in enumerate(values) if j != r), 1e-12))
                values[r] = min(values[r - 1] if r else 0.0, max(rest, values[r + 1]))
                raised.append(r)
        # Two such keys' bounds can claim more than the whole together (the first took what the others left, the
        # second its rank): the lower-ranked give back first, never below what the server gave them.
        excess = sum(math.exp(v) for v in values) - 1.0
        for r in reversed(raised):
            if excess <= 0.0:
                break
            back = min(excess, math.exp(values[r]) - math.exp(given[r]))
            values[r] = math.log(max(math.exp(values[r]) - back, 1e-300))
            excess -= back
        read = [(self._id_of(key), value) for key, value in zip(keys, values, strict=True)]
        if len(entry) < min(asked, self.vocab) and not any(key in self.shared_texts for key in entry):
            raise ServerError(f"the teacher server {self.client.url} returned {len(entry)} log-probs where {asked} "
                              f"were asked (row {self._row(prompt)}); it caps them: lower --distill-top-k or raise its "
                              "limit (vLLM: --max-logprobs)")
        head: dict[int, float] = {}
        for i, value in sorted(read, key=lambda x: -x[1]):
            if i is not None and i not in head:
                head[i] = -math.inf if value <= _NEG else value
        return list(head.items())

    def _targets(self, rows: list[list[tuple[int, float]]], k: int) -> TeacherTargets:
        n = len(rows)
        ids = torch.zeros(n, k, dtype=torch.long)
        logp = torch.full((n, k), -math.inf)
        for r, head in enumerate(rows):
            for c, (i, value) in enumerate(head):
                ids[r, c], logp[r, c] = i, value
            if len(head) < k:  # some texts were no id: the slots left repeat the last id with no mass
                ids[r, len(head):] = ids[r, max(len(head) - 1, 0)]
        mass = logp.exp().sum(-1)
        if bool((mass > 1.001).any()):
            raise ServerError(f"the teacher server {self.client.url} returned log-probs that sum to {float(mass.max()):.3f}: "
                              "they are not the model's raw distribution (vLLM: --logprobs-mode raw_logprobs)")
        tail = torch.log1p(-mass.clamp(max=1.0))
        least = torch.where(torch.isfinite(logp), logp, torch.inf).amin(-1)
        tau = self.settings.distill_temperature
        tail_lognorm = torch.where(torch.isfinite(tail) & torch.isfinite(least), tail + (1 / tau - 1) * least, tail)
        empty = torch.zeros(n, 0)
        return TeacherTargets(ids=ids, logp=logp, sample_logp=empty, counts=empty, tail_logp=tail,
                              tail_lognorm=tail_lognorm, tau=tau)


def _ids_by_text(pieces: list[bytes | None], texts: list[str], eos: int | None) -> dict[str, int]:
    """The id a text key stands for (Note [Server log-probabilities]): the one token that reads as it; where several
    do, the one whose bytes are that text whole (" " is the space token, not a space and a broken character), and
    for "" the end of the answer (special tokens read as ""; the end-of-sequence token is the one a model predicts
    inside an answer). Texts left ambiguous stand for no id."""
    candidates: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        candidates.setdefault(text, []).append(i)
    out = {}
    for text, ids in candidates.items():
        whole = [i for i in ids if pieces[i] is not None and pieces[i] == text.encode()]
        if len(ids) == 1:
            out[text] = ids[0]
        elif len(whole) == 1:
            out[text] = whole[0]
        elif text == "" and eos is not None and eos in ids:
            out[text] = eos
    return out
