"""Chat templates (Jinja source from a checkpoint, so untrusted) rendered in a sandbox with limits.

jinja2's ImmutableSandboxedEnvironment stops attribute escapes and mutation, but not a template that
asks for `"x" * 10**10`, loops for hours, recurses until Python does, or includes files. Every render
here has its own budget, checked from hooks jinja2 calls, so it is safe in any thread (no signals):

- steps: every loop iteration, call, filter, operator, attribute/item lookup and output piece costs one;
  at most MAX_STEPS, and at most MAX_SECONDS of wall time (checked at every step);
- size: no value a template makes may exceed MAX_CHARS (strings in characters, lists and dicts by their
  items, deeply) — operators and calls that would multiply a size are refused before they run
  ("x" * n, str.center(n), "%*d", replace("", s), …), the others are checked right after; everything
  written (output, and text captured by set/filter/macro blocks) counts against MAX_CHARS in total;
- integers at most MAX_INT_BITS bits; range() at most MAX_RANGE items; calls nested at most
  MAX_CALL_DEPTH deep (recursive macros);
- include, import, extends: refused (a chat template must be self-contained).

Every failure — a limit, a syntax error, a sandbox violation, raise_exception(), or any exception the
template's own code raises — is one TemplateError line.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from olmoscope.display import one_line
from olmoscope.errors import EngineError

MAX_STEPS = 2_000_000  # OLMo 2's template takes ~30 per message
MAX_SECONDS = 2.0
MAX_CHARS = 1 << 22  # 4 Mi characters: eight times a 128k-token context's worth of text
MAX_INT_BITS = 4096
MAX_RANGE = 100_000  # jinja2's own sandbox limit, kept
MAX_CALL_DEPTH = 32
MAX_TEMPLATE_CHARS = 1 << 20  # the template's source

_LOOP, _OUT, _CONCAT, _RANGE = "olmoscope_loop", "olmoscope_out", "olmoscope_concat", "range"
_HOOKS = frozenset(["_loop", "_out", "_concat", "_range"])  # the methods behind those names
_DIGITS = re.compile(r"\d+")


class TemplateError(EngineError):
    """A chat template failed to compile or render, or went over a limit."""


def compile_template(source: str) -> Any:
    """The template's compiled code, every loop, output and `~` routed through the budget's hooks.

    Compile once, render many times (each render binds the code to a fresh budget).
    """
    if len(source) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"chat template: {len(source):,} characters is over the {MAX_TEMPLATE_CHARS:,} limit")
    env = _Budget()
    try:
        tree = env.parse(source)
        _instrument(tree)
        return env.compile(tree)
    except TemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise TemplateError(f"chat template: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - the compiler on hostile input: anything is a template error
        raise TemplateError(f"chat template: cannot compile ({type(exc).__name__}: {_first_line(exc)})") from None


def render(code: Any, globals_: dict[str, Any], **context: Any) -> str:
    """Run compiled template code with a fresh budget; the text, or one TemplateError.

    >>> render(compile_template("{{ a ~ b }}"), {}, a="x", b="y")
    'xy'
    """
    budget = _Budget()
    budget.globals.update(globals_)
    try:
        template = budget.template_class.from_code(budget, code, budget.make_globals(None))
        pieces, total = [], 0
        for piece in template.generate(**context):
            total += len(piece)
            if total > MAX_CHARS:
                raise TemplateError(f"chat template: output over {MAX_CHARS:,} characters")
            pieces.append(piece)
        return "".join(pieces)
    except TemplateError:
        raise
    except jinja2.TemplateError as exc:  # syntax, undefined names, sandbox violations
        raise TemplateError(f"chat template: {_first_line(exc)}") from None
    except RecursionError:
        raise TemplateError("chat template: recursion too deep") from None
    except MemoryError:
        raise TemplateError("chat template: ran out of memory") from None
    except Exception as exc:  # noqa: BLE001 - the template is code from a file: any exception is its failure
        raise TemplateError(f"chat template: {type(exc).__name__}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return one_line(text[0][:300]) if text else type(exc).__name__


# ── compile time: refuse includes, route loops, output and ~ through the hooks ──────
def _instrument(tree: nodes.Template) -> None:
    for kind, word in ((nodes.Include, "include"), (nodes.Import, "import"), (nodes.FromImport, "from … import"),
                       (nodes.Extends, "extends")):
        if tree.find(kind) is not None:
            raise TemplateError(f"chat template: {{% {word} %}} is not allowed (a chat template must be self-contained)")
    _Instrument().visit(tree)


class _Instrument(NodeTransformer):
    """Loops iterate through olmoscope_loop, every output piece goes through olmoscope_out, and `a ~ b`
    becomes olmoscope_concat(a, b), sized before it is joined."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = _hook(_LOOP, [node.iter])
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        node = self.generic_visit(node)
        node.nodes = [_hook(_OUT, [nodes.Const(n.data) if isinstance(n, nodes.TemplateData) else n]) for n in node.nodes]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        node = self.generic_visit(node)
        return _hook(_CONCAT, list(node.nodes))


