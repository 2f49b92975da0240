"""How a model sees a prompt: a prompt template shapes the user's message (`{input}` is replaced literally, never
with `str.format`, so braces in user text are safe), then the model's chat template wraps the conversation when
it has one (or the one chosen with `--chat-template`). With `--chat-template none` the template is the raw prompt
text. The response is tokenized on its own and appended, so the response tokens are the same ids whatever the
prompt looked like: that is what lets teacher and student be aligned on the response.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aitraining.data.examples import Example
from aitraining.errors import UserError, one_line

# Generic chat templates a user can pick by name for models without one.
BUILTIN_CHAT_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "zephyr": (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
}


def apply_template(template: str, text: str) -> str:
    """Put `text` where `{input}` is. Literal replacement: braces in `text` are never interpreted."""
    return template.replace("{input}", text)


def resolve_chat_template(tokenizer: Any, choice: str | None, *, flag_name: str = "--chat-template") -> str | None:
    """The Jinja chat template to use, or None for raw text."""
    if choice in (None, "auto"):
        return getattr(tokenizer, "chat_template", None) or None
    if choice == "none":
        return None
    if choice == "tokenizer":
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise UserError(f"{flag_name} tokenizer: the model's tokenizer has no chat template; use chatml, zephyr or none")
        return template
    return BUILTIN_CHAT_TEMPLATES[choice]


def render_prompt(
    tokenizer: Any, messages: Sequence[dict[str, str]], template: str, chat_template: str | None, *, place: str = ""
) -> tuple[str, bool]:
    """The prompt text a model sees, and whether the tokenizer should add its special tokens (BOS).

    The template applies to the last user turn. A chat template renders BOS itself, so then no special
    tokens are added; raw text gets the tokenizer's usual ones. A chat template that refuses a conversation
    (many raise on roles they do not expect) is the data's problem, named by `place`.
    """
    msgs = [dict(m) for m in messages]
    msgs[-1]["content"] = apply_template(template, msgs[-1]["content"])
    if chat_template is not None:
        try:
            text = tokenizer.apply_chat_template(msgs, chat_template=chat_template, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as e:  # jinja2's TemplateError, or whatever the template's own code raises
            roles = ", ".join(m.get("role", "?") for m in msgs)
            raise UserError(f"--data-path: {place or 'a row'}: the chat template refuses this conversation (roles: "
                            f"{roles}): {one_line(e)}; fix the row, or choose another with --chat-template") from None
        return text, False
    return "\n\n".join(m["content"] for m in msgs), True


def encode_prompt(tokenizer: Any, ex: Example, template: str, chat_template: str | None) -> list[int]:
    """A message row's prompt ids as a model sees them: `render_prompt`, then its tokenizer."""
    assert ex.messages is not None
    prompt, special = render_prompt(tokenizer, ex.messages, template, chat_template, place=ex.place)
    return encode(tokenizer, prompt, add_special_tokens=special)


def encode(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def encode_response(tokenizer: Any, response: str, *, add_eos: bool) -> list[int]:
    ids = encode(tokenizer, response, add_special_tokens=False)
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids
