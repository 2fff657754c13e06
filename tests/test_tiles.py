"""The reverse tiler's fast paths equal the exact ones."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from wsiseg.sampling.tiles import label_counts


@given(st.integers(0, 2**31 - 1), st.integers(0, 255), st.integers(0, 300), st.booleans())
@settings(deadline=None, max_examples=60)
def test_label_counts_is_bincount(seed, top, size, strided):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, top + 1, (size, 7)).astype(np.uint8)
    if strided:
        a = a[:, ::2]
    assert np.array_equal(label_counts(a), np.bincount(a.ravel(), minlength=256))
    assert label_counts(a).dtype == np.int64
    assert np.array_equal(label_counts(top, size), np.bincount(np.full(size, top), minlength=256))
