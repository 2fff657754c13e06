"""``wsiseg bench memory``: peak memory of ``wsiseg segment`` against slide area.

Each size is a synthetic JPEG pyramid (:func:`wsiseg.bench.common.cached_synthetic_slide`) segmented in a
fresh process by :func:`wsiseg.bench.segment.measure`. Moved out of :mod:`wsiseg.bench.segment`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from wsiseg.bench.common import SlideSpec, cached_synthetic_slide, machine_info, machine_lines
from wsiseg.bench.segment import TARGET_RSS_MB, Measurement, mark, measure, tiny_model

#: Issue 12: what ``segment`` itself may add to the imports and the model (peak RSS minus *before*).
TARGET_OVER_IMPORTS_MB = 400

__all__ = [
    "MemoryBench",
    "MemoryRun",
    "bench_memory",
    "format_memory_section",
]


@dataclass(frozen=True)
class MemoryRun:
    """One slide size: how it was built and what segmenting it took."""

    spec: SlideSpec
    write_seconds: float | None
    reused: bool
    file_bytes: int
    run: Measurement


@dataclass(frozen=True)
class MemoryBench:
    """Result of :func:`bench_memory`."""

    model: str
    untrained: bool
    runs: tuple[MemoryRun, ...]
    skipped: tuple[str, ...]
    disk_free_gib: float
    machine: dict = field(default_factory=dict)


def _disk_free(path: Path) -> float:
    return shutil.disk_usage(path).free / 2**30


def bench_memory(
    sizes: list[tuple[int, int]],
    source: Path,
    workdir: str | os.PathLike,
    *,
    tile: int = 256,
    model: str | os.PathLike | None = None,
    log=None,
) -> MemoryBench:
    """Peak memory of ``segment_slide`` (deformed) on synthetic slides of growing size.

    A size whose slide would not fit in ``workdir``'s free disk space (with
    a margin: the JPEG pyramid takes about 0.36 bytes per level-0 pixel) is
    skipped and reported.
    """
    say = log or (lambda msg: None)
    machine = machine_info()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    untrained = model is None
    model_path = Path(model) if model else tiny_model(workdir)
    runs, skipped = [], []
    for w, h in sizes:
        spec = SlideSpec(w, h, source, tile)
        need = 0.5 * w * h / 2**30  # GiB, generous
        if not (workdir / spec.cache_name()).is_file() and need > 0.8 * _disk_free(workdir):
            skipped.append(f"{w}x{h} (needs ~{need:.0f} GiB, {_disk_free(workdir):.0f} GiB free)")
            say(f"  skipped {skipped[-1]}")
            continue
        path, write_s, reused = cached_synthetic_slide(spec, workdir)
        say(f"synthetic slide {w}x{h}: {'reused' if reused else f'written in {write_s:.1f} s'}")
        m = measure(path, model_path, workdir)
        say(f"  peak RSS {m.peak_rss_mb:.0f} MiB (before segment_slide {m.rss_before_mb:.0f}), total {m.total:.1f} s")
        runs.append(MemoryRun(spec, write_s, reused, path.stat().st_size, m))
    return MemoryBench(model_path.name, untrained, tuple(runs), tuple(skipped), _disk_free(workdir), machine)


def format_memory_section(b: MemoryBench, command: str) -> str:
    """Markdown for the ``memory`` section of docs/benchmarks.md."""
    lines = [
        "## Peak memory of wsiseg segment against slide area",
        "",
        f"- Command: `{command}`",
        *machine_lines(b.machine),
        f"- Model: `{b.model}`"
        + (
            " (untrained tiny test net, fixed seed: labels change at almost every grid node, "
            "the tile writer's worst case)."
            if b.untrained
            else "."
        ),
        "- Each size: a synthetic JPEG pyramid (tiles 256, q90, mirror-tiled from the same H&E region) segmented in "
        "deformed mode with every output, in a fresh process; peak RSS = `VmHWM` of that process (imports, "
        "model and the whole run). *Before* = the same just before `segment_slide` (imports and model).",
        "",
        "| slide | Gpx | slide written in s | file MiB | regions | samples | peak RSS MiB | before MiB | "
        "peak - before MiB | total s | stages s (open, regions, sample+segment, mask, geojson, qc) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in b.runs:
        s, m = r.spec, r.run
        built = "?" if r.write_seconds is None else f"{r.write_seconds:.0f}" + (" (cached)" if r.reused else "")
        samples = sum(g["grid"][0] * g["grid"][1] for g in m.report["gather"].get("regions", ()))
        stages = ", ".join(
            f"{m.timings[k]:.1f}" for k in ("open", "regions", "sample+segment", "mask", "geojson", "qc")
        )
        lines.append(
            f"| {s.width} x {s.height} | {s.width * s.height / 1e9:.2f} | {built} | {r.file_bytes / 2**20:.0f} | "
            f"{len(m.report['regions'])} | {samples} | **{m.peak_rss_mb:.0f}** | {m.rss_before_mb:.0f} | "
            f"{m.peak_rss_mb - m.rss_before_mb:.0f} | {m.total:.1f} | {stages} |"
        )
    if b.skipped:
        lines.append("")
        lines.append(f"- Skipped for disk space ({b.disk_free_gib:.0f} GiB free): " + ", ".join(b.skipped) + ".")
    if b.runs:
        peaks = [r.run.peak_rss_mb for r in b.runs]
        over = [r.run.peak_rss_mb - r.run.rss_before_mb for r in b.runs]
        first, last = b.runs[0].spec, b.runs[-1].spec
        lines += [
            "",
            f"- Issue target: peak RSS <= 1.5 GiB, flat in slide area: largest peak {max(peaks):.0f} MiB "
            f"({mark(max(peaks) <= TARGET_RSS_MB)}); spread over a "
            f"{last.width * last.height / (first.width * first.height):.0f}x "
            f"range of areas: {max(peaks) - min(peaks):.0f} MiB.",
            f"- Issue 12 target: peak RSS minus the imports and model (*before*) <= {TARGET_OVER_IMPORTS_MB} MiB, "
            f"flat in slide area: largest {max(over):.0f} MiB ({mark(max(over) <= TARGET_OVER_IMPORTS_MB)}); "
            f"spread {max(over) - min(over):.0f} MiB.",
        ]
    return "\n".join(lines)
