"""interop.layout_copy: the tiled, threaded copy that loads checkpoints equals numpy's plain assignment
for any shape, split into tiles and pieces or not, with dtype conversion, into stacked layers."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interop import layout_copy
from interop.layout_copy import Copy, copy_all


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 3x5 and pieces of 256 bytes, so small arrays cross every tile and piece border."""
    monkeypatch.setattr(layout_copy, "TILE_ROWS", 3)
    monkeypatch.setattr(layout_copy, "TILE_COLUMNS", 5)
    monkeypatch.setattr(layout_copy, "PIECE_BYTES", 256)


# The fixture only sets module constants, the same for every example.
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 40), columns=st.integers(1, 40), transpose=st.booleans(), threads=st.sampled_from([1, 2, 3]))
def test_equals_numpy_assignment(small_tiles, rows, columns, transpose, threads):
    src = np.random.default_rng(rows * 41 + columns).standard_normal((rows, columns), dtype=np.float32)
    dst = np.full((columns, rows) if transpose else (rows, columns), np.nan, np.float32)
    copy_all([Copy(dst, src, transpose)], progress=False, threads=threads)
    np.testing.assert_array_equal(dst, src.T if transpose else src)


def test_stacked_layers_bias_and_conversion(small_tiles):
    # Four layers of a (out=13, in=7) weight into a stacked (4, 7, 13) bf16 kernel, a 1-D bias
    # stacked (4, 13), and a 3-D tensor copied as it is; all in one call, on two threads.
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((13, 7), dtype=np.float32) for _ in range(4)]
    biases = [rng.standard_normal(13, dtype=np.float32) for _ in range(4)]
    other = rng.standard_normal((2, 9, 5), dtype=np.float32)
    kernel = np.zeros((4, 7, 13), ml_dtypes.bfloat16)
    bias = np.zeros((4, 13), np.float32)
    cube = np.zeros((2, 9, 5), np.float32)
    copies = [Copy(kernel[i], w, True) for i, w in enumerate(weights)]
    copies += [Copy(bias[i], b) for i, b in enumerate(biases)] + [Copy(cube, other)]
    copy_all(copies, progress=False, threads=2)
    np.testing.assert_array_equal(kernel, np.stack([w.T for w in weights]).astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(bias, np.stack(biases))
    np.testing.assert_array_equal(cube, other)


def test_default_tiles_on_an_lm_head():
    # The real tile and piece sizes on a (vocab, hidden) head: many pieces, partial last tiles.
    src = np.random.default_rng(1).standard_normal((3001, 520), dtype=np.float32)
    dst = np.empty((520, 3001), np.float32)
    copy_all([Copy(dst, src, True)], progress=False)
    np.testing.assert_array_equal(dst, src.T)
