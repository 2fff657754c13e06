"""Texture mosaics on label-map geometry (wsiseg.training.mosaic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy import ndimage as ndi

from wsiseg.training.classmap import load_class_map
from wsiseg.training.pairs import load_pairs
from wsiseg.errors import WsisegError
from wsiseg.training.mosaic import build_mosaics, build_mosaics_from_spec, load_spec, main

REPO = Path(__file__).resolve().parents[2]
COLOURS = {"background": (235, 235, 235), "red": (200, 40, 40), "blue": (40, 40, 200)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A 300 x 240 label map (codes 0, 5, 9) and one noisy solid-colour texture per class."""
    d = tmp_path_factory.mktemp("mosaic-inputs")
    yy, xx = np.mgrid[:240, :300]
    m = np.zeros((240, 300), np.uint8)
    m[((xx // 25) + (yy // 30)) % 3 == 1] = 5
    m[((xx - 150) ** 2 + (yy - 120) ** 2) < 60**2] = 9
    Image.fromarray(m).save(d / "map.png")
    (d / "codes.csv").write_text("group,GT_code\nred_thing,5\nblue_thing,9\n")
    rng = np.random.default_rng(1)
    textures = {}
    for name, col in COLOURS.items():
        arr = np.clip(np.array(col)[None, None] + rng.normal(0, 6, (80, 90, 3)), 0, 255).astype(np.uint8)
        rgba = np.concatenate([arr, np.full((80, 90, 1), 255, np.uint8)], axis=2)
        Image.fromarray(rgba, "RGBA").save(d / f"{name}.png")
        textures[name] = [d / f"{name}.png"]
    return {
        "label_map_path": d / "map.png",
        "codes_csv": d / "codes.csv",
        "textures": textures,
        "class_of_code": {0: "background", "red_thing": "red", 9: "blue"},
        "n": {"train": 4, "val": 2, "test": 2},
        "size": 48,
        "seed": 3,
        "crop": (0.3, 0.5),
        "zoom": (2.0, 4.0),
    }


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory):
    return build_mosaics(out_dir=tmp_path_factory.mktemp("m") / "a", **inputs)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic(inputs, built, tmp_path):
    again = build_mosaics(out_dir=tmp_path / "b", **inputs)
    assert _files(built.out_dir) == _files(again.out_dir)
    other = build_mosaics(out_dir=tmp_path / "c", **{**inputs, "seed": 4})
    a, c = _files(built.out_dir), _files(other.out_dir)
    assert a["train/images/train-0000.png"] != c["train/images/train-0000.png"]


def test_counts_of_one_split_do_not_change_others(inputs, built, tmp_path):
    more = build_mosaics(out_dir=tmp_path / "d", **{**inputs, "n": {"train": 1, "val": 2, "test": 3}})
    a, b = _files(built.out_dir), _files(more.out_dir)
    for name in ("train/images/train-0000.png", "val/labels/val-0001.png", "test/images/test-0001.png"):
        assert a[name] == b[name]


def test_layout_labels_and_classes(built):
    out = built.out_dir
    assert built.class_names == ["background", "red", "blue"]
    cm = load_class_map(built.classes_path)
    assert cm.names == ["background", "red", "blue"]
    pairs = load_pairs(out)
    assert sorted((p.split, Path(p.image).name) for p in pairs) == sorted(
        [("train", f"train-{i:04d}.png") for i in range(4)]
        + [("val", f"val-{i:04d}.png") for i in range(2)]
        + [("test", f"test-{i:04d}.png") for i in range(2)]
    )
    assert len(load_pairs(built.pairs_path)) == 8
    for p in pairs:
        img, lab = np.asarray(Image.open(p.image)), np.asarray(Image.open(p.annotation))
        assert img.shape == (48, 48, 3) and img.dtype == np.uint8
        assert lab.shape == (48, 48) and lab.dtype == np.uint8
        assert set(np.unique(lab)) <= {0, 1, 2}


def test_pixels_come_from_their_class_texture(built):
    """Away from boundaries every pixel has its class's colour (up to noise and the +-5 % jitter)."""
    seen = set()
    for p in load_pairs(built.out_dir):
        img = np.asarray(Image.open(p.image)).astype(float)
        lab = np.asarray(Image.open(p.annotation))
        for v, name in enumerate(built.class_names):
            inner = ndi.binary_erosion(lab == v, iterations=3, border_value=1)
            if inner.sum() < 20:
                continue
            seen.add(name)
            px = img[inner]
            ref = np.array(COLOURS[name], float)
            assert np.abs(px.mean(0) - ref).max() < 0.12 * ref.max() + 4, (p.image, name, px.mean(0))
            # the dominant channel is the class's (textures are far apart in colour)
            if name != "background":
                assert (px.argmax(1) == ref.argmax()).mean() > 0.99
            else:
                assert px.min() > 170
    assert seen == set(built.class_names)


def test_splits_are_disjoint_on_the_map(built):
    man = yaml.safe_load(built.manifest_path.read_text())
    W, H = man["label_map"]["size"]
    rects = {k: [(x0 * W, y0 * H, x1 * W, y1 * H) for x0, y0, x1, y1 in v]
             for k, v in man["parameters"]["splits"].items()}  # fmt: skip
    boxes: dict[str, list] = {}
    for it in man["mosaics"]:
        c = it["crop"]
        b = (c["x"], c["y"], c["x"] + c["side"], c["y"] + c["side"])
        # every crop lies inside a rectangle of its own split ...
        assert any(r[0] - 1 <= b[0] and r[1] - 1 <= b[1] and b[2] <= r[2] + 1 and b[3] <= r[3] + 1
                   for r in rects[it["split"]])  # fmt: skip
        boxes.setdefault(it["split"], []).append(b)
    # ... so crops of different splits never overlap
    names = list(boxes)
    for i, a in enumerate(names):
        for bname in names[i + 1 :]:
            for ba in boxes[a]:
                for bb in boxes[bname]:
                    assert not (ba[0] < bb[2] and bb[0] < ba[2] and ba[1] < bb[3] and bb[1] < ba[3])
    bands = man["parameters"]["texture_bands"]
    assert bands["train"][1] <= bands["val"][0] and bands["val"][1] <= bands["test"][0]


def test_refusals(inputs, tmp_path):
    with pytest.raises(WsisegError, match=r"codes \[9\] are not mapped"):
        build_mosaics(out_dir=tmp_path / "x", **{**inputs, "class_of_code": {0: "background", 5: "red"}})
    with pytest.raises(WsisegError, match="overlap on the label map"):
        build_mosaics(
            out_dir=tmp_path / "y",
            **{**inputs, "splits": {"train": [(0, 0, 1, 0.6)], "val": [(0, 0.5, 1, 0.8)], "test": [(0, 0.8, 1, 1)]}},
        )
    with pytest.raises(WsisegError, match="texture bands"):
        build_mosaics(
            out_dir=tmp_path / "z",
            **{**inputs, "texture_bands": {"train": (0, 0.7), "val": (0.6, 0.85), "test": (0.85, 1)}},
        )
    with pytest.raises(WsisegError, match="unknown label-map code name"):
        build_mosaics(out_dir=tmp_path / "w", **{**inputs, "class_of_code": {0: "background", "nope": "red"}})
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_output_exists_is_refused(inputs, built):
    with pytest.raises(WsisegError, match="output exists"):
        build_mosaics(out_dir=built.out_dir, **inputs)


def test_demo_spec_on_the_real_data(shared_data, tmp_path, capsys):
    """The shipped demo's spec on the real BCSS map and textures, a few small mosaics."""
    spec = REPO / "pipelines" / "demo-data.yaml"
    kwargs = load_spec(spec, shared_data)
    assert list(kwargs["textures"]) == ["background", "cellular", "stroma"]
    small = tmp_path / "spec.yaml"
    doc = yaml.safe_load(spec.read_text())
    doc.update(n={"train": 2, "val": 1, "test": 1}, size=96)
    small.write_text(yaml.safe_dump(doc))
    assert main([str(small), "--data", str(shared_data), "--out", str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    pairs = load_pairs(tmp_path / "out")
    assert sorted(p.split for p in pairs) == ["test", "train", "train", "val"]
    means: dict[int, list] = {}
    for p in pairs:
        img = np.asarray(Image.open(p.image)).astype(float)
        lab = np.asarray(Image.open(p.annotation))
        for v in range(3):
            inner = ndi.binary_erosion(lab == v, iterations=3, border_value=1)
            if inner.any():
                means.setdefault(v, []).append(img[inner].mean(0))
    m = {v: np.mean(x, axis=0) for v, x in means.items()}
    assert m[0].min() > 215  # glass
    if 1 in m and 2 in m:
        assert m[1][1] < m[2][1]  # dense nuclei (haematoxylin) are darker in green than stroma (eosin)
    assert main([str(small), "--data", str(shared_data), "--out", str(tmp_path / "out")]) == 2  # exists
    with pytest.raises(WsisegError, match="output exists"):
        build_mosaics_from_spec(small, shared_data, tmp_path / "out")
