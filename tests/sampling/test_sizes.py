"""Dynamic output size (paper A.6) and sampling cost."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsiseg.sampling.sizes import dynamic_output_size, sample_fraction


def test_paper_example():
    # 368 * 800 / 7986 = 36.86 -> floor 36 (rounding would give 37)
    assert dynamic_output_size(368, 7986, short=80, long=800) == (36, 800)
    assert dynamic_output_size(7986, 368, short=80, long=800) == (800, 36)


def test_square_and_mild_aspect_use_short_side():
    assert dynamic_output_size(1000, 1000, 80, 800) == (80, 80)
    assert dynamic_output_size(1000, 1200, 80, 800) == (80, 96)


def test_guards():
    assert dynamic_output_size(50, 60, 80, 800) == (50, 60)  # never upsample
    assert dynamic_output_size(80, 80, 80, 800) == (80, 80)
    assert dynamic_output_size(3, 100000, 80, 800) == (1, 800)  # never a side < 1
    assert dynamic_output_size(1, 1, 80, 800) == (1, 1)
    with pytest.raises(ValueError):
        dynamic_output_size(0, 10)
    with pytest.raises(ValueError):
        dynamic_output_size(10, 10, short=0)


@settings(deadline=None, max_examples=50)
@given(h=st.integers(1, 100000), w=st.integers(1, 100000), a=st.integers(1, 512), b=st.integers(1, 4096))
def test_size_properties(h, w, a, b):
    oh, ow = dynamic_output_size(h, w, a, b)
    assert 1 <= oh <= h and 1 <= ow <= w
    lo, hi = min(h, w), max(h, w)
    olo, ohi = (oh, ow) if h <= w else (ow, oh)
    if lo <= a and hi <= b:
        assert (oh, ow) == (h, w)
    else:
        # one side hits its target exactly and neither exceeds it
        assert olo == a or ohi == b
        assert olo <= max(a, 1) and ohi <= b
        # pixel count is at most the smaller candidate's (flooring; the >= 1 guard
        # can only lift a side to 1)
        c1 = a * (a * hi / lo)
        c2 = (b * lo / hi) * b
        assert olo * ohi <= max(min(c1, c2), ohi) + 1e-6


def test_sample_fraction():
    assert sample_fraction(36, 800, 368, 7986) == pytest.approx(36 * 800 / (368 * 7986))
    assert sample_fraction(100, 100, 10, 10) == 1.0
    with pytest.raises(ValueError):
        sample_fraction(1, 1, 0, 5)
