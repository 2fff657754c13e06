"""The ``wsiseg`` command line: a thin Click group.

Each command parses and validates its options and calls one library
function. User-facing errors (:class:`wsiseg.errors.WsisegError`) become one
line on stderr and exit code 2; ``--debug`` shows the traceback instead.
Other libraries' log records and Python warnings go to the log, reaching
stderr only with ``--debug``; wsiseg's own warnings are printed as lines.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import click

from wsiseg import __version__
from wsiseg.cli.bench import bench_group
from wsiseg.cli.evaluate import evaluate_command
from wsiseg.cli.segment import demo_command, segment_command
from wsiseg.cli.slides import convert_command, info_command
from wsiseg.cli.train import train_command
from wsiseg.errors import WsisegError

__all__ = [
    "main",
    "run_cli",
]


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


class _StderrLog(logging.Handler):
    """wsiseg's own warnings as bare lines on the current ``sys.stderr``; other libraries' only with --debug.

    OpenSlide, tifffile, shapely and Python warnings (``warnings.warn``,
    captured into logging) report things wsiseg handles itself: on a good
    run they are noise, and on a bad input wsiseg says what failed in its
    own one line, so they reach stderr only with ``--debug``.
    """

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.debug = False
        self.setFormatter(logging.Formatter("%(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == "wsiseg" or record.name.startswith("wsiseg.")
        # a library's error (tifffile on a corrupt file) is followed by wsiseg's own one-line error
        return self.debug or (ours and record.levelno >= logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")  # looked up now: click's test runner swaps it
        except Exception:
            self.handleError(record)


_LOG = _StderrLog()


def _route_logs(debug: bool) -> None:
    root = logging.getLogger()
    if _LOG not in root.handlers:
        root.addHandler(_LOG)
    _LOG.debug = debug
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.captureWarnings(True)


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
    _route_logs(debug)


# Commands are defined in their own modules and registered here.
# (registration block: keep one line per command)
main.add_command(info_command)
main.add_command(convert_command)
main.add_command(bench_group)
main.add_command(segment_command)
main.add_command(train_command)
main.add_command(demo_command)
main.add_command(evaluate_command)


@main.command("run")
@click.argument("pipeline_path", metavar="PIPELINE", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a key of the pipeline (repeatable; YAML values, e.g. --set qc=false).",
)
@click.option("--dry-run", is_flag=True, help="Validate and print the equivalent command; run nothing.")
@click.pass_context
def run_command(ctx, pipeline_path, overrides, dry_run) -> None:
    """Run the job defined in PIPELINE (a versioned YAML file, see pipelines/).

    The file names a job (segment, train, evaluate, bench) and its options
    as the command line spells them; it is validated first (one-line errors
    naming the file and key), then run exactly as the equivalent wsiseg
    command, which is printed. The exit code is the job's.
    """
    from wsiseg.errors import ConfigError
    from wsiseg.cli.pipeline import load_pipeline, parse_overrides

    pipe = load_pipeline(pipeline_path, parse_overrides(overrides))
    click.echo(f"{pipeline_path}: {pipe.command_line()}", err=True)
    if dry_run:
        return
    argv = (["--debug"] if ctx.obj and ctx.obj.get("debug") else []) + pipe.argv()
    try:
        code = main.main(args=argv, prog_name="wsiseg", standalone_mode=False)
    except click.ClickException as exc:  # e.g. a path that does not exist
        raise ConfigError(exc.format_message(), pipeline_path) from None
    ctx.exit(code if isinstance(code, int) else 0)


def run_cli(argv: Sequence[str]) -> None:
    """Run a wsiseg command line in this process, as ``python -m wsiseg ARGV...`` would (ends in SystemExit).

    The entry point that ``wsiseg bench fuzz`` gives its fork server
    (``"wsiseg.cli.app:run_cli"``, :func:`wsiseg.bench.fuzz.run_fuzz`).
    """
    sys.argv = ["wsiseg", *argv]
    main.main(args=list(argv), prog_name="wsiseg")
