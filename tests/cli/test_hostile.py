"""Hostile files through the command line: every one is refused in one line naming the file, exit code 2.

Each case builds its file in tmp_path from a real small model, a real slide
or real NuCLS tiles: numbers that would allocate terabytes or run forever,
JSON nested past Python's recursion limit, a gzip bomb, NaN coordinates, a
DOCTYPE hidden in UTF-16 without a byte-order mark, a TIFF header lying
about its size. None may end as an "internal error" (exit 1), a traceback
or a MemoryError.
"""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from wsiseg.cli.app import main

SEG = {"arch": "unet", "encoder": "tu-resnet10t", "num_classes": 2, "encoder_depth": 3, "decoder_channels": [32, 16, 8]}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A real, tiny wsiseg model file (about 0.4 M parameters)."""
    from wsiseg.models.io import save_deformseg
    from wsiseg.models.net import DeformSegNet
    from wsiseg.output.classes import default_classes

    torch.manual_seed(0)
    net = DeformSegNet(SEG, map_size=(16, 16), out_size=(32, 32)).eval()
    path = tmp_path_factory.mktemp("model") / "good.safetensors"
    save_deformseg(path, net, default_classes(2))
    return path


def _with_metadata(src: Path, dst: Path, mutate=None, text: str | None = None) -> Path:
    """Copy a model file with its wsiseg metadata changed by ``mutate(meta)`` or replaced by ``text``."""
    data = src.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    if text is None:
        meta = json.loads(header["__metadata__"]["wsiseg"])
        mutate(meta)
        text = json.dumps(meta)
    header["__metadata__"]["wsiseg"] = text
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    dst.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n :])
    return dst


def _net(key, value):
    return lambda m: m["net"].__setitem__(key, value)


def _seg(key, value):
    return lambda m: m["net"]["segmenter"].__setitem__(key, value)


MODEL_CASES = {
    "support 1e6 (an 8 TB kernel)": (_net("support", 1_000_001), "net.support"),
    "sigma 1e9": (_net("sigma", 1e9), "net.sigma"),
    "sigma NaN": (_net("sigma", float("nan")), "net.sigma"),
    "grid_iterations 1e9 (an endless run)": (_net("grid_iterations", 10**9), "net.grid_iterations"),
    "out_size 100k": (_net("out_size", [100_000, 100_000]), "net.out_size"),
    "map_size 100k": (_net("map_size", [100_000, 100_000]), "net.map_size"),
    "in_channels 1e6": (_net("in_channels", 10**6), "net.in_channels"),
    "decoder of 1e6 channels": (_seg("decoder_channels", [10**6, 16, 8]), "decoder_channels"),
    "decoder within bounds, unlike the weights": (_seg("decoder_channels", [4096, 4096, 4096]), "weights do not match"),
    "num_classes 1e6": (_seg("num_classes", 10**6), "num_classes"),
    "format_version true": (lambda m: m.__setitem__("format_version", True), "format version True"),
}


def _lying_tiff(path: Path, side: int = 900_000) -> Path:
    """A tiled BigTIFF whose header claims ``side x side`` pixels of sparse tiles; it holds one 256 px tile."""
    import numpy as np
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(np.full((256, 256, 3), 200, np.uint8), tile=(256, 256), photometric="rgb")
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        for code in (256, 257):  # ImageWidth, ImageLength
            tag = tif.pages[0].tags[code]
            struct.pack_into({3: "<H", 4: "<I", 16: "<Q"}[tag.dtype], data, tag.valueoffset, side)
    path.write_bytes(bytes(data))
    return path


def _gzip_bomb(path: Path, mib: int) -> Path:
    """A valid gzip GeoJSON of ``mib`` MiB of spaces, written in 1 MiB pieces (never held in memory)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip container
    block = b" " * 2**20
    with open(path, "wb") as fh:
        fh.write(z.compress(b'{"type": "FeatureCollection", "features": []'))
        for _ in range(mib):
            fh.write(z.compress(block))
        fh.write(z.compress(b"}") + z.flush())
    return path


def _polygon(coords) -> bytes:
    feature = {
        "type": "Feature",
        "properties": {"classification": {"name": "tumour nucleus"}},
        "geometry": {"type": "Polygon", "coordinates": [coords]},
    }
    return json.dumps(feature).encode()  # NaN and Infinity as JSON's NaN / Infinity literals


def _asap_utf16_doctype() -> bytes:
    xml = (
        '<?xml version="1.0" encoding="UTF-16"?>\n'
        '<!DOCTYPE ASAP_Annotations [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>\n'
        '<ASAP_Annotations><Annotations><Annotation Name="&b;" Type="Polygon" PartOfGroup="tumour nucleus">'
        '<Coordinates><Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="10" Y="0"/>'
        '<Coordinate Order="2" X="10" Y="10"/></Coordinates></Annotation></Annotations></ASAP_Annotations>\n'
    )
    return xml.encode("utf-16-le")  # no byte-order mark: expat detects UTF-16 from '<\0?\0'


