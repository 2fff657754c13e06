"""Slide reading: any slide -> :class:`Multiscale` of lazy dask levels."""

from wsiseg.slide.multiscale import Level, Multiscale
from wsiseg.slide.open import open_slide

__all__ = ["Level", "Multiscale", "open_slide"]
