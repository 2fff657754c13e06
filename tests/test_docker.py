"""docker/: Dockerfiles and compose file parse, match the README/Makefile install and the CLI.

Docker cannot build here, so these checks read the files: what an image
installs and runs, and that every wsiseg / dask command line in the compose
file and in the README's deployment section exists.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import click
import pytest
import yaml

from wsiseg.cli.app import main

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    return out


def pick(ins, name):
    return [args for word, args in ins if word == name]


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def makefile_pip_lines() -> list[str]:
    return [line.strip() for line in (REPO / "Makefile").read_text().splitlines() if "pip install" in line]


def command_of(words: list[str]) -> tuple[click.Command, list[str]]:
    """The Click command a wsiseg command line names, and its remaining words."""
    cmd: click.Command = main
    rest = list(words)
    while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
        assert rest[0] in cmd.commands, f"no wsiseg command {rest[0]!r}"
        cmd = cmd.commands[rest.pop(0)]
    return cmd, rest


def check_options(cmd: click.Command, words: list[str]) -> None:
    """Every --option in ``words`` exists on ``cmd`` (with its value, if it takes one)."""
    known = {o: p for p in cmd.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}
    known["--help"] = None
    for i, w in enumerate(words):
        if w.startswith("--"):
            name = w.split("=", 1)[0]
            assert name in known, f"{cmd.name}: unknown option {name}"
            p = known[name]
            if p is not None and not p.is_flag and "=" not in w:
                assert i + 1 < len(words), f"{cmd.name}: {name} needs a value"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_image_contract(name):
    ins = instructions(DOCKER / name)
    assert ins[0][0] == "FROM" or (ins[0][0] == "ARG" and pick(ins, "FROM"))
    base = pick(ins, "FROM")[0]
    assert base == ("python:3.11-slim" if name == "Dockerfile" else "nvidia/cuda:12.4.1-runtime-ubuntu22.04")
    # Entry point and health check run the installed console script.
    script = next(iter(project()["scripts"]))
    assert json.loads(pick(ins, "ENTRYPOINT")[-1]) == [script]
    health = pick(ins, "HEALTHCHECK")[-1]
    cmd = json.loads(health[health.index("CMD") + 3 :].strip())
    assert cmd == [script, "--version"]
    # Not root, and the USER comes before the entry point takes effect.
    users = [(i, a) for i, (w, a) in enumerate(ins) if w == "USER"]
    assert users and users[-1][1] not in ("root", "0", "0:0")
    assert users[-1][0] < [i for i, (w, _) in enumerate(ins) if w == "ENTRYPOINT"][-1]
    assert any("useradd" in a and users[-1][1] in a for a in pick(ins, "RUN"))
    # Volumes for slides and outputs.
    volumes = set(json.loads(pick(ins, "VOLUME")[-1]))
    assert {"/data", "/out"} <= volumes


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_installs_the_package_as_the_makefile_does(name):
    ins = instructions(DOCKER / name)
    copied = " ".join(pick(ins, "COPY"))
    for needed in ("pyproject.toml", "README.md", "wsiseg"):  # README.md: pyproject's readme
        assert needed in copied
    assert project()["readme"] == "README.md"
    run = " && ".join(pick(ins, "RUN"))
    steps = [s.strip() for s in run.split("&&")]

    def norm(s):
        return re.sub(r"\s+", " ", s.replace("$(BIN)/python", "python").replace("--quiet ", "")).strip()

    # The Makefile's first pip step, verbatim but for --quiet and the venv path.
    upgrade, install = makefile_pip_lines()
    assert norm(upgrade) in steps
    # The Makefile installs the checkout editable with test extras; the image installs it plainly.
    assert "-e '.[test]'" in install
    pip = [s for s in steps if s.startswith("python -m pip install") and "--upgrade" not in s]
    assert len(pip) == 1
    words = shlex.split(pip[0])
    assert words[-1] == "." and "-e" not in words
    # ... and proves that it installed: the console script of the package named in pyproject.
    assert project()["name"] == "wsiseg" and "wsiseg --version" in steps
    # The build context ignore file keeps everything the COPY lines need.
    ignore = (DOCKER / f"{name}.dockerignore").read_text()
    for needed in ("pyproject.toml", "README.md", "wsiseg/", "pipelines/"):
        assert f"!{needed}" in ignore


def test_healthcheck_command_works():
    from click.testing import CliRunner

    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and "wsiseg" in r.output


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_services(compose):
    services = compose["services"]
    assert {"scheduler", "worker", "worker-gpu", "job"} <= set(services)
    for name, svc in services.items():
        mounts = {v.rsplit("}", 1)[-1].split(":")[1] for v in svc["volumes"]}  # after ${HOST_VAR:-default}
        assert {"/data", "/out", "/models"} <= mounts, name  # the same paths everywhere
        assert svc["build"]["context"] == ".." and (DOCKER.parent / svc["build"]["dockerfile"]).is_file()
    sched = services["scheduler"]
    assert sched["entrypoint"] == ["dask", "scheduler"] and "8786:8786" in sched["ports"]
    assert "--port" in sched["command"] and sched["command"][sched["command"].index("--port") + 1] == "8786"
    for name in ("worker", "worker-gpu"):
        svc = services[name]
        assert svc["entrypoint"] == ["dask", "worker"] and svc["command"][0] == "tcp://scheduler:8786"
        assert svc["depends_on"]["scheduler"]["condition"] == "service_healthy"
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["image"] == "wsiseg:cuda"
    assert "--resources" in gpu["command"] and gpu["command"][gpu["command"].index("--resources") + 1] == "GPU=1"
    dev = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and dev["capabilities"] == ["gpu"]
    assert services["worker"]["deploy"]["replicas"] >= 1


def test_compose_command_lines_exist(compose):
    from distributed.cli.dask_scheduler import main as dask_scheduler
    from distributed.cli.dask_worker import main as dask_worker

    services = compose["services"]
    check_options(dask_scheduler, services["scheduler"]["command"])
    for name in ("worker", "worker-gpu"):
        check_options(dask_worker, services[name]["command"])
    job = services["job"]
    assert "entrypoint" not in job  # the image's: wsiseg
    cmd, rest = command_of(job["command"])
    assert cmd.name == "segment"
    check_options(cmd, rest)
    assert rest[rest.index("--scheduler") + 1] == "tcp://scheduler:8786"
    assert rest[rest.index("--out") + 1] == "/out" and rest[0] == "/data"


def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Lab deployment")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_readme_deployment_commands_exist():
    section = readme_section()
    blocks = re.findall(r"```(?:console|bash|sh)?\n(.*?)```", section, re.S)
    lines, buf = [], ""
    for block in blocks:
        for raw in block.splitlines():
            line = raw.split(" #", 1)[0].strip().removeprefix("$ ")
            if line.endswith("\\"):
                buf += line[:-1] + " "
                continue
            lines.append(buf + line)
            buf = ""
    checked = 0
    for line in lines:
        words = shlex.split(line)
        for i, w in enumerate(words):  # wsiseg anywhere on the line (after env vars, srun, docker run IMAGE)
            if w == "wsiseg" and i + 1 < len(words) and not words[i + 1].startswith("-"):
                cmd, rest = command_of(words[i + 1 :])
                check_options(cmd, rest)
                checked += 1
                break
    assert checked >= 3, "the deployment section should show wsiseg commands"
    # The install it describes is the image's.
    assert "docker/Dockerfile" in section and "docker/compose.yaml" in section
    assert "--scheduler" in section and "--workers" in section and "wsiseg run" in section