ANNOTATION_CASES = {
    "NaN coordinate": ("x.geojson", _polygon([[0, 0], [float("nan"), 10], [10, 10], [0, 0]]), "finite"),
    "infinite coordinate": ("x.geojson", _polygon([[0, 0], [float("inf"), 10], [10, 10], [0, 0]]), "finite"),
    "huge coordinate": ("x.geojson", _polygon([[0, 0], [1e300, 10], [10, 10], [0, 0]]), "coordinates beyond"),
    "JSON nested 100,000 deep": ("x.geojson", b"[" * 100_000 + b"]" * 100_000, "nested deeper than"),
    "DOCTYPE in UTF-16 without BOM": ("x.xml", _asap_utf16_doctype(), "DOCTYPE"),
}


def _run(args) -> tuple[int, list[str], str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.stderr.strip().splitlines(), res.output


def _assert_refused(code, lines, output, path: Path, fragment: str) -> None:
    assert code == 2, output
    assert len(lines) == 1, output  # one line: no traceback, no library warning
    assert lines[0].startswith("wsiseg: error: ") and str(path) in lines[0] and fragment in lines[0], lines[0]
    assert "internal error" not in output


@pytest.mark.parametrize("case", list(MODEL_CASES) + ["metadata nested 100,000 deep", "manifest mpp 1e-300"])
def test_hostile_model_and_manifest_refused_in_one_line(case, model, slides_dir, tmp_path):
    slide = slides_dir / "small.svs"
    if case == "manifest mpp 1e-300":
        bad = tmp_path / "slides.csv"
        bad.write_text(f"path,mpp\n{slide},1e-300\n")
        args, fragment = ["segment", bad, "--model", model], "mpp must be"
    else:
        bad = tmp_path / "hostile.safetensors"
        if case in MODEL_CASES:
            mutate, fragment = MODEL_CASES[case]
            _with_metadata(model, bad, mutate)
        else:
            deep = "[" * 100_000 + "]" * 100_000
            text = json.dumps({"format": "wsiseg-model", "format_version": 1})[:-1] + f', "x": {deep}}}'
            _with_metadata(model, bad, text=text)
            fragment = "nested deeper than"
        args = ["segment", slide, "--model", bad]
    code, lines, output = _run([*args, "--out", tmp_path / "out", "--progress", "none", "--device", "cpu"])
    _assert_refused(code, lines, output, bad, fragment)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.mask.tif"))


@pytest.mark.parametrize("case", list(ANNOTATION_CASES) + ["gzip bomb"])
def test_hostile_annotation_refused_in_one_line(case, shared_data, tmp_path, monkeypatch):
    tiles = shared_data / "labelled-tiles" / "nucls" / "square" / "train" / "images"
    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(sorted(tiles.glob("*.png"))[0], data / "x.png")
    if case == "gzip bomb":
        # The cap is lowered so the bomb stays small: 64 MiB of spaces in ~64 KB against a 1 MiB cap.
        monkeypatch.setattr("wsiseg.limits.MAX_ANNOTATION_BYTES", 2**20)
        bad = _gzip_bomb(data / "x.geojson.gz", 64)
        fragment = "decompresses to more than 1,048,576 bytes"
    else:
        name, payload, fragment = ANNOTATION_CASES[case]
        bad = data / name
        bad.write_bytes(payload)
    classes = tmp_path / "classes.yaml"
    classes.write_text("classes:\n  - {value: 1, name: non-tumour nucleus}\n  - {value: 2, name: tumour nucleus}\n")
    code, lines, output = _run(
        ["train", data, "--classes", classes, "--out", tmp_path / "run", "--epochs", "1", "--device", "cpu"]
    )
    _assert_refused(code, lines, output, bad, fragment)


def test_slide_header_claiming_900k_squared_refused(tmp_path):
    slide = _lying_tiff(tmp_path / "lying.tiff")
    for args in (["info", slide], ["convert", slide, tmp_path / "out.zarr"]):
        code, lines, output = _run(args)
        _assert_refused(code, lines, output, slide, "absurd size 900000x900000")
    assert not (tmp_path / "out.zarr").exists()


def test_gzip_stream_is_cut_at_the_cap(tmp_path):
    """read_capped never decompresses much past its limit, and names the limit."""
    from wsiseg.limits import read_capped

    bomb = _gzip_bomb(tmp_path / "b.gz", 32)
    with pytest.raises(ValueError, match="decompresses to more than 1,000 bytes"):
        read_capped(bomb, 1000)
    small = tmp_path / "s.json.gz"
    small.write_bytes(gzip.compress(b'{"a": 1}'))
    assert read_capped(small, 1000) == b'{"a": 1}'
