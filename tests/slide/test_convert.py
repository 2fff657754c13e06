"""convert_to_ngff: round trips, NGFF 0.4 metadata, overwrite rules, clean failure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsiseg.errors import ConfigError, WsisegError
from wsiseg.slide import Multiscale, open_slide
from wsiseg.slide import convert as convert_mod
from wsiseg.slide.convert import convert_to_ngff


def _attrs(out: Path) -> dict:
    return json.loads((out / ".zattrs").read_text())


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("name", ["boxes.tiff", "yb10kx5k.zstd.tiff"])
def test_round_trip_lossless(slides_dir, tmp_path, name):
    # both files carry only a 72 dpi default, ignored: give them a pixel size to carry through
    src = open_slide(slides_dir / name, mpp=(0.5, 0.25))
    out = convert_to_ngff(src, tmp_path / "out.zarr", progress=False)
    assert out == tmp_path / "out.zarr" and _leftovers(tmp_path) == []
    back = open_slide(out)
    assert (back.vendor, back.reader, back.mpp_source) == ("ome-zarr", "zarr", "ngff")
    assert back.mpp == pytest.approx(src.mpp)
    assert len(back.levels) == len(src.levels)
    for a, b in zip(src.levels, back.levels):
        assert b.downsample == pytest.approx(a.downsample)
        assert np.array_equal(a.array.compute(), b.array.compute())
    assert back.levels[0].chunk_shape == (min(512, src.height), min(512, src.width))


def test_ngff_metadata(slides_dir, tmp_path):
    src = open_slide(slides_dir / "boxes.tiff", mpp=0.5)
    out = convert_to_ngff(src, tmp_path / "boxes.zarr", chunk=128, progress=False)
    attrs = _attrs(out)
    assert json.loads((out / ".zgroup").read_text())["zarr_format"] == 2
    (ms,) = attrs["multiscales"]
    assert ms["version"] == "0.4"
    # NGFF 0.4: channel axis before the space axes.
    assert ms["axes"] == [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    assert [d["path"] for d in ms["datasets"]] == ["0", "1", "2", "3"]
    mx, my = src.mpp
    for d, lv in zip(ms["datasets"], src.levels):
        sx, sy = lv.downsample
        scale = d["coordinateTransformations"][0]
        assert scale["type"] == "scale"
        assert scale["scale"] == pytest.approx([1.0, my * sy, mx * sx])
        if d["path"] == "0":
            assert len(d["coordinateTransformations"]) == 1
        else:
            (trans,) = d["coordinateTransformations"][1:]
            assert trans["type"] == "translation"
            # pixel-centre origin: level pixel 0 centred at level-0 index (s - 1) / 2
            assert trans["translation"] == pytest.approx([0.0, my * (sy - 1) / 2, mx * (sx - 1) / 2])
    assert [c["color"] for c in attrs["omero"]["channels"]] == ["FF0000", "00FF00", "0000FF"]
    zarray = json.loads((out / "0" / ".zarray").read_text())
    assert zarray["shape"] == [3, 250, 300]
    assert zarray["chunks"] == [3, 128, 128]
    assert zarray["dimension_separator"] == "/"
    assert zarray["compressor"]["id"] == "blosc" and zarray["compressor"]["cname"] == "zstd"
    assert (out / "0" / "0" / "1" / "2").is_file()  # nested chunk keys c/y/x


def test_single_level_source_gets_mean_levels(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (1100, 700, 3), dtype=np.uint8)
    src = Multiscale.from_arrays([img], chunks=256)  # no MPP
    out = convert_to_ngff(src, tmp_path / "one.zarr", progress=False)
    back = open_slide(out)
    assert [(lv.height, lv.width) for lv in back.levels] == [(1100, 700), (550, 350), (275, 175)]
    assert back.mpp is None and back.mpp_source == "missing"
    level1 = np.floor(img.astype(np.float32).reshape(550, 2, 350, 2, 3).mean(axis=(1, 3)) + 0.5).astype(np.uint8)
    assert np.array_equal(back.levels[1].array.compute(), level1)
    ms = _attrs(out)["multiscales"][0]
    assert all("unit" not in ax for ax in ms["axes"])  # unitless when the MPP is unknown
    assert ms["datasets"][1]["coordinateTransformations"][0]["scale"] == [1.0, 2.0, 2.0]


def test_refuse_overwrite_then_overwrite(slides_dir, tmp_path):
    out = tmp_path / "x.zarr"
    out.mkdir()
    (out / "marker").write_text("old")
    with pytest.raises(WsisegError, match="already exists") as err:
        convert_to_ngff(slides_dir / "boxes.tiff", out, progress=False)
    assert str(out) in str(err.value)
    assert (out / "marker").exists() and _leftovers(tmp_path) == []
    convert_to_ngff(slides_dir / "boxes.tiff", out, overwrite=True, progress=False)
    assert not (out / "marker").exists()
    assert open_slide(out).dimensions == (300, 250)
    assert _leftovers(tmp_path) == []


def test_failure_leaves_no_temp_dir(slides_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = convert_mod._write_piece

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_mod, "_write_piece", flaky)
    out = tmp_path / "boxes.zarr"
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert_to_ngff(slides_dir / "boxes.tiff", out, chunk=64, progress=False)
    assert not out.exists()
    assert _leftovers(tmp_path) == []

    # A failed --overwrite keeps the previous output intact.
    monkeypatch.setattr(convert_mod, "_write_piece", real)
    convert_to_ngff(slides_dir / "boxes.tiff", out, progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    calls["n"] = 0
    monkeypatch.setattr(convert_mod, "_write_piece", flaky)
    with pytest.raises(RuntimeError):
        convert_to_ngff(slides_dir / "boxes.tiff", out, chunk=64, overwrite=True, progress=False)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert _leftovers(tmp_path) == []


def test_bad_options(slides_dir, tmp_path):
    with pytest.raises(ConfigError):
        convert_to_ngff(slides_dir / "boxes.tiff", tmp_path / "a.zarr", ngff_version="0.5")
    with pytest.raises(ConfigError):
        convert_to_ngff(slides_dir / "boxes.tiff", tmp_path / "a.zarr", chunk=4)
    with pytest.raises(WsisegError, match="parent"):
        convert_to_ngff(slides_dir / "boxes.tiff", tmp_path / "no" / "a.zarr")
    assert not (tmp_path / "a.zarr").exists()


def test_ngff_of_ngff(slides_dir, tmp_path):
    first = convert_to_ngff(slides_dir / "dicom-sm", tmp_path / "a.zarr", progress=False)
    second = convert_to_ngff(first, tmp_path / "b.zarr", progress=False)
    a, b = open_slide(first), open_slide(second)
    assert b.mpp == pytest.approx((0.499, 0.499))
    assert np.array_equal(a.levels[0].array.compute(), b.levels[0].array.compute())
    with pytest.raises(WsisegError, match="source"):
        convert_to_ngff(first, first, overwrite=True, progress=False)


def test_reads_ngff_05_and_channel_last(tmp_path):
    """Other writers: zarr v3 / NGFF 0.5 attributes under "ome", (y, x, c) axes, gray."""
    import zarr

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    group = zarr.open_group(str(tmp_path / "v05.zarr"), mode="w", zarr_format=3)
    group.create_array("s0", data=rgb, chunks=(16, 16, 3))
    group.create_array("s1", data=rgb[::2, ::2], chunks=(16, 16, 3))
    axes = [
        {"name": "y", "type": "space", "unit": "nanometer"},
        {"name": "x", "type": "space", "unit": "nanometer"},
        {"name": "c", "type": "channel"},
    ]
    datasets = [
        {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [250.0, 500.0, 1.0]}]},
        {"path": "s1", "coordinateTransformations": [{"type": "scale", "scale": [500.0, 1000.0, 1.0]}]},
    ]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": datasets}]}
    ms = open_slide(tmp_path / "v05.zarr")
    assert ms.mpp == pytest.approx((0.5, 0.25)) and ms.mpp_source == "ngff"
    assert [lv.downsample for lv in ms.levels] == [(1.0, 1.0), (2.0, 2.0)]
    assert np.array_equal(ms.levels[0].array.compute(), rgb)

    gray = rng.integers(0, 256, (1, 1, 1, 30, 20), dtype=np.uint8)  # t, c, z, y, x
    g2 = zarr.open_group(str(tmp_path / "gray.zarr"), mode="w", zarr_format=2)
    g2.create_array("0", data=gray, chunks=(1, 1, 1, 16, 16))
    axes5 = [{"name": n, "type": t} for n, t in zip("tczyx", ["time", "channel", "space", "space", "space"])]
    g2.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": axes5,
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * 5}]}],
        }
    ]
    ms = open_slide(tmp_path / "gray.zarr")
    assert ms.mpp is None  # no units: not a physical size
    out = ms.levels[0].array.compute()
    assert out.shape == (30, 20, 3) and np.array_equal(out[..., 2], gray[0, 0, 0])
