"""The `olmoscope` command line: one group, one subcommand per job; errors become one line on stderr."""

from __future__ import annotations

import sys

import click

from olmoscope import __version__
from olmoscope.errors import OlmoscopeError


class _Group(click.Group):
    """Turns the project's own errors into one line on stderr and a non-zero exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OlmoscopeError as exc:
            click.echo(f"olmoscope: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("olmoscope: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            sys.exit(141)  # output piped into `head`: not an error worth a traceback


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="olmoscope")
def main() -> None:
    """Look inside AllenAI's OLMo 2 models and run them with olmoscope's own runtime."""


def _register() -> None:
    # Each command lives in the module of its concern; the CLI only gathers them.
    from olmoscope.arch import arch_command
    from olmoscope.tensors import tensors_command
    from olmoscope.tiny import make_tiny_command
    from olmoscope.generate import generate_command
    from olmoscope.convert import convert_command
    from olmoscope.verify import verify_command
    from olmoscope.demo import demo_command

    for command in (arch_command, tensors_command, make_tiny_command, generate_command, convert_command, verify_command,
                    demo_command):
        main.add_command(command)


_register()
