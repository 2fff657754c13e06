"""``wsiseg bench fuzz``: wsiseg's commands on mutated real slides, each outcome classified.

Every case of :mod:`wsiseg.bench.mutate` (a real slide with one kind of damage) is
written to a folder of its own and given to ``wsiseg info``; a case that
opens is also converted (``wsiseg convert``), and one case in every
``segment_every`` is segmented with the demo model (``wsiseg segment --model
demo``; :func:`segments`).
Each command runs in a process of its own under a hard time limit and a
memory limit, and ends as one of :data:`OUTCOMES`:

``ok``
    exit code 0.
``refused``
    a clean refusal: exit code 2 with exactly one stderr line starting
    ``wsiseg: error:`` and naming the slide, the last one; only wsiseg's own
    warnings about that slide (lines starting with its path, e.g. an
    implausible MPP ignored) may come before it. For ``segment``: exit
    code 1 with the slide ``failed`` in ``status.csv``, the error naming it.
``internal-error``
    ``internal error`` (exit code 1) or a Python traceback anywhere.
``crash``
    killed by a signal (a segfault, an abort in a C library).
``hang``
    still running at the time limit (killed).
``memory``
    ran out of its address-space limit (``MemoryError``, ``Unable to
    allocate``, ``std::bad_alloc``, ``Cannot allocate memory``).
``unclear``
    anything else (e.g. exit code 2 with two lines on stderr).

The last five are failures. Each command runs in a child process forked
from a *fork server* (:mod:`wsiseg.bench.forkserver`) that imported wsiseg
and its libraries once, under a hard time limit and an address-space limit,
through the entry point the caller names (``cli`` of :func:`run_fuzz`; the
CLI gives :func:`wsiseg.cli.app.run_cli`, which runs wsiseg's Click group
exactly as ``python -m wsiseg`` does, so that this package never imports the
CLI). A command thus costs milliseconds instead of a second of imports, and a
child that hangs, crashes or exhausts its memory takes nothing else down.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wsiseg.bench.forkserver import PRELOAD, ForkServer, Run
from wsiseg.bench.mutate import MUTATIONS, Source, find_sources, make_case, write_case

__all__ = [
    "COMMANDS",
    "FAILURES",
    "OUTCOMES",
    "CaseResult",
    "CommandResult",
    "FuzzReport",
    "classify",
    "format_fuzz_section",
    "run_fuzz",
    "segments",
]

OUTCOMES = ("ok", "refused", "internal-error", "crash", "hang", "memory", "unclear")
#: The outcomes that are bugs.
FAILURES = ("internal-error", "crash", "hang", "memory", "unclear")
COMMANDS = ("info", "convert", "segment")
# Python's own exceptions quoted in a refusal: a library (or wsiseg) failed on the damage, and the message
# names that failure instead of the damage. Clean refusals still; counted apart in the section.
_PYTHON_ERRORS = re.compile(
    r"\b(TypeError|ValueError|IndexError|KeyError|AttributeError|ZeroDivisionError|"
    r"OverflowError|AssertionError|RuntimeError|UnboundLocalError|NameError)\b"
)
_MEMORY_MARKERS = ("MemoryError", "Unable to allocate", "bad_alloc", "Cannot allocate memory", "out of memory")
# Modules the fork server imports too (after the module of run_fuzz's cli and PRELOAD) when cases are segmented.
_PRELOAD_SEGMENT = ("torch", "wsiseg.segment", "wsiseg.batch.runner", "wsiseg.models.io", "segmentation_models_pytorch")


# ---------------------------------------------------------------------------
# outcomes


def _status_error(out_dir: Path, slide: str) -> tuple[str, str] | None:
    """``(status, error)`` of the slide's row in ``out_dir/status.csv``, or None."""
    import csv

    try:
        with open(out_dir / "status.csv", newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row.get("slide") == slide:
                    return row.get("status") or "", row.get("error") or ""
    except (OSError, csv.Error):
        pass
    return None


def classify(run: Run, slide: str, command: str = "info", out_dir: Path | None = None) -> tuple[str, str]:
    """The outcome of one command on one slide and a one-line detail.

    Parameters
    ----------
    run : Run
    slide : str
        The path given to the command; a refusal must name it.
    command : {"info", "convert", "segment"}
    out_dir : Path, optional
        ``segment``'s output folder, whose ``status.csv`` says how the slide failed.

    Returns
    -------
    outcome, detail
        ``outcome`` is one of :data:`OUTCOMES`; ``detail`` the line that
        decided it (empty for ``ok``).
    """
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    status = _status_error(out_dir, slide) if command == "segment" and out_dir is not None else None
    texts = [run.stderr, run.stdout] + ([status[1]] if status else [])
    if run.timed_out:
        return "hang", f"still running after {run.seconds:.1f} s"
    if run.returncode < 0:
        try:
            name = signal.Signals(-run.returncode).name
        except ValueError:
            name = f"signal {-run.returncode}"
        return "crash", f"killed by {name}" + (f": {first}" if first else "")
    for text in texts:
        for marker in _MEMORY_MARKERS:
            if marker in text:
                return "memory", next(ln for ln in text.splitlines() if marker in ln).strip()
    for text in texts:
        if "Traceback (most recent call last)" in text or "internal error" in text:
            last = [ln for ln in text.splitlines() if ln.strip()]
            hit = next((ln for ln in last if "internal error" in ln), last[-1] if last else "")
            return "internal-error", hit.strip()
    if run.returncode == 0:
        return "ok", ""
    if run.returncode == 2 or command != "segment":
        errors = [ln for ln in lines if ln.startswith("wsiseg: error: ")]
        # wsiseg's own warnings about the slide (an implausible MPP ...) may come first; nothing else may
        if (
            run.returncode == 2
            and errors == lines[-1:]
            and slide in errors[0]
            and all(ln.startswith(f"{slide}: ") for ln in lines[:-1])
        ):
            return "refused", errors[0]
        return "unclear", f"exit code {run.returncode}, {len(lines)} stderr line(s): {' | '.join(lines)[:300]}"
    if status is None:
        return "unclear", f"exit code {run.returncode} and no status row for the slide"
    state, error = status
    if run.returncode == 1 and state == "failed" and slide in error:
        return "refused", error
    return "unclear", f"exit code {run.returncode}, status {state!r}: {error[:300]}"


# ---------------------------------------------------------------------------
# the campaign


def segments(index: int, every: int) -> bool:
    """Whether case ``index`` is segmented: case ``k * every + k % every`` of each block ``k`` of ``every`` cases.

    One case per block, at a position that moves by one from block to block,
    so the segmented cases take every source in turn (sources alternate by
    index, so a plain ``index % every == 0`` would always pick the same one
    when ``every`` is a multiple of their number).
    """
    block = index // every
    return index % every == block % every


@dataclass(frozen=True)
class CommandResult:
    """One command on one case."""

    command: str
    outcome: str
    detail: str
    seconds: float
    max_rss_mib: float
    returncode: int


@dataclass(frozen=True)
class CaseResult:
    """A case and what each command made of it."""

    index: int
    source: str
    kind: str
    description: str
    results: tuple[CommandResult, ...]

    @property
    def failed(self) -> bool:
        return any(r.outcome in FAILURES for r in self.results)

    def outcome(self, command: str) -> str | None:
        """The outcome of ``command`` on this case, or None when it did not run."""
        return next((r.outcome for r in self.results if r.command == command), None)


@dataclass
class FuzzReport:
    """Result of :func:`run_fuzz`."""

    seed: int
    first: int
    commands: tuple[str, ...]
    segment_every: int
    timeout: float
    memory_mib: int
    sources: tuple[str, ...]
    cases: list[CaseResult] = field(default_factory=list)
    seconds: float = 0.0
    machine: dict = field(default_factory=dict)

    def counts(self, command: str) -> Counter:
        """Outcome -> number of runs of ``command``."""
        return Counter(r.outcome for c in self.cases for r in c.results if r.command == command)

    def failures(self) -> list[CaseResult]:
        """The cases on which some command failed (an outcome of :data:`FAILURES`)."""
        return [c for c in self.cases if c.failed]

    def to_json(self) -> dict:
        """Everything, JSON-ready (``wsiseg bench fuzz --json``)."""
        return asdict(self)


def _run_case(
    server: ForkServer,
    cli: str,
    slide: str,
    folder: Path,
    convert: bool,
    segment: bool,
    timeout: float,
    memory: int,
) -> tuple[CommandResult, ...]:
    """``info`` on one written case, then ``convert`` (when asked and info opened it) and ``segment`` (when asked)."""
    results = []

    def run(command: str, argv: list[str], out_dir: Path | None = None) -> str:
        r = server.run(cli, [argv], cwd=folder, timeout=timeout, memory=memory)
        outcome, detail = classify(r, slide, command, out_dir)
        results.append(CommandResult(command, outcome, detail, r.seconds, r.max_rss_mib, r.returncode))
        return outcome

    opened = run("info", ["info", slide]) == "ok"
    if convert and opened:
        run("convert", ["convert", slide, str(folder / "out.zarr")])
    if segment:
        seg = folder / "segment"
        run(
            "segment",
            ["segment", slide, "--model", "demo", "--out", str(seg), "--progress", "none", "--device", "cpu"],
            seg,
        )
    return tuple(results)


def run_fuzz(
    sources: Sequence[Source] | str | os.PathLike,
    *,
    cases: int,
    cli: str,
    seed: int = 0,
    first: int = 0,
    workdir: str | os.PathLike | None = None,
    commands: Sequence[str] = COMMANDS,
    segment_every: int = 10,
    timeout: float = 120.0,
    memory_mib: int = 4096,
    keep: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> FuzzReport:
    """Run wsiseg's commands on cases ``first`` .. ``first + cases - 1`` of ``seed`` and classify each outcome.

    Parameters
    ----------
    sources : list of Source, or a folder
        The real slides to mutate (a folder is read with
        :func:`wsiseg.bench.mutate.find_sources`).
    cases : int
        How many cases.
    cli : str
        The entry point that runs one wsiseg command line in the process it
        is called in, given its argv, as ``"module:function"`` (``wsiseg bench
        fuzz`` gives ``"wsiseg.cli.app:run_cli"``); the fork server imports
        its module first.
    seed, first : int
        Which cases (:func:`wsiseg.bench.mutate.make_case`).
    workdir : path-like, optional
        Where each case's folder is written (and removed after it); a
        temporary folder by default.
    commands : sequence of {"info", "convert", "segment"}
        ``info`` runs on every case; ``convert`` on every case that ``info``
        opened; ``segment --model demo`` on one case in every
        ``segment_every`` (:func:`segments`), opened or not.
    segment_every : int
    timeout : float
        Seconds per command before it counts as a hang and is killed.
    memory_mib : int
        Address space (MiB) a command may add to what it inherits from the
        fork server.
    keep : path-like, optional
        Folder to which the folders of failed cases (the mutated slide and
        any output) are moved, for reproduction.
    log : callable, optional
        Receives progress lines and one line per failure.

    Returns
    -------
    FuzzReport
    """
    from wsiseg.bench.common import machine_info

    say = log or (lambda msg: None)
    if not isinstance(sources, (list, tuple)):
        sources = find_sources(sources)
    sources = list(sources)
    unknown = set(commands) - set(COMMANDS)
    if unknown or "info" not in commands:
        raise ValueError(f"commands must include info and be among {COMMANDS}, got {list(commands)}")
    report = FuzzReport(
        seed,
        first,
        tuple(commands),
        segment_every,
        timeout,
        memory_mib,
        tuple(s.name for s in sources),
        machine=machine_info(),
    )
    preload = (cli.partition(":")[0], *PRELOAD) + (_PRELOAD_SEGMENT if "segment" in commands else ())
    own_tmp = workdir is None
    root = Path(tempfile.mkdtemp(prefix="wsiseg-fuzz-")) if own_tmp else Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    memory = memory_mib * 2**20
    t0 = time.monotonic()
    server = ForkServer(preload)
    try:
        for index in range(first, first + cases):
            case = make_case(sources, seed, index)
            folder = root / case.label
            shutil.rmtree(folder, ignore_errors=True)
            slide = str(write_case(case, folder).resolve())
            segment = "segment" in commands and segments(index, segment_every)
            results = _run_case(server, cli, slide, folder, "convert" in commands, segment, timeout, memory)
            result = CaseResult(index, case.source.name, case.kind, case.description, results)
            report.cases.append(result)
            if result.failed:
                for r in result.results:
                    if r.outcome in FAILURES:
                        say(f"case {index} ({case.label}: {case.description}): {r.command}: {r.outcome}: {r.detail}")
                if keep is not None:
                    Path(keep).mkdir(parents=True, exist_ok=True)
                    target = Path(keep) / case.label
                    shutil.rmtree(target, ignore_errors=True)
                    shutil.move(str(folder), target)
            shutil.rmtree(folder, ignore_errors=True)
            done = index - first + 1
            if done % 50 == 0 or done == cases:
                say(f"{done}/{cases} cases, {len(report.failures())} failed, {time.monotonic() - t0:.0f} s")
    finally:
        server.close()
        if own_tmp:
            shutil.rmtree(root, ignore_errors=True)
    report.seconds = time.monotonic() - t0
    return report


# ---------------------------------------------------------------------------
# the section of docs/benchmarks.md


def _count_cells(counts: Counter) -> str:
    return " | ".join(str(counts.get(o, 0)) for o in OUTCOMES)


def _quoted_exceptions(runs: list[CommandResult]) -> str:
    """``"info: TypeError 12, ..."`` for the refusals that quote one of Python's exceptions, or ``"none"``."""
    found = Counter()
    for r in runs:
        m = _PYTHON_ERRORS.search(r.detail) if r.outcome == "refused" else None
        if m:
            found[r.command, m.group(1)] += 1
    return ", ".join(f"{cmd}: {name} {n}" for (cmd, name), n in sorted(found.items())) or "none"


def format_fuzz_section(report: FuzzReport, command: str) -> str:
    """Markdown for the ``fuzz`` section of docs/benchmarks.md."""
    from wsiseg.bench.common import machine_lines

    n = len(report.cases)
    last = report.first + n - 1
    fails = Counter(r.outcome for c in report.cases for r in c.results if r.outcome in FAILURES)
    verdict = ", ".join(f"{fails.get(o, 0)} {o}" for o in FAILURES)
    runs = [r for c in report.cases for r in c.results]
    lines = [
        "## Fuzzing: mutated real slides",
        "",
        f"- Command: `{command}`",
        *machine_lines(report.machine),
        f"- Cases {report.first} to {last} of seed {report.seed} ({n} mutated slides from "
        f"{', '.join(f'`{s}`' for s in report.sources)}; one kind of damage each, see `wsiseg/bench/mutate.py`). "
        "`wsiseg info` runs on every case, `convert` on every case that info opened"
        + (
            f", `segment --model demo --device cpu` on one case in every {report.segment_every} (case "
            f"`k * {report.segment_every} + k % {report.segment_every}` of block k)"
            if "segment" in report.commands
            else ""
        )
        + ".",
        f"- Each command runs in its own process forked from a server that imported wsiseg once; it is killed after "
        f"{report.timeout:g} s (a hang) and may map {report.memory_mib} MiB beyond what it inherits (a memory "
        "blowup). Refused = exit code 2 and exactly one stderr line `wsiseg: error: ...` naming the file "
        "(segment: the slide failed in status.csv with an error naming it).",
        f"- **Failures: {verdict}**; {len(runs)} commands in {report.seconds:.0f} s.",
        f"- Refusals quoting a Python exception raised on the damage (named by the exception rather than the "
        f"damage; by command and type): {_quoted_exceptions(runs)}.",
        "",
        f"| command | runs | {' | '.join(OUTCOMES)} | median s | max s | max RSS MiB |",
        "|---|---|" + "---|" * len(OUTCOMES) + "---|---|---|",
    ]
    for cmd in report.commands:
        rs = [r for r in runs if r.command == cmd]
        if not rs:
            continue
        secs = [r.seconds for r in rs]
        lines.append(
            f"| {cmd} | {len(rs)} | {_count_cells(report.counts(cmd))} | {statistics.median(secs):.3f} | "
            f"{max(secs):.2f} | {max(r.max_rss_mib for r in rs):.0f} |"
        )
    lines += [
        "",
        "Per mutation (outcome of `info`; failures count every command):",
        "",
        "| mutation | cases | info ok | info refused | failures |",
        "|---|---|---|---|---|",
    ]
    for kind in MUTATIONS:
        cs = [c for c in report.cases if c.kind == kind]
        if cs:
            info = Counter(c.outcome("info") for c in cs)
            failed = sum(1 for c in cs for r in c.results if r.outcome in FAILURES)
            lines.append(f"| {kind} | {len(cs)} | {info.get('ok', 0)} | {info.get('refused', 0)} | {failed} |")
    slow = sorted(((r, c) for c in report.cases for r in c.results), key=lambda rc: -rc[0].seconds)[:5]
    lines += [
        "",
        "Slowest commands:",
        "",
        "| case | source | mutation | command | s | outcome |",
        "|---|---|---|---|---|---|",
    ]
    for r, c in slow:
        lines.append(
            f"| {c.index} | `{c.source}` | {c.kind}: {c.description[:80]} | {r.command} | "
            f"{r.seconds:.2f} | {r.outcome} |"
        )
    failures = report.failures()
    if failures:
        lines += ["", "Failures (reproduce with `--first INDEX --cases 1 --keep DIR`):", ""]
        for c in failures[:20]:
            for r in c.results:
                if r.outcome in FAILURES:
                    lines.append(
                        f"- case {c.index} `{c.source}` {c.kind} ({c.description[:80]}): {r.command} "
                        f"{r.outcome}: {r.detail[:200]}"
                    )
    return "\n".join(lines)
