"""The CLI shell: version, help, and the one-line error contract."""

import subprocess
import sys

from click.testing import CliRunner

from wsiseg import __version__
from wsiseg.cli.app import main


def test_version_and_help():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and "learning where to sample" in r.output


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "wsiseg", "--version"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert __version__ in out.stdout


def test_demo_without_shipped_model_says_so(tmp_path, monkeypatch):
    import wsiseg.demo as demo

    monkeypatch.setattr(demo, "MODEL", tmp_path / "missing.safetensors")
    r = CliRunner().invoke(main, ["demo", "--model", "mosaic", "--out", str(tmp_path / "out")])
    assert r.exit_code == 2
    assert "no demo model is shipped yet" in r.stderr


def test_demo_runs_end_to_end_with_a_model(tmp_path, monkeypatch):
    import torch

    import wsiseg.demo as demo
    from wsiseg.models.io import save_deformseg
    from wsiseg.models.net import DeformSegNet
    from wsiseg.output.classes import default_classes

    assert demo.REGION.is_file()  # the CC0 region ships in the package
    torch.manual_seed(0)
    seg = {"arch": "unet", "encoder": "resnet18", "num_classes": 2, "encoder_depth": 3, "decoder_channels": [16, 8, 8]}
    model = tmp_path / "m.safetensors"
    save_deformseg(model, DeformSegNet(seg, map_size=(16, 16), out_size=(32, 32)), default_classes(2))
    monkeypatch.setattr(demo, "MODEL", model)
    real = demo.demo_slide
    monkeypatch.setattr(demo, "demo_slide", lambda out: real(out, 1024, 768))
    r = CliRunner().invoke(main, ["demo", "--model", "mosaic", "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "Open in QuPath" in r.output
    assert (tmp_path / "out" / "demo-slide-1024x768.mask.tif").is_file()