def _hook(name: str, args: list[nodes.Expr]) -> nodes.Call:
    return nodes.Call(nodes.Name(name, "load"), args, [], None, None)


# ── run time: the budget ──────────────────────────────────────────────────────────
def size_of(value: Any, cap: int = MAX_CHARS) -> int:
    """Characters of a string, items (deeply) of a container, bytes of an int; stops counting past `cap`."""
    total, stack = 0, [value]
    while stack and total <= cap:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += len(item) + 1
            if total <= cap:
                stack.extend(item)
        elif isinstance(item, dict):
            total += len(item) + 1
            if total <= cap:
                stack.extend(item.keys())
                stack.extend(item.values())
        elif isinstance(item, int) and not isinstance(item, bool):
            total += item.bit_length() // 8 + 1
        else:
            total += 1
    return total


class _Budget(ImmutableSandboxedEnvironment):
    """One render's sandbox: jinja2 calls these hooks, each costs a step and checks the limits."""

    intercepted_binops = frozenset(["*", "**", "+", "%", "//", "/", "-"])

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, optimized=False, loader=None)
        self.steps = 0
        self.depth = 0
        self.emitted = 0
        self.deadline = time.monotonic() + MAX_SECONDS
        self.filters = {name: self._guarded(name, f) for name, f in self.filters.items()}
        del self.globals["lipsum"]  # lipsum(n) writes n paragraphs; no chat template needs it
        self.globals.update({_LOOP: self._loop, _OUT: self._out, _CONCAT: self._concat, _RANGE: self._range})

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise TemplateError(f"chat template: over {MAX_STEPS:,} steps (a runaway loop?)")
        if time.monotonic() > self.deadline:
            raise TemplateError(f"chat template: rendering took over {MAX_SECONDS:g} s")

    # ── jinja2's hooks ──────────────────────────────────────────────────────
    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's signature
        __self.step()
        scope = {k: kwargs.pop(k) for k in ("_loop_vars", "_block_vars") if k in kwargs}  # jinja2's own
        if getattr(__obj, "__self__", None) is __self and __obj.__name__ in _HOOKS:
            return __obj(*args, **kwargs)  # our own instrumentation: already budgeted
        if __self.depth >= MAX_CALL_DEPTH:
            raise TemplateError(f"chat template: calls nested over {MAX_CALL_DEPTH} deep (a recursive macro?)")
        _check_int_arguments(args, kwargs, getattr(__obj, "__name__", "a call"))
        receiver = getattr(__obj, "__self__", None)
        if isinstance(receiver, (str, list, tuple, dict)):
            _check_estimate(receiver, args, kwargs, getattr(__obj, "__name__", "method"))
        __self.depth += 1
        try:
            result = super().call(__context, __obj, *args, **kwargs, **scope)
        finally:
            __self.depth -= 1
        return _checked(result)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        self.step()
        _check_binop(operator, left, right)
        return _checked(super().call_binop(context, operator, left, right))

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.step()
        return super().getattr(obj, attribute)

    def wrap_str_format(self, value: Any) -> Any:
        """str.format / format_map, jinja2's sandboxed wrapper, with its widths checked first."""
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt = value.__self__

        def checked(*args: Any, **kwargs: Any) -> str:
            _check_format(fmt, (*args, *kwargs.values()))
            _check_estimate(fmt, args, kwargs, value.__name__)
            return _checked(wrapper(*args, **kwargs))

        checked.__name__ = value.__name__  # what call() and its messages see
        return checked

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.step()
        return super().getitem(obj, argument)

    # ── our globals (the instrumented template calls them; call() lets them through unbudgeted) ──
    def _loop(self, iterable: Any) -> Iterator[Any]:
        for item in iterable:
            self.step()
            yield item

    def _out(self, value: Any) -> str:
        text = value if isinstance(value, str) else self.finalize_text(value)
        self.emitted += len(text)
        if self.emitted > MAX_CHARS:
            raise TemplateError(f"chat template: writes over {MAX_CHARS:,} characters")
        return text

    def finalize_text(self, value: Any) -> str:
        if size_of(value) > MAX_CHARS:
            raise TemplateError(f"chat template: a value over {MAX_CHARS:,} characters")
        return str(value)  # as jinja2 writes it: None as "None", undefined as ""

    def _concat(self, *parts: Any) -> str:
        if sum(size_of(p) for p in parts) > MAX_CHARS:
            raise TemplateError(f"chat template: '~' would make over {MAX_CHARS:,} characters")
        return _checked("".join(p if isinstance(p, str) else str(p) for p in parts))

    def _range(self, *args: Any) -> Iterator[int]:
        self.step()
        _check_int_arguments(args, {}, "range")
        numbers = range(*args)  # TypeError on non-integers, caught by render()
        if len(numbers) > MAX_RANGE:
            raise TemplateError(f"chat template: range of {len(numbers):,} items is over the {MAX_RANGE:,} limit")
        return self._loop(numbers)

    def _guarded(self, name: str, function: Any) -> Any:
        """A filter that costs a step, is refused when its arguments could make a value over the limits, and
        whose result is checked."""
        def guarded(*args: Any, **kwargs: Any) -> Any:
            self.step()
            values = [a for a in args if not isinstance(a, (jinja2.runtime.Context, jinja2.nodes.EvalContext,
                                                             jinja2.Environment))]
            if values:
                if name == "format" and isinstance(values[0], str):
                    _check_format(values[0], (*values[1:], *kwargs.values()))
                _check_estimate(values[0], values[1:], kwargs, f"filter {name}")
            return _checked(function(*args, **kwargs))

        for attribute in ("jinja_pass_arg",):  # pass_context/pass_environment must survive the wrapping
            if hasattr(function, attribute):
                setattr(guarded, attribute, getattr(function, attribute))
        return guarded


