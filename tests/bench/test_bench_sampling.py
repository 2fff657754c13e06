"""`wsiseg bench sampling`: learned (joint / single loss) vs uniform vs edge at equal budgets, end to end (tiny)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from wsiseg.bench.sampling import _epochs_config, bench_config
from wsiseg.cli.app import main
from wsiseg.evaluation.results import SWEEP_METHODS
from wsiseg.models.io import read_metadata
from wsiseg.training.checkpoint import LOG_NAME, MODEL_NAME

REPO = Path(__file__).resolve().parents[2]

# A tiny segmenter (a 0.4 M-parameter encoder) at a 64 px working size: the benchmark's plumbing, not its numbers.
TINY = {
    "arch": "unet",
    "encoder": "tu-resnet10t",
    "encoder_depth": 3,
    "decoder_channels": [16, 8, 8],
    "out_size": [16, 16],
    "map_size": [8, 8],
    "hr_size": [64, 64],
    "regions": "whole",
    "batch_size": 2,
    "epochs": 1,
    "step_size": None,
    "patience": None,
    "val_fraction": 0.0,
    "flips": False,
    "device": "cpu",
    "seed": 0,
}


@pytest.fixture(scope="module")
def few_nucls(shared_data: Path, tmp_path_factory) -> Path:
    """A shared-data root holding 3 train and 2 test NuCLS tiles (links to the real files)."""
    src = shared_data / "labelled-tiles" / "nucls" / "square"
    if not src.is_dir():
        pytest.skip(f"NuCLS tiles not found at {src}")
    root = tmp_path_factory.mktemp("shared")
    for split, n in (("train", 3), ("test", 2)):
        for img in sorted((src / split / "images").glob("*.png"))[:n]:
            for kind in ("images", "labels"):
                dst = root / "labelled-tiles" / "nucls" / "square" / split / kind / img.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.symlink_to(src / split / kind / img.name)
    return root


def _rows(section: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| grid") and "%" in line.split("|")[1]
    ]


def test_bench_sampling_tiny_run_writes_every_method_and_budget(few_nucls, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # pipelines/classes/nucls.yaml is found from the project root
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out, work = tmp_path / "bench.md", tmp_path / "work"
    args = [
        "bench",
        "sampling",
        "--datasets",
        "nucls",
        "--sizes",
        "8,16",
        "--nucls-epochs",
        "1",
        "--config",
        str(config),
        "--data",
        str(few_nucls),
        "--threads",
        "1",
        "--workdir",
        str(work),
        "--out",
        str(out),
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    text = out.read_text()
    section = text[text.index("<!-- bench:sampling -->") : text.index("<!-- /bench:sampling -->")]
    assert "**1 torch CPU thread**" in section and "3 train / 2 test pairs" in section
    rows = _rows(section)
    labels = ["learned (joint loss)", "learned (single loss)", "uniform", "edge (oracle)"]
    # cost in % of the tiles' level-0 (native 256x256) pixels, then of the 64x64 working pixels
    grids = {8: "8x8 (0.098 %; 1.56 % of working px)", 16: "16x16 (0.39 %; 6.25 % of working px)"}
    assert [(row[0], row[1]) for row in rows] == [(grids[s], lb) for s in (8, 16) for lb in labels]
    for row in rows:
        assert 0 <= float(row[2].strip("*")) <= 1 and 0 <= float(row[3]) <= 1  # mIoU full res., deformed
        assert float(row[6]) > 0  # train s/it was measured
    assert "- 8x8: best full-resolution mIoU:" in section and "- 16x16: best full-resolution mIoU:" in section

    (run_dir,) = work.glob("nucls-*")
    doc = json.loads((run_dir / "sweep.json").read_text())
    assert [(row["method"], row["out_width"]) for row in doc["rows"]] == [
        (m, s) for s in (8, 16) for m in SWEEP_METHODS
    ]
    assert doc["threads"] == 1
    for size in ("8x8", "16x16"):
        # "single" is the learned sampler with the edge loss off; "learned" has it on (gamma 100).
        cfgs = {
            m: read_metadata(run_dir / "sweep" / f"{m}-{size}" / MODEL_NAME)["training"]["config"]
            for m in ("learned", "single")
        }
        assert cfgs["single"]["sampler"] == cfgs["learned"]["sampler"] == "learned"
        assert cfgs["single"]["joint"] is False and cfgs["learned"]["joint"] is True
        assert {k for k in cfgs["learned"] if cfgs["learned"][k] != cfgs["single"][k]} == {"joint"}
        edge = {}
        for m in ("learned", "single"):
            with open(run_dir / "sweep" / f"{m}-{size}" / LOG_NAME) as f:
                edge[m] = [float(row["edge"]) for row in csv.DictReader(f)]
        assert all(e == 0 for e in edge["single"]) and all(e > 0 for e in edge["learned"])
    assert {row["method"]: row["joint"] for row in doc["rows"]} == {
        "learned": True,
        "single": False,
        "uniform": False,
        "edge": False,
    }
    with open(run_dir / "sweep.csv") as f:
        assert [row["label"] for row in csv.DictReader(f)] == labels * 2

    # A rerun reuses every finished run: nothing is trained again.
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert not [line for line in r.output.splitlines() if line.startswith("training ")]
    assert "in which 0 of 8 runs were trained or resumed" in out.read_text()


def test_bench_config_is_the_demo_config_with_its_schedule_scaled():
    cfg = bench_config(REPO / "pipelines" / "demo-model.yaml")
    demo = yaml.safe_load((REPO / "pipelines" / "demo-model.yaml").read_text())
    assert (cfg.encoder, cfg.epochs, cfg.step_size, cfg.joint) == (demo["encoder"], 20, 14, True)
    assert _epochs_config(cfg, 10).step_size == 7 and _epochs_config(cfg, 10).epochs == 10
    assert _epochs_config(cfg, 1).step_size == 1


def test_bench_sampling_bad_options(tmp_path):
    base = ["bench", "sampling", "--workdir", str(tmp_path), "--out", str(tmp_path / "b.md")]
    for extra, msg in (
        (["--datasets", "camelyon"], "--datasets"),
        (["--mosaics", "10,2"], "--mosaics"),
        (["--sizes", "0"], "bad size"),
    ):
        r = CliRunner().invoke(main, base + extra)
        assert r.exit_code == 2 and msg in r.output, r.output
