"""The dolma2 tokenizer (bundled olmoscope/data/dolma2-tokenizer.json), streaming decode and chat templates."""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from olmoscope.errors import OlmoscopeError
from olmoscope.runtime.tokenizer import Tokenizer


@cache
def bundled() -> Tokenizer:
    return Tokenizer.bundled()


@pytest.fixture
def dolma2() -> Tokenizer:
    return bundled()


@pytest.mark.parametrize(
    "text, ids",
    [("Hello world", [9906, 1917]), ("Language modeling is ", [14126, 34579, 374, 220])],
)
def test_olmo2_test_vectors(dolma2, text, ids):
    assert dolma2.encode(text) == ids
    assert dolma2.decode(ids) == text


def test_vocabulary_size_and_special_tokens(dolma2):
    assert dolma2.vocab_size == 100278
    assert dolma2.encode("<|endoftext|>") == [100257]  # no BOS/EOS added: post_processor is null
    assert dolma2.encode("<|pad|>") == [100277]


@given(st.text(max_size=60))
@settings(max_examples=150, deadline=None)
def test_round_trip(text):
    tokenizer = bundled()
    assert tokenizer.decode(tokenizer.encode(text)) == text


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
@settings(max_examples=100, deadline=None)
def test_streaming_decode_rebuilds_the_text_piece_by_piece(text):
    tokenizer = bundled()
    stream = tokenizer.stream()
    pieces = [stream.step(i) for i in tokenizer.encode(text)]
    assert "".join(pieces) == text  # so no piece held half a character (it would show as U+FFFD)


def test_streaming_holds_back_a_split_character(dolma2):
    ids = dolma2.encode("日本語")  # 語 takes two byte-level tokens
    stream = dolma2.stream()
    pieces = [stream.step(i) for i in ids]
    assert "" in pieces and "".join(pieces) == "日本語", pieces


def test_chat_template_is_olmo2_instruct_format(dolma2):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert dolma2.render_chat(messages) == (
        "<|endoftext|><|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!<|endoftext|>\n"
        "<|user|>\nBye\n<|assistant|>\n"
    )
    assert dolma2.render_chat(messages[1:2], add_generation_prompt=False) == "<|endoftext|><|user|>\nHi\n"


def test_chat_prompt_tokens_start_with_endoftext_and_end_with_the_assistant_marker(dolma2):
    ids = dolma2.encode_chat("Hi")
    assert ids[0] == 100257
    assert dolma2.decode(ids) == "<|endoftext|><|user|>\nHi\n<|assistant|>\n"
    assert ids[-len(dolma2.encode("<|assistant|>\n")) :] == dolma2.encode("<|assistant|>\n")


def test_a_files_own_chat_template_is_used(dolma2):
    custom = Tokenizer(dolma2._tokenizer, chat_template="{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert custom.render_chat([{"role": "user", "content": "x"}]) == "[x]"


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # sandbox: no attribute escapes
        "{% for m in messages %}{{ messages.append(1) }}{% endfor %}",  # immutable: no mutation
        "{% if %}",  # syntax error
        "{{ raise_exception('no tools') }}",
    ],
)
def test_hostile_or_broken_templates_are_clear_errors(dolma2, template):
    tokenizer = Tokenizer(dolma2._tokenizer, chat_template=template)
    with pytest.raises(OlmoscopeError, match="chat template"):
        tokenizer.render_chat([{"role": "user", "content": "x"}])


def test_an_unreadable_tokenizer_is_a_clear_error():
    with pytest.raises(OlmoscopeError, match="unreadable tokenizer"):
        Tokenizer.from_json("{not json", origin="engine.olmo")
