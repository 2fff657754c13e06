"""Mutated copies of real slides, deterministic from a seed, for ``wsiseg bench fuzz``.

A *case* is one real slide file (or DICOM series folder) with one kind of
damage: bit flips in the header and directory bytes or anywhere, truncation,
zeroed ranges, duplicated chunks, and, for TIFFs, targeted damage to the
image file directories (IFDs): swapped tile offsets, hostile tag values,
huge image and tile sizes, wrong tag types and counts, wrong entry counts,
next-IFD offsets pointing anywhere, and loops in the IFD chain. Case ``i``
of seed ``s`` is always the same bytes (:func:`make_case`), so a failure
found by a long run is reproduced by its seed and index alone.

The TIFF structure is read here by a small parser of its own
(:func:`parse_tiff`, classic TIFF and BigTIFF, either byte order) that
records where each IFD, entry and value lies in the file; it never trusts
what it reads further than the file's bytes and stops at the first loop.

It stays one module (some 630 lines): the TIFF map exists only to aim the
damage, and the mutations, sources and cases make one deterministic
generator of cases.
"""

from __future__ import annotations

import random
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MUTATIONS",
    "Case",
    "Source",
    "TiffEntry",
    "TiffIfd",
    "TiffMap",
    "find_sources",
    "make_case",
    "parse_tiff",
    "write_case",
]

_TIFF_MAGICS = {b"II*\x00": ("<", False), b"MM\x00*": (">", False), b"II+\x00": ("<", True), b"MM\x00+": (">", True)}
#: Bytes per value of each TIFF field type (BYTE, ASCII, SHORT, LONG, RATIONAL, ..., LONG8, SLONG8, IFD8).
TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
_INT_FORMATS = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I", 16: "Q", 17: "q", 18: "Q"}
_MAX_IFDS = 10_000
# Tags whose values size the image (width, length, bits, samples, rows per strip, tile width and length).
_SIZE_TAGS = {
    256: "ImageWidth",
    257: "ImageLength",
    258: "BitsPerSample",
    277: "SamplesPerPixel",
    278: "RowsPerStrip",
    322: "TileWidth",
    323: "TileLength",
}
# Offsets and byte counts of strips and tiles: (offsets tag, byte counts tag).
_DATA_TAGS = ((324, 325), (273, 279))


# ---------------------------------------------------------------------------
# where things are in a TIFF


@dataclass(frozen=True)
class TiffEntry:
    """One IFD entry and where its parts lie in the file.

    Attributes
    ----------
    ifd : int
        Index of its IFD in the chain.
    tag, type, count : int
        As the file says.
    pos : int
        Byte offset of the entry (tag, type, count, value field).
    value_pos : int
        Byte offset of the values: inside the entry when they fit there,
        else where the entry's offset points (which may lie past the end).
    """

    ifd: int
    tag: int
    type: int
    count: int
    pos: int
    value_pos: int

    @property
    def itemsize(self) -> int:
        """Bytes per value (1 for unknown types)."""
        return TYPE_SIZES.get(self.type, 1)


@dataclass(frozen=True)
class TiffIfd:
    """One image file directory: its offset, entries and next-IFD field."""

    index: int
    offset: int
    entries: tuple[TiffEntry, ...]
    next_pos: int  # byte offset of the next-IFD offset field


@dataclass(frozen=True)
class TiffMap:
    """The structure of a TIFF file as :func:`parse_tiff` found it."""

    order: str  # "<" or ">"
    big: bool
    size: int
    ifds: tuple[TiffIfd, ...]

    @property
    def offset_size(self) -> int:
        return 8 if self.big else 4

    @property
    def count_size(self) -> int:
        return 8 if self.big else 2

    @property
    def first_pos(self) -> int:
        """Byte offset of the header's first-IFD offset."""
        return 8 if self.big else 4

    def entries(self) -> list[TiffEntry]:
        """Every entry of every IFD, in file order of the chain."""
        return [e for ifd in self.ifds for e in ifd.entries]

    def structure_ranges(self) -> list[tuple[int, int]]:
        """``(start, stop)`` byte ranges of the header, each IFD and each entry's out-of-line values (64 B at most)."""
        ranges = [(0, self.first_pos + self.offset_size)]
        for ifd in self.ifds:
            ranges.append((ifd.offset, ifd.next_pos + self.offset_size))
            for e in ifd.entries:
                n = e.count * e.itemsize
                if n > self.offset_size:
                    ranges.append((e.value_pos, e.value_pos + min(n, 64)))
        return [(a, min(b, self.size)) for a, b in ranges if a < min(b, self.size)]


