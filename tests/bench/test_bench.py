"""Benchmark plumbing: markdown sections and a tiny end-to-end `wsiseg bench gather`."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from wsiseg.bench.common import deformed_points, uniform_points, write_section
from wsiseg.cli.app import main
from wsiseg.errors import WsisegError


def test_write_section_creates_replaces_and_keeps_others(tmp_path):
    md = tmp_path / "docs" / "b.md"
    write_section(md, "gather", "one")
    write_section(md, "convert", "two")
    write_section(md, "gather", "three\nlines")
    text = md.read_text()
    assert text.startswith("# Benchmarks\n")
    assert "one" not in text and text.count("<!-- bench:gather -->") == 1
    assert "<!-- bench:gather -->\nthree\nlines\n<!-- /bench:gather -->" in text
    assert "<!-- bench:convert -->\ntwo\n<!-- /bench:convert -->" in text
    assert text.index("bench:gather") < text.index("bench:convert")  # replaced in place
    md.write_text("x\n<!-- bench:gather -->\nno end\n")
    with pytest.raises(WsisegError):
        write_section(md, "gather", "y")


def test_grids():
    u = uniform_points(4, 8, 800.0, 400.0)
    assert u.shape == (4, 8, 2)
    np.testing.assert_allclose(u[0, :, 0], (np.arange(8) + 0.5) * 100)
    d = deformed_points(64, 64, 1000.0, 1000.0)
    dx = np.diff(d[0, :, 0])
    assert np.all(dx > 0) and dx.min() < 0.05 * dx.max()  # monotone, dense in the middle
    assert np.argmin(dx) in (31, 32)


def test_cli_bench_gather_small(slides_dir, tmp_path):
    out = tmp_path / "bench.md"
    args = [
        "bench", "gather", "--size", "1200x900", "--samples", "40x30", "--repeats", "1", "--tile", "128",
        "--workdir", str(tmp_path / "work"), "--out", str(out), "--source", str(slides_dir / "CMU-1-Small-Region.svs"),
    ]  # fmt: skip
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "written in" in first.output
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    assert "reused" in second.output  # cached by parameters
    text = out.read_text()
    assert text.count("<!-- bench:gather -->") == 1
    for row in ("| uniform | lod |", "| uniform | exact |", "| deformed | lod |", "| deformed | exact |"):
        assert row in text
    assert "40 x 30 (w x h) samples" in text


def test_cli_bench_segment_small(slides_dir, tmp_path, monkeypatch):
    import wsiseg.bench.segment as bs

    # In-process runs keep the test fast (each child process would pay torch's imports);
    # the benchmark itself runs every measurement in a fresh process. No demo or standard-net rows here.
    monkeypatch.setattr(bs, "_run_child", bs._run)
    monkeypatch.setattr(bs, "_more_models", lambda workdir: [])
    out = tmp_path / "bench.md"
    out.write_text("# Benchmarks\n\n<!-- bench:gather -->\nkept\n<!-- /bench:gather -->\n")
    args = [
        "bench", "segment", "--size", "1200x900", "--window", "256", "--workdir", str(tmp_path / "work"),
        "--out", str(out), "--source", str(slides_dir / "CMU-1-Small-Region.svs"),
    ]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "untrained tiny net" in r.output and "extrapolated" in r.output
    text = out.read_text()
    assert "<!-- bench:gather -->\nkept\n<!-- /bench:gather -->" in text  # other sections untouched
    section = text[text.index("<!-- bench:segment -->") : text.index("<!-- /bench:segment -->")]
    assert "synthetic 1200 x 900" in section and "untrained with a fixed seed" in section
    assert "Mpx/s" in section and "peak RSS" in section
    assert "**extrapolated** (not run)" in section and "256 x 256 synthetic slide" in section
    assert "| untrained tiny net |" in section and "| untrained, constant labels |" in section
    for target in ("end to end <= 15 s", "mask write >= 500 Mpx/s", "peak RSS <= 1.5 GiB", ">= 100x"):
        assert target in section
    assert not [p for p in (tmp_path / "work").iterdir() if p.is_dir()]  # run outputs removed


def test_bench_standard_model_is_smp_default_unet(tmp_path):
    # The sliding-window row for a typical net: smp's default U-Net on ResNet-34, built once, loadable.
    import wsiseg.bench.segment as bs
    from wsiseg.models.io import load_deformseg

    path = bs.standard_model(tmp_path)
    assert bs.standard_model(tmp_path) == path and path.stat().st_size > 50e6  # cached; ~24 M float32 weights
    seg = load_deformseg(path, device="cpu").net.segmenter
    assert sum(p.numel() for p in seg.parameters()) > 20e6


def test_cli_bench_segment_layout_small(shared_data, tmp_path, monkeypatch):
    import wsiseg.bench.segment as bs

    monkeypatch.setattr(bs, "_run_child", bs._run)  # in-process, as above
    monkeypatch.setattr(bs, "_more_models", lambda workdir: [])
    out = tmp_path / "bench.md"
    args = [
        "bench", "segment", "--layout", "needle", "--size", "2000x1500", "--window", "256",
        "--workdir", str(tmp_path / "work"), "--out", str(out), "--source", str(shared_data / "textures"),
    ]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "needle slide 2000x1500: written in" in r.output
    text = out.read_text()
    assert "<!-- bench:segment -->" not in text  # the synthetic slide's section is not touched
    section = text[text.index("<!-- bench:segment-needle -->") : text.index("<!-- /bench:segment-needle -->")]
    assert "## wsiseg segment end to end: needle biopsies layout" in section
    assert "`--layout needle --seed 0`" in section and "pieces of tissue covering" in section
    assert "`target_image.png`" in section and "all tissue (`--layout fill`" in section
    assert "end to end <= 10 s" in section and "decoded Mpx" in section
    names = sorted(p.name for p in (tmp_path / "work").glob("layout-*.tiff"))
    assert [n.split("-")[1] for n in names] == ["fill", "needle"]


def test_cli_bench_gpu_without_cuda_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = CliRunner().invoke(main, ["bench", "gpu", "--workdir", str(tmp_path), "--out", str(tmp_path / "b.md")])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--device cpu" in lines[0]
    assert not (tmp_path / "b.md").exists()


def test_cli_bench_gpu_on_cpu_tiny_layout(shared_data, tmp_path):
    out = tmp_path / "bench.md"
    args = [
        "bench", "gpu", "--device", "cpu", "--layouts", "needle", "--size", "1200x900", "--repeats", "1",
        "--workdir", str(tmp_path / "work"), "--out", str(out), "--source", str(shared_data / "textures"),
    ]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "slides/h" in r.output and "labels equal on 100.000 %" in r.output
    section = out.read_text().split("<!-- bench:gpu -->")[1]
    assert "| needle | 1200 x 900 |" in section and "(met)" in section
    assert "Device: cpu" in section and "AMP (float16 autocast): off (CPU)" in section
    assert list((tmp_path / "work").glob("gpu-*")) == []  # outputs removed


def test_memory_section_reports_what_segment_adds_to_the_imports_and_its_goal():
    from pathlib import Path

    from wsiseg.bench.memory import MemoryBench, MemoryRun, format_memory_section
    from wsiseg.bench.common import SlideSpec, machine_info
    from wsiseg.bench.segment import Measurement

    def run(side: int, peak: float, before: float) -> MemoryRun:
        timings = {k: 1.0 for k in ("open", "regions", "sample+segment", "mask", "geojson", "qc")}
        report = {"regions": [{}], "gather": {"regions": [{"grid": [8, 8]}]}}
        m = Measurement("deformed", side, side, {**timings, "total": 6.0}, 3.0, 6.0, 9.0, peak, before, report)
        return MemoryRun(SlideSpec(side, side, Path("src.png")), 1.0, False, 2**20, m)

    ok = MemoryBench(
        "m.safetensors", True, (run(1000, 1400.0, 1100.0), run(4000, 1450.0, 1080.0)), (), 10.0, machine_info()
    )
    text = format_memory_section(ok, "wsiseg bench memory")
    assert "| **1400** | 1100 | 300 |" in text and "| **1450** | 1080 | 370 |" in text
    assert (
        "minus the imports and model (*before*) <= 400 MiB, flat in slide area: largest 370 MiB (met); spread 70"
        in text
    )
    over = MemoryBench(
        "m.safetensors", True, (run(1000, 1400.0, 1100.0), run(4000, 1600.0, 1100.0)), (), 10.0, machine_info()
    )
    assert "largest 500 MiB (**MISSED**)" in format_memory_section(over, "wsiseg bench memory")
