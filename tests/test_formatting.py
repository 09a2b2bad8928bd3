"""Tests of onnx_dwdecomp.formatting: how sizes and shapes are written, one rule each."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_dwdecomp.formatting import fmt_bytes, fmt_shape


@pytest.mark.parametrize("n, text", [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (3 << 20, "3.0 MiB"),
                                     (5 << 30, "5.0 GiB"), (2 << 40, "2.0 TiB"), (1 << 61, "2.3e+18 bytes")])
def test_fmt_bytes(n, text):
    assert fmt_bytes(n) == text


@pytest.mark.parametrize("shape, text", [((1, 3, 224, 224), "(1, 3, 224, 224)"), ((5,), "(5,)"), ((), "()"),
                                         ((None, 3, None), "(?, 3, ?)"), (("N", 3), "(N, 3)"),
                                         ((np.int64(2), 4), "(2, 4)")])
def test_fmt_shape_writes_python_tuples_with_unknown_dims_as_question_marks(shape, text):
    assert fmt_shape(shape) == text