def parse_tiff(data: bytes) -> TiffMap | None:
    """Where the IFDs, entries and values of a TIFF lie, or None when ``data`` is not a TIFF.

    Parameters
    ----------
    data : bytes
        The whole file.

    Returns
    -------
    TiffMap or None
        The IFDs of the chain up to its end, the first offset past the end of
        the file, the first one already visited (a loop) or the 10,000th.
    """
    head = _TIFF_MAGICS.get(bytes(data[:4]))
    if head is None:
        return None
    order, big = head
    osize, ofmt = (8, order + "Q") if big else (4, order + "I")
    cfmt, csize, esize = (order + "Q", 8, 20) if big else (order + "H", 2, 12)
    first = 8 if big else 4
    if len(data) < first + osize:
        return None
    (offset,) = struct.unpack_from(ofmt, data, first)
    ifds: list[TiffIfd] = []
    seen: set[int] = set()
    while offset and offset not in seen and len(ifds) < _MAX_IFDS and offset + csize <= len(data):
        seen.add(offset)
        (n,) = struct.unpack_from(cfmt, data, offset)
        next_pos = offset + csize + n * esize
        if next_pos + osize > len(data):
            break
        entries = []
        for k in range(n):
            pos = offset + csize + k * esize
            tag, typ = struct.unpack_from(order + "HH", data, pos)
            (count,) = struct.unpack_from(ofmt, data, pos + 4)
            field = pos + 4 + osize
            inline = count * TYPE_SIZES.get(typ, 1) <= osize
            value_pos = field if inline else struct.unpack_from(ofmt, data, field)[0]
            entries.append(TiffEntry(len(ifds), tag, typ, count, pos, value_pos))
        ifds.append(TiffIfd(len(ifds), offset, tuple(entries), next_pos))
        (offset,) = struct.unpack_from(ofmt, data, next_pos)
    return TiffMap(order, big, len(data), tuple(ifds))


# ---------------------------------------------------------------------------
# the mutations


class _NotApplicable(Exception):
    """This mutation has nothing to act on in this file (e.g. no tiled IFD)."""


def _header_ranges(data: bytes, tmap: TiffMap | None) -> list[tuple[int, int]]:
    """Bytes that describe the image rather than hold pixels: TIFF structure, or a DICOM's bytes before PixelData."""
    if tmap is not None and tmap.ifds:
        return tmap.structure_ranges()
    pixel_data = data.find(b"\xe0\x7f\x10\x00", 132)  # (7FE0,0010) little endian
    stop = pixel_data + 12 if pixel_data > 0 else min(len(data), 4096)
    return [(0, min(stop, len(data)))]


def _pick_in_ranges(rng: random.Random, ranges: list[tuple[int, int]]) -> int:
    total = sum(b - a for a, b in ranges)
    k = rng.randrange(total)
    for a, b in ranges:
        if k < b - a:
            return a + k
        k -= b - a
    raise AssertionError("unreachable")


def _flip(data: bytearray, rng: random.Random, positions: list[int]) -> str:
    for pos in positions:
        data[pos] ^= 1 << rng.randrange(8)
    shown = ", ".join(str(p) for p in positions[:4]) + (", ..." if len(positions) > 4 else "")
    return f"{len(positions)} bit(s) flipped at byte {shown}"


def _m_flip_header(data: bytearray, tmap, rng) -> str:
    ranges = _header_ranges(data, tmap)
    return _flip(data, rng, sorted(_pick_in_ranges(rng, ranges) for _ in range(rng.choice((1, 1, 2, 4, 8)))))


