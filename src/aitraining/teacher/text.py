"""The teacher's side of the text, whichever engine runs it: its tokenizer, prompt template and chat template."""

from __future__ import annotations

from typing import Any

from aitraining.data.examples import Example
from aitraining.data.templates import encode_prompt, encode_response, resolve_chat_template
from aitraining.models.load import load_tokenizer
from aitraining.padding import pad_id
from aitraining.signal import VocabularyMap
from aitraining.teacher.settings import TeacherSettings


class TeacherText:
    """The teacher's tokenizer (loaded, or handed over by a caller that loaded it already to check vocabularies) and
    how it renders a prompt."""

    def __init__(self, settings: TeacherSettings, tokenizer: Any = None) -> None:
        self.settings = settings
        self.tokenizer = tokenizer or load_tokenizer(settings.teacher_model, trust_remote_code=settings.trust_remote_code,
                                                     token=settings.token, flag="--teacher-model")
        self.tokenizer.padding_side = "left"
        # Note [Padded vocabularies]: embedding matrices are often padded past the tokenizer (152064 rows for
        # 151936 tokens). Padded ids are no tokens: the teacher's distribution is taken over the real
        # vocabulary only, so a top-k id always exists in the student too.
        self.vocab = len(self.tokenizer)
        self.chat_template = resolve_chat_template(self.tokenizer, "none" if settings.chat_template == "none" else "auto")
        self.pad_id = pad_id(self.tokenizer)
        # A student with another vocabulary: the teacher's distributions are projected onto it.
        self.projection: VocabularyMap | None = None

    def prompt_ids(self, ex: Example) -> list[int]:
        return encode_prompt(self.tokenizer, ex, self.settings.prompt_template, self.chat_template)

    def response_ids(self, text: str, *, add_eos: bool) -> list[int]:
        """A given response in the teacher's tokens (with its EOS)."""
        return encode_response(self.tokenizer, text, add_eos=add_eos)
