"""The public API: ``import wsiseg`` exports, and README's Python API example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import wsiseg

REPO = Path(__file__).resolve().parents[1]


def test_every_exported_name_resolves_and_is_listed():
    for name in wsiseg.__all__:
        assert getattr(wsiseg, name) is not None, name
    assert set(wsiseg.__all__) <= set(dir(wsiseg))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        wsiseg.nope  # noqa: B018
    assert wsiseg.load_model.__name__ == "load_deformseg" and wsiseg.train_model.__module__ == "wsiseg.training.loop"
    assert issubclass(wsiseg.ModelFileError, wsiseg.WsisegError) and issubclass(wsiseg.SlideError, wsiseg.WsisegError)


def test_import_wsiseg_and_open_a_slide_without_torch(slides_dir):
    code = (
        "import sys, wsiseg\n"
        f"ms = wsiseg.open_slide({str(slides_dir / 'CMU-1-Small-Region.svs')!r})\n"
        "print(ms.width, ms.height, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["2220", "2967", "False"]


def test_readme_python_example_runs(tmp_path):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["2048", "1536", "4"]
    assert lines[1] == "demo.mask.tif demo.report.json"
    assert "no-such-slide.svs" in lines[2] and "no such file" in lines[2]
    assert (tmp_path / "api-out" / "demo.mask.tif").stat().st_size > 0


def test_every_module_declares_all_and_its_names_exist():
    import importlib
    import pkgutil

    missing, broken = [], []
    for info in pkgutil.walk_packages(wsiseg.__path__, "wsiseg."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        names = getattr(module, "__all__", None)
        if names is None:
            missing.append(info.name)
        else:
            broken += [f"{info.name}.{n}" for n in names if not hasattr(module, n)]
    assert missing == [] and broken == []


def test_no_private_name_is_imported_from_another_module():
    import ast

    found = []
    for path in sorted((REPO / "wsiseg").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("wsiseg"):
                found += [
                    f"{path.name}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert found == []
