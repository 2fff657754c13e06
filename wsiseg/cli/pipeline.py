"""Versioned YAML job definitions: ``wsiseg run pipelines/NAME.yaml``.

A pipeline file names one job and its options, spelled as on the command
line (``--no-qc`` is ``qc: false``, ``--out-size`` is ``out_size``,
arguments by their name: ``slides``, ``data``, ``model``)::

    version: 1                 # schema version (required)
    job: segment               # segment | train | evaluate | bench (required)
    description: one line      # optional
    slides: [../shared/data/slides]
    model: runs/biopsies/model.safetensors
    out: runs/segment-folder
    qc: false

``job: bench`` also needs ``benchmark:`` (``gather``, ``convert``,
``cluster``). A ``train`` job's ``config:`` is a training-options YAML
(:class:`wsiseg.training.config.TrainConfig`, e.g. ``pipelines/demo-model.yaml``), or a list
of them layered in order, as for ``wsiseg train --config``; it is validated too.

Values: flags are ``true``/``false``; lists become repeated options
(``baseline: [uniform=a.safetensors]``) or, for options that take a
comma-separated list (``compare``, ``sweep``), are joined with commas; sizes
are written ``WIDTHxHEIGHT`` as on the command line. Strings may use
``${VAR}`` and ``${VAR:-default}`` from the environment. Relative paths are
relative to the working directory, as on the command line.

Running a pipeline runs the command line it stands for
(:func:`Pipeline.argv`) in this process, so it behaves exactly like typing
it; ``--set KEY=VALUE`` overrides a key, ``--dry-run`` prints the command.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsiseg.errors import ConfigError, one_line

__all__ = ["JOBS", "PIPELINE_VERSION", "Pipeline", "load_pipeline", "parse_overrides", "validate_file"]

PIPELINE_VERSION = 1
#: Pipeline job -> wsiseg command.
JOBS = ("segment", "train", "evaluate", "bench")
_META_KEYS = ("version", "job", "description", "benchmark")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_COMMA_LISTS = {("evaluate", "compare"), ("evaluate", "sweep"), ("evaluate", "trimap_widths"), ("bench", "workers")}


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline file.

    Attributes
    ----------
    path : pathlib.Path
    job : str
        ``segment``, ``train``, ``evaluate`` or ``bench``.
    command : tuple of str
        The wsiseg command words, e.g. ``("bench", "cluster")``.
    options : dict
        Job options after overrides and ``${VAR}`` expansion.
    description : str or None
    """

    path: Path
    job: str
    command: tuple[str, ...]
    options: dict[str, Any]
    description: str | None = None

    def argv(self) -> list[str]:
        """The ``wsiseg`` arguments this pipeline stands for."""
        return [*self.command, *_to_argv(self, _command(self.command), self.options)]

    def command_line(self) -> str:
        return shlex.join(["wsiseg", *self.argv()])


def _err(path: Path, key: str | None, message: str) -> ConfigError:
    return ConfigError(f"{key}: {message}" if key else message, path)


def _command(words: Sequence[str]):
    import click

    # the jobs' commands from their own modules, not the root group: wsiseg.cli.app imports this module (run)
    from wsiseg.cli.bench import bench_group
    from wsiseg.cli.evaluate import evaluate_command
    from wsiseg.cli.segment import segment_command
    from wsiseg.cli.train import train_command

    cmd: Any = click.Group(commands=[segment_command, train_command, evaluate_command, bench_group])
    for w in words:
        if not isinstance(cmd, click.Group) or w not in cmd.commands:
            return None
        cmd = cmd.commands[w]
    return cmd


def param_key(param) -> str | None:
    """The pipeline key of a Click parameter: ``--out-size`` -> ``out_size``, argument MODEL -> ``model``."""
    import click

    if isinstance(param, click.Argument):
        return (param.metavar or param.name or "").lower() or None
    longs = [o for o in param.opts if o.startswith("--")]
    if not longs or param.name == "help":
        return None
    return longs[0][2:].replace("-", "_")


