"""Many slides: batch semantics around a per-slide function. :mod:`.runner` expands the inputs, plans, runs and
certifies every slide (status.csv, done markers, locks, progress), :mod:`.isolated` runs one slide in a worker
process of its own under a time limit, and :mod:`.dask` runs a batch on a dask.distributed cluster by the same
rules. Nothing here knows what a slide's processing is: ``wsiseg segment`` hands in its per-slide function.
"""

__all__: list[str] = []  # the modules are the API: wsiseg.batch.runner, .isolated, .dask
