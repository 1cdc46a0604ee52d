"""The dolma2 tokenizer (bundled olmoscope/data/dolma2-tokenizer.json), streaming decode and chat templates."""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from olmoscope import chat_template as ct
from olmoscope.errors import OlmoscopeError
from olmoscope.runtime.tokenizer import TemplateError, Tokenizer


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


# ── limits (issue 10, item 1): each template below once exhausted memory, hung, or raised a traceback ──
LIMITED = [
    ('{{ "x" * 10**10 }}', "'*' would make over"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "steps"),
    ("{% include 'other.jinja' %}", "{% include %} is not allowed"),
    ("{% import 'macros.jinja' as m %}", "{% import %} is not allowed"),
    ("{% extends 'base.jinja' %}", "{% extends %} is not allowed"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "calls nested over 32 deep"),
    ("{% for x in messages recursive %}{{ loop(messages) }}{% endfor %}", "calls nested over 32 deep"),
    ("{{ range(200000) | list }}", "range of 200,000 items is over the 100,000 limit"),
    ("{% for i in range(200000) %}{% endfor %}", "range of 200,000 items"),
    ('{{ "x" | center(10**9) }}', "center(1000000000) is over"),
    ('{{ "x".ljust(10**9) }}', "ljust() with 1000000000 is over"),
    ('{{ "%*d" % (10**9, 1) }}', "a format argument over"),
    ('{{ "%999999999d" % 1 }}', "a format width over"),
    ('{{ "{:>999999999}".format(1) }}', "a format width over"),
    ('{{ ("a" * 1000).replace("", "b" * 10000) }}', "replace could make a value over"),
    ('{% set ns = namespace(s="x") %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}', "'~' would make"),
    ('{% set ns = namespace(s="x") %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}', "'+' would make"),
    ('{% set x %}{% for i in range(100000) %}{{ "y" * 100 }}{% endfor %}{% endset %}', "writes over"),
    ("{{ (10**10)**(10**10) }}", "an integer over 4096 bits"),
    ("{{ [1] * 10**7 }}", "'*' would make over"),
    ("{{ [1] | slice(10**8) }}", "slice(100000000) is over"),
    ('{{ "x" | indent(10**9) }}', "indent(1000000000) is over"),
    ("{{ lipsum(10**6) }}", "'lipsum' is undefined"),
    ("{{ 2.0 ** 10000 }}", "OverflowError"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ messages[0]['content'] + 1 }}", "TypeError"),
]


@pytest.mark.parametrize("template, fragment", LIMITED, ids=range(len(LIMITED)))
def test_hostile_templates_hit_a_limit_quickly_as_one_line(dolma2, template, fragment):
    import time

    tokenizer = Tokenizer(dolma2._tokenizer, chat_template=template)
    started = time.perf_counter()
    with pytest.raises(TemplateError) as caught:
        tokenizer.render_chat([{"role": "user", "content": "x"}])
    elapsed = time.perf_counter() - started
    message = str(caught.value)
    assert message.startswith("chat template: ") and fragment in message and "\n" not in message, message
    assert elapsed < ct.MAX_SECONDS + 1, f"{elapsed:.1f} s"


