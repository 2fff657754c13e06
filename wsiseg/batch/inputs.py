"""Batch inputs: files, folders, globs and CSV manifests -> slide jobs with unique output names.

Inputs (:func:`expand_inputs`)
------------------------------
Each input is, in this order of precedence:

* a ``.csv`` file: a **manifest**. Its header must have a ``path`` column;
  ``mpp`` (micrometres per level-0 pixel) and ``name`` (output stem) are
  optional; any other column is kept, as text, in :attr:`SlideJob.overrides`.
  Relative paths resolve against the manifest's folder. Every row is one
  slide and must exist; a bad row stops everything with an error naming the
  manifest and line (better than failing hours into a batch).
* an existing **file**: one slide, whatever its extension.
* an existing **directory** that is itself a slide: an OME-Zarr store (name
  ending ``.zarr`` or NGFF metadata inside) or a DICOM series folder (it holds
  ``.dcm`` files or files with the DICOM ``DICM`` magic, and no files with a
  slide extension).
* any other existing **directory**: scanned *one level deep* (not recursed,
  so an output folder or an MRXS data folder inside is never mistaken for
  slides) for files with a slide extension (:data:`SLIDE_EXTENSIONS`) and for
  slide directories (OME-Zarr, DICOM series). Loose ``.dcm`` files beside
  other slides count as one more slide, the directory itself. Hidden entries
  are ignored. For deeper trees use a glob such as ``'data/**/*.svs'``.
* a **glob** pattern (``*``, ``?``, ``[...]``; ``**`` recurses): every match
  is treated exactly as if it had been typed as an input, as a shell would
  expand it. ``**`` follows symlinked folders but enters each real folder
  once, so symlink loops (``a/up -> ..``) cannot make the expansion endless;
  symlinked slide files match like any file.

A DICOM instance file (``.dcm``) stands for its series folder, so the
several files of one slide become one job. Anything under ``exclude`` (the
output folder) is never taken from a directory scan or glob. Inputs that
match nothing are an error naming them; the same slide reached twice (same
real path) is kept once. Output names (:attr:`SlideJob.name`) are the file
stem (``.ome.tiff`` and ``.zarr`` stripped); stems that collide (two
``slide.svs`` in different folders, compared case-insensitively) get the
shortest run of parent folder names that tells them apart
(``site-a_slide``), then the extension (``slide_svs`` beside
``slide_tiff``), deterministically. Names therefore depend on which slides
are in the batch; give a ``name`` column in a manifest to pin them.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import hashlib
import io
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from wsiseg.batch.jobs import RESERVED_NAMES, SlideJob, name_problem
from wsiseg.errors import WsisegError
from wsiseg.limits import mpp_problem
from wsiseg.slide.open import has_dicom_magic

__all__ = ["SLIDE_EXTENSIONS", "expand_inputs"]

#: File extensions taken as slides when a directory is scanned (lower case).
SLIDE_EXTENSIONS = frozenset(
    {".svs", ".tif", ".tiff", ".btf", ".tf8", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide"}
)
_ZARR_META = (".zattrs", ".zgroup", "zarr.json")
_DICOM_MAGIC_PROBE = 20  # files checked for the DICM magic when none ends in .dcm


def _is_zarr_dir(p: Path) -> bool:
    return p.suffix.lower() == ".zarr" or any((p / m).exists() for m in _ZARR_META)


def _dicom_files(p: Path) -> bool:
    """True when a folder holds DICOM instances (``*.dcm`` or the ``DICM`` magic)."""
    try:
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    except OSError:
        return False
    if any(f.suffix.lower() == ".dcm" for f in files):
        return True
    # DICOM files often have no extension
    return any(has_dicom_magic(f) for f in files[:_DICOM_MAGIC_PROBE])


def _has_slide_files(p: Path) -> bool:
    try:
        return any(f.suffix.lower() in SLIDE_EXTENSIONS for f in p.iterdir())
    except OSError:
        return False


def _is_dicom_dir(p: Path) -> bool:
    """A DICOM series folder: DICOM files and no other slide files (those win)."""
    return _dicom_files(p) and not _has_slide_files(p)


def _is_slide_dir(p: Path) -> bool:
    return _is_zarr_dir(p) or _is_dicom_dir(p)


def _slide_path(p: Path) -> Path:
    """The slide a path stands for: a DICOM instance stands for its series folder."""
    if p.is_file() and p.suffix.lower() == ".dcm":
        return p.parent
    return p


def _scan_dir(d: Path) -> list[Path]:
    """Slide-like entries of a plain directory, one level deep, sorted.

    Loose DICOM files beside other slides form one more slide: the folder.
    """
    try:
        entries = sorted(d.iterdir())
    except OSError as exc:
        raise WsisegError(f"cannot list directory: {exc.strerror or exc}", d) from exc
    found: list[Path] = []
    for e in entries:
        if e.name.startswith("."):
            continue
        if e.is_dir():
            if _is_slide_dir(e):
                found.append(e)
        elif e.suffix.lower() in SLIDE_EXTENSIONS:
            found.append(e)
    if found and any(e.suffix.lower() == ".dcm" and e.is_file() for e in entries):
        found.append(d)
    return found


def _walk_once(top: str) -> Iterator[tuple[str, list[str]]]:
    """``top`` and every folder below it, each *real* folder once, with its other entries.

    Hidden entries are skipped, as ``**`` skips them. Symlinked folders are
    entered (data is often linked in from other disks) but a folder already
    visited under another path is not: a symlink loop (``a/up -> ..``)
    would otherwise be followed until paths grow too long, and two such
    links make ``glob.glob`` take forever.

    Yields
    ------
    (folder, entries)
        Sorted paths of the folder's non-folder entries (files, symlinks to
        files, broken symlinks).
    """
    seen: set[str] = set()
    stack = [top]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder or ".")
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder or "."), key=lambda e: e.name)
        except OSError:
            continue  # unreadable folders are skipped, as glob.glob skips them
        folders, others = [], []
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_dir = e.is_dir()  # follows symlinks
            except OSError:  # e.g. a symlink to itself (ELOOP)
                is_dir = False
            (folders if is_dir else others).append(os.path.join(folder, e.name))
        yield folder, others
        stack.extend(reversed(folders))


def _glob_parts(base: str, parts: list[str]) -> Iterator[str]:
    """Paths under ``base`` matching the pattern components ``parts`` (see :func:`_glob`)."""
    if not parts:
        yield base
        return
    part, rest = parts[0], parts[1:]
    if part == "**":
        for folder, others in _walk_once(base):
            if rest:
                yield from _glob_parts(folder, rest)
            else:  # a trailing ** matches every folder and file below
                yield folder
                yield from others
    elif part == "":  # 'a//b' or a trailing '/': folders only
        if os.path.isdir(base or "."):
            yield from _glob_parts(base, rest)
    elif glob.has_magic(part):
        try:
            names = os.listdir(base or ".")
        except OSError:
            return
        if not part.startswith("."):
            names = [n for n in names if not n.startswith(".")]
        for name in sorted(fnmatch.filter(names, part)):
            path = os.path.join(base, name)
            if not rest:
                yield path
            elif os.path.isdir(path):
                yield from _glob_parts(path, rest)
    else:
        path = os.path.join(base, part)
        if not rest:
            if os.path.lexists(path):
                yield path
        elif os.path.isdir(path):
            yield from _glob_parts(path, rest)


def _glob(pattern: str) -> list[str]:
    """Sorted matches of a glob pattern, like ``glob.glob(pattern, recursive=True)``.

    The difference: ``**`` enters each real folder once (:func:`_walk_once`),
    so symlink loops cannot make the expansion endless. Symlinked slide files
    and symlinked folders outside the loop are matched as before.
    """
    parts = pattern.split("/")
    base = "/" if parts[0] == "" and len(parts) > 1 else ""
    if base:
        parts = parts[1:]
    return sorted(dict.fromkeys(_glob_parts(base, parts)))


def _under(p: Path, roots: Sequence[Path]) -> bool:
    rp = Path(os.path.realpath(p))
    return any(rp == r or r in rp.parents for r in roots)


def _expand_path(p: Path, roots: Sequence[Path], *, explicit: bool) -> list[Path]:
    """Slides an existing path stands for (explicit: typed by the user, not a glob match)."""
    if not explicit and _under(p, roots):
        return []
    if p.is_dir():
        if _is_slide_dir(p):
            return [p]
        return [s for s in _scan_dir(p) if not _under(s, roots)]
    if not explicit and p.name.startswith("."):
        return []
    return [_slide_path(p)]


def _strip_ext(name: str, is_dir: bool) -> str:
    base, ext = os.path.splitext(name)
    if ext.lower() in SLIDE_EXTENSIONS or ext.lower() in (".zarr", ".dcm") or (not is_dir and ext):
        name = base
        if name.lower().endswith(".ome"):
            name = name[:-4]
    return name


def _sanitise(text: str) -> str:
    # Keep names portable: characters that are awkward in file names become '_'.
    return re.sub(r"[^\w.+-]", "_", text).lstrip(".")


def _auto_stem(path: str, *, with_ext: bool = False) -> str:
    p = Path(path)
    stem = _strip_ext(p.name, p.is_dir())
    if with_ext and stem != p.name:  # 'slide.svs' -> 'slide_svs', for slide.svs beside slide.tiff
        stem = f"{stem}_{p.name[len(stem) :].lstrip('.').replace('.', '_')}"
    return _sanitise(stem) or "slide"


def _parent_names(path: str) -> list[str]:
    """Parent folder names, nearest first, sanitised like stems."""
    return [_sanitise(part) or "_" for part in reversed(Path(path).parent.parts[1:])]


def _candidate(path: str, depth: int, with_ext: bool) -> str:
    parents = list(reversed(_parent_names(path)[:depth]))
    return "_".join([*parents, _auto_stem(path, with_ext=with_ext)])


def _assign_names(paths: list[str], explicit: list[str | None]) -> list[str]:
    """Unique output stems: explicit names kept, colliding stems prefixed by parent folders.

    Colliding stems try, in order: 1, 2, ... nearest parent folders; then the
    extension kept (``slide_svs``) with 0, 1, ... parents; then a short hash
    of the path. The first rule that makes the whole group unique wins, so the
    result depends only on the set of paths.
    """
    names: list[str | None] = list(explicit)
    taken = {n.casefold() for n in explicit if n} | set(RESERVED_NAMES)
    groups: dict[str, list[int]] = {}
    for i, (p, n) in enumerate(zip(paths, explicit)):
        if n is None:
            groups.setdefault(_auto_stem(p).casefold(), []).append(i)
    # Unique stems first, so that a plain stem is never displaced by a
    # disambiguated one from another group.
    for key, idx in sorted(groups.items()):
        if len(idx) == 1 and key not in taken:
            names[idx[0]] = _auto_stem(paths[idx[0]])
            taken.add(key)
    for _key, idx in sorted(groups.items()):
        if names[idx[0]] is not None:
            continue
        idx = sorted(idx, key=lambda i: paths[i])
        depth = max(len(_parent_names(paths[i])) for i in idx)
        rules = [(k, False) for k in range(1, depth + 1)] + [(k, True) for k in range(depth + 1)]
        chosen = None
        for k, with_ext in rules:
            cand = [_candidate(paths[i], k, with_ext) for i in idx]
            folded = {c.casefold() for c in cand}
            if len(folded) == len(cand) and not (folded & taken):
                chosen = cand
                break
        if chosen is None:  # e.g. 'a.b.svs' vs 'a_b.svs' in one folder
            chosen = [f"{_auto_stem(paths[i])}-{hashlib.sha256(paths[i].encode()).hexdigest()[:8]}" for i in idx]
        for i, c in zip(idx, chosen):
            names[i] = c
            taken.add(c.casefold())
    return [n for n in names if n is not None]


def _read_manifest(csv_path: Path) -> list[tuple[str, str | None, dict[str, Any]]]:
    """Rows of a manifest as ``(absolute path, name or None, overrides)``."""

    def bad(line: int | None, msg: str) -> WsisegError:
        return WsisegError(f"line {line}: {msg}" if line else msg, csv_path)

    try:
        # utf-8-sig: Excel writes a byte-order mark. newline="": quoted cells may hold newlines.
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise bad(None, f"cannot read manifest: {getattr(exc, 'strerror', None) or exc}") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: list[tuple[str, str | None, dict[str, Any]]] = []
    try:
        for cells in reader:
            line = reader.line_num
            if not any(c.strip() for c in cells) or cells[0].lstrip().startswith("#"):
                continue  # blank lines and comments
            if header is None:
                header = [c.strip().lower() for c in cells]
                if "path" not in header:
                    raise bad(line, f"manifest header has no 'path' column (found: {', '.join(header) or 'nothing'})")
                dup = sorted({h for h in header if header.count(h) > 1 and h})
                if dup:
                    raise bad(line, f"manifest header repeats column(s) {', '.join(dup)}")
                continue
            if len(cells) > len(header):
                raise bad(line, f"{len(cells)} cells but the header has {len(header)} columns")
            row = {h: c.strip() for h, c in zip(header, cells) if h}
            raw = row.pop("path", "")
            if not raw:
                raise bad(line, "empty 'path'")
            p = Path(os.path.expanduser(raw))
            if not p.is_absolute():
                p = csv_path.parent / p
            if not p.exists():
                raise bad(line, f"slide not found: {p}")
            name = row.pop("name", "") or None
            if name is not None and name_problem(name):
                raise bad(line, name_problem(name) or "")
            overrides: dict[str, Any] = {}
            mpp = row.pop("mpp", "")
            if mpp:
                problem = mpp_problem(mpp)
                if problem:
                    raise bad(line, problem)
                overrides["mpp"] = float(mpp)
            overrides.update({k: v for k, v in row.items() if v})
            rows.append((os.path.abspath(_slide_path(p)), name, overrides))
    except csv.Error as exc:
        raise bad(reader.line_num, f"malformed CSV ({exc})") from exc
    if header is None:
        raise bad(None, "manifest is empty (a header with a 'path' column is required)")
    if not rows:
        raise bad(None, "manifest lists no slides")
    return rows


def expand_inputs(inputs: Sequence[str | os.PathLike], *, exclude: Sequence[str | os.PathLike] = ()) -> list[SlideJob]:
    """Turn files, directories, globs and CSV manifests into slide jobs.

    See the module docstring for the rules.

    Parameters
    ----------
    inputs : sequence of str or path-like
        As typed on the command line.
    exclude : sequence of path-like
        Folders (typically the output folder) whose contents are never taken
        from a directory scan or glob.

    Returns
    -------
    list of SlideJob
        In input order (sorted within a directory or glob), duplicates removed,
        with unique output names.

    Raises
    ------
    WsisegError
        No inputs; an input that does not exist, a glob or directory that
        matches no slide; a bad manifest (file and line named); the same slide
        given twice with different overrides; a manifest name used twice.
    """
    if not inputs:
        raise WsisegError("no slides given")
    roots = [Path(os.path.realpath(os.path.expanduser(os.fspath(e)))) for e in exclude]
    entries: list[tuple[str, str | None, dict[str, Any], str]] = []  # path, name, overrides, origin
    for item in inputs:
        text = os.path.expanduser(os.fspath(item))
        p = Path(text)
        if p.suffix.lower() == ".csv" and p.is_file():
            entries.extend((path, name, ov, f"{p}") for path, name, ov in _read_manifest(p))
            continue
        if p.exists():
            found = _expand_path(p, roots, explicit=True)
            if not found:
                raise WsisegError(
                    "no slides found in directory (looked for slide files "
                    f"{', '.join(sorted(SLIDE_EXTENSIONS))}, OME-Zarr and DICOM folders, one level deep)",
                    p,
                )
        elif glob.has_magic(text):
            matches = _glob(text)
            found = []
            for m in matches:
                found.extend(_expand_path(Path(m), roots, explicit=False))
            if not found:
                raise WsisegError("pattern matches no slide" if matches else "pattern matches nothing", text)
        else:
            raise WsisegError("no such file or directory", text)
        entries.extend((os.path.abspath(f), None, {}, text) for f in found)

    # The same slide twice: one without settings (a directory scan) defers
    # to one with settings (a manifest row), in either order; two different
    # settings are ambiguous.
    seen: dict[str, int] = {}
    unique: list[tuple[str, str | None, dict[str, Any], str]] = []
    for entry in entries:
        path, name, ov, origin = entry
        key = os.path.realpath(path)
        if key not in seen:
            seen[key] = len(unique)
            unique.append(entry)
            continue
        kept = unique[seen[key]]
        if (kept[1], kept[2]) == (name, ov) or not (name or ov):
            continue
        if not (kept[1] or kept[2]):
            unique[seen[key]] = (kept[0], name, ov, origin)
            continue
        raise WsisegError(f"slide given twice with different settings (from {kept[3]} and from {origin})", path)

    explicit = [u[1] for u in unique]
    folded = [n.casefold() for n in explicit if n]
    dup = sorted({n for n in folded if folded.count(n) > 1})
    if dup:
        raise WsisegError(f"output name(s) used for more than one slide: {', '.join(dup)}")
    if set(folded) & RESERVED_NAMES:
        raise WsisegError(f"output name(s) reserved for wsiseg's own files: {', '.join(sorted(RESERVED_NAMES))}")
    names = _assign_names([u[0] for u in unique], explicit)
    return [SlideJob(path=u[0], name=n, overrides=dict(u[2])) for u, n in zip(unique, names)]