def _check_int_arguments(args: Any, kwargs: dict[str, Any], what: str) -> None:
    """No call gets an integer beyond the size limit (a width, a count, a repeat): refused before it runs."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CHARS:
            raise TemplateError(f"chat template: {what}() with {_number(value)} is over the {MAX_CHARS:,} limit")


def _check_estimate(receiver: Any, args: Any, kwargs: dict[str, Any], what: str) -> None:
    """Refuse a call whose result could exceed the limit: at most (size + 1) · (1 + sizes of its arguments)."""
    extra = 1
    for value in (*args, *kwargs.values()):
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            if abs(value) > MAX_CHARS:
                raise TemplateError(f"chat template: {what}({_number(value)}) is over the {MAX_CHARS:,} limit")
            extra += abs(value)
        elif isinstance(value, (str, list, tuple, dict)):
            extra += size_of(value)
    if (size_of(receiver) + 1) * extra > MAX_CHARS:
        raise TemplateError(f"chat template: {what} could make a value over {MAX_CHARS:,} characters")


def _number(value: int) -> str:
    return str(value) if value.bit_length() < 64 else f"an integer of {value.bit_length()} bits"


def _check_format(fmt: str, args: Any) -> None:
    """A width or precision in a format string (or taken from its arguments) must fit the limit."""
    if any(int(d) > MAX_CHARS for d in _DIGITS.findall(fmt) if len(d) > 6):
        raise TemplateError(f"chat template: a format width over the {MAX_CHARS:,} limit")
    flat = []
    for value in args:
        flat.extend(value if isinstance(value, (tuple, list)) else value.values() if isinstance(value, dict) else [value])
    if any(isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_CHARS for v in flat):
        raise TemplateError(f"chat template: a format argument over the {MAX_CHARS:,} limit")


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse, before it runs, an operator whose result would be over a limit."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if operator == "*":
        if is_int(left) and is_int(right):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise TemplateError(f"chat template: an integer over {MAX_INT_BITS} bits")
        elif is_int(left) or is_int(right):
            count, sequence = (left, right) if is_int(left) else (right, left)
            if count > 0 and size_of(sequence) * count > MAX_CHARS:
                raise TemplateError(f"chat template: '*' would make over {MAX_CHARS:,} characters")
    elif operator == "**" and is_int(left) and is_int(right) and right > 0 and abs(left) > 1:
        if left.bit_length() * right > MAX_INT_BITS:
            raise TemplateError(f"chat template: an integer over {MAX_INT_BITS} bits")
    elif operator == "+" and size_of(left) + size_of(right) > MAX_CHARS:
        raise TemplateError(f"chat template: '+' would make over {MAX_CHARS:,} characters")
    elif operator == "%" and isinstance(left, str):
        _check_format(left, (right,))


def _checked(value: Any) -> Any:
    """A value made by the template, refused when it is over a limit."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > MAX_INT_BITS:
            raise TemplateError(f"chat template: an integer over {MAX_INT_BITS} bits")
    elif isinstance(value, (str, list, tuple, dict, set)) and size_of(value) > MAX_CHARS:
        raise TemplateError(f"chat template: a value over {MAX_CHARS:,} characters")
    return value
