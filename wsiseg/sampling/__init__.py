"""The paper's sampling maths: pure torch/numpy, no I/O.

See :mod:`wsiseg.sampling.coords` for the one coordinate convention used
everywhere (forward sampling, reverse sampling, pyramids, OME-Zarr).
"""

__all__: list[str] = []  # the modules are the API: wsiseg.sampling.coords, .grid, .reverse, ...
