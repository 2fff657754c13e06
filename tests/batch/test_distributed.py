"""Slides on a real dask.distributed LocalCluster: worker loss, crashing slides, resume, unreachable scheduler."""

from __future__ import annotations

import csv
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from _faults import Faulty, Stamp
from click.testing import CliRunner

import wsiseg.batch.dask as wd
from wsiseg.batch.inputs import expand_inputs
from wsiseg.batch.markers import make_fingerprint
from wsiseg.batch.runner import run_batch
from wsiseg.cli.app import main
from wsiseg.batch.dask import run_batch_distributed
from wsiseg.segment import SlideSegmenter
from wsiseg.errors import WsisegError
from wsiseg.hashing import file_hash
from wsiseg.models.io import save_deformseg
from wsiseg.models.net import DeformSegNet
from wsiseg.output.classes import default_classes
from wsiseg.segment import SegmentOptions

distributed = pytest.importorskip("distributed")

SEG = {"arch": "unet", "encoder": "resnet18", "num_classes": 3, "encoder_depth": 3, "decoder_channels": [32, 16, 8]}
SLIDES = ("boxes.tiff", "small.svs", "test_orient0.tif", "test_orient3.tif")
OPTIONS = SegmentOptions(qc=False, device="cpu")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_deformseg(path, DeformSegNet(SEG, map_size=(32, 32), out_size=(64, 64)).eval(), default_classes(3))
    return path


@pytest.fixture(scope="module")
def client():
    """Two worker processes, one thread each; a slide may kill one worker and still be retried once."""
    import dask
    from distributed import Client, LocalCluster

    # the scheduler settings of wsiseg's own clusters (distributed.cluster_client), with one retry
    with dask.config.set({"distributed.scheduler.allowed-failures": 1, "distributed.scheduler.worker-saturation": 1.0}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    c = Client(cluster, set_as_default=False)
    c.wait_for_workers(2, timeout=120)
    yield c
    c.close()
    cluster.close()


@pytest.fixture()
def fresh_client(client):
    """The module's cluster with both workers up; restarted when a crash test left one down."""
    try:
        client.wait_for_workers(2, timeout=30)
    except TimeoutError:
        client.restart(timeout=120)
        client.wait_for_workers(2, timeout=120)
    return client


@pytest.fixture()
def jobs(slides_dir):
    return expand_inputs([slides_dir / s for s in SLIDES])


def read_status(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "status.csv", newline="", encoding="utf-8") as fh:
        return {r["name"]: r for r in csv.DictReader(fh)}


def completed(log: Path) -> list[str]:
    path = log / "completed.log"
    return sorted(path.read_text().split()) if path.exists() else []


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.endswith(".lock") or ".tmp-" in p.name)


def check_mask(out: Path, job) -> None:
    from wsiseg.slide import open_slide

    ms = open_slide(job.path)
    with tifffile.TiffFile(out / f"{job.name}.mask.tif") as tif:
        level0 = tif.pages[0].asarray()
    assert level0.shape == (ms.height, ms.width) and level0.dtype == np.uint8


def test_worker_killed_mid_slide_is_redone_elsewhere_exactly_once(client, jobs, model_file, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    log.mkdir()
    inner = SlideSegmenter(str(model_file), file_hash(model_file), OPTIONS)
    process = Faulty(inner, str(log), slow="boxes")
    fp = make_fingerprint(inner.model_hash, OPTIONS.resolved())
    killed: list[int] = []

    def killer():
        pid_file = log / "slow.pid"
        deadline = time.monotonic() + 120
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.2)
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    result = run_batch_distributed(jobs, out, process, fingerprint=fp, client=client, progress="none")
    t.join(5)
    assert killed, "the slow slide never started"
    assert result.counts == {"ok": 4, "failed": 0, "skipped": 0}, read_status(out)
    assert completed(log) == sorted(j.name for j in jobs)  # every slide finished exactly once
    status = read_status(out)
    assert {n: r["status"] for n, r in status.items()} == {j.name: "ok" for j in jobs}
    for job in jobs:
        assert (out / f"{job.name}.done.json").is_file()
        check_mask(out, job)
    # The killed attempt's half-written mask never became final and its temporary is gone.
    assert leftovers(out) == []

    # Same command again: the same resume rules as a local run.
    again = run_batch_distributed(jobs, out, process, fingerprint=fp, client=client, progress="none")
    assert again.counts == {"ok": 0, "failed": 0, "skipped": 4}
    assert completed(log) == sorted(j.name for j in jobs)


