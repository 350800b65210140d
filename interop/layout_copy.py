"""Copying checkpoint tensors into our arrays: transposed where the layouts differ, in tiles, on a
few threads.

Loading is one copy of the checkpoint (our kernels are (in, out), torch's weights (out, in), and
layers are stacked), so the copy is the load time. numpy's `dst[...] = src.T` walks one side of a
large matrix with a stride of a whole row, missing the cache and the TLB on every element;
copying in tiles of 64 rows keeps both sides of a tile in cache (2-4x faster on a 65 MB LM head).
numpy releases the GIL inside each tile's copy, so a small thread pool copies tiles of different
tensors at once.

>>> src = np.arange(12, dtype=np.float32).reshape(3, 4)       # torch's (out, in)
>>> dst = np.empty((4, 3), np.float32)                         # our (in, out)
>>> copy_all([Copy(dst, src, transpose=True)], progress=False)
>>> bool((dst == src.T).all())
True
"""

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm.auto import tqdm

# A tile of TILE_ROWS source rows by at most TILE_COLUMNS columns: 128 KB in fp32, which fits
# in L2 with its transposed destination. Whole-load medians of benchmarks/load.py's checkpoint:
# on a 2-core Xeon (2 MB L2), 32 rows 0.086-0.100 s, 64 rows 0.069-0.082 s, 128 rows 0.068-0.072 s;
# an earlier AMD machine had 32 rows best, so 64 (fewer Python steps, still small for L2).
TILE_ROWS = 64
TILE_COLUMNS = 512
# Work is handed to the threads in pieces of about this many bytes, so that one large tensor
# (an LM head) is shared between them too.
PIECE_BYTES = 4 << 20


@dataclasses.dataclass(frozen=True)
class Copy:
    """dst[...] = src.T if transpose else src, with dst's dtype."""

    dst: np.ndarray
    src: np.ndarray
    transpose: bool = False


def _transpose_into(dst: np.ndarray, src: np.ndarray):
    rows, columns = src.shape
    # A dtype change (fp32 checkpoint, bf16 model) is made on the contiguous tile: casting the
    # transposed view is 3x slower (numpy buffers strided casts).
    convert = dst.dtype != src.dtype
    for r in range(0, rows, TILE_ROWS):
        for c in range(0, columns, TILE_COLUMNS):
            tile = src[r:r + TILE_ROWS, c:c + TILE_COLUMNS]
            dst[c:c + TILE_COLUMNS, r:r + TILE_ROWS] = (tile.astype(dst.dtype) if convert else tile).T


def _pieces(copy: Copy) -> list[Copy]:
    """`copy` split along the source's first axis into pieces of about PIECE_BYTES."""
    src = copy.src
    if src.ndim == 0 or src.nbytes <= PIECE_BYTES:
        return [copy]
    step = max(1, src.shape[0] * PIECE_BYTES // src.nbytes)
    if copy.transpose:
        return [Copy(copy.dst[:, r:r + step], src[r:r + step], True) for r in range(0, src.shape[0], step)]
    return [Copy(copy.dst[r:r + step], src[r:r + step]) for r in range(0, src.shape[0], step)]


def _run(copy: Copy) -> int:
    if copy.transpose and copy.src.ndim == 2:
        _transpose_into(copy.dst, copy.src)
    else:
        copy.dst[...] = copy.src.T if copy.transpose else copy.src
    return copy.src.nbytes


def copy_all(copies: list[Copy], *, progress: bool = True, desc: str = "copying", threads: int | None = None):
    """Carry out every copy, on `threads` threads (default: the CPUs this process may use, at most 8),
    with a tqdm bar in bytes."""
    pieces = [piece for copy in copies for piece in _pieces(copy)]
    threads = threads or min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    with tqdm(total=sum(p.src.nbytes for p in pieces), desc=desc, unit="B", unit_scale=True, disable=not progress,
              leave=False) as bar:
        if threads == 1 or len(pieces) == 1:
            for piece in pieces:
                bar.update(_run(piece))
            return
        with ThreadPoolExecutor(threads) as pool:
            for done in pool.map(_run, pieces):
                bar.update(done)
