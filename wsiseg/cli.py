"""The ``wsiseg`` command line: a thin Click group.

Each command parses and validates its options and calls one library
function. User-facing errors (:class:`wsiseg.errors.WsisegError`) become one
line on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys

import click

from wsiseg import __version__
from wsiseg.errors import WsisegError


class _Group(click.Group):
    """Click group that turns WsisegError into a one-line message and exit 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except WsisegError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"wsiseg: error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("wsiseg: interrupted", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # last resort: never a bare traceback at 3 a.m.
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(
                f"wsiseg: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                err=True,
            )
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsiseg")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Segment whole-slide images fast by learning where to sample.

    Slides are opened lazily as pyramids; only the chunks that the sampling
    points touch are ever decoded. Run `wsiseg COMMAND --help` for details.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


# Commands are defined in their own modules and registered here.
# (registration block: keep one line per command)
