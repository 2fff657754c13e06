"""`wsiseg info` and `wsiseg convert` through Click: output, JSON, one-line errors, exit codes."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from wsiseg.cli.app import main
from wsiseg.slide import open_slide

from tests.slide.test_slide_open import BAD_NAMES, bad_inputs


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def test_info_text(slides_dir, caplog):
    with caplog.at_level("WARNING"):
        res = _run("info", slides_dir / "boxes.tiff")
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "generic-tiff" in out and "tifffile" in out
    # the TIFF's 72 dpi default is shown, and said to be ignored, once
    assert "mpp: unknown (ignored-implausible: 352.778 um/px from openslide, outside 0.05-20 um/px; pass --mpp)" in out
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"{slides_dir / 'boxes.tiff'}: ignored implausible") and "352.778 um/px" in warning
    for size in ("300x250", "150x125", "75x62", "37x31"):
        assert size in out
    assert "64x64" in out
    assert "4 x 4.032" in out  # non-isotropic downsample shown per axis


def test_info_json_several(slides_dir):
    paths = [slides_dir / "CMU-1-Small-Region.svs", slides_dir / "dicom-sm", slides_dir / "rgba_geotiff.tiff"]
    res = _run("info", "--json", *paths)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [d["path"] for d in data] == [str(p) for p in paths]
    cmu, dcm, rgba = data
    assert cmu["vendor"] == "aperio" and cmu["mpp"] == [0.499, 0.499] and cmu["mpp_source"] == "openslide"
    assert cmu["mpp_ignored"] is None
    assert cmu["associated"] == ["label", "macro", "thumbnail"]
    assert cmu["levels"] == [{"index": 0, "width": 2220, "height": 2967, "downsample": [1.0, 1.0], "chunk": [240, 240]}]
    assert dcm["reader"] == "openslide" and dcm["vendor"] == "dicom"
    assert rgba["mpp"] is None and rgba["mpp_source"] == "missing" and len(rgba["levels"]) == 2


def test_info_mpp_override(slides_dir, caplog):
    with caplog.at_level("WARNING"):
        res = _run("info", "--json", "--mpp", "0.25", slides_dir / "boxes.tiff")
    assert res.exit_code == 0
    (d,) = json.loads(res.stdout)
    assert d["mpp"] == [0.25, 0.25] and d["mpp_source"] == "override" and d["mpp_ignored"] is None
    assert caplog.records == []  # --mpp given: the file's value is not used, nothing to warn about
    res = _run("info", "--mpp", "-1", slides_dir / "boxes.tiff")
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1


def test_info_reports_good_slides_then_fails(slides_dir):
    bad = slides_dir / "dicom-sm-grayscale"
    res = _run("info", slides_dir / "small.svs", bad, slides_dir / "boxes.tiff")
    assert res.exit_code == 2
    assert "small.svs" in res.stdout and "boxes.tiff" in res.stdout
    lines = _errors(res.stderr)
    assert len(lines) == 1
    assert lines[0].startswith("wsiseg: error: ") and "sm_image_grayscale.dcm" in lines[0] and "16-bit" in lines[0]
    assert "Traceback" not in res.output


@pytest.mark.parametrize("name", BAD_NAMES)
def test_info_bad_input_one_line(tmp_path, slides_dir, name):
    path, _ = bad_inputs(tmp_path, slides_dir)[name]
    res = _run("info", path)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("wsiseg: error: ") and str(path) in lines[0]
    assert "Traceback" not in res.output


def _errors(stderr: str) -> list[str]:
    """stderr's lines except the expected warnings about ignored 72/96 dpi resolution tags (boxes.tiff ...)."""
    return [ln for ln in stderr.strip().splitlines() if "ignored implausible level-0 resolution" not in ln]


def test_info_json_with_bad_input(tmp_path, slides_dir):
    res = _run("info", "--json", slides_dir / "boxes.tiff", tmp_path / "missing.svs")
    assert res.exit_code == 2
    (boxes,) = json.loads(res.stdout)
    assert boxes["path"] == str(slides_dir / "boxes.tiff") and boxes["mpp"] is None
    assert boxes["mpp_source"] == "ignored-implausible"
    assert boxes["mpp_ignored"] == {
        "mpp": [pytest.approx(352.7778)] * 2,
        "source": "openslide",
        "plausible_range": [0.05, 20.0],
    }
    assert len(_errors(res.stderr)) == 1


def test_convert_cli(slides_dir, tmp_path):
    out = tmp_path / "boxes.zarr"
    res = _run("convert", slides_dir / "boxes.tiff", out, "--chunk", "128")
    assert res.exit_code == 0, res.output
    assert "wrote" in res.stdout and open_slide(out).levels[0].chunk_shape == (128, 128)
    res = _run("convert", slides_dir / "boxes.tiff", out)
    assert res.exit_code == 2
    (line,) = _errors(res.stderr)
    assert "already exists" in line and "--overwrite" in line
    res = _run("convert", slides_dir / "boxes.tiff", out, "--overwrite")
    assert res.exit_code == 0
    res = _run("convert", tmp_path / "missing.svs", tmp_path / "m.zarr")
    assert res.exit_code == 2 and "no such file" in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "m.zarr").exists()


def test_info_on_every_real_slide_prints_nothing_on_stderr(slides_dir):
    """Library warnings (unclosed files, tifffile/OpenSlide notes) go to the log, not stderr, on success.

    Run as a real process with every warning enabled (``-W always``, as a developer or CI may
    have it), so that nothing is hidden by Python's default filters or by pytest's capture.
    """
    import os
    import subprocess
    import sys

    slides = sorted(p for p in slides_dir.iterdir() if "grayscale" not in p.name)  # that one is refused
    env = {**os.environ, "PYTHONWARNINGS": "always"}
    out = subprocess.run(
        [sys.executable, "-m", "wsiseg", "info", *map(str, slides)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    # only wsiseg's own line per file whose 72/96 dpi resolution tag is ignored
    assert _errors(out.stderr) == []
    assert "CMU-1-Small-Region" not in out.stderr and "boxes.tiff" in out.stderr
    assert out.stdout.count("vendor:") == len(slides)
