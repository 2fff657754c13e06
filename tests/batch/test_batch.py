"""Batch semantics: inputs, status.csv, resume, locks, interruption, full disks, progress."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsiseg.atomic import atomic_output
from wsiseg.batch import locks, runner
from wsiseg.batch import progress as batch_progress
from wsiseg.batch.inputs import expand_inputs
from wsiseg.batch.jobs import SlideJob, SlideOutcome
from wsiseg.batch.markers import DONE_REASON, is_done, make_fingerprint, slide_fingerprint
from wsiseg.batch.runner import run_batch
from wsiseg.errors import ConfigError, WsisegError
from wsiseg.slide import open_slide

FP = make_fingerprint("model-hash-1", {"size": [256, 256], "classes": 2})


# ---------------------------------------------------------------------------
# helpers


class ThumbnailProcess:
    """A real per-slide function: open the slide, write a PNG of its smallest level."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, job, out_dir, *, fingerprint, overwrite, progress):
        self.calls.append(job.name)
        progress("open", 0.0)
        ms = open_slide(job.path, mpp=job.overrides.get("mpp"))
        level = ms.levels[-1]
        step = max(1, max(level.height, level.width) // 64)
        progress("read", 0.5)
        pixels = np.asarray(level.array[::step, ::step].compute())
        out = Path(out_dir) / f"{job.name}.thumb.png"
        with atomic_output(out, overwrite=overwrite) as tmp:
            Image.fromarray(pixels).save(tmp, format="PNG")
        progress("write", 1.0)
        return SlideOutcome("ok", outputs={"thumbnail": out.name})


def read_status(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "status.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and list(rows[0]) == ["slide", "name", "status", "seconds", "error", "finished_at"]
    return {r["name"]: r for r in rows}


def leftovers(out: Path) -> list[str]:
    """Lock files and temporary siblings that must never outlive a run."""
    return sorted(p.name for p in out.iterdir() if p.name.endswith(".lock") or ".tmp-" in p.name)


@pytest.fixture()
def good_jobs(slides_dir):
    return expand_inputs([slides_dir / "small.svs", slides_dir / "boxes.tiff", slides_dir / "dicom-boxes"])


@pytest.fixture()
def mixed_jobs(slides_dir, tmp_path):
    """Three readable slides, one refused (16-bit DICOM), one truncated TIFF."""
    src = tmp_path / "in"
    src.mkdir()
    data = (slides_dir / "boxes.tiff").read_bytes()
    (src / "truncated.tiff").write_bytes(data[:3000])
    return expand_inputs(
        [
            slides_dir / "small.svs",
            slides_dir / "dicom-sm-grayscale",
            slides_dir / "boxes.tiff",
            src / "truncated.tiff",
            slides_dir / "dicom-boxes",
        ]
    )


def run(jobs, out, process, **kw):
    kw.setdefault("fingerprint", FP)
    kw.setdefault("progress", "none")
    return run_batch(jobs, out, process, **kw)


# ---------------------------------------------------------------------------
# inputs


def test_directory_scan_finds_files_and_dicom_folders_as_single_slides(slides_dir):
    jobs = expand_inputs([slides_dir])
    by_name = {j.name: j for j in jobs}
    assert set(by_name) == {
        "CMU-1-Small-Region",
        "boxes",
        "rgba_geotiff",
        "small",
        "test_orient0",
        "test_orient3",
        "yb10kx5k.zstd",
        "dicom-boxes",
        "dicom-sm",
        "dicom-sm-grayscale",
    }
    for name in ("dicom-boxes", "dicom-sm", "dicom-sm-grayscale"):
        assert by_name[name].path == str(slides_dir / name)  # the folder, not its .dcm files
    assert not any(j.path.endswith(".dcm") for j in jobs)
    assert all(j.overrides == {} for j in jobs)
    assert expand_inputs([slides_dir]) == jobs  # deterministic


def test_globs_recursive_and_dicom_files_collapse_to_their_series(slides_dir):
    svs = expand_inputs([str(slides_dir / "*.svs")])
    assert [j.name for j in svs] == ["CMU-1-Small-Region", "small"]
    one = expand_inputs([str(slides_dir / "dicom-boxes" / "*.dcm")])
    assert [(j.name, j.path) for j in one] == [("dicom-boxes", str(slides_dir / "dicom-boxes"))]
    deep = expand_inputs([str(slides_dir / "**" / "*.dcm")])
    assert sorted(j.name for j in deep) == ["dicom-boxes", "dicom-sm", "dicom-sm-grayscale"]


def test_loose_dicom_files_beside_other_slides_form_one_slide(slides_dir, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in (slides_dir / "dicom-boxes").iterdir():
        shutil.copyfile(f, mixed / f.name)
    shutil.copyfile(slides_dir / "small.svs", mixed / "small.svs")
    jobs = expand_inputs([mixed])
    assert [(j.name, j.path) for j in jobs] == [("small", str(mixed / "small.svs")), ("mixed", str(mixed))]


def test_identical_paths_are_deduplicated(slides_dir, tmp_path):
    link = tmp_path / "alias.svs"
    link.symlink_to(slides_dir / "small.svs")
    jobs = expand_inputs([slides_dir / "small.svs", str(slides_dir / "small.*"), link, slides_dir])
    assert [j.name for j in jobs].count("small") == 1
    assert len(jobs) == 10


@pytest.mark.timeout(60)  # before the fix, glob.glob followed the two loops for ever
def test_recursive_glob_survives_symlink_loops_and_keeps_linked_slides(slides_dir, tmp_path):
    root = tmp_path / "data"
    deep = root / "site-a" / "case-1"
    deep.mkdir(parents=True)
    shutil.copyfile(slides_dir / "small.svs", deep / "small.svs")
    (root / "site-a" / "up").symlink_to("..")  # two loops: glob.glob would walk 2**40 paths
    (deep / "top").symlink_to("../..")
    (root / "linked.svs").symlink_to(slides_dir / "CMU-1-Small-Region.svs")  # a symlinked slide file
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(slides_dir / "small.svs", elsewhere / "other.svs")
    (root / "site-b").symlink_to(elsewhere)  # a symlinked folder outside the loops is still searched
    (root / "self").symlink_to("self")  # a link to itself (ELOOP) is skipped
    jobs = expand_inputs([str(root / "**" / "*.svs")])
    assert [(j.name, j.path) for j in jobs] == [
        ("linked", str(root / "linked.svs")),
        ("small", str(deep / "small.svs")),
        ("other", str(root / "site-b" / "other.svs")),
    ]
    # folders matched by a trailing ** are scanned, the looping ones once
    assert {j.name for j in expand_inputs([str(root / "**")])} == {"linked", "small", "other", "self"}


@pytest.mark.timeout(60)  # before the fix, reading the FIFO blocked the batch until a writer came
def test_fifo_in_a_folder_or_manifest_fails_only_its_slide(slides_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copyfile(slides_dir / "small.svs", src / "small.svs")
    os.mkfifo(src / "pipe.svs")
    os.mkfifo(tmp_path / "listed.tiff")
    manifest = tmp_path / "slides.csv"
    manifest.write_text("path\nlisted.tiff\n")
    out = tmp_path / "out"
    result = run(expand_inputs([src, manifest]), out, ThumbnailProcess())
    rows = read_status(out)
    assert {n: r["status"] for n, r in rows.items()} == {"pipe": "failed", "small": "ok", "listed": "failed"}
    for name, path in (("pipe", src / "pipe.svs"), ("listed", tmp_path / "listed.tiff")):
        assert rows[name]["error"] == (
            f"{path}: not a regular file (a FIFO); a slide is a file, a DICOM folder or an OME-Zarr store"
        )
    assert result.exit_code == 1 and leftovers(out) == []


def test_manifest_relative_path_mpp_name_and_extra_columns(slides_dir, tmp_path):
    manifest = tmp_path / "lists" / "manifest.csv"
    manifest.parent.mkdir()
    rel = os.path.relpath(slides_dir / "small.svs", manifest.parent)
    manifest.write_text(
        "path,mpp,name,stain\n"
        f"{rel},0.25,,HE\n"
        "\n"
        f"{slides_dir / 'boxes.tiff'},,box-slide,\n"
        f"{slides_dir / 'dicom-sm' / 'sm_image.dcm'},,,\n"
    )
    jobs = expand_inputs([manifest])
    assert [(j.name, j.path, j.overrides) for j in jobs] == [
        ("small", str(slides_dir / "small.svs"), {"mpp": 0.25, "stain": "HE"}),
        ("box-slide", str(slides_dir / "boxes.tiff"), {}),
        ("dicom-sm", str(slides_dir / "dicom-sm"), {}),
    ]
    # A directory scan plus a manifest naming one of its slides: the manifest's settings win.
    both = {j.name: j for j in expand_inputs([slides_dir, manifest])}
    assert both["small"].overrides == {"mpp": 0.25, "stain": "HE"}
    assert "boxes" not in both and "box-slide" in both


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("file,mpp\nsmall.svs,0.5\n", "line 1: manifest header has no 'path' column"),
        (
            "path,mpp\n{small},0.5\n{small2},abc\n",
            "line 3: mpp must be a number of micrometres per pixel in [0.01, 1000]",
        ),
        ("path,mpp\n{small},-1\n", "line 2: mpp must be a number of micrometres per pixel"),
        (
            "path,mpp\n{small},1e-300\n",
            "line 2: mpp must be a number of micrometres per pixel in [0.01, 1000], got '1e-300'",
        ),
        ("path\n{small}\nmissing.svs\n", "line 3: slide not found"),
        ("path,name\n{small},../x\n", "line 2: output name '../x' contains a path separator"),
        ("path,name\n{small},a\n{boxes},A\n", "output name(s) used for more than one slide: a"),
        ("", "manifest is empty"),
        ("path\n", "manifest lists no slides"),
    ],
)
def test_bad_manifest_names_file_and_line(slides_dir, tmp_path, text, fragment):
    manifest = tmp_path / "m.csv"
    shutil.copyfile(slides_dir / "small.svs", tmp_path / "small2.svs")
    manifest.write_text(
        text.format(small=slides_dir / "small.svs", small2=tmp_path / "small2.svs", boxes=slides_dir / "boxes.tiff")
    )
    with pytest.raises(WsisegError) as info:
        expand_inputs([manifest])
    msg = str(info.value)
    assert fragment in msg
    if "line" in fragment:
        assert msg.startswith(str(manifest))


def test_inputs_that_match_nothing_are_named(slides_dir, tmp_path):
    missing = tmp_path / "nope.svs"
    with pytest.raises(WsisegError, match="nope.svs: no such file or directory"):
        expand_inputs([slides_dir / "small.svs", missing])
    with pytest.raises(WsisegError, match=r"\*\.ndpi: pattern matches nothing"):
        expand_inputs([str(slides_dir / "*.ndpi")])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(WsisegError, match="empty: no slides found in directory"):
        expand_inputs([empty])
    with pytest.raises(WsisegError, match="no slides given"):
        expand_inputs([])


def test_duplicate_stems_get_parent_folders_deterministically(slides_dir, tmp_path):
    for folder in ("site-a", "site-b"):
        (tmp_path / folder).mkdir()
        shutil.copyfile(slides_dir / "small.svs", tmp_path / folder / "slide.svs")
    shutil.copyfile(slides_dir / "boxes.tiff", tmp_path / "site-a" / "boxes.ome.tiff")
    shutil.copyfile(slides_dir / "boxes.tiff", tmp_path / "site-a" / "slide.tiff")  # same folder, same stem
    inputs = [tmp_path / "site-b" / "slide.svs", tmp_path / "site-a", slides_dir / "small.svs"]
    jobs = expand_inputs(inputs)
    names = {Path(j.path).relative_to(tmp_path).as_posix() if str(tmp_path) in j.path else j.path: j.name for j in jobs}
    assert names[str(slides_dir / "small.svs")] == "small"
    assert names["site-a/boxes.ome.tiff"] == "boxes"
    assert len({n.casefold() for n in names.values()}) == len(names) == 5
    # Three 'slide' stems, two in one folder: parent folder and extension.
    assert names["site-b/slide.svs"] == "site-b_slide_svs"
    assert names["site-a/slide.tiff"] == "site-a_slide_tiff"
    # The same inputs in another order give the same names.
    assert {j.path: j.name for j in expand_inputs(list(reversed(inputs)))} == {j.path: j.name for j in jobs}
    # Two folders only: the nearest parent folder tells them apart.
    two = expand_inputs([tmp_path / "site-a" / "slide.svs", tmp_path / "site-b" / "slide.svs"])
    assert [j.name for j in two] == ["site-a_slide", "site-b_slide"]


def test_output_folder_is_excluded_from_scans(slides_dir, tmp_path):
    shutil.copyfile(slides_dir / "small.svs", tmp_path / "a.svs")
    (tmp_path / "out").mkdir()
    shutil.copyfile(slides_dir / "boxes.tiff", tmp_path / "out" / "a.mask.tiff")
    assert [j.name for j in expand_inputs([str(tmp_path / "**" / "*.*")], exclude=[tmp_path / "out"])] == ["a"]


def test_fingerprint_is_canonical():
    a = make_fingerprint("h", {"b": 1, "a": {"y": (1, 2), "x": 0.5}})
    b = make_fingerprint("h", {"a": {"x": 0.5, "y": [1, 2]}, "b": 1.0})
    assert a == b and len(a) == 64
    assert make_fingerprint("h2", {"b": 1, "a": {"y": (1, 2), "x": 0.5}}) != a
    assert make_fingerprint("h", {"b": 2, "a": {"y": (1, 2), "x": 0.5}}) != a
    assert make_fingerprint("h", {"p": Path("x"), "n": np.float32(0.5)}) == make_fingerprint("h", {"p": "x", "n": 0.5})
    with pytest.raises(ConfigError):
        make_fingerprint("h", {"f": object()})
    job = SlideJob("/x/s.svs", "s")
    assert slide_fingerprint(a, job) == a
    assert slide_fingerprint(a, SlideJob("/x/s.svs", "s", {"mpp": 0.25})) != a


def test_slide_job_refuses_unsafe_names():
    with pytest.raises(ConfigError, match="path separator"):
        SlideJob("/x/a.svs", "a/b")
    with pytest.raises(ConfigError, match="starts with '.'"):
        SlideJob("/x/a.svs", "..")


# ---------------------------------------------------------------------------
# run_batch


def test_every_slide_attempted_and_status_is_truthful(mixed_jobs, tmp_path):
    out = tmp_path / "out"
    proc = ThumbnailProcess()
    result = run(mixed_jobs, out, proc)
    assert result.exit_code == 1
    assert proc.calls == [j.name for j in mixed_jobs]  # failures did not stop the batch
    assert result.counts == {"ok": 3, "failed": 2, "skipped": 0}
    rows = read_status(out)
    assert {n: r["status"] for n, r in rows.items()} == {
        "small": "ok",
        "dicom-sm-grayscale": "failed",
        "boxes": "ok",
        "truncated": "failed",
        "dicom-boxes": "ok",
    }
    assert "refused: 16-bit DICOM" in rows["dicom-sm-grayscale"]["error"]
    assert "truncated.tiff" in rows["truncated"]["error"] and "truncated or corrupt" in rows["truncated"]["error"]
    for name, row in rows.items():
        datetime.fromisoformat(row["finished_at"])
        assert float(row["seconds"]) >= 0
        assert "\n" not in row["error"]
        ok = row["status"] == "ok"
        assert (out / f"{name}.thumb.png").exists() == ok
        assert (out / f"{name}.done.json").exists() == ok
        assert row["error"] == "" if ok else row["error"]
    with Image.open(out / "small.thumb.png") as im:
        assert im.size[0] > 0
    marker = json.loads((out / "small.done.json").read_text())
    assert marker["fingerprint"] == FP and marker["outputs"] == {"thumbnail": "small.thumb.png"}
    assert leftovers(out) == []


def test_resume_skips_done_slides_and_redoes_changed_ones(good_jobs, tmp_path):
    out = tmp_path / "out"
    first = ThumbnailProcess()
    assert run(good_jobs, out, first).exit_code == 0
    assert len(first.calls) == 3

    again = ThumbnailProcess()
    result = run(good_jobs, out, again)
    assert again.calls == [] and result.exit_code == 0
    assert {r.status for r in result.results} == {"skipped"}
    assert {r["error"] for r in read_status(out).values()} == {DONE_REASON}
    assert all(is_done(j, out, FP) for j in good_jobs)

    changed = ThumbnailProcess()
    assert run(good_jobs, out, changed, fingerprint=make_fingerprint("model-hash-2", {})).exit_code == 0
    assert changed.calls == ["small", "boxes", "dicom-boxes"]
    assert not is_done(good_jobs[0], out, FP)  # certified for the new fingerprint only

    (out / "boxes.thumb.png").unlink()
    redo = ThumbnailProcess()
    run(good_jobs, out, redo, fingerprint=make_fingerprint("model-hash-2", {}))
    assert redo.calls == ["boxes"]

    over = ThumbnailProcess()
    assert run(good_jobs, out, over, fingerprint=make_fingerprint("model-hash-2", {}), overwrite=True).exit_code == 0
    assert over.calls == ["small", "boxes", "dicom-boxes"]
    assert {r["status"] for r in read_status(out).values()} == {"ok"}


def test_changed_manifest_override_redoes_only_that_slide(good_jobs, tmp_path):
    out = tmp_path / "out"
    run(good_jobs, out, ThumbnailProcess())
    jobs = [SlideJob(j.path, j.name, {"mpp": 0.3} if j.name == "boxes" else {}) for j in good_jobs]
    proc = ThumbnailProcess()
    run(jobs, out, proc)
    assert proc.calls == ["boxes"]


def test_failed_slides_are_retried_on_resume(mixed_jobs, tmp_path):
    out = tmp_path / "out"
    run(mixed_jobs, out, ThumbnailProcess())
    proc = ThumbnailProcess()
    assert run(mixed_jobs, out, proc).exit_code == 1
    assert proc.calls == ["dicom-sm-grayscale", "truncated"]


def test_live_lock_is_respected(good_jobs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    other = subprocess.Popen(["sleep", "30"])
    try:
        lock = out / "boxes.lock"
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        proc = ThumbnailProcess()
        result = run(good_jobs, out, proc)
        assert proc.calls == ["small", "dicom-boxes"]
        assert result.exit_code == 0
        row = read_status(out)["boxes"]
        assert row["status"] == "skipped"
        assert row["error"] == f"being processed by another run (pid {other.pid})"
        assert lock.exists()  # not ours to remove
    finally:
        other.kill()
        other.wait()


def test_stale_lock_is_taken_over(good_jobs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / "boxes.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    proc = ThumbnailProcess()
    assert run(good_jobs, out, proc).exit_code == 0
    assert proc.calls == ["small", "boxes", "dicom-boxes"]
    assert leftovers(out) == [] and not any(p.name.startswith(".boxes.lock") for p in out.iterdir())


def test_lock_from_another_host_is_respected_until_it_times_out(good_jobs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / "small.lock"
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    proc = ThumbnailProcess()
    run(good_jobs, out, proc)
    assert "small" not in proc.calls
    assert read_status(out)["small"]["error"] == "being processed by another run (pid 1 on elsewhere.example)"
    old = time.time() - 7200
    os.utime(lock, (old, old))
    proc = ThumbnailProcess()
    run(good_jobs, out, proc, lock_timeout=3600)
    assert proc.calls == ["small"]
    assert not lock.exists()


def test_unreadable_lock_gets_a_grace_period(good_jobs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / "small.lock"
    lock.write_bytes(b"")  # created, not yet written by its owner
    proc = ThumbnailProcess()
    run(good_jobs, out, proc)
    assert "small" not in proc.calls
    old = time.time() - 600
    os.utime(lock, (old, old))
    proc = ThumbnailProcess()
    run(good_jobs, out, proc)
    assert proc.calls == ["small"]


_CONCURRENT_RUN = """
import sys, time
from pathlib import Path
from wsiseg.atomic import atomic_output
from wsiseg.batch.jobs import SlideJob, SlideOutcome
from wsiseg.batch.runner import run_batch

out = Path(sys.argv[1])
names = sys.argv[2:]

def process(job, out_dir, *, fingerprint, overwrite, progress):
    with open(out_dir / "calls.log", "a") as log:
        log.write(job.name + "\\n")
    target = out_dir / (job.name + ".txt")
    with atomic_output(target, overwrite=overwrite) as tmp:
        tmp.write_text("start ")
        time.sleep(0.15)
        with open(tmp, "a") as fh:
            fh.write(job.name + " end")
    return SlideOutcome("ok", outputs={"text": target.name})

jobs = [SlideJob("/nonexistent/" + n + ".svs", n) for n in names]
sys.exit(run_batch(jobs, out, process, fingerprint="fp", progress="jsonl").exit_code)
"""


def test_two_runs_on_one_folder_process_each_slide_once(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_CONCURRENT_RUN))
    names = [f"s{i}" for i in range(8)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    runs = [
        subprocess.Popen([sys.executable, str(script), str(out), *order], env=env, stderr=subprocess.PIPE, text=True)
        for order in (names, list(reversed(names)))
    ]
    logs = [r.communicate(timeout=60)[1] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], logs
    calls = (out / "calls.log").read_text().split()
    assert sorted(calls) == names  # each slide processed exactly once across both runs
    for n in names:
        assert (out / f"{n}.txt").read_text() == f"start {n} end"
        assert json.loads((out / f"{n}.done.json").read_text())["fingerprint"] == "fp"
    assert leftovers(out) == []
    skipped = [json.loads(line) for log in logs for line in log.splitlines() if '"slide_done"' in line]
    assert {e["status"] for e in skipped} <= {"ok", "skipped"}


def test_keyboard_interrupt_records_status_and_propagates(good_jobs, tmp_path):
    out = tmp_path / "out"
    inner = ThumbnailProcess()

    def process(job, out_dir, **kw):
        if job.name == "boxes":
            with atomic_output(out_dir / "boxes.thumb.png") as tmp:
                tmp.write_bytes(b"half")
                raise KeyboardInterrupt
        return inner(job, out_dir, **kw)

    with pytest.raises(KeyboardInterrupt):
        run(good_jobs, out, process)
    rows = read_status(out)
    assert rows["small"]["status"] == "ok"
    assert (rows["boxes"]["status"], rows["boxes"]["error"]) == ("failed", "interrupted")
    assert rows["dicom-boxes"]["status"] == "pending"
    assert not (out / "boxes.done.json").exists() and not (out / "boxes.thumb.png").exists()
    assert leftovers(out) == []
    # The next run redoes the interrupted slide and the one never reached.
    proc = ThumbnailProcess()
    assert run(good_jobs, out, proc).exit_code == 0
    assert proc.calls == ["boxes", "dicom-boxes"]


def test_redo_removes_the_old_certificate_before_work_starts(good_jobs, tmp_path):
    out = tmp_path / "out"
    run(good_jobs, out, ThumbnailProcess())

    def interrupted(job, out_dir, **kw):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(good_jobs[:1], out, interrupted, overwrite=True)
    assert not (out / "small.done.json").exists()  # half-replaced outputs are never presented as complete
    assert not is_done(good_jobs[0], out, FP)


def test_disk_full_mid_write_fails_the_slide_and_the_batch_goes_on(good_jobs, tmp_path):
    out = tmp_path / "out"
    inner = ThumbnailProcess()

    def process(job, out_dir, **kw):
        if job.name == "small":
            with atomic_output(out_dir / "small.thumb.png") as tmp, open(tmp, "wb") as fh:
                fh.write(b"\x89PNG partial")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
        return inner(job, out_dir, **kw)

    result = run(good_jobs, out, process)
    assert result.exit_code == 1
    rows = read_status(out)
    assert rows["small"]["status"] == "failed"
    assert rows["small"]["error"].startswith("disk full: No space left on device")
    assert not (out / "small.thumb.png").exists() and not (out / "small.done.json").exists()
    assert inner.calls == ["boxes", "dicom-boxes"]
    assert rows["boxes"]["status"] == rows["dicom-boxes"]["status"] == "ok"
    assert leftovers(out) == []


def test_unwritable_status_is_a_warning_not_a_stop(good_jobs, tmp_path, monkeypatch):
    real = batch_progress.atomic_output

    def full_for_status(path, **kw):
        if Path(path).name == "status.csv":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, **kw)

    monkeypatch.setattr(batch_progress, "atomic_output", full_for_status)
    stream = io.StringIO()
    result = run(good_jobs, tmp_path / "out", ThumbnailProcess(), progress="jsonl", stream=stream)
    assert result.exit_code == 0 and result.counts["ok"] == 3
    warnings = [json.loads(x) for x in stream.getvalue().splitlines() if '"warning"' in x]
    assert len(warnings) == 1 and "disk full" in warnings[0]["message"]


def test_process_bugs_and_false_outputs_fail_only_their_slide(good_jobs, tmp_path):
    def process(job, out_dir, **kw):
        if job.name == "small":
            raise ValueError("boom\nsecond line")
        if job.name == "boxes":
            return SlideOutcome("ok", outputs={"mask": "boxes.mask.tiff"})  # never written
        return SlideOutcome("ok")

    out = tmp_path / "out"
    result = run(good_jobs, out, process)
    rows = read_status(out)
    assert rows["small"]["error"] == "internal error: ValueError: boom second line"
    assert rows["boxes"]["status"] == "failed" and "does not exist" in rows["boxes"]["error"]
    assert rows["dicom-boxes"]["status"] == "ok"
    assert result.exit_code == 1


def test_jobs_with_duplicate_names_are_refused(slides_dir, tmp_path):
    jobs = [SlideJob(str(slides_dir / "small.svs"), "x"), SlideJob(str(slides_dir / "boxes.tiff"), "X")]
    with pytest.raises(ConfigError, match="used by two slides"):
        run(jobs, tmp_path / "out", ThumbnailProcess())


def test_jsonl_progress_events_parse(good_jobs, tmp_path):
    stream = io.StringIO()
    result = run(good_jobs, tmp_path / "out", ThumbnailProcess(), progress="jsonl", stream=stream)
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "batch_start" and kinds[-1] == "batch_done"
    assert kinds.count("slide_start") == kinds.count("slide_done") == 3
    stages = [(e["name"], e["stage"], e["fraction"]) for e in events if e["event"] == "stage"]
    assert ("small", "open", 0.0) in stages and ("small", "write", 1.0) in stages
    done = [e for e in events if e["event"] == "slide_done"]
    assert [(e["name"], e["status"]) for e in done] == [("small", "ok"), ("boxes", "ok"), ("dicom-boxes", "ok")]
    assert all(isinstance(e["seconds"], float) for e in done)
    for e in events:
        datetime.fromisoformat(e["time"])
    assert events[-1]["exit_code"] == result.exit_code == 0
    # "auto" on a non-terminal stream means JSON lines too.
    stream = io.StringIO()
    run(good_jobs, tmp_path / "out", ThumbnailProcess(), progress="auto", stream=stream)
    assert all(json.loads(line)["event"] for line in stream.getvalue().splitlines())


def test_tty_progress_bars_render(mixed_jobs, tmp_path):
    stream = io.StringIO()
    result = run(mixed_jobs, tmp_path / "out", ThumbnailProcess(), progress="tty", stream=stream)
    text = stream.getvalue()
    assert "slides" in text and "truncated: failed:" in text
    assert text.rstrip().endswith(f"3 ok, 2 failed, 0 skipped; status: {result.status_path}")
    with pytest.raises(ConfigError, match="progress"):
        run(mixed_jobs, tmp_path / "out", ThumbnailProcess(), progress="fancy")


def test_lock_of_the_same_distributed_batch_is_taken_over_even_from_another_host(good_jobs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    job = next(j for j in good_jobs if j.name == "small")
    (out / "small.lock").write_text(json.dumps({"pid": 4242, "host": "elsewhere.example", "run": "batch-1"}))
    (out / ".small.thumb.png.tmp-4242").write_bytes(b"half a thumbnail")  # left by the killed attempt
    proc = ThumbnailProcess()
    # Another batch's lock from another host: respected.
    outcome = runner.execute_slide(job, out, proc, fingerprint=FP, run_id="batch-2")
    assert outcome.status == "skipped" and "elsewhere.example" in outcome.error and proc.calls == []
    # The same batch's: an earlier attempt whose worker was lost; taken over, its temporaries removed.
    outcome = runner.execute_slide(job, out, proc, fingerprint=FP, run_id="batch-1")
    assert outcome.status == "ok" and proc.calls == ["small"]
    assert is_done(job, out, FP) and leftovers(out) == []


def test_lost_slide_release_only_touches_its_own_batch(good_jobs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    job = next(j for j in good_jobs if j.name == "small")
    (out / "small.lock").write_text(json.dumps({"pid": 4242, "host": "elsewhere.example", "run": "batch-1"}))
    (out / ".small.mask.tif.tmp-4242").write_bytes(b"partial")
    (out / ".small.mask.tif.tmp-999").write_bytes(b"someone else's")
    assert not locks.release_lost_slide(job, out, "batch-2")
    assert (out / "small.lock").exists()
    assert locks.release_lost_slide(job, out, "batch-1")
    assert sorted(p.name for p in out.iterdir()) == [".small.mask.tif.tmp-999"]


def test_plan_execute_record_are_the_parts_of_run_batch(good_jobs, tmp_path):
    out = tmp_path / "out"
    jobs = runner.check_batch(good_jobs, fingerprint=FP)
    rec = runner.BatchRecorder(jobs, out, "none", io.StringIO())
    assert read_status(out)["small"]["status"] == "pending"
    proc = ThumbnailProcess()
    for i, job in enumerate(jobs):
        action, reason = runner.plan_slide(job, out, FP)
        assert (action, reason) == ("process", "not done yet")
        rec.slide_start(i, action, reason)
        rec.slide_done(i, runner.execute_slide(job, out, proc, fingerprint=FP))
    assert rec.finish().counts == {"ok": 3, "failed": 0, "skipped": 0}
    assert runner.plan_slide(jobs[0], out, FP) == ("skip", DONE_REASON)
    assert runner.plan_slide(jobs[0], out, FP, overwrite=True) == ("process", "--overwrite")


def test_slide_finished_by_a_lost_attempt_of_the_same_batch_is_ok_not_skipped(good_jobs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    job = next(j for j in good_jobs if j.name == "small")
    first = ThumbnailProcess()
    assert runner.execute_slide(job, out, first, fingerprint=FP, run_id="batch-1").status == "ok"
    # The worker died before reporting; the scheduler reruns the task: the work is not redone.
    again = ThumbnailProcess()
    outcome = runner.execute_slide(job, out, again, fingerprint=FP, run_id="batch-1")
    assert outcome.status == "ok" and outcome.outputs == {"thumbnail": "small.thumb.png"} and again.calls == []
    other = runner.execute_slide(job, out, again, fingerprint=FP, run_id="batch-2")
    assert other.status == "skipped" and "by another run" in other.error


def test_status_of_two_runs_sharing_a_folder_shows_both(good_jobs, tmp_path):
    """Each run merges its rows with the file's under a lock: both runs' slides show, each with its latest outcome."""
    out = tmp_path / "out"
    small, boxes, dicom = good_jobs
    old = "2020-01-01T00:00:00+00:00"
    out.mkdir()
    (out / "status.csv").write_text(
        "slide,name,status,seconds,error,finished_at\n"
        f"{small.path},small,failed,1.000,an earlier run,{old}\n/gone.svs,gone,ok,1.000,,{old}\n"
        "/dead.svs,dead,pending,,,\n"
    )
    a = runner.BatchRecorder([small, boxes], out, "none", io.StringIO())
    assert read_status(out)["small"]["status"] == "pending"  # an earlier run's outcome is not this run's
    b = runner.BatchRecorder([boxes, dicom], out, "none", io.StringIO())
    a.slide_done(0, SlideOutcome("ok"))
    b.slide_done(0, SlideOutcome("skipped", error="being processed by another run (pid 1 on here)"))
    b.slide_done(1, SlideOutcome("ok"))
    assert {n: r["status"] for n, r in read_status(out).items()} == {
        "small": "ok",
        "boxes": "skipped",
        "dicom-boxes": "ok",
        "gone": "ok",
    }
    a.slide_done(1, SlideOutcome("ok"))
    b.abort()  # B writes its view again: A's outcome for boxes is newer than B's skip
    rows = read_status(out)
    statuses = {n: r["status"] for n, r in rows.items()}
    assert statuses == {"small": "ok", "boxes": "ok", "dicom-boxes": "ok", "gone": "ok"}
    assert "dead" not in rows and leftovers(out) == []


# ---------------------------------------------------------------------------
# per-slide time limit


def _gone(pid: int) -> bool:
    """The process has exited (a zombie whose parent died counts as gone)."""
    return not locks._pid_alive(pid, None)


def test_slide_timeout_kills_a_hung_slide_and_the_batch_goes_on(tmp_path):
    from _faults import Faulty, Stamp

    out, log = tmp_path / "out", tmp_path / "log"
    log.mkdir()
    jobs = [SlideJob(f"/nonexistent/{n}.svs", n) for n in ("a", "hang", "crash", "b")]
    stream = io.StringIO()
    t0 = time.monotonic()
    # "hang" writes part of its mask, then sleeps 120 s; "crash" kills its process
    result = run(
        jobs,
        out,
        Faulty(Stamp(), str(log), slow="hang", crash="crash"),
        slide_timeout=8,
        progress="jsonl",
        stream=stream,
    )
    assert time.monotonic() - t0 < 60
    rows = read_status(out)
    assert {n: (r["status"], r["error"]) for n, r in rows.items()} == {
        "a": ("ok", ""),
        "hang": ("failed", "timed out after 8 s"),
        "crash": ("failed", "its worker process exited with code 3 before it finished"),
        "b": ("ok", ""),
    }
    assert result.exit_code == 1 and sorted((log / "completed.log").read_text().split()) == ["a", "b"]
    assert _gone(int((log / "slow.pid").read_text()))  # killed, not left running
    assert leftovers(out) == []  # its half-written mask's temporary went with it
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert {e["name"] for e in events if e["event"] == "stage"} == {"a", "b"}  # progress comes back from the workers


def test_slide_timeout_is_checked_before_any_work(good_jobs, tmp_path):
    for bad in (0, -1, float("nan"), "soon"):
        with pytest.raises(ConfigError, match="slide timeout must be a positive number"):
            run(good_jobs, tmp_path / "out", ThumbnailProcess(), slide_timeout=bad)
    with open(tmp_path / "held.txt", "w") as fh:

        def unpicklable(job, out_dir, **kw):  # holds an open file: cannot go to another process
            return SlideOutcome("ok", outputs={"f": fh.name})

        with pytest.raises(ConfigError, match="cannot be sent there"):
            run(good_jobs, tmp_path / "out", unpicklable, slide_timeout=60)
    assert not (tmp_path / "out").exists()


_TIMED_RUN = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from _faults import Faulty, Stamp
from wsiseg.batch.jobs import SlideJob
from wsiseg.batch.runner import run_batch

out, log = Path(sys.argv[1]), sys.argv[2]
run_batch([SlideJob("/nonexistent/hang.svs", "hang")], out, Faulty(Stamp(), log, slow="hang"), fingerprint="fp",
          progress="none", slide_timeout=300)
"""


def test_batch_killed_outright_takes_its_slide_process_along_and_the_next_run_cleans_up(tmp_path):
    from _faults import Stamp

    out, log = tmp_path / "out", tmp_path / "log"
    log.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    tests = Path(__file__).resolve().parents[1]  # _faults.py
    parent = subprocess.Popen([sys.executable, "-c", _TIMED_RUN, str(out), str(log), str(tests)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not (log / "slow.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        child = int((log / "slow.pid").read_text())
        owner = json.loads((out / "hang.lock").read_text())
        assert (owner["pid"], owner["child"]) == (parent.pid, child)  # the lock names the slide's process
    finally:
        parent.kill()  # SIGKILL: no cleanup of its own
        parent.wait()
    deadline = time.monotonic() + 30
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(child)  # it died with the batch instead of running on unowned
    assert (out / f".hang.mask.tif.tmp-{child}").exists() and (out / "hang.lock").exists()
    assert run([SlideJob("/nonexistent/hang.svs", "hang")], out, Stamp(), fingerprint="fp").exit_code == 0
    assert leftovers(out) == []