def _m_flip_anywhere(data: bytearray, tmap, rng) -> str:
    return _flip(data, rng, sorted(rng.randrange(len(data)) for _ in range(rng.choice((1, 4, 16, 64)))))


def _m_truncate(data: bytearray, tmap, rng) -> str:
    if rng.random() < 0.5:  # inside the structure: a cut directory or tag value
        at = _pick_in_ranges(rng, _header_ranges(data, tmap))
    else:
        at = rng.randrange(1, len(data))
    at = max(at, 1)
    del data[at:]
    return f"truncated to {at} bytes"


def _span(rng: random.Random, size: int, low: int = 0, high: int = 16) -> tuple[int, int]:
    """A random range: length 2**U(low, high) bytes (at most the file), anywhere in ``size`` bytes."""
    n = max(1, min(size, int(2 ** rng.uniform(low, high))))
    start = rng.randrange(0, size - n + 1)
    return start, n


def _m_zero_range(data: bytearray, tmap, rng) -> str:
    if rng.random() < 0.5:
        start = _pick_in_ranges(rng, _header_ranges(data, tmap))
        n = min(len(data) - start, int(2 ** rng.uniform(0, 8)))
    else:
        start, n = _span(rng, len(data))
    data[start : start + n] = bytes(n)
    return f"zeroed {n} bytes at {start}"


def _m_duplicate_chunk(data: bytearray, tmap, rng) -> str:
    start, n = _span(rng, len(data), 2, 14)
    chunk = bytes(data[start : start + n])
    if rng.random() < 0.5:  # inserted: every offset after it now points n bytes too early
        data[start + n : start + n] = chunk
        return f"{n} bytes at {start} inserted again after themselves"
    to = rng.randrange(0, len(data) - n + 1)
    data[to : to + n] = chunk
    return f"{n} bytes at {start} copied over byte {to}"


def _entries(tmap: TiffMap | None, tags=None) -> list[TiffEntry]:
    if tmap is None:
        raise _NotApplicable("not a TIFF")
    found = [e for e in tmap.entries() if tags is None or e.tag in tags]
    if not found:
        raise _NotApplicable("no such tag")
    return found


def _write_int(data: bytearray, tmap: TiffMap, pos: int, typ: int, value: int) -> None:
    """Write ``value`` as one value of TIFF type ``typ`` (wrapped to its width) at ``pos``, when it fits in the file."""
    fmt = _INT_FORMATS.get(typ, "I")
    size = struct.calcsize(fmt)
    if pos < 0 or pos + size > len(data):
        raise _NotApplicable("value lies outside the file")
    bits = 8 * size
    value %= 1 << bits
    if fmt.islower() and value >= 1 << (bits - 1):
        value -= 1 << bits
    struct.pack_into(tmap.order + fmt, data, pos, value)


def _hostile_ints(rng: random.Random, size: int, file_size: int, current: int | None = None) -> int:
    """A number chosen to hurt: 0, 1, the type's extremes, the file's size, a multiple of the current value."""
    top = (1 << (8 * size)) - 1
    options = [
        0,
        1,
        2,
        3,
        top,
        top - 1,
        top >> 1,
        (top >> 1) + 1,
        255,
        256,
        65535,
        65536,
        500_001,
        file_size - 1,
        file_size,
        file_size + 1,
        rng.randrange(top + 1),
    ]
    if current is not None:
        options += [current + 1, max(current - 1, 0), current * 2, current * 1000]
    return rng.choice(options)


