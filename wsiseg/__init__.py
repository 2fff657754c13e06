"""wsiseg: fast whole-slide image segmentation by learning where to sample.

Implements "Learning to Downsample for Segmentation of Ultra-High Resolution
Images" (Jin et al., ICLR 2022) as a whole-slide pipeline.
"""

__version__ = "0.1.0"