def _params(cmd) -> dict[str, Any]:
    return {k: p for p in cmd.params if (k := param_key(p))}


def _expand(value: Any, path: Path, key: str) -> Any:
    """``${VAR}`` / ``${VAR:-default}`` in strings (recursively in lists)."""
    if isinstance(value, list):
        return [_expand(v, path, key) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise _err(path, key, f"environment variable {name} is not set (write ${{{name}:-default}} for a default)")
        return default

    return _ENV.sub(sub, value)


def _scalar(value: Any, path: Path, key: str) -> str:
    if isinstance(value, bool) or value is None:
        raise _err(path, key, f"expected a value, got {value!r}")
    if isinstance(value, (str, int, float)):
        return str(value)
    raise _err(path, key, f"expected a single value, got {type(value).__name__}")


def _values(pipe: Pipeline, param, key: str, value: Any) -> list[str]:
    """Command-line words for one option or argument (checked, not converted)."""
    import click

    is_list = isinstance(value, (list, tuple))
    if isinstance(param, click.Argument):
        many = param.nargs == -1 or param.nargs > 1
        if is_list and not many:
            raise _err(pipe.path, key, "expected a single value, got a list")
        items = list(value) if is_list else [value]
        if many and not items:
            raise _err(pipe.path, key, "expected at least one value")
        return [_scalar(v, pipe.path, key) for v in items]
    if param.is_flag and not param.count:
        if not isinstance(value, bool):
            raise _err(pipe.path, key, f"expected true or false, got {value!r}")
        if value:
            return [param.opts[0]]
        if param.secondary_opts:
            return [param.secondary_opts[0]]
        return []
    if param.multiple:
        items = list(value) if is_list else [value]
        return [w for v in items for w in (param.opts[0], _scalar(v, pipe.path, key))]
    if is_list:
        if (pipe.job, key) not in _COMMA_LISTS:
            hint = " (sizes are WIDTHxHEIGHT, e.g. 64x64)" if getattr(param.type, "name", "") == "WIDTHxHEIGHT" else ""
            raise _err(pipe.path, key, f"expected a single value, got a list{hint}")
        value = ",".join(_scalar(v, pipe.path, key) for v in value)
    if value is None:
        return []
    return [param.opts[0], _scalar(value, pipe.path, key)]


def _to_argv(pipe: Pipeline, cmd, options: Mapping[str, Any]) -> list[str]:
    import click

    params = _params(cmd)
    args: list[str] = []
    opts: list[str] = []
    for key, value in options.items():
        param = params[key]
        words = _values(pipe, param, key, value)
        (args if isinstance(param, click.Argument) else opts).extend(words)
    # Arguments after "--" so that values starting with "-" are never read as options.
    return [*opts, "--", *args] if args else opts


def _check_values(pipe: Pipeline, cmd) -> None:
    """Types a pipeline can check before running: choices, numbers, sizes (paths are checked when run)."""
    import click

    params = _params(cmd)
    for key, value in pipe.options.items():
        param = params[key]
        if isinstance(param, click.Argument) or param.is_flag or isinstance(param.type, click.Path):
            continue
        items = value if isinstance(value, (list, tuple)) and param.multiple else [value]
        for v in items:
            if v is None or isinstance(v, (list, tuple)):
                continue
            try:
                param.type.convert(str(v), param, None)
            except click.BadParameter as exc:
                raise _err(pipe.path, key, exc.message) from None


def _check_train_config(pipe: Pipeline) -> None:
    ref = pipe.options.get("config")
    refs = ref if isinstance(ref, list) else [ref]
    if not refs or not all(isinstance(r, str) and Path(r).is_file() for r in refs):
        return  # a missing file is reported by `wsiseg train` when it runs
    from wsiseg.training.config import TrainConfig, load_train_config

    options: dict = {}
    try:
        for r in refs:  # layered as `wsiseg train` layers repeated --config files
            options.update(load_train_config(r))
        TrainConfig.from_dict(options)
    except ConfigError as exc:
        raise _err(pipe.path, "config", f"{', '.join(refs)}: {exc.message if exc.path is None else exc}") from None


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> dict; values are YAML (``qc=false``, ``slides=[a, b]``)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            out[key] = text
    return out


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read pipeline: {exc.strerror or exc}", path) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {one_line(exc)}", path) from exc