def _m_swap_tiles(data: bytearray, tmap, rng) -> str:
    pairs = []
    for off_tag, count_tag in _DATA_TAGS:
        for e in _entries(tmap):
            if e.tag == off_tag and e.count >= 2 and e.value_pos + e.count * e.itemsize <= len(data):
                counts = [c for c in tmap.ifds[e.ifd].entries if c.tag == count_tag and c.count == e.count]
                pairs.append((e, counts[0] if counts else None))
    if not pairs:
        raise _NotApplicable("no strips or tiles to swap")
    offsets, counts = rng.choice(pairs)
    i, j = rng.sample(range(offsets.count), 2)
    swapped = [offsets]
    if counts is not None and counts.value_pos + counts.count * counts.itemsize <= len(data) and rng.random() < 0.5:
        swapped.append(counts)
    for e in swapped:
        a, b, n = e.value_pos + i * e.itemsize, e.value_pos + j * e.itemsize, e.itemsize
        data[a : a + n], data[b : b + n] = data[b : b + n], data[a : a + n]
    what = "offsets and byte counts" if len(swapped) == 2 else "offsets only"
    return f"IFD {offsets.ifd}: tiles/strips {i} and {j} swapped (tag {offsets.tag}, {what})"


def _m_tag_value(data: bytearray, tmap, rng) -> str:
    e = rng.choice(_entries(tmap))
    k = rng.randrange(min(e.count, 1024)) if e.count else 0
    pos = e.value_pos + k * e.itemsize
    if e.type in (5, 10):  # RATIONAL: numerator or denominator
        pos += rng.choice((0, 4))
        value = rng.choice((0, 1, 0xFFFFFFFF, 0x80000000))
        _write_int(data, tmap, pos, 4 if e.type == 5 else 9, value)
    elif e.type == 2:  # ASCII: a stray byte, or the terminating NUL gone
        if pos >= len(data):
            raise _NotApplicable("value lies outside the file")
        value = rng.choice((0x41, 0xFF, 0x00, 0x80))
        data[pos] = value
    elif e.type in (11, 12):  # FLOAT, DOUBLE: NaN, infinity, huge, negative
        fmt = "f" if e.type == 11 else "d"
        value = rng.choice((float("nan"), float("inf"), -1.0, 1e300 if fmt == "d" else 3e38, 0.0))
        if pos + struct.calcsize(fmt) > len(data):
            raise _NotApplicable("value lies outside the file")
        struct.pack_into(tmap.order + fmt, data, pos, value)
    else:
        value = _hostile_ints(rng, e.itemsize, len(data))
        _write_int(data, tmap, pos, e.type, value)
    return f"IFD {e.ifd}: tag {e.tag} value {k} set to {value!r}"


def _m_huge_dimension(data: bytearray, tmap, rng) -> str:
    e = rng.choice(_entries(tmap, _SIZE_TAGS))
    value = rng.choice((0, 1, 7, 65535, 65536, 100_000, 499_999, 500_001, 2**31 - 1, 2**31, 2**32 - 1))
    typ = e.type
    if value > 0xFFFF and typ == 3:  # a SHORT cannot hold it: make the tag a LONG, as writers may
        typ = 4
        struct.pack_into(tmap.order + "H", data, e.pos + 2, typ)
        data[e.pos + 4 + tmap.offset_size : e.pos + 4 + 2 * tmap.offset_size] = bytes(tmap.offset_size)
        _write_int(data, tmap, e.pos + 4 + tmap.offset_size, typ, value)
    else:
        _write_int(data, tmap, e.value_pos, typ, value)
    return f"IFD {e.ifd}: {_SIZE_TAGS[e.tag]} set to {value}"


def _m_tag_type(data: bytearray, tmap, rng) -> str:
    e = rng.choice(_entries(tmap))
    typ = rng.choice((0, 1, 2, 3, 4, 5, 7, 11, 12, 13, 16, 17, 19, 99, 0xFFFF))
    struct.pack_into(tmap.order + "H", data, e.pos + 2, typ)
    return f"IFD {e.ifd}: tag {e.tag} type {e.type} -> {typ}"


def _m_tag_count(data: bytearray, tmap, rng) -> str:
    e = rng.choice(_entries(tmap))
    count = _hostile_ints(rng, tmap.offset_size, len(data), e.count)
    _write_int(data, tmap, e.pos + 4, 16 if tmap.big else 4, count)
    return f"IFD {e.ifd}: tag {e.tag} count {e.count} -> {count}"


