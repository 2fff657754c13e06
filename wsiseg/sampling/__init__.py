"""The paper's sampling maths: pure torch/numpy, no I/O.

See :mod:`wsiseg.sampling.coords` for the one coordinate convention used
everywhere (forward sampling, reverse sampling, pyramids, OME-Zarr).
"""