def load_pipeline(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> Pipeline:
    """Read and validate a pipeline file.

    Parameters
    ----------
    path : path-like
    overrides : mapping, optional
        Keys replacing the file's (``--set``).

    Raises
    ------
    ConfigError
        One line naming the file and the key: not a mapping, wrong or missing
        ``version``, unknown ``job`` or ``benchmark``, unknown keys, missing
        required options, values of the wrong type, an invalid training
        ``config``.
    """
    path = Path(path)
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise _err(path, None, "a pipeline must be a YAML mapping with 'version' and 'job'")
    if "job" not in data:
        hint = ""
        try:
            from wsiseg.training.config import TrainConfig

            TrainConfig.from_dict(data)
            hint = "; it is a training config: use it as 'config:' of a train pipeline or with 'wsiseg train --config'"
        except ConfigError:
            pass
        raise _err(path, "job", f"missing: not a pipeline (job: {' | '.join(JOBS)}){hint}")
    data = {**data, **dict(overrides or {})}
    version = data.get("version")
    if version != PIPELINE_VERSION or isinstance(version, bool):
        what = "missing" if version is None else f"unsupported version {version!r}"
        raise _err(path, "version", f"{what} (this wsiseg reads version {PIPELINE_VERSION})")
    job = data["job"]
    if job not in JOBS:
        raise _err(path, "job", f"unknown job {job!r} (expected one of: {', '.join(JOBS)})")
    description = data.get("description")
    if description is not None and not isinstance(description, str):
        raise _err(path, "description", "must be text")
    command: tuple[str, ...] = (job,)
    if job == "bench":
        from wsiseg.cli.bench import bench_group

        names = sorted(n for n in bench_group.commands if n != "all")
        bench = data.get("benchmark")
        if bench not in names:
            raise _err(path, "benchmark", f"expected one of: {', '.join(names)}, got {bench!r}")
        command = ("bench", bench)
    elif "benchmark" in data:
        raise _err(path, "benchmark", "only for job: bench")
    cmd = _command(command)
    params = _params(cmd)
    options = {k: _expand(v, path, k) for k, v in data.items() if k not in _META_KEYS}
    unknown = sorted(k for k in options if k not in params)
    if unknown:
        raise _err(
            path,
            unknown[0],
            f"unknown option for job {' '.join(command)} (known: {', '.join(sorted(params))})",
        )
    missing = sorted(k for k, p in params.items() if p.required and options.get(k) is None)
    if missing:
        raise _err(path, missing[0], f"required by job {' '.join(command)}")
    pipe = Pipeline(path, job, command, options, description)
    pipe.argv()  # value shapes (flags, lists)
    _check_values(pipe, cmd)
    if job == "train":
        _check_train_config(pipe)
    return pipe


def validate_file(path: str | os.PathLike) -> str:
    """What a YAML file in ``pipelines/`` is, validated: ``"pipeline"`` or ``"train config"``.

    Raises
    ------
    ConfigError
        Neither a valid pipeline nor a valid training config.
    """
    path = Path(path)
    data = _read_yaml(path)
    if isinstance(data, dict) and "job" in data:
        load_pipeline(path)
        return "pipeline"
    from wsiseg.training.config import TrainConfig, load_train_config

    TrainConfig.from_dict(load_train_config(path))
    return "train config"
