"""Benchmarks behind ``wsiseg bench``, kept out of the product core: each measures the product on realistic
slides or real labelled data and writes its own section of ``docs/benchmarks.md``. :mod:`.common` holds the
section writer, the machine description and the gather/convert benchmarks; :mod:`.cluster` (scale-out),
:mod:`.segment` (segment), :mod:`.memory`, :mod:`.gpu`, :mod:`.output` (mask writer), :mod:`.sampling` (learned vs
fixed sampling), :mod:`.quality`, :mod:`.capacity` and :mod:`.quality_report` (quality on real tissue) and
:mod:`.fuzz` (commands on damaged slides, with :mod:`.mutate`, the slide mutator, and :mod:`.forkserver`, the
process runner) one benchmark each. Only the CLI and :mod:`wsiseg.demo.data` (the quality sets) import from here.
"""

__all__: list[str] = []  # the modules are the API: wsiseg.bench.common, .segment, .quality, ...
