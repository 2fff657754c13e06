"""Evaluation: segmentation quality against sampling cost. :mod:`.scoring` evaluates one model on a labelled data
set (:func:`~wsiseg.evaluation.scoring.evaluate_model`) into an :class:`~wsiseg.evaluation.results.EvalResult`
(:mod:`.results`: results, tables, method and file names); :mod:`.sweep` trains and evaluates each method over
several budgets, drawn by :mod:`wsiseg.viz.eval_figures` (the sweep and class frequencies); :mod:`.run` is
``wsiseg evaluate``: the model on one split, against its baselines and over a sweep.
"""

__all__: list[str] = []  # the modules are the API: wsiseg.evaluation.run, .scoring, .sweep, ...