def test_a_slow_template_stops_at_the_time_limit(dolma2, monkeypatch):
    monkeypatch.setattr(ct, "MAX_SECONDS", 0.2)
    monkeypatch.setattr(ct, "MAX_STEPS", 10**12)  # only the clock can stop it
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"
    with pytest.raises(TemplateError, match="rendering took over 0.2 s"):
        Tokenizer(dolma2._tokenizer, chat_template=slow).render_chat([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("template, expected", [
    ("{% for i in range(3) %}{{ loop.index }}{{ loop.last }}{% endfor %}", "1False2False3True"),
    ("{% macro m(x) %}<{{ x }}>{{ caller() }}{% endmacro %}{% call m(1) %}in{% endcall %}", "<1>in"),
    ("{% filter upper %}{{ messages[0].content }}{% endfilter %}", "X"),
    ("{{ messages | map(attribute='content') | join(', ') }}|{{ {'a': 1} | tojson }}", 'x|{"a": 1}'),
    ("{{ '%s=%d' | format('a', 3) }} {{ '{}-{}'.format(1, 'b') }} {{ none }}{{ undefined_name }}", "a=3 1-b None"),
    ("{%- set ns = namespace(n=0) -%}{%- for m in messages -%}{%- set ns.n = ns.n + 1 -%}{%- endfor -%}{{ ns.n }}", "1"),
])
def test_ordinary_template_features_still_work(dolma2, template, expected):
    assert Tokenizer(dolma2._tokenizer, chat_template=template).render_chat([{"role": "user", "content": "x"}]) == expected


def test_rendering_is_safe_in_threads_and_budgets_are_per_render(dolma2):
    """A server renders on worker threads: no signals, and one render's runaway loop costs no other render."""
    from concurrent.futures import ThreadPoolExecutor

    runaway = Tokenizer(dolma2._tokenizer, chat_template=LIMITED[1][0])
    good = dolma2
    messages = [{"role": "user", "content": "Hi"}]

    def render(tokenizer):
        try:
            return tokenizer.render_chat(messages)
        except TemplateError as exc:
            return exc

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(render, [runaway, good, good, runaway, good]))
    assert [isinstance(r, TemplateError) for r in results] == [True, False, False, True, False]
    assert results[1] == "<|endoftext|><|user|>\nHi\n<|assistant|>\n"


def test_a_tokenizer_panic_is_one_engine_error():
    """Issue 10, item 5: a normalizer regex that makes tokenizers panic (a BaseException, not an Exception)."""
    import json
    from importlib import resources

    raw = json.loads(resources.files("olmoscope").joinpath("data", "dolma2-tokenizer.json").read_text("utf-8"))
    raw["normalizer"] = {"type": "Replace", "pattern": {"Regex": ""}, "content": "x"}
    tokenizer = Tokenizer.from_json(json.dumps(raw), origin="model.olmo")
    with pytest.raises(OlmoscopeError, match=r"^model.olmo: the tokenizer panicked \(index out of bounds"):
        tokenizer.encode("Hello")


def test_an_unreadable_tokenizer_is_a_clear_error():
    with pytest.raises(OlmoscopeError, match="unreadable tokenizer"):
        Tokenizer.from_json("{not json", origin="engine.olmo")


# ── fuzz: templates stitched from hostile pieces give only TemplateError, quickly, within the size limit ──
_NUMBERS = st.sampled_from(["0", "3", "1000", "10**6", "10**9", "10**40", "-1", "'7'", "2.5", "none"])
_PIECES = st.one_of(
    st.sampled_from([
        "{% for i in range(N) %}", "{% endfor %}", "{% if messages %}", "{% else %}", "{% endif %}",
        "{% macro f(a) %}", "{% endmacro %}", "{{ f(1) }}", "{{ caller() }}", "{% set ns = namespace(s='ab') %}",
        "{% set ns.s = ns.s ~ ns.s %}", "{% set ns.s = ns.s * N %}", "{{ ns.s|length }}", "{{ 'x' * N }}",
        "{{ [0] * N }}", "{{ N ** N }}", "{{ 'ab'|center(N) }}", "{{ 'a\nb'|indent(N) }}", "{{ '%*d' % (N, 1) }}",
        "{{ '{:>N}'.format(1) }}", "{{ messages|map(attribute='content')|join(N) }}", "{{ range(N)|list|sort }}",
        "{% include 'x' %}", "{{ messages[0].content.replace('', 'yy') }}", "{{ loop.index }}", "{%", "}}", "~",
        "{{ raise_exception('no') }}", "{{ messages.__class__ }}", "{% set x %}", "{% endset %}", "{{ x }}",
    ]),
    st.text(alphabet="ab {}%#~|()'\n", max_size=6),
)


@given(pieces=st.lists(st.tuples(_PIECES, _NUMBERS), max_size=10))
@settings(max_examples=150, deadline=None)
def test_stitched_templates_give_only_template_errors(pieces):
    import time

    template = "".join(piece.replace("N", number) for piece, number in pieces)
    tokenizer = Tokenizer(bundled()._tokenizer, chat_template=template)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ct, "MAX_STEPS", 20_000)
        patch.setattr(ct, "MAX_SECONDS", 0.5)
        started = time.perf_counter()
        try:
            text = tokenizer.render_chat([{"role": "user", "content": "Hi there"}])
        except TemplateError as exc:
            assert str(exc).startswith("chat template: ") and "\n" not in str(exc)
        else:
            assert len(text) <= ct.MAX_CHARS
        assert time.perf_counter() - started < 2.0, template
