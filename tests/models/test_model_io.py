"""Model files: round trip, and every kind of bad file refused with a clear error."""

import json
import struct

import pytest
import torch

from wsiseg.hashing import file_hash
from wsiseg.errors import ModelConfigError
from wsiseg.models.io import FORMAT_VERSION, ModelFileError, load_model_file, read_metadata, save_model


@pytest.fixture()
def model_file(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    path = tmp_path / "m.safetensors"
    save_model(path, net.state_dict(), {"classes": [{"value": 0, "name": "background"}]})
    return path, net


def test_round_trip(model_file):
    path, net = model_file
    state, meta = load_model_file(path)
    assert meta["classes"][0]["name"] == "background"
    assert meta["format_version"] == FORMAT_VERSION
    for k, v in net.state_dict().items():
        assert torch.equal(state[k], v)
    assert len(file_hash(path)) == 16


def test_missing_and_directory(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        read_metadata(tmp_path / "nope.safetensors")
    with pytest.raises(ModelFileError, match="not a file"):
        read_metadata(tmp_path)


def test_truncated(model_file):
    path, _ = model_file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError) as err:
        load_model_file(path)
    assert str(path) in str(err.value)


def test_random_bytes_and_pickle(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"\x80\x04" + bytes(range(256)) * 4)
    with pytest.raises(ModelFileError, match="not a readable"):
        read_metadata(p)
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pt)  # a pickle: must never be loaded
    with pytest.raises(ModelFileError):
        load_model_file(pt)


def _rewrite_header(path, mutate):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    mutate(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n :])


def test_not_ours_and_future_version(model_file, tmp_path):
    path, _ = model_file
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(path.read_bytes())
    _rewrite_header(foreign, lambda h: h.pop("__metadata__"))
    with pytest.raises(ModelFileError, match="not a wsiseg model"):
        read_metadata(foreign)

    def bump(h):
        meta = json.loads(h["__metadata__"]["wsiseg"])
        meta["format_version"] = FORMAT_VERSION + 1
        h["__metadata__"]["wsiseg"] = json.dumps(meta)

    _rewrite_header(path, bump)
    with pytest.raises(ModelFileError, match="newer than this wsiseg"):
        read_metadata(path)


def test_deformseg_round_trip_and_mismatches(tmp_path):
    from wsiseg.models.io import load_deformseg, save_deformseg
    from wsiseg.models.net import DeformSegNet
    from wsiseg.output.classes import default_classes

    torch.manual_seed(0)
    seg = {"arch": "unet", "encoder": "resnet18", "num_classes": 3, "encoder_depth": 3, "decoder_channels": [32, 16, 8]}
    net = DeformSegNet(seg, map_size=(16, 16), out_size=(32, 32)).eval()
    path = tmp_path / "m.safetensors"
    save_deformseg(path, net, default_classes(3), extra={"training": {"epochs": 1}})
    loaded = load_deformseg(path)
    assert [c.value for c in loaded.classes] == [0, 1, 2]
    assert loaded.metadata["training"]["epochs"] == 1
    x = torch.rand(1, 3, 16, 16)
    hr = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net(x, hr).logits, loaded.net(x, hr).logits)
    with pytest.raises(ModelFileError, match="predicts 3 classes"):
        save_deformseg(tmp_path / "bad.safetensors", net, default_classes(2))
    assert loaded.net.grid_iterations == 1


def test_grid_iterations_round_trip_and_old_files_get_one(tmp_path):
    """A model's attraction steps travel in its file; a file from before the option reads as one step."""
    from wsiseg.models.io import load_deformseg, save_deformseg
    from wsiseg.models.net import DeformSegNet
    from wsiseg.output.classes import default_classes

    torch.manual_seed(0)
    seg = {"arch": "unet", "encoder": "resnet18", "num_classes": 2, "encoder_depth": 3, "decoder_channels": [32, 16, 8]}
    net = DeformSegNet(seg, map_size=(16, 16), out_size=(32, 32), grid_iterations=4).eval()
    assert net.geometry(100, 300).iterations == 4 and net.reference_geometry().iterations == 4
    path = tmp_path / "m.safetensors"
    save_deformseg(path, net, default_classes(2))
    loaded = load_deformseg(path).net
    assert loaded.grid_iterations == 4 and loaded.config()["grid_iterations"] == 4
    x, hr = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net(x, hr).grid, loaded(x, hr).grid)
        one = DeformSegNet.from_config({**net.config(), "grid_iterations": 1}).eval()
        one.load_state_dict(net.state_dict())
        assert not torch.allclose(one(x, hr).grid, loaded(x, hr).grid)
    old = net.config()
    del old["grid_iterations"]
    assert DeformSegNet.from_config(old).grid_iterations == 1
    with pytest.raises(ModelConfigError, match="grid_iterations"):
        DeformSegNet.from_config({**old, "grid_iterations": 0})
    # the bound a file is read with holds when the net is built, so no net saves a file that will not load
    with pytest.raises(ModelConfigError, match="grid_iterations must be at most 64"):
        DeformSegNet.from_config({**old, "grid_iterations": 65})


