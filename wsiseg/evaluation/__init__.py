"""Evaluation: segmentation quality against sampling cost. :mod:`.run` is ``wsiseg evaluate``: a model on a
labelled data set, optionally against the uniform and oracle edge baselines and over a sweep of budgets, with its
results, tables and figures.
"""

__all__: list[str] = []  # the modules are the API: wsiseg.evaluation.run, ...