def test_cli_scheduler_matches_a_local_run_and_resumes(client, jobs, slides_dir, model_file, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    args = [*(str(slides_dir / s) for s in SLIDES), "--model", str(model_file), "--no-qc", "--device", "cpu"]
    r = CliRunner().invoke(
        main, ["segment", *args, "--out", str(remote), "--scheduler", client.scheduler.address, "--progress", "jsonl"]
    )
    assert r.exit_code == 0, r.output
    assert "4 ok, 0 skipped, 0 failed" in r.stdout
    assert '"event": "stage"' in r.stderr and '"event": "batch_done"' in r.stderr  # worker progress arrives
    r = CliRunner().invoke(main, ["segment", *args, "--out", str(local), "--progress", "none"])
    assert r.exit_code == 0, r.output
    for job in jobs:  # the same outputs as a local run
        for suffix in (".mask.tif", ".classes.json"):
            a, b = local / f"{job.name}{suffix}", remote / f"{job.name}{suffix}"
            if suffix == ".mask.tif":
                assert np.array_equal(tifffile.imread(a), tifffile.imread(b))
            else:
                assert a.read_bytes() == b.read_bytes()
    assert (remote / "report.csv").read_text().count("\n") == 5
    # A local rerun in the folder the cluster wrote skips everything: one set of rules.
    r = CliRunner().invoke(main, ["segment", *args, "--out", str(remote), "--progress", "none"])
    assert r.exit_code == 0 and "0 ok, 4 skipped" in r.stdout


def test_distributed_and_local_runs_on_one_folder_share_the_work(client, jobs, model_file, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    log.mkdir()
    inner = SlideSegmenter(str(model_file), file_hash(model_file), OPTIONS)
    process = Faulty(inner, str(log))
    fp = make_fingerprint(inner.model_hash, OPTIONS.resolved())
    results = {}
    t = threading.Thread(
        target=lambda: results.setdefault(
            "cluster", run_batch_distributed(jobs, out, process, fingerprint=fp, client=client, progress="none")
        )
    )
    t.start()
    results["local"] = run_batch(list(reversed(jobs)), out, process, fingerprint=fp, progress="none")
    t.join(120)
    assert completed(log) == sorted(j.name for j in jobs)  # each slide processed by one run only
    for name in ("cluster", "local"):
        assert results[name].exit_code == 0
        assert {r.status for r in results[name].results} <= {"ok", "skipped"}
    for job in jobs:
        check_mask(out, job)
    assert leftovers(out) == []


def test_unreachable_scheduler_is_a_clear_error_before_any_work(slides_dir, model_file, tmp_path, monkeypatch):
    monkeypatch.setattr(wd, "CONNECT_TIMEOUT_S", 1.0)
    out = tmp_path / "out"
    r = CliRunner().invoke(
        main,
        [
            "segment",
            str(slides_dir / "boxes.tiff"),
            "--model",
            str(model_file),
            "--out",
            str(out),
            "--scheduler",
            "tcp://127.0.0.1:9",
        ],
    )
    assert r.exit_code == 2, r.output
    assert "cannot reach the dask scheduler at tcp://127.0.0.1:9" in r.stderr and "Traceback" not in r.output
    assert not out.exists()
    r = CliRunner().invoke(
        main,
        [
            "segment",
            str(slides_dir / "boxes.tiff"),
            "--model",
            str(model_file),
            "--out",
            str(out),
            "--scheduler",
            "tcp://127.0.0.1:9",
            "--workers",
            "2",
        ],
    )
    assert r.exit_code == 2 and "exclude each other" in r.output


def test_unpicklable_process_is_refused_before_any_work(jobs, tmp_path):
    lock = threading.Lock()

    def process(job, out_dir, *, fingerprint, overwrite, progress, _lock=lock):
        raise AssertionError("never called")

    with pytest.raises(WsisegError, match="cannot be sent to dask workers"):
        run_batch_distributed(jobs, tmp_path / "out", process, fingerprint="fp", workers=1)
    assert not (tmp_path / "out").exists()


def test_segmenter_loads_the_model_once_per_process_and_checks_its_hash(model_file, tmp_path):
    seg = SlideSegmenter(str(model_file), file_hash(model_file), OPTIONS)
    assert seg.model() is seg.model()
    wrong = SlideSegmenter(str(model_file), "0" * 16, OPTIONS)
    with pytest.raises(WsisegError, match="differs from the client's"):
        wrong.model()


def test_slide_timeout_on_the_cluster_fails_only_the_slow_slide(fresh_client, tmp_path):
    from wsiseg.batch.jobs import SlideJob

    client = fresh_client  # an earlier test's killed worker may still be restarting
    out, log = tmp_path / "out", tmp_path / "log"
    log.mkdir()
    workers = set(client.scheduler_info()["workers"])
    jobs = [SlideJob(f"/nonexistent/{n}.svs", n) for n in ("a", "hang", "b")]
    result = run_batch_distributed(
        jobs,
        out,
        Faulty(Stamp(), str(log), slow="hang"),
        fingerprint="fp",
        client=client,
        progress="none",
        slide_timeout=8,
    )
    status = {n: (r["status"], r["error"]) for n, r in read_status(out).items()}
    assert status == {"a": ("ok", ""), "hang": ("failed", "timed out after 8 s"), "b": ("ok", "")}, status
    assert result.exit_code == 1 and completed(log) == ["a", "b"]
    assert leftovers(out) == []
    assert set(client.scheduler_info()["workers"]) == workers  # the slide's process died, not its worker


# Last: the workers it crashes restart (and re-import) while nothing else waits for them.
def test_slide_that_crashes_its_worker_fails_after_the_retry_limit(client, jobs, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    log.mkdir()
    # A light per-slide function: restarted workers need not import torch to crash again.
    process = Faulty(Stamp(), str(log), crash="small")
    result = run_batch_distributed(jobs, out, process, fingerprint="fp", client=client, progress="none")
    status = read_status(out)
    assert result.exit_code == 1, status
    assert {n: r["status"] for n, r in status.items()} == {
        j.name: ("failed" if j.name == "small" else "ok") for j in jobs
    }
    assert "worker died 2 times" in status["small"]["error"] and "allowed-failures" in status["small"]["error"]
    assert completed(log) == sorted(j.name for j in jobs if j.name != "small"), status
    assert not list(out.glob("small.*")) and leftovers(out) == [], sorted(p.name for p in out.iterdir())


def test_gpu_workers_get_one_slide_per_gpu():
    class FakeClient:
        def __init__(self, workers):
            self.workers = workers

        def scheduler_info(self, n_workers=5):
            return {"workers": {f"tcp://w{i}": w for i, w in enumerate(self.workers)}}

    cpu = FakeClient([{"nthreads": 4, "resources": {}}, {"nthreads": 2}])
    assert not wd._has_gpu_workers(cpu) and wd._capacity(cpu, gpu=False) == 6
    gpu = FakeClient([{"nthreads": 4, "resources": {"GPU": 1}}, {"nthreads": 4, "resources": {"GPU": 2}}])
    assert wd._has_gpu_workers(gpu) and wd._capacity(gpu, gpu=True) == 3
