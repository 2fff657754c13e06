"""``wsiseg segment`` over many slides: the picklable per-slide function and the batch entry point."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsiseg.device import resolve_device
from wsiseg.errors import WsisegError
from wsiseg.segment.options import OUTPUT_SUFFIXES, SegmentOptions
from wsiseg.segment.regions import check_model_for_slides
from wsiseg.segment.slide import segment_slide

__all__ = [
    "SlideSegmenter",
    "run_segment",
]


_MAX_MODELS = 2  # models cached per worker process
_MODELS: dict[tuple[str, str, str], Any] = {}
_MODELS_LOCK = threading.Lock()


@dataclass(frozen=True)
class SlideSegmenter:
    """The per-slide function of ``wsiseg segment``, picklable for dask workers.

    Loads the model once per worker process (cached by path, hash and
    device) and calls :func:`segment_slide`, as a local run
    does.

    Attributes
    ----------
    model_path : str
        Absolute path of the model file, the same on every worker.
    model_hash : str
        :func:`wsiseg.hashing.file_hash` seen by the client; a worker whose
        file differs fails the slide instead of writing other results.
    options : SegmentOptions
    """

    model_path: str
    model_hash: str
    options: SegmentOptions

    def model(self):
        """The loaded model of this worker process."""
        from wsiseg.models.io import load_deformseg

        key = (self.model_path, self.model_hash, str(self.options.device))
        with _MODELS_LOCK:
            model = _MODELS.get(key)
            if model is None:
                model = load_deformseg(self.model_path, device=resolve_device(self.options.device))
                if model.hash != self.model_hash:
                    raise WsisegError(
                        f"the model file on this worker differs from the client's (hash {model.hash}, expected "
                        f"{self.model_hash}); workers need the same file on shared storage",
                        self.model_path,
                    )
                while len(_MODELS) >= _MAX_MODELS:
                    _MODELS.pop(next(iter(_MODELS)))
                _MODELS[key] = model
            return model

    def __call__(self, job, out_dir, *, fingerprint, overwrite, progress):
        from wsiseg.batch.jobs import SlideOutcome

        mpp = job.overrides.get("mpp")
        outputs = segment_slide(
            job.path,
            self.model(),
            out_dir,
            job.name,
            self.options,
            mpp=float(mpp) if mpp not in (None, "") else None,
            progress=progress,
        )
        return SlideOutcome("ok", outputs=outputs)


def run_segment(
    inputs,
    model_path: str | Path,
    out_dir: str | Path,
    options: SegmentOptions = SegmentOptions(),
    *,
    overwrite: bool = False,
    progress: str = "auto",
    stream=None,
    scheduler: str | None = None,
    workers: int | None = None,
    slide_timeout: float | None = None,
):
    """Segment a batch of slides: the library behind ``wsiseg segment``.

    Every slide is attempted even after failures; ``status.csv``, the resume
    markers and the locks are those of :func:`wsiseg.batch.runner.run_batch`; a
    ``report.csv`` summarises every slide that has a report.

    Parameters
    ----------
    inputs : sequence of str
        Slide files, folders, globs or CSV manifests
        (:func:`wsiseg.batch.inputs.expand_inputs`).
    model_path : path-like
        A wsiseg model file.
    out_dir : path-like
        Output folder.
    options : SegmentOptions
    overwrite : bool
        Redo slides that are already done.
    progress : {"auto", "tty", "jsonl", "none"}
    scheduler : str, optional
        Address of a dask scheduler (``tcp://host:8786``): one task per slide
        on its workers (:mod:`wsiseg.batch.dask`); paths must be shared.
    workers : int, optional
        Run on a local cluster of this many worker processes instead.
    slide_timeout : float, optional
        Seconds each slide may take; a slide past it is killed and fails
        with ``timed out after N s`` and the batch goes on. Each slide then
        runs in a worker process of its own that loads the model again
        (:mod:`wsiseg.batch.isolated`). Default: no limit.

    Returns
    -------
    wsiseg.batch.jobs.BatchResult

    Raises
    ------
    WsisegError
        Bad model, bad options, inputs that match nothing or an unreachable
        scheduler: before any slide is touched.
    """
    from wsiseg.batch.inputs import expand_inputs
    from wsiseg.batch.jobs import SlideOutcome
    from wsiseg.batch.markers import make_fingerprint
    from wsiseg.batch.runner import run_batch
    from wsiseg.batch.isolated import check_timeout
    from wsiseg.models.io import load_deformseg
    from wsiseg.output.report import read_report_json, write_batch_csv

    out_dir = Path(out_dir)
    slide_timeout = check_timeout(slide_timeout)
    distributed = scheduler is not None or workers is not None
    # On a cluster, or with a time limit (a worker process per slide), the slides' processes pick their own
    # device and load the model themselves; this one only checks it.
    device = "cpu" if distributed or slide_timeout is not None else resolve_device(options.device)
    model = load_deformseg(model_path, device=device)
    check_model_for_slides(model)
    jobs = expand_inputs(list(inputs), exclude=(out_dir,))
    fingerprint = make_fingerprint(model.hash, options.resolved())

    def process(job, out, *, fingerprint, overwrite, progress):
        mpp = job.overrides.get("mpp")
        outputs = segment_slide(
            job.path,
            model,
            out,
            job.name,
            options,
            mpp=float(mpp) if mpp not in (None, "") else None,
            progress=progress,
        )
        return SlideOutcome("ok", outputs=outputs)

    segmenter = SlideSegmenter(str(Path(model_path).absolute()), model.hash, options)
    if distributed:
        from wsiseg.batch.dask import run_batch_distributed

        result = run_batch_distributed(
            jobs,
            out_dir,
            segmenter,
            fingerprint=fingerprint,
            scheduler=scheduler,
            workers=workers,
            overwrite=overwrite,
            progress=progress,
            stream=stream,
            slide_timeout=slide_timeout,
        )
    else:
        result = run_batch(
            jobs,
            out_dir,
            process if slide_timeout is None else segmenter,
            fingerprint=fingerprint,
            overwrite=overwrite,
            progress=progress,
            stream=stream,
            slide_timeout=slide_timeout,
        )
    reports = []
    for r in result.results:
        path = out_dir / f"{r.job.name}{OUTPUT_SUFFIXES['report']}"
        if r.status in ("ok", "skipped") and path.exists():
            rep = read_report_json(path)
            rep["status"] = r.status
            reports.append(rep)
        else:
            reports.append({"slide": r.job.path, "status": r.status, "error": r.outcome.error})
    write_batch_csv(out_dir / "report.csv", reports, overwrite=True)
    return result
