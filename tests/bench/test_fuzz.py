"""The slide mutator (wsiseg.bench.mutate), the fork-server runner and a fast fuzz sample (wsiseg.bench.fuzz).

The sample runs ``wsiseg bench fuzz`` on 20 mutated real slides (every
source, two kinds of damage each) with info and convert: no command may hang,
crash, run out of memory, raise an internal error or end unclearly. The long
run is ``wsiseg bench fuzz --cases 1000`` (docs/benchmarks.md, with segment);
the slow test below runs 400 cases with segment.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter

import pytest
from click.testing import CliRunner

tifffile = pytest.importorskip("tifffile")

from wsiseg.bench.forkserver import ForkServer, Run  # noqa: E402
from wsiseg.bench.fuzz import FAILURES, classify  # noqa: E402
from wsiseg.cli.app import main  # noqa: E402
from wsiseg.bench.mutate import (  # noqa: E402
    MUTATIONS,
    _m_ifd_loop,
    _m_swap_tiles,
    find_sources,
    make_case,
    parse_tiff,
    write_case,
)

TIFFS = [
    "CMU-1-Small-Region.svs",
    "boxes.tiff",
    "rgba_geotiff.tiff",
    "small.svs",
    "test_orient0.tif",
    "yb10kx5k.zstd.tiff",
]


@pytest.fixture(scope="module")
def sources(slides_dir):
    return find_sources(slides_dir)


# ---------------------------------------------------------------------------
# the mutator


@pytest.mark.parametrize("name", TIFFS)
def test_parse_tiff_finds_what_tifffile_finds(slides_dir, name):
    data = (slides_dir / name).read_bytes()
    tmap = parse_tiff(data)
    with tifffile.TiffFile(slides_dir / name) as tif:
        pages = list(tif.pages)
        assert tmap.big == (tif.tiff.offsetsize == 8)
        assert [ifd.offset for ifd in tmap.ifds] == [p.offset for p in pages]
        for ifd, page in zip(tmap.ifds, pages):
            assert [e.tag for e in ifd.entries] == [t.code for t in page.tags.values()]
            for e in ifd.entries:
                tag = page.tags[e.tag]
                assert (e.pos, e.type, e.count, e.value_pos) == (tag.offset, int(tag.dtype), tag.count, tag.valueoffset)


def test_parse_tiff_stops_at_loops_and_garbage():
    assert parse_tiff(b"not a tiff") is None
    assert parse_tiff(b"II*\x00") is None  # no room for the first offset
    # one IFD of no entries whose next offset points back at itself
    looped = parse_tiff(b"II*\x00\x08\x00\x00\x00" + b"\x00\x00" + b"\x08\x00\x00\x00")
    assert [ifd.offset for ifd in looped.ifds] == [8]
    past_end = parse_tiff(b"II*\x00\xff\xff\x00\x00")
    assert past_end.ifds == ()


def test_cases_are_deterministic_cover_everything_and_change_the_file(sources):
    names = {s.name for s in sources}
    assert {"dicom-boxes", "dicom-sm", "yb10kx5k.zstd.tiff", "CMU-1-Small-Region.svs"} <= names
    cases = [make_case(sources, 0, i) for i in range(150)]
    again = [make_case(sources, 0, i) for i in (0, 17, 149)]
    assert [(c.kind, c.description, c.data) for c in again] == [
        (cases[i].kind, cases[i].description, cases[i].data) for i in (0, 17, 149)
    ]
    other = [make_case(sources, 1, i).data for i in range(20)]
    assert sum(a != b.data for a, b in zip(other, cases)) >= 15  # another seed, other bytes
    assert {c.source.name for c in cases} == names
    assert {c.kind for c in cases} == set(MUTATIONS)
    for c in cases:
        assert c.data != c.file.read_bytes(), c.label
        assert c.kind in c.source.kinds()
        if c.source.kind == "dicom":
            assert not MUTATIONS[c.kind][1]  # no TIFF surgery on DICOM
    kinds_per_source = Counter((c.source.name, c.kind) for c in cases[:40])
    assert len(kinds_per_source) == 40  # the first cases already mix sources and kinds


def test_ifd_loop_and_swap_tiles_do_what_they_say(slides_dir, tmp_path):
    data = (slides_dir / "boxes.tiff").read_bytes()
    tmap = parse_tiff(data)
    looped = bytearray(data)
    text = _m_ifd_loop(looped, tmap, random.Random(3))
    last, target = (int(w) for w in text.replace("IFD ", "").split(" points back to "))
    assert target <= last
    assert len(parse_tiff(bytes(looped)).ifds) == last + 1  # the walk stopped where the chain came back
    swapped = bytearray(data)
    text = _m_swap_tiles(swapped, tmap, random.Random(5))
    path_a, path_b = tmp_path / "a.tiff", tmp_path / "b.tiff"
    path_a.write_bytes(data)
    path_b.write_bytes(bytes(swapped))
    with tifffile.TiffFile(path_a) as a, tifffile.TiffFile(path_b) as b:
        changed = [
            (i, pa.dataoffsets, pb.dataoffsets)
            for i, (pa, pb) in enumerate(zip(a.pages, b.pages))
            if pa.dataoffsets != pb.dataoffsets
        ]
    assert len(changed) == 1, text
    i, before, after = changed[0]
    assert f"IFD {i}:" in text and sorted(before) == sorted(after)
    assert sum(x != y for x, y in zip(before, after)) == 2


def test_write_case_copies_the_dicom_series(sources, tmp_path):
    source = next(s for s in sources if s.name == "dicom-boxes")
    index = next(i for i in range(200) if make_case(sources, 0, i).source is source)
    case = make_case(sources, 0, index)
    folder = write_case(case, tmp_path / "case")
    assert folder.is_dir() and sorted(f.name for f in folder.iterdir()) == ["boxes_0.dcm", "boxes_1.dcm"]
    for f in folder.iterdir():
        original = (source.path / f.name).read_bytes()
        assert (f.read_bytes() == case.data) if f.name == case.file.name else (f.read_bytes() == original)
    tiff = make_case(sources, 0, 1)
    path = write_case(tiff, tmp_path / "tiff")
    assert path.name == tiff.source.name and path.read_bytes() == tiff.data


# ---------------------------------------------------------------------------
# the runner


def _run(rc=0, stderr="", stdout="", timed_out=False) -> Run:
    return Run(rc, 0.1, 50.0, timed_out, stdout, stderr)


def test_classify():
    s = "/x/slide.svs"
    assert classify(_run(0, "/x/slide.svs: ignored implausible MPP\n"), s)[0] == "ok"
    assert classify(_run(2, f"wsiseg: error: {s}: corrupt\n"), s) == ("refused", f"wsiseg: error: {s}: corrupt")
    assert classify(_run(2, f"{s}: ignored implausible MPP\nwsiseg: error: {s}: corrupt\n"), s)[0] == "refused"
    for unclear in (
        f"wsiseg: error: {s}: a\nwsiseg: error: {s}: b\n",  # two errors
        "wsiseg: error: /other.svs: corrupt\n",  # not naming the slide
        f"TIFFReadDirectory: warning\nwsiseg: error: {s}: corrupt\n",  # a library's noise
        f"wsiseg: error: {s}: corrupt\n{s}: a warning after the error\n",
    ):
        assert classify(_run(2, unclear), s)[0] == "unclear", unclear
    assert classify(_run(3), s)[0] == "unclear"
    assert classify(_run(1, "wsiseg: internal error: KeyError: 3 (rerun with --debug)\n"), s)[0] == "internal-error"
    assert classify(_run(0, "Traceback (most recent call last):\n  ...\nValueError: x\n"), s)[0] == "internal-error"
    assert classify(_run(2, f"wsiseg: error: {s}: cannot read (MemoryError: )\n"), s)[0] == "memory"
    assert classify(_run(-6, "GLib-ERROR: failed to allocate\n"), s) == (
        "crash",
        "killed by SIGABRT: GLib-ERROR: failed to allocate",
    )
    assert classify(_run(-9, timed_out=True), s)[0] == "hang"


def test_classify_segment_reads_status_csv(tmp_path):
    s = "/x/slide.svs"
    out = tmp_path / "out"
    out.mkdir()
    head = "slide,name,status,seconds,error,finished_at\n"
    (out / "status.csv").write_text(head + f"{s},slide,failed,0.1,{s}: truncated file,2026-01-01\n")
    assert classify(_run(1), s, "segment", out) == ("refused", f"{s}: truncated file")
    (out / "status.csv").write_text(head + f"{s},slide,failed,0.1,internal error: IndexError: 5,2026-01-01\n")
    assert classify(_run(1), s, "segment", out)[0] == "internal-error"
    (out / "status.csv").write_text(head + f"{s},slide,failed,0.1,out of memory (MemoryError),2026-01-01\n")
    assert classify(_run(1), s, "segment", out)[0] == "memory"
    (out / "status.csv").write_text(head)
    assert classify(_run(1), s, "segment", out)[0] == "unclear"


@pytest.mark.timeout(120)
def test_fork_server_limits_and_outcomes(slides_dir, tmp_path):
    slide = str(slides_dir / "boxes.tiff")
    missing = str(tmp_path / "missing.svs")
    with ForkServer() as server:
        assert server.threads == 1

        def run(target, args, timeout=30.0, memory=None):
            return server.run(target, args, cwd=tmp_path, timeout=timeout, memory=memory)

        r = run("wsiseg.cli.app:run_cli", [["info", slide]])
        assert classify(r, slide)[0] == "ok" and "generic-tiff" in r.stdout and r.seconds < 20
        r = run("wsiseg.cli.app:run_cli", [["info", missing]])
        assert classify(r, missing) == ("refused", f"wsiseg: error: {missing}: no such file or directory")
        t0 = time.monotonic()
        r = run("time:sleep", [60], timeout=1.0)
        assert r.timed_out and classify(r, slide)[0] == "hang" and time.monotonic() - t0 < 10
        assert classify(run("os:abort", []), slide)[0] == "crash"
        r = run("builtins:bytearray", [2**33], memory=256 * 2**20)  # 8 GiB against a 256 MiB limit
        assert classify(r, slide)[0] == "memory" and "MemoryError" in r.stderr
        assert classify(run("builtins:int", ["x"]), slide)[0] == "internal-error"
        # what a hanging command started dies with it (its process group is killed)
        r = run("os:system", [f"sleep 60 & echo $! > {tmp_path / 'pid'}; wait"], timeout=1.0)
        assert r.timed_out
        pid = int((tmp_path / "pid").read_text())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"sleep {pid} outlived its timed-out parent")
        # the server survived all of that
        assert classify(run("wsiseg.cli.app:run_cli", [["info", slide]]), slide)[0] == "ok"


# ---------------------------------------------------------------------------
# fuzz samples


def _assert_no_failures(report: dict) -> None:
    failed = [
        f"case {c['index']} {c['source']} {c['kind']} ({c['description']}): {r['command']} {r['outcome']}: "
        f"{r['detail']}"
        for c in report["cases"]
        for r in c["results"]
        if r["outcome"] in FAILURES
    ]
    assert not failed, "\n".join(failed)


def test_segmented_cases_take_the_sources_in_turn(sources):
    from wsiseg.bench.fuzz import segments

    picked = [i for i in range(400) if segments(i, 10)]
    assert len(picked) == 40 and all(len([i for i in picked if k * 10 <= i < k * 10 + 10]) == 1 for k in range(40))
    assert {make_case(sources, 0, i).source.name for i in picked} == {s.name for s in sources}


@pytest.mark.timeout(300)
def test_fuzz_sample_has_no_hang_crash_or_internal_error(slides_dir, tmp_path):
    """20 mutated slides, two per source, through info and convert: refused or read, never worse (segment: slow)."""
    out, js = tmp_path / "bench.md", tmp_path / "fuzz.json"
    args = [
        "bench",
        "fuzz",
        "--cases",
        "20",
        "--seed",
        "0",
        "--commands",
        "info,convert",
        "--timeout",
        "60",
        "--slides",
        str(slides_dir),
        "--workdir",
        str(tmp_path / "work"),
        "--keep",
        str(tmp_path / "failed"),
        "--json",
        str(js),
        "--out",
        str(out),
    ]
    res = CliRunner().invoke(main, args)
    report = json.loads(js.read_text()) if js.exists() else None
    assert report is not None, res.output
    _assert_no_failures(report)
    assert res.exit_code == 0, res.output
    cases = report["cases"]
    assert len(cases) == 20 and {c["source"] for c in cases} == {s.name for s in find_sources(slides_dir)}
    runs = Counter((r["command"], r["outcome"]) for c in cases for r in c["results"])
    assert runs["info", "ok"] >= 5 and runs["info", "refused"] >= 5, runs  # both paths exercised
    assert runs["convert", "ok"] >= 3, runs
    text = out.read_text()
    assert "<!-- bench:fuzz -->" in text
    assert "**Failures: 0 internal-error, 0 crash, 0 hang, 0 memory, 0 unclear**" in text
    assert not (tmp_path / "failed").exists() and not any((tmp_path / "work").iterdir())  # nothing left behind


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fuzz_long_run_has_no_failures(slides_dir, tmp_path):
    """The long version: 400 cases of seed 1 (the benchmark runs seed 0), info, convert, segment every 40th."""
    from wsiseg.bench.fuzz import run_fuzz

    report = run_fuzz(
        slides_dir,
        cases=400,
        cli="wsiseg.cli.app:run_cli",
        seed=1,
        workdir=tmp_path,
        segment_every=40,
        timeout=120,
    )
    from dataclasses import asdict

    _assert_no_failures(asdict(report))


def test_section_counts_outcomes_and_quoted_exceptions():
    from wsiseg.bench.fuzz import (
        CaseResult,
        CommandResult,
        FuzzReport,
        format_fuzz_section,
    )

    machine = {"platform": "p", "processor": "x", "cpus": "2", "ram_gib": 1, "date": "d", "load": "0", "versions": "v"}
    report = FuzzReport(0, 0, ("info", "convert"), 10, 60.0, 4096, ("boxes.tiff",), machine=machine, seconds=3.0)
    report.cases = [
        CaseResult(
            0,
            "boxes.tiff",
            "truncate",
            "truncated to 9 bytes",
            (CommandResult("info", "refused", "wsiseg: error: b: cannot read TIFF (TypeError: x)", 0.1, 60, 2),),
        ),
        CaseResult(
            1,
            "boxes.tiff",
            "ifd-loop",
            "IFD 1 points back to IFD 0",
            (CommandResult("info", "ok", "", 0.2, 60, 0), CommandResult("convert", "hang", "still", 9.0, 70, -9)),
        ),
    ]
    text = format_fuzz_section(report, "wsiseg bench fuzz")
    assert "**Failures: 0 internal-error, 0 crash, 1 hang, 0 memory, 0 unclear**" in text
    assert "| info | 2 | 1 | 1 | 0 | 0 | 0 | 0 | 0 |" in text and "| convert | 1 | 0 | 0 | 0 | 0 | 1 | 0 | 0 |" in text
    assert "(named by the exception rather than the damage; by command and type): info: TypeError 1." in text
    assert "| ifd-loop | 1 | 1 | 0 | 1 |" in text and "| truncate | 1 | 0 | 1 | 0 |" in text
    assert "- case 1 `boxes.tiff` ifd-loop (IFD 1 points back to IFD 0): convert hang: still" in text