def _m_entry_count(data: bytearray, tmap, rng) -> str:
    if tmap is None or not tmap.ifds:
        raise _NotApplicable("no IFD")
    ifd = rng.choice(tmap.ifds)
    n = _hostile_ints(rng, tmap.count_size, len(data), len(ifd.entries))
    _write_int(data, tmap, ifd.offset, 16 if tmap.big else 3, n)
    return f"IFD {ifd.index}: entry count {len(ifd.entries)} -> {n}"


def _next_fields(tmap: TiffMap | None) -> list[tuple[str, int]]:
    if tmap is None:
        raise _NotApplicable("not a TIFF")
    return [("header", tmap.first_pos)] + [(f"IFD {ifd.index}", ifd.next_pos) for ifd in tmap.ifds]


def _m_ifd_offset(data: bytearray, tmap, rng) -> str:
    name, pos = rng.choice(_next_fields(tmap))
    size = len(data)
    targets = [
        0,
        1,
        7,
        size - 2,
        size,
        size + 8,
        (1 << (8 * tmap.offset_size)) - 1,
        pos,
        pos + 1,
        rng.randrange(size),
        rng.randrange(size) | 1,
    ]
    value = rng.choice(targets)
    _write_int(data, tmap, pos, 16 if tmap.big else 4, value)
    return f"{name}: next IFD offset set to {value}"


def _m_ifd_loop(data: bytearray, tmap, rng) -> str:
    if tmap is None or not tmap.ifds:
        raise _NotApplicable("no IFD")
    last = rng.randrange(len(tmap.ifds))
    target = rng.randrange(last + 1)
    _write_int(data, tmap, tmap.ifds[last].next_pos, 16 if tmap.big else 4, tmap.ifds[target].offset)
    return f"IFD {last} points back to IFD {target}"


def _m_mixed(data: bytearray, tmap, rng) -> str:
    """Two or three in-place mutations on the original structure, then sometimes a truncation."""
    done = []
    pool = [k for k in _IN_PLACE if k != "mixed" and (tmap is not None or not MUTATIONS[k][1])]
    for kind in rng.sample(pool, rng.choice((2, 3))):
        try:
            done.append(f"{kind}: {MUTATIONS[kind][0](data, tmap, rng)}")
        except _NotApplicable:
            continue
    if rng.random() < 0.3:
        done.append(f"truncate: {_m_truncate(data, tmap, rng)}")
    if not done:
        raise _NotApplicable("no mutation applied")
    return "; ".join(done)


Mutation = Callable[[bytearray, "TiffMap | None", random.Random], str]

#: name -> (function, TIFF only). Each function changes ``data`` in place and says what it did.
MUTATIONS: dict[str, tuple[Mutation, bool]] = {
    "flip-header": (_m_flip_header, False),
    "flip-anywhere": (_m_flip_anywhere, False),
    "truncate": (_m_truncate, False),
    "zero-range": (_m_zero_range, False),
    "duplicate-chunk": (_m_duplicate_chunk, False),
    "swap-tiles": (_m_swap_tiles, True),
    "tag-value": (_m_tag_value, True),
    "huge-dimension": (_m_huge_dimension, True),
    "tag-type": (_m_tag_type, True),
    "tag-count": (_m_tag_count, True),
    "entry-count": (_m_entry_count, True),
    "ifd-offset": (_m_ifd_offset, True),
    "ifd-loop": (_m_ifd_loop, True),
    "mixed": (_m_mixed, False),
}
# mutations that keep every byte position (so several can share one parsed structure)
_IN_PLACE = [k for k in MUTATIONS if k not in ("truncate", "duplicate-chunk")]


# ---------------------------------------------------------------------------
# sources and cases


@dataclass(frozen=True)
class Source:
    """A real slide to mutate.

    Attributes
    ----------
    name : str
        The file or folder name.
    path : Path
        The slide as a user passes it: a file, or a DICOM series folder.
    files : tuple of Path
        The files one of which is mutated (the slide itself, or the
        folder's ``.dcm`` files).
    kind : str
        ``"tiff"`` or ``"dicom"``.
    """

    name: str
    path: Path
    files: tuple[Path, ...]
    kind: str

    def kinds(self) -> list[str]:
        """The mutations that apply to this source, in a fixed order."""
        return [k for k, (_, tiff_only) in MUTATIONS.items() if self.kind == "tiff" or not tiff_only]


