"""Figures, drawn with numpy and Pillow: :mod:`.qc` is the per-slide QC figure of ``wsiseg segment``,
:mod:`.charts` the training curves (``curves.png``) and the chart helpers the other charts are drawn with,
:mod:`.eval_figures` the evaluation figures (the cost-performance sweep, the class frequencies).

The import direction is one way: viz reads the lower rooms (the classes of :mod:`wsiseg.output`), and segment,
training, evaluation and the benchmarks call it; nothing in slide/, sampling/, models/ or output/ imports viz.
"""

from __future__ import annotations

__all__: list[str] = []  # the modules are the API: wsiseg.viz.qc, .charts, .eval_figures
