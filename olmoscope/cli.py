"""The `olmoscope` command line: one group, one subcommand per job; errors become one line on stderr."""

from __future__ import annotations

import sys

import click

from olmoscope import __version__
from olmoscope.errors import OlmoscopeError


class _Group(click.Group):
    """Turns the project's own errors, and click's usage errors, into one line on stderr and a non-zero exit."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # bare `olmoscope`: the help is the answer
            click.echo(exc.ctx.get_help())
            sys.exit(0)
        except click.UsageError as exc:  # bad option or argument: click would print a usage block
            where = exc.ctx.command_path if exc.ctx else "olmoscope"
            click.echo(f"olmoscope: error: {exc.format_message()} (see '{where} --help')", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"olmoscope: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("olmoscope: interrupted", err=True)
            sys.exit(130)
        sys.exit(result if isinstance(result, int) else 0)  # --help and --version return their exit code

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
    from olmoscope.bench import bench_command
    from olmoscope.demo import demo_command
    from olmoscope.batch import batch_command
    from olmoscope.serve import serve_command

    for command in (arch_command, tensors_command, make_tiny_command, generate_command, batch_command, serve_command,
                    convert_command, verify_command, bench_command, demo_command):
        main.add_command(command)


_register()