def test_grid_border_round_trip_and_old_files_keep_the_replicated_border(tmp_path):
    """New nets mirror the density at the map's edges and say so in their file; a file from before reads as
    the replicated border it was trained with, so its grids are as they were; a bad value is refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from wsiseg.models.io import load_deformseg, save_deformseg
    from wsiseg.sampling.grid import density_to_grid
    from wsiseg.models.net import DeformSegNet
    from wsiseg.output.classes import default_classes

    torch.manual_seed(0)
    seg = {"arch": "unet", "encoder": "resnet18", "num_classes": 2, "encoder_depth": 3, "decoder_channels": [32, 16, 8]}
    net = DeformSegNet(seg, map_size=(16, 16), out_size=(16, 16), sigma=3.0).eval()
    assert net.grid_border == "mirror" and net.config()["grid_border"] == "mirror"
    path = tmp_path / "m.safetensors"
    save_deformseg(path, net, default_classes(2))
    assert load_deformseg(path).net.grid_border == "mirror"
    # the same file without the key, as files were written before it existed
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    doc = json.loads(meta["wsiseg"])
    del doc["net"]["grid_border"]
    old_path = tmp_path / "old.safetensors"
    save_file(tensors, str(old_path), metadata={**meta, "wsiseg": json.dumps(doc)})
    old = load_deformseg(old_path).net.eval()
    assert old.grid_border == "replicate"
    d = torch.ones(1, 1, 16, 16)
    d[..., 0, :] = 200.0  # a dense edge: the two rules differ there
    assert torch.equal(old.grid(d), density_to_grid(d, old.sigma, old.support, border="replicate"))
    assert not torch.allclose(old.grid(d), net.grid(d))
    doc["net"]["grid_border"] = "wrap"
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**meta, "wsiseg": json.dumps(doc)})
    with pytest.raises(Exception, match="net.grid_border must be one of mirror, replicate"):
        load_deformseg(bad)
    with pytest.raises(ModelConfigError, match="grid_border"):
        DeformSegNet(seg, map_size=(16, 16), out_size=(16, 16), grid_border="wrap")


def test_scale_metadata_round_trip_old_files_and_bad_entries(tmp_path):
    """A model records its physical scale; files without one load with ``scale`` None; bad entries are refused."""
    from wsiseg.models.io import load_deformseg, save_deformseg
    from wsiseg.models.net import DeformSegNet
    from wsiseg.models.scale import ModelScale
    from wsiseg.output.classes import default_classes

    seg = {"arch": "unet", "encoder": "resnet18", "num_classes": 2, "encoder_depth": 3, "decoder_channels": [32, 16, 8]}
    net = DeformSegNet(seg, map_size=(16, 16), out_size=(32, 32)).eval()
    scale = ModelScale(0.5, 8.0, "mpp option", 12, 1)
    path = tmp_path / "scaled.safetensors"
    save_deformseg(path, net, default_classes(2), extra={"scale": scale.to_dict()})
    assert load_deformseg(path).scale == scale
    unknown = ModelScale(None, None, "unknown", 0, 5)
    save_deformseg(path, net, default_classes(2), extra={"scale": unknown.to_dict()})
    assert load_deformseg(path).scale == unknown and not unknown.known
    save_deformseg(path, net, default_classes(2))  # as written before the scale was recorded
    assert load_deformseg(path).scale is None
    for bad in ({"sample_spacing_um": -1}, {"mpp_working": "0.5"}, {"source": "guess"}, [0.5], {"regions": -2}):
        save_deformseg(path, net, default_classes(2), extra={"scale": bad})
        with pytest.raises(ModelFileError, match="scale") as err:
            load_deformseg(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
