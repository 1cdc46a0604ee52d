"""The `olmoscope` command line: one group, one subcommand per job; errors become one line on stderr.

The commands' modules (numpy, the runtime, …) are imported when a command is looked up, inside the
handlers below, so that Ctrl-C at any point after start-up is one "interrupted" line, never a traceback.
"""

from __future__ import annotations

import os
import sys


def _interrupted_at_start_up(signum, frame) -> None:
    os.write(2, b"olmoscope: interrupted\n")
    os._exit(130)  # nothing has been done yet: nothing to clean up


import signal  # noqa: E402 - the handler is installed before anything slower is imported

# Until the group's own handlers run, Ctrl-C exits with one line (an import interrupted midway would
# otherwise print a traceback); restored at the end of this module.
_DEFAULT_INT_HANDLER = signal.getsignal(signal.SIGINT)
if _DEFAULT_INT_HANDLER is signal.default_int_handler:  # not when the parent asked us to ignore it
    signal.signal(signal.SIGINT, _interrupted_at_start_up)

import warnings  # noqa: E402

import click  # noqa: E402

from olmoscope import __version__  # noqa: E402
from olmoscope.display import one_line  # noqa: E402
from olmoscope.errors import OlmoscopeError  # noqa: E402

# name → (module, attribute): each command lives in the module of its concern; the CLI only gathers them.
COMMANDS = {
    "arch": ("olmoscope.arch", "arch_command"),
    "tensors": ("olmoscope.tensors", "tensors_command"),
    "make-tiny": ("olmoscope.tiny", "make_tiny_command"),
    "generate": ("olmoscope.generate", "generate_command"),
    "batch": ("olmoscope.batch", "batch_command"),
    "perplexity": ("olmoscope.perplexity", "perplexity_command"),
    "serve": ("olmoscope.serve", "serve_command"),
    "convert": ("olmoscope.convert", "convert_command"),
    "verify": ("olmoscope.verify", "verify_command"),
    "bench": ("olmoscope.bench", "bench_command"),
    "demo": ("olmoscope.demo", "demo_command"),
}


class _Group(click.Group):
    """Turns the project's own errors, and click's usage errors, into one line on stderr and a non-zero exit."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when the parent ignores SIGINT
            signal.signal(signal.SIGINT, _raise_interrupted)  # click's own code runs first: see _Interrupted
        try:
            _one_line_streams()
            with warnings.catch_warnings():
                warnings.showwarning = _one_line_warning
                result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `olmoscope`: the help is the answer
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        except click.UsageError as exc:  # bad option or argument: click would print a usage block
            where = exc.ctx.command_path if exc.ctx else "olmoscope"
            _fail(f"{exc.format_message()} (see '{where} --help')", exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except (click.Abort, KeyboardInterrupt, _Interrupted):
            _interrupted()
        except OlmoscopeError as exc:  # raised while a command was looked up (the lazy imports)
            _fail(str(exc), exc.exit_code)
        sys.exit(result if isinstance(result, int) else 0)  # --help and --version return their exit code

    def invoke(self, ctx: click.Context):
        ours = signal.getsignal(signal.SIGINT) is _raise_interrupted
        if ours:  # the commands' own code: Ctrl-C is KeyboardInterrupt again, which they clean up after
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return super().invoke(ctx)
        except OlmoscopeError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _interrupted()
        except BrokenPipeError:
            sys.exit(141)  # output piped into `head`: not an error worth a traceback
        except MemoryError as exc:  # the last line of defence: sizes are meant to be checked before allocating
            _fail(f"not enough memory ({str(exc) or 'MemoryError'})", 1)
        finally:  # back in click's code (unless an exit path has set SIGINT aside already)
            if ours and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                signal.signal(signal.SIGINT, _raise_interrupted)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in COMMANDS:
            import importlib

            module, attribute = COMMANDS[name]
            try:
                self.add_command(getattr(importlib.import_module(module), attribute), name)
            except KeyboardInterrupt:  # inside click's main, which would print a blank line before aborting
                _interrupted()
        return self.commands.get(name)


class _Interrupted(BaseException):
    """Ctrl-C while click's own code runs (parsing, making the context): not a KeyboardInterrupt, which click would
    catch to print a blank line before it aborts, so the user would see two lines."""


def _raise_interrupted(signum, frame) -> None:
    raise _Interrupted


def _fail(message: str, exit_code: int) -> None:
    """One line on stderr (control characters and undecodable bytes escaped: it stays one line) and exit."""
    click.echo(f"olmoscope: error: {one_line(message)}", err=True)
    sys.exit(exit_code)


def _interrupted() -> None:
    # A second Ctrl-C (or a SIGTERM) during the exit must not turn it into a traceback.
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    click.echo("olmoscope: interrupted", err=True)
    sys.exit(130)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library's warning as one `olmoscope: warning:` line, not Python's two-line format with source."""
    if issubclass(category, RuntimeWarning) and "encountered in" in str(message):
        return  # numpy's floating-point notices: NaN and overflow are handled where they matter, by name
    click.echo(f"olmoscope: warning: {one_line(str(message))[:300]}", err=True)


def _one_line_streams() -> None:
    """stdout and stderr never fail on text that is not UTF-8 (an argv or file name with a stray byte)."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="olmoscope")
def main() -> None:
    """Look inside AllenAI's OLMo 2 models and run them with olmoscope's own runtime."""


signal.signal(signal.SIGINT, _DEFAULT_INT_HANDLER)  # from here on, KeyboardInterrupt reaches the handlers above
