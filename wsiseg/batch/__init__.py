"""Many slides: batch semantics around a per-slide function. :mod:`.inputs` turns files, folders, globs and
manifests into :mod:`.jobs`; :mod:`.runner` plans, runs and certifies every slide, with :mod:`.markers` (done
markers, fingerprints: resume), :mod:`.locks` (one run per slide) and :mod:`.progress` (progress events and
``status.csv``); :mod:`.isolated` runs one slide in a worker process of its own under a time limit, and
:mod:`.dask` runs a batch on a dask.distributed cluster by the same rules. Nothing here knows what a slide's
processing is: ``wsiseg segment`` hands in its per-slide function.
"""

__all__: list[str] = []  # the modules are the API: wsiseg.batch.inputs, .runner, .dask, ...
