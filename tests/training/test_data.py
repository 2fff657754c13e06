"""Training data: pairs, splits, hashes, region items (NuCLS tiles, a real slide), augmentation."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsiseg.training.classmap import IGNORE_INDEX, ClassMap
from wsiseg.training.dataset import augment, build_dataset, read_region, slide_regions, working_shape
from wsiseg.training.pairs import TrainingPair, dataset_hash, load_pairs, split_pairs
from wsiseg.errors import WsisegError
from wsiseg.slide import Multiscale, open_slide
from wsiseg.slide.tissue import Region

NUCLS = ClassMap.from_names(["background", "non-tumour nucleus", "tumour nucleus"])


@pytest.fixture(scope="module")
def nucls(shared_data) -> Path:
    return shared_data / "labelled-tiles" / "nucls"


# ---------------------------------------------------------------------------
# pairs


def test_load_pairs_nucls_subfolders(nucls):
    pairs = load_pairs(nucls / "square" / "train")
    assert len(pairs) == 10 and all(p.split is None for p in pairs)
    for p in pairs:
        assert Path(p.image).parent.name == "images" and Path(p.annotation).parent.name == "labels"
        assert Path(p.image).name == Path(p.annotation).name
    # a folder of split folders
    both = load_pairs(nucls / "square")
    assert sorted(p.split for p in both) == ["test"] * 5 + ["train"] * 10


def test_load_pairs_flat_folder(tmp_path):
    for name in [
        "A.svs",
        "A.geojson",
        "B.tif",
        "B_mask.png",
        "C.svs",
        "C.png",
        "D.ndpi",
        "D.xml",
        "E.svs",
        "F.tif",
        "F.png",
        "G.mrxs",
        "G.tiff",
        "notes.txt",
        "classes.yaml",
    ]:
        (tmp_path / name).write_bytes(b"x")
    pairs = load_pairs(tmp_path)
    assert [(Path(p.image).name, Path(p.annotation).name) for p in pairs] == [
        ("A.svs", "A.geojson"),
        ("B.tif", "B_mask.png"),
        ("C.svs", "C.png"),
        ("D.ndpi", "D.xml"),
        ("F.tif", "F.png"),
        ("G.mrxs", "G.tiff"),
    ]
    (tmp_path / "A.xml").write_bytes(b"x")
    with pytest.raises(WsisegError, match="ambiguous pair for 'A'"):
        load_pairs(tmp_path)


def test_load_pairs_csv(tmp_path, nucls):
    src = nucls / "non-square" / "train"
    shutil.copytree(src, tmp_path / "data")
    csv = tmp_path / "pairs.csv"
    csv.write_text(
        "image,annotation,split,mpp,downsample\n"
        "data/images/train_1.png,data/labels/train_1.png,train,0.25,\n"
        f"{tmp_path / 'data/images/train_2.png'},data/labels/train_2.png,Validation,,1\n"
        "data/images/train_3.png,data/labels/train_3.png,,,\n"
    )
    pairs = load_pairs(csv)
    assert [p.split for p in pairs] == ["train", "val", None]
    assert pairs[0].mpp == 0.25 and pairs[0].downsample is None and pairs[1].downsample == 1.0
    assert pairs[0].image == str(tmp_path / "data/images/train_1.png")
    csv.write_text("image,annotation\ndata/images/missing.png,data/labels/train_1.png\n")
    with pytest.raises(WsisegError, match="line 2: image not found") as e:
        load_pairs(csv)
    assert str(csv) in str(e.value)
    csv.write_text("image,annotation,split\ndata/images/train_1.png,data/labels/train_1.png,holdout\n")
    with pytest.raises(WsisegError, match="line 2: split"):
        load_pairs(csv)
    csv.write_text("path,labels\n")
    with pytest.raises(WsisegError, match="header"):
        load_pairs(csv)
    csv.write_text("image,annotation\n")
    with pytest.raises(WsisegError, match="no image/annotation pairs") as e:
        load_pairs(csv)
    assert str(csv) in str(e.value)


def test_load_pairs_empty(tmp_path):
    with pytest.raises(WsisegError, match="no image/annotation pairs") as e:
        load_pairs(tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(WsisegError, match="not found"):
        load_pairs(tmp_path / "nope")


def test_split_pairs_deterministic():
    pairs = [TrainingPair(f"/d/s{i}.svs", f"/d/s{i}.geojson") for i in range(10)]
    pairs += [
        TrainingPair("/d/t.svs", "/d/t.geojson", "train"),
        TrainingPair("/d/v.svs", "/d/v.geojson", "val"),
        TrainingPair("/d/x.svs", "/d/x.geojson", "test"),
    ]
    train, val = split_pairs(pairs, 0.2, seed=3)
    assert len(val) == 3 and len(train) == 9  # 2 drawn + the explicit val; test left out
    assert pairs[10] in train and pairs[11] in val and pairs[12] not in train + val
    assert split_pairs(pairs, 0.2, seed=3) == (train, val)
    _, val_r = split_pairs(pairs[::-1], 0.2, seed=3)  # independent of the order
    assert {p.image for p in val_r} == {p.image for p in val}
    assert {p.image for p in split_pairs(pairs, 0.2, seed=4)[1]} != {p.image for p in val}
    assert split_pairs(pairs[:2], 0.1)[1] and split_pairs(pairs[:2], 0.1)[0]  # at least one on each side
    assert split_pairs(pairs[:5], 0.0) == (pairs[:5], [])
    with pytest.raises(WsisegError):
        split_pairs(pairs, 1.0)


def test_dataset_hash(tmp_path, nucls):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(nucls / "non-square" / "train", a)
    shutil.copytree(nucls / "non-square" / "train", b)
    ha, hb = dataset_hash(load_pairs(a)), dataset_hash(load_pairs(b))
    assert ha == hb and len(ha) == 64  # location-independent
    assert dataset_hash(load_pairs(a)[::-1]) == ha  # order-independent
    lab = b / "labels" / "train_1.png"
    arr = np.asarray(Image.open(lab)).copy()
    arr[0, 0] = 2 - arr[0, 0] // 2
    Image.fromarray(arr).save(lab)
    assert dataset_hash(load_pairs(b)) != ha
    assert dataset_hash([TrainingPair(**{**load_pairs(a)[0].__dict__, "split": "val"})]) != dataset_hash(
        load_pairs(a)[:1]
    )


# ---------------------------------------------------------------------------
# NuCLS items


def test_nucls_items_native(nucls):
    pairs = load_pairs(nucls / "square" / "train")
    ds = build_dataset(pairs, NUCLS, hr_size=(256, 256))
    assert len(ds) == 10
    for k in (0, 7):
        item = ds[k]
        assert item["image"].shape == (3, 256, 256) and item["image"].dtype == torch.uint8
        assert item["labels"].shape == (256, 256) and item["labels"].dtype == torch.int64
        assert item["box"] == (0, 0, 256, 256) and item["downsample"] == 1.0 and item["size"] == (256, 256)
        # native resolution: exact copies of the files
        pair = pairs[k]
        assert item["name"] == Path(pair.image).stem
        assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), np.asarray(Image.open(pair.image)))
        assert np.array_equal(item["labels"].numpy(), np.asarray(Image.open(pair.annotation)))
        assert set(np.unique(item["labels"].numpy())) <= {0, 1, 2}
    # padded: labels ignore, image white
    big = build_dataset(pairs[:1], NUCLS, hr_size=(300, 320))[0]
    assert big["size"] == (256, 256)
    assert (big["labels"][256:] == IGNORE_INDEX).all() and (big["labels"][:, 256:] == IGNORE_INDEX).all()
    assert (big["image"][:, 256:] == 255).all() and (big["image"][:, :, 256:] == 255).all()
    assert set(np.unique(big["labels"].numpy())) <= {0, 1, 2, 255}


def test_nucls_non_square_unpadded_and_resize(nucls):
    pairs = load_pairs(nucls / "non-square" / "train")
    assert len(pairs) == 3
    ds = build_dataset(pairs, NUCLS, hr_size=(300, 300))
    item = ds[1]
    assert item["size"] == (260, 288) and item["box"] == (0, 0, 288, 260)
    # never padded: padding would enter the sampling grid
    assert item["image"].shape == (3, 260, 288) and item["labels"].shape == (260, 288)
    lab = item["labels"].numpy()
    assert np.array_equal(lab, np.asarray(Image.open(pairs[1].annotation)))
    # larger than hr_size: resized keeping the aspect ratio, labels by nearest
    small = build_dataset(pairs, NUCLS, hr_size=(256, 256))
    item = small[1]
    assert item["size"] == (231, 256) and item["downsample"] == pytest.approx(288 / 256)
    lab = item["labels"].numpy()
    assert lab.shape == (231, 256) and set(np.unique(lab)) <= {0, 1, 2}
    full = np.asarray(Image.open(pairs[1].annotation))
    rows = np.floor((np.arange(231) + 0.5) * 260 / 231).astype(int)
    cols = np.floor((np.arange(256) + 0.5) * 288 / 256).astype(int)
    assert np.array_equal(lab, full[np.ix_(rows, cols)])
    # items of one shape batch with the default collate
    batch = next(iter(torch.utils.data.DataLoader(small, batch_size=3)))
    assert batch["image"].shape == (3, 3, 231, 256) and batch["labels"].shape == (3, 231, 256)
    clone = pickle.loads(pickle.dumps(small))
    assert torch.equal(clone[2]["labels"], small[2]["labels"])


def test_dataset_augmentation_reproducible(nucls):
    pairs = load_pairs(nucls / "non-square" / "train")
    ds = build_dataset(
        pairs, NUCLS, hr_size=(256, 256), seed=5, augmentation={"flips": True, "rot90": True, "color_jitter": 0.1}
    )
    a, b = ds[0], ds[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["labels"], b["labels"])
    changed = False
    for epoch in range(1, 6):
        ds.set_epoch(epoch)
        changed |= not torch.equal(ds[0]["labels"], a["labels"])
    assert changed
    with pytest.raises(WsisegError, match="augmentation"):
        build_dataset(pairs, NUCLS, augmentation={"elastic": True})


def test_unmapped_mask_values_fail_at_build(nucls):
    with pytest.raises(WsisegError, match="unmapped classes: value 2") as e:
        build_dataset(load_pairs(nucls / "non-square" / "train")[:1], ClassMap.from_names(["bg", "nucleus"]))
    assert "labels" in str(e.value)
    ds = build_dataset(
        load_pairs(nucls / "non-square" / "train")[:1],
        ClassMap.from_names(["bg", "nucleus"]),
        ignore_unmapped=True,
        hr_size=(300, 300),
    )
    assert set(np.unique(ds[0]["labels"].numpy())) == {0, 1, 255}


def test_mask_size_mismatch_names_both_files(tmp_path, shared_data):
    Image.fromarray(np.full((100, 120, 3), 200, np.uint8)).save(tmp_path / "fake.png")
    mask = next((shared_data / "annotations").glob("TCGA-*.png"))
    pair = TrainingPair(str(tmp_path / "fake.png"), str(mask))
    cm = ClassMap.from_names(["background", "mostly_tumor"])
    with pytest.raises(WsisegError) as e:
        build_dataset([pair], cm, value_names=shared_data / "annotations" / "sample_GTcodes.csv", ignore_unmapped=True)
    msg = str(e.value)
    assert str(mask) in msg and "fake.png" in msg and "4542x4594" in msg and "120x100" in msg


# ---------------------------------------------------------------------------
# slides


def test_slide_pair_tissue_regions(tmp_path, slides_dir):
    slide = slides_dir / "CMU-1-Small-Region.svs"
    # A tumour polygon (level-0 px) with a hole, inside the tissue.
    poly = {
        "type": "Polygon",
        "coordinates": [
            [[900, 1200], [1500, 1200], [1500, 2000], [900, 2000], [900, 1200]],
            [[1100, 1500], [1300, 1500], [1300, 1700], [1100, 1700], [1100, 1500]],
        ],
    }
    geojson = tmp_path / "CMU-1-Small-Region.geojson"
    geojson.write_text(
        json.dumps({"type": "Feature", "geometry": poly, "properties": {"classification": {"name": "Tumor"}}})
    )
    cm = ClassMap.from_names(["background", "Tumor"])
    pair = TrainingPair(str(slide), str(geojson))
    ds = build_dataset([pair], cm, hr_size=(512, 512))
    regions = slide_regions(open_slide(slide))
    assert [it.box for it in ds.items] == regions and len(ds) == len(regions) >= 1
    it = ds.items[0]
    item = ds[0]
    x, y, bw, bh = item["box"]
    h, w = item["size"]
    assert max(h, w) == 512 and item["image"].shape == (3, h, w)

    def label_at(X: float, Y: float) -> int:
        j, i = int((X - x) * w / bw), int((Y - y) * h / bh)
        return int(item["labels"][i, j])

    assert label_at(950, 1250) == 1 and label_at(1450, 1950) == 1  # inside, near corners
    assert label_at(1200, 1600) == 0  # in the hole
    assert label_at(850, 1250) == 0 and label_at(1200, 2050) == 0  # outside
    assert item["labels"].shape == (h, w) and (item["labels"] != IGNORE_INDEX).all()
    # labelled area matches the polygon's area at this resolution
    area = (800 * 600 - 200 * 200) * (h / bh) * (w / bw)
    assert abs(int((item["labels"] == 1).sum()) - area) < 0.02 * area
    # the image is the slide, downsampled: tissue where the slide has tissue
    assert item["image"][:, :h, :w].float().mean() < 240
    assert it.name == "CMU-1-Small-Region" and item["downsample"] == pytest.approx(bw / w)

    whole = build_dataset([pair], cm, hr_size=(256, 256), regions="whole")
    assert len(whole) == 1 and whole[0]["box"] == (0, 0, 2220, 2967)


def test_read_region_alignment_on_pyramid():
    # Level 0 is a horizontal ramp, round(x / 2); its local mean around level-0
    # coordinate X is (X - 0.5) / 2 + 0.25 (the +0.25: odd x round up). Every
    # output pixel must read the mean around its own centre: a half-pixel shift
    # at these downsamples would be off by 1 to 2.5 grey levels.
    W, H = 500, 200
    lv0 = np.broadcast_to(np.floor(np.arange(W) / 2.0 + 0.5)[None, :, None], (H, W, 3)).astype(np.uint8)
    lv1 = lv0.reshape(H // 2, 2, W // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    lv2 = lv1.reshape(H // 4, 2, W // 4, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    ms = Multiscale.from_arrays([lv0, lv1, lv2], chunks=64)
    cases = [
        (Region(31, 7, 400, 150), (30, 80)),  # t = 5: level 2, residual 1.25
        (Region(0, 0, 500, 200), (20, 50)),  # t = 10: level 2, blocks of 2, residual 1.25
        (Region(7, 3, 399, 150), (100, 266)),  # t = 1.5: level 0, Gaussian only
        (Region(11, 0, 333, 100), (100, 111)),  # t = 3: level 1, residual 1.5
        (Region(11, 0, 333, 100), (100, 333)),  # native: exact copy
    ]
    for box, shape in cases:
        out = read_region(ms, box, shape)
        assert out.shape == (*shape, 3) and out.dtype == np.uint8
        xc = box.x + (np.arange(shape[1]) + 0.5) * box.width / shape[1]
        err = out[:, 2:-2, 0].astype(float) - ((xc - 0.5) / 2 + 0.25)[None, 2:-2]  # the border replicates
        assert np.abs(err).max() <= 0.55 and abs(err.mean()) < 0.1, box
    assert np.array_equal(read_region(ms, Region(11, 0, 333, 100), (100, 333)), lv0[:100, 11:344])
    assert working_shape(Region(0, 0, 3000, 1000), (1024, 1024)) == (341, 1024)
    assert working_shape(Region(0, 0, 100, 50), (1024, 1024)) == (50, 100)


# ---------------------------------------------------------------------------
# augmentation


def test_augment_keeps_alignment():
    rng = np.random.default_rng(0)
    palette = torch.tensor([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=torch.uint8)
    for shape in [(16, 16), (12, 20)]:
        labels = torch.from_numpy(rng.integers(0, 4, shape)).long()
        image = palette[labels].permute(2, 0, 1).contiguous()
        seen = set()
        for seed in range(24):
            img, lab = augment(image, labels, np.random.default_rng(seed), flips=True, rot90=True)
            assert img.shape == image.shape and lab.shape == labels.shape
            assert torch.equal(img, palette[lab].permute(2, 0, 1))
            seen.add(lab.numpy().tobytes())
        assert len(seen) == (8 if shape[0] == shape[1] else 4)  # the dihedral group (its shape-keeping half)
        img, lab = augment(image, labels, 1, flips=False, color_jitter=0.3)
        assert torch.equal(lab, labels) and img.dtype == torch.uint8 and not torch.equal(img, image)
