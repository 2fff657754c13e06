"""`wsiseg run PIPELINE.yaml`: every pipeline in the repo validates; the small ones run on shared data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tifffile
import torch
import yaml
from click.testing import CliRunner

from wsiseg.cli.app import main
from wsiseg.errors import ConfigError
from wsiseg.models.io import load_deformseg, save_deformseg
from wsiseg.models.net import DeformSegNet
from wsiseg.output.classes import default_classes
from wsiseg.cli.pipeline import load_pipeline, parse_overrides, validate_file

REPO = Path(__file__).resolve().parents[2]
PIPELINES = sorted((REPO / "pipelines").glob("*.yaml"))
SEG = {"arch": "unet", "encoder": "resnet18", "num_classes": 3, "encoder_depth": 3, "decoder_channels": [32, 16, 8]}


def run(*args, cwd: Path = REPO):
    import os

    old = os.getcwd()
    os.chdir(cwd)  # pipelines use paths relative to the repository, as documented
    try:
        return CliRunner().invoke(main, ["run", *[str(a) for a in args]])
    finally:
        os.chdir(old)


@pytest.fixture(autouse=True)
def shared_env(monkeypatch, request):
    """Point ${WSISEG_SHARED_DATA} at the shared data the tests use."""
    from conftest import SHARED_DATA

    monkeypatch.setenv("WSISEG_SHARED_DATA", str(SHARED_DATA))


@pytest.mark.parametrize("path", PIPELINES, ids=[p.name for p in PIPELINES])
def test_every_yaml_in_pipelines_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)
    data = yaml.safe_load(path.read_text())
    if isinstance(data, dict) and "label_map" in data:  # a mosaic spec (python -m wsiseg.training.mosaic)
        mosaic = pytest.importorskip("wsiseg.training.mosaic")
        from conftest import SHARED_DATA

        if not SHARED_DATA.is_dir():
            pytest.skip("shared data absent")
        assert mosaic.load_spec(path, SHARED_DATA)
        return
    kind = validate_file(path)
    if kind == "pipeline":
        pipe = load_pipeline(path)
        assert pipe.description and pipe.argv()
        # Every option it uses exists on the command (the argv parses).
        r = CliRunner().invoke(main, ["run", str(path), "--dry-run"])
        assert r.exit_code == 0, r.output
        assert "wsiseg " + pipe.command[0] in r.stderr
    else:
        assert kind == "train config"


def test_training_config_file_is_not_a_pipeline_but_says_how_to_use_it(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("epochs: 3\nencoder: resnet18\n")
    r = CliRunner().invoke(main, ["run", str(cfg)])
    assert r.exit_code == 2
    assert str(cfg) in r.stderr and "training config" in r.stderr and "config:" in r.stderr


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("job: segment\nslides: [a]\nmodel: m\nout: o\n", "version: missing"),
        ("version: 2\njob: segment\n", "version: unsupported version 2"),
        ("version: 1\njob: paint\n", "job: unknown job 'paint'"),
        ("version: 1\njob: segment\nslides: [a]\nmodel: m\nout: o\ncolour: red\n", "colour: unknown option"),
        ("version: 1\njob: segment\nslides: [a]\nout: o\n", "model: required"),
        ("version: 1\njob: segment\nslides: [a]\nmodel: m\nout: o\nqc: maybe\n", "qc: expected true or false"),
        ("version: 1\njob: segment\nslides: [a]\nmodel: m\nout: o\nsize: [64, 32]\n", "WIDTHxHEIGHT"),
        ("version: 1\njob: segment\nslides: [a]\nmodel: m\nout: o\nregions: blobs\n", "regions: 'blobs' is not one of"),
        (
            "version: 1\njob: segment\nslides: [a]\nmodel: m\nout: o\ntile: many\n",
            "tile: 'many' is not a valid integer",
        ),
        ("version: 1\njob: segment\nslides: [a]\nmodel: ${NO_SUCH_VAR_HERE}\nout: o\n", "NO_SUCH_VAR_HERE is not set"),
        ("version: 1\njob: bench\nbenchmark: nothing\n", "benchmark: expected one of"),
        ("version: 1\njob: train\nbenchmark: cluster\n", "benchmark: only for job: bench"),
        ("[1, 2]\n", "a pipeline must be a YAML mapping"),
        ("version: 1\njob: segment\n  bad: indent\n", "not valid YAML"),
    ],
)
def test_bad_pipelines_give_one_line_naming_file_and_key(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    assert fragment in str(info.value) and str(path) in str(info.value)
    r = CliRunner().invoke(main, ["run", str(path)])
    assert r.exit_code == 2 and fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_train_pipeline_checks_its_training_config(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("epochs: 0\n")
    path = tmp_path / "p.yaml"
    path.write_text(f"version: 1\njob: train\ndata: d\nclasses: c\nout: o\nconfig: {cfg}\n")
    with pytest.raises(ConfigError, match="config: .*epochs"):
        load_pipeline(path)
    # a list is layered in order, as repeated --config options: the later file fixes the earlier one's value
    fix = tmp_path / "fix.yaml"
    fix.write_text("epochs: 3\n")
    path.write_text(f"version: 1\njob: train\ndata: d\nclasses: c\nout: o\nconfig: [{cfg}, {fix}]\n")
    argv = load_pipeline(path).argv()
    assert [argv[i + 1] for i, w in enumerate(argv) if w == "--config"] == [str(cfg), str(fix)]
    path.write_text(f"version: 1\njob: train\ndata: d\nclasses: c\nout: o\nconfig: [{fix}, {cfg}]\n")
    with pytest.raises(ConfigError, match="config: .*epochs"):
        load_pipeline(path)


def test_overrides_and_environment(tmp_path, monkeypatch):
    assert parse_overrides(["qc=false", "slides=[a, b]", "out-size=32x32", "out=x=y"]) == {
        "qc": False,
        "slides": ["a", "b"],
        "out_size": "32x32",
        "out": "x=y",
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["qc"])
    monkeypatch.setenv("SLIDES_HERE", "/mnt/slides")
    path = tmp_path / "p.yaml"
    path.write_text(
        "version: 1\njob: segment\ndescription: d\nslides: ['${SLIDES_HERE}', '-odd.svs']\n"
        "model: ${MODEL_FILE:-m.safetensors}\nout: o\nqc: false\nworkers: 2\n"
    )
    pipe = load_pipeline(path, {"out": "elsewhere"})
    assert pipe.argv() == [
        "segment",
        "--model",
        "m.safetensors",
        "--out",
        "elsewhere",
        "--no-qc",
        "--workers",
        "2",
        "--",
        "/mnt/slides",
        "-odd.svs",
    ]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_deformseg(path, DeformSegNet(SEG, map_size=(32, 32), out_size=(64, 64)).eval(), default_classes(3))
    return path


def test_segment_folder_pipeline_runs(slides_dir, model_file, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("boxes.tiff", "small.svs"):
        shutil.copy(slides_dir / name, folder / name)
    out = tmp_path / "out"
    r = run(
        REPO / "pipelines" / "segment-folder.yaml",
        "--set",
        f"slides=[{folder}]",
        "--set",
        f"model={model_file}",
        "--set",
        f"out={out}",
        "--set",
        "qc=false",
        "--set",
        "progress=none",
    )
    assert r.exit_code == 0, r.output
    assert "2 ok, 0 skipped, 0 failed" in r.stdout and "wsiseg segment" in r.stderr
    for name in ("boxes", "small"):
        with tifffile.TiffFile(out / f"{name}.mask.tif") as tif:
            assert tif.pages[0].dtype == "uint8"
    r = run(
        REPO / "pipelines" / "segment-folder.yaml",
        "--set",
        f"slides=[{folder}]",
        "--set",
        f"model={model_file}",
        "--set",
        f"out={out}",
        "--set",
        "qc=false",
        "--set",
        "progress=none",
    )
    assert r.exit_code == 0 and "2 skipped" in r.stdout


def test_missing_path_at_run_time_names_the_pipeline(tmp_path):
    r = run(
        REPO / "pipelines" / "train-biopsies.yaml",
        "--set",
        f"data={tmp_path / 'nowhere'}",
        "--set",
        f"out={tmp_path / 'o'}",
    )
    assert r.exit_code == 2
    assert "train-biopsies.yaml" in r.stderr and "nowhere" in r.stderr


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
    """train-biopsies.yaml on the shared NuCLS tiles, shrunk to one quick epoch."""
    if not (shared_data / "labelled-tiles" / "nucls" / "square" / "train").is_dir():
        pytest.skip("NuCLS tiles absent")
    out = tmp_path_factory.mktemp("train") / "run"
    data = shared_data / "labelled-tiles" / "nucls" / "square" / "train"
    r = run(
        REPO / "pipelines" / "train-biopsies.yaml",
        "--set",
        f"data={data}",
        "--set",
        f"out={out}",
        "--set",
        "epochs=1",
        "--set",
        "out_size=32x32",
        "--set",
        "map_size=16x16",
        "--set",
        "hr_size=128x128",
        "--set",
        "encoder=tu-resnet10t",
        "--set",
        "device=cpu",
    )
    assert r.exit_code == 0, r.output
    return out / "model.safetensors"


def test_train_pipeline_runs(trained):
    m = load_deformseg(trained)
    assert [c.name for c in m.classes] == ["background", "non-tumour nucleus", "tumour nucleus"]
    assert tuple(m.net.out_size) == (32, 32)


@pytest.mark.slow
def test_evaluate_pipeline_runs(trained, tmp_path):
    out = tmp_path / "eval"
    r = run(
        REPO / "pipelines" / "evaluate-baselines-sweep.yaml",
        "--set",
        f"model={trained}",
        "--set",
        f"out={out}",
        "--set",
        "compare=[uniform]",
        "--set",
        "sweep=[16]",
        "--set",
        "sweep_epochs=1",
        "--set",
        "epochs=1",
        "--set",
        "device=cpu",
    )
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "eval.json").read_text())
    assert list(doc["methods"]) == ["learned", "uniform"]
    assert (out / "sweep.json").is_file()


@pytest.mark.slow
def test_benchmark_pipeline_runs(tmp_path):
    out = tmp_path / "bench.md"
    r = run(
        REPO / "pipelines" / "benchmark.yaml",
        "--set",
        "size=1024x768",
        "--set",
        "slides=2",
        "--set",
        "workers=[1]",
        "--set",
        "in_process=false",
        "--set",
        f"out={out}",
        "--set",
        f"workdir={tmp_path / 'work'}",
    )
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert "<!-- bench:cluster -->" in text and "| 1 worker process |" in text