def find_sources(folder: str | Path) -> list[Source]:
    """The slides of a folder to fuzz: TIFF-family files and DICOM series folders, sorted by name.

    Parameters
    ----------
    folder : path-like
        E.g. ``../shared/data/slides``.

    Returns
    -------
    list of Source
        Files starting with a TIFF magic, and folders holding ``.dcm`` files;
        anything else is left out.
    """
    out = []
    for p in sorted(Path(folder).iterdir()):
        if p.is_dir():
            dcm = tuple(sorted(f for f in p.glob("*.dcm") if f.is_file()))
            if dcm:
                out.append(Source(p.name, p, dcm, "dicom"))
        elif p.is_file():
            with open(p, "rb") as fh:
                if fh.read(4) in _TIFF_MAGICS:
                    out.append(Source(p.name, p, (p,), "tiff"))
    return out


@dataclass(frozen=True)
class Case:
    """One mutated slide: which source, which mutation, what it did, and the bytes of the mutated file.

    Attributes
    ----------
    index : int
    seed : int
    source : Source
    kind : str
        The mutation's name (a key of :data:`MUTATIONS`).
    file : Path
        The source file that was mutated (one of ``source.files``).
    description : str
        What the mutation did, e.g. ``"IFD 2 points back to IFD 0"``.
    data : bytes
        The mutated file.
    """

    index: int
    seed: int
    source: Source
    kind: str
    file: Path
    description: str
    data: bytes

    @property
    def label(self) -> str:
        return f"{self.index:05d}-{Path(self.source.name).stem}-{self.kind}"


_CACHE: dict[Path, tuple[bytes, TiffMap | None]] = {}


def _read(path: Path) -> tuple[bytes, TiffMap | None]:
    if path not in _CACHE:
        data = path.read_bytes()
        _CACHE[path] = (data, parse_tiff(data))
    return _CACHE[path]


def make_case(sources: list[Source], seed: int, index: int) -> Case:
    """Case ``index`` of seed ``seed``: always the same source, mutation and bytes.

    Sources take turns (``index % len(sources)``); each source goes through
    its applicable mutations in turn, starting at a different one per
    source, so a few dozen cases already cover every source and mutation.
    The mutation's own choices come from a random generator seeded by
    ``(seed, index)``. A mutation with nothing to act on (no tiles to swap
    in a strip-less file) falls to the next one.

    Parameters
    ----------
    sources : list of Source
        :func:`find_sources`; their order is part of the case's identity.
    seed, index : int

    Returns
    -------
    Case
    """
    if not sources:
        raise ValueError("no sources to mutate")
    n = len(sources)
    source = sources[index % n]
    kinds = source.kinds()
    start = (index // n + index % n) % len(kinds)
    rng = random.Random(f"wsiseg-fuzz:{seed}:{index}")
    file = source.files[rng.randrange(len(source.files))]
    original, tmap = _read(file)
    for step in range(len(kinds)):
        kind = kinds[(start + step) % len(kinds)]
        data = bytearray(original)
        try:
            description = MUTATIONS[kind][0](data, tmap, rng)
        except _NotApplicable:
            continue
        if bytes(data) != original:
            return Case(index, seed, source, kind, file, description, bytes(data))
    raise ValueError(f"no mutation applies to {file}")  # pragma: no cover - flips always apply


def write_case(case: Case, folder: str | Path) -> Path:
    """Write a case's mutated slide into ``folder`` (created) and return the path to pass to wsiseg.

    A TIFF is written under its source's file name; a DICOM series is copied
    as a folder with one file replaced by the mutant, and the folder is
    returned.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if case.source.kind == "dicom":
        series = folder / case.source.name
        series.mkdir(exist_ok=True)
        for f in case.source.files:
            if f != case.file:
                shutil.copyfile(f, series / f.name)
        (series / case.file.name).write_bytes(case.data)
        return series
    target = folder / case.source.name
    target.write_bytes(case.data)
    return target
