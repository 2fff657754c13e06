"""Slide reading: any slide -> :class:`Multiscale` of lazy dask levels."""

from wsiseg.slide.multiscale import Level, Multiscale

__all__ = ["Level", "Multiscale"]
