"""NF4 and FP4: QLoRA's 4-bit frozen base, bit for bit what bitsandbytes stores.

A weight is cut into blocks of `blocksize` consecutive values (row-major order). Each block
keeps its absolute maximum `absmax` (fp32) and each value becomes the 4-bit index of the
nearest entry of a 16-value codebook after scaling by 1/absmax; two indices share a byte,
the first in the high nibble. NF4 (QLoRA's NormalFloat) spaces the codebook at quantiles of
a normal distribution; FP4 is a 1-sign, 2-exponent, 1-mantissa float. Double quantization
quantizes the absmax values again: their mean (`offset`) is subtracted, then they are stored
as 8-bit indices into bitsandbytes' dynamic map, 256 per block, with one fp32 `nested_absmax`
per block of 256. That takes the cost of the statistics from 0.5 to about 0.127 bits per
parameter at blocksize 64.

Every rounding step follows bitsandbytes' CPU implementation (the `default` torch backend
for 4-bit quantization, the C library for the 8-bit double quantization, torch's own float
sum for the offset), so packed bytes, statistics and dequantized values are identical; see
tests/test_nf4.py. All of it is jittable: shapes are static, nothing leaves the device.
Where bitsandbytes itself depends on the machine, this module follows the common case:
torch sums the absmax values for the double-quantization offset in 8 float32 lanes (its AVX2
kernels; AVX-512 builds use 16) and on one thread up to 32,768 blocks (more are split across
torch's threads). XLA flushes subnormal floats (below 1.2e-38) to zero on CPU, so blocks made
only of such values do not match.

`Nf4Array` is the quantized weight as an implicit array: model code multiplies by it as if it
were the dense weight, and its `dot_general` rule dequantizes inside the computation (a large
linear weight a block of output features at a time, forward and backward, so its dense copy
never exists whole). A `LoraArray` whose base `w` is an `Nf4Array` is QLoRA.

>>> import jax, jax.numpy as jnp, quax
>>> w = jax.random.normal(jax.random.key(0), (128, 32))
>>> q = quantize(w, blocksize=64, double_quant=True)
>>> q.shape, q.dtype, q.packed.shape
((128, 32), dtype('float32'), (2048,))
>>> float(jnp.abs(dequantize(q) - w).max()) < 0.5
True
>>> quax.quaxify(lambda x, k: x @ k)(jnp.ones((2, 128)), q).shape
(2, 32)
"""

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import quax
from jax import lax
from jaxtyping import ArrayLike

from lorax.errors import LoraError, UnsupportedOpError
from lorax.ragged import ragged_dot_general_p


class QuantizationError(LoraError, ValueError):
    """A quantization request that bitsandbytes' 4-bit format cannot express."""


QUANT_TYPES = ("nf4", "fp4")
# bitsandbytes' quantize_4bit accepts these.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Double quantization: bitsandbytes quantizes the absmax values in blocks of 256.
NESTED_BLOCKSIZE = 256

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1) scaled to [-1, 1], with an exact 0.
NF4_CODE = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    np.float32,
)
# get_4bit_type("fp4"), listed by bit pattern: bit 3 is the sign, bits 2-1 the exponent (bias 2),
# bit 0 the mantissa; code 0b001 is the subnormal 0.0625. Divided in fp32 by the largest, 12.
FP4_CODE = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3], np.float32) / np.float32(12)
CODEBOOKS = {"nf4": NF4_CODE, "fp4": FP4_CODE}

# The positive half of bitsandbytes' create_dynamic_map() (signed, 7 exponent bits, 8 bits): for
# each decade 10^(i-6), i = 0..6, the 2^i midpoints of torch.linspace(0.1, 1, 2^i + 1). The fp32
# values are written out because torch.linspace's vectorized rounding is part of them.
_DYNAMIC_POSITIVE = np.array(
    [5.5000004e-07,
     3.2500002e-06, 7.75e-06,
     2.1249998e-05, 4.375e-05, 6.625e-05, 8.875e-05,
     0.00015625001, 0.00026875004, 0.00038125002, 0.00049375003, 0.0006062501, 0.00071875006, 0.00083125,
     0.0009437501,
     0.0012812499, 0.00184375, 0.00240625, 0.00296875, 0.0035312497, 0.00409375, 0.0046562497, 0.0052187503,
     0.00578125, 0.00634375, 0.00690625, 0.00746875, 0.00803125, 0.00859375, 0.009156249, 0.00971875,
     0.01140625, 0.01421875, 0.01703125, 0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375,
     0.03390625, 0.036718752, 0.03953125, 0.042343747, 0.04515625, 0.04796875, 0.05078125, 0.05359375,
     0.05640625, 0.059218753, 0.06203125, 0.06484375, 0.067656256, 0.070468746, 0.07328125, 0.07609375,
     0.07890625, 0.08171876, 0.08453125, 0.08734375, 0.09015625, 0.092968754, 0.09578126, 0.09859375,
     0.107031256, 0.12109375, 0.13515624, 0.14921875, 0.16328125, 0.17734376, 0.19140625, 0.20546874,
     0.21953125, 0.23359375, 0.24765624, 0.26171875, 0.27578127, 0.28984374, 0.30390626, 0.31796873,
     0.33203125, 0.34609374, 0.36015624, 0.37421876, 0.38828123, 0.40234375, 0.41640624, 0.43046874,
     0.44453126, 0.45859373, 0.47265625, 0.4867187, 0.50078124, 0.5148437, 0.5289062, 0.54296875,
     0.5570313, 0.5710938, 0.58515626, 0.5992187, 0.61328125, 0.6273438, 0.6414063, 0.65546876,
     0.6695312, 0.68359375, 0.6976563, 0.7117188, 0.72578126, 0.7398437, 0.75390625, 0.7679688,
     0.78203124, 0.79609376, 0.8101562, 0.82421875, 0.8382813, 0.85234374, 0.86640626, 0.8804687,
     0.89453125, 0.9085938, 0.92265624, 0.93671876, 0.9507812, 0.96484375, 0.9789063, 0.99296874],
    np.float32,
)
# The full 256-entry map, sorted: the negatives, 0, the positives, 1.
DYNAMIC_CODE = np.sort(np.concatenate([-_DYNAMIC_POSITIVE, [0.0], _DYNAMIC_POSITIVE, [1.0]]).astype(np.float32))

# bitsandbytes stores max(absmax, 1e-38) for a trailing partial block (a subnormal fp32 that
# XLA's CPU backend would flush to zero if it went through arithmetic, so it is only selected).
_TINY_ABSMAX = np.float32(1e-38)


def _bounds(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """(midpoints between neighbouring codebook values in ascending order, code of each slot).

    A value goes to slot `count(midpoints < value)`, as torch.bucketize does in bitsandbytes'
    quantize_4bit. For FP4 the two zeros tie: a stable sort puts +0 (code 0) first, so 0 and
    tiny negatives get code 0 and tiny positives (up to 0.0026) get code 8, -0, like bnb.
    """
    code = CODEBOOKS[quant_type]
    order = np.argsort(code, kind="stable")
    ordered = code[order]
    return (ordered[:-1] + ordered[1:]) / np.float32(2), order.astype(np.uint8)


def _bnb_lookup_index(normed: np.ndarray) -> np.ndarray:
    """bitsandbytes' CPU 8-bit quantizer maps a normalized value to a slot of a 65536-entry table:
    trunc(fma((clamp(x, -1, 1) + 1) * 0.5, 65535, 0.5)). The product is exact in float64, so
    one float32 rounding of the float64 sum is the fused multiply-add."""
    half = (np.clip(normed, -1, 1) + np.float32(1)) * np.float32(0.5)
    return (half.astype(np.float64) * 65535 + 0.5).astype(np.float32).astype(np.int64)


def _dynamic_thresholds() -> np.ndarray:
    """For each code c = 1..255 of the dynamic map, the smallest float32 x that bitsandbytes'
    8-bit quantizer sends to code c or above.

    bnb finds the code through the lookup table above (built from the codebook's midpoints on a
    65536-point grid), not by nearest value, and its index arithmetic uses a fused multiply-add
    that XLA may or may not form. The whole map x -> code is monotone, so it is equivalent to
    counting the thresholds ≤ x; they are found here once, by bisection on the float32 order.
    """
    midpoints = np.float32(0.5) * (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:])
    grid = np.float32(-1) + np.float32(2) * np.arange(65536, dtype=np.float32) / np.float32(65535)
    table = np.searchsorted(midpoints, grid, side="left")  # bnb advances while midpoint < grid value

    def code_of(keys):
        # keys order the float32 values: key(-x) = -key(x); key(x) = bits of x for x >= 0.
        bits = np.abs(keys).astype(np.uint32).view(np.float32)
        return table[_bnb_lookup_index(np.where(keys < 0, -bits, bits))]

    low = np.full(255, -np.float32(1).view(np.int32).astype(np.int64))
    high = np.full(255, np.float32(1).view(np.int32).astype(np.int64))
    wanted = np.arange(1, 256)
    while np.any(low < high):  # smallest key with code_of(key) >= wanted
        middle = (low + high) // 2
        reached = code_of(middle) >= wanted
        high, low = np.where(reached, middle, high), np.where(reached, low, middle + 1)
    bits = np.abs(high).astype(np.uint32).view(np.float32)
    return np.where(high < 0, -bits, bits)


_DYNAMIC_THRESHOLDS = _dynamic_thresholds()


def _sequential_sum(values: jax.Array, start=None) -> jax.Array:
    """start + values[0] + values[1] + ... in exactly that order (XLA does not reassociate
    float additions). Short sums are unrolled, which compiles faster than a loop."""
    total = jnp.zeros(values.shape[1:], values.dtype) if start is None else start
    if values.shape[0] > 64:
        return lax.scan(lambda running, value: (running + value, None), total, values)[0]
    for value in values:
        total = total + value
    return total


def _grouped(values: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """(sequential sums of each complete group of `size` rows, sequential sum of the rest)."""
    full = values.shape[0] // size * size
    groups = values[:full].reshape(-1, size, *values.shape[1:])
    return _sequential_sum(jnp.moveaxis(groups, 1, 0)), _sequential_sum(values[full:])


def _cascade_sum(rows: jax.Array) -> jax.Array:
    """torch's multi_row_sum (aten/src/ATen/native/cpu/SumKernel.cpp) over axis 0: running sums of
    chunks of `step` rows, whose sums are summed in chunks of `step`, and so on for 4 levels."""
    size = rows.shape[0]
    power = max(4, (size - 1).bit_length() // 4 if size > 1 else 0)
    step = 1 << power
    level1, tail = _grouped(rows, step)
    level2, rest1 = _grouped(level1, step)
    level3, rest2 = _grouped(level2, step)
    top = _sequential_sum(level3)
    return ((tail + rest1) + rest2) + top


def _torch_mean(x: jax.Array) -> jax.Array:
    """`torch.Tensor.mean()` of a 1-D float32 array on CPU, bit for bit: torch's vectorized
    cascade sum (8 float32 lanes, as on AVX2, times 4 rows in flight), then a division by n.

    torch splits sums of more than 32,768 values across its threads, so for more blocks than
    that bitsandbytes' offset depends on torch.get_num_threads(); this is the 1-thread result.
    """
    n = x.shape[0]
    lanes = 8 if n >= 8 else 1
    vectors = x[: n // lanes * lanes].reshape(-1, lanes)
    rows = vectors.shape[0] // 4 * 4
    partial = _cascade_sum(vectors[:rows].reshape(-1, 4, lanes))
    lane_sums = _sequential_sum(jnp.concatenate([vectors[rows:], partial[1:]]), start=partial[0])
    scalars = x[n // lanes * lanes:] if lanes > 1 else jnp.zeros((0,), x.dtype)
    total = _sequential_sum(jnp.concatenate([scalars, lane_sums]))
    # A true division: XLA turns a division by a constant into a multiplication by its reciprocal.
    return total / lax.optimization_barrier(jnp.float32(n))


def _blocks(values: jax.Array, blocksize: int) -> jax.Array:
    """(ceil(n / blocksize), blocksize), the last block padded with zeros."""
    count = -(-values.shape[0] // blocksize)
    return jnp.pad(values, (0, count * blocksize - values.shape[0])).reshape(count, blocksize)


def _quantize_blockwise_8bit(values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """bitsandbytes' CPU quantize_blockwise(values, blocksize=256) with the dynamic map:
    (uint8 codes (n,), fp32 absmax per block). An all-zero block is stored as code 0, like bnb."""
    blocks = _blocks(values, NESTED_BLOCKSIZE)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    normed = blocks * (1 / jnp.where(absmax > 0, absmax, 1))[:, None]  # bnb multiplies by the reciprocal
    codes = jnp.searchsorted(jnp.asarray(_DYNAMIC_THRESHOLDS), normed, side="right", method="compare_all")
    codes = jnp.where(absmax[:, None] > 0, codes, 0).astype(jnp.uint8)
    return codes.reshape(-1)[: values.shape[0]], absmax


def _check(x_dtype, size: int, blocksize: int, quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise QuantizationError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        nearest = min(BLOCKSIZES, key=lambda b: abs(b - blocksize)) if isinstance(blocksize, int) else 64
        raise QuantizationError(
            f"blocksize must be one of {BLOCKSIZES} (bitsandbytes' 4-bit block sizes), got {blocksize!r}; "
            f"nearest: {nearest}"
        )
    if jnp.dtype(x_dtype) not in FLOAT_DTYPES:
        raise QuantizationError(
            f"4-bit quantization takes float32, bfloat16 or float16 weights, got {jnp.dtype(x_dtype).name}; "
            "cast first (x.astype(jnp.float32))"
        )
    if size == 0:
        raise QuantizationError("cannot quantize an empty array")


@functools.partial(jax.jit, static_argnames=("blocksize", "quant_type", "double_quant"))
def _quantize(x: jax.Array, blocksize: int, quant_type: str, double_quant: bool) -> "Nf4Array":
    flat = x.reshape(-1).astype(jnp.float32)
    n = flat.shape[0]
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    # bnb scales by 1/max(absmax, 1e-38); an all-zero block becomes zeros either way.
    reciprocal = 1 / jnp.where(absmax > 0, absmax, 1)
    scaled = [jnp.clip(blocks * reciprocal[:, None], -1, 1).reshape(-1)]
    if full < n:
        # bnb divides the trailing partial block (rather than multiplying by a reciprocal) and
        # stores its absmax clamped at 1e-38. The barrier keeps XLA from rewriting the division
        # by a broadcast scalar into a multiplication by its reciprocal.
        tail = flat[full:]
        tail_max = jnp.max(jnp.abs(tail))
        divisor = lax.optimization_barrier(jnp.broadcast_to(jnp.where(tail_max > 0, tail_max, 1), tail.shape))
        scaled.append(jnp.clip(tail / divisor, -1, 1))
        absmax = jnp.concatenate([absmax, jnp.where(tail_max > 0, tail_max, _TINY_ABSMAX)[None]])
    if n % 2:
        scaled.append(jnp.zeros((1,), jnp.float32))
    scaled = jnp.concatenate(scaled)
    bounds, slot_codes = _bounds(quant_type)
    slots = sum((scaled > bound).astype(jnp.uint8) for bound in bounds)  # torch.bucketize: count(bounds < x)
    codes = slots if quant_type == "nf4" else jnp.asarray(slot_codes)[slots]
    packed = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return Nf4Array(packed, absmax, quant_shape=x.shape, quant_dtype=x.dtype, blocksize=blocksize,
                        quant_type=quant_type)
    offset = _torch_mean(absmax)
    codes8, nested_absmax = _quantize_blockwise_8bit(absmax - offset)
    return Nf4Array(packed, codes8, nested_absmax, offset, quant_shape=x.shape, quant_dtype=x.dtype,
                    blocksize=blocksize, quant_type=quant_type)


def quantize(x: jax.Array, *, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = False) -> "Nf4Array":
    """Quantize `x` to 4 bits exactly as bitsandbytes.functional.quantize_4bit does on CPU.

    Args:
        x: a float32, bfloat16 or float16 array of any shape; it is quantized as one tensor in
            row-major order (bnb flattens too).
        blocksize: values per absmax: 32, 64, 128, 256, 512, 1024, 2048 or 4096.
        quant_type: "nf4" (QLoRA's NormalFloat) or "fp4".
        double_quant: also quantize the absmax values (bnb's compress_statistics=True).

    Returns:
        An `Nf4Array` with x's shape and dtype. Runs under jit.

    Example:
        >>> q = lorax.nf4.quantize(w, blocksize=64, double_quant=True)          # w: (64, 32) fp32
        >>> q.packed.shape, q.absmax.dtype, q.nested_absmax.shape
        ((1024,), dtype('uint8'), (1,))
        >>> w_hat = lorax.nf4.dequantize(q)
    """
    _check(x.dtype, math.prod(x.shape), blocksize, quant_type)
    return _quantize(x, blocksize, quant_type, double_quant)


def _rounded(x: jax.Array) -> jax.Array:
    """x, rounded to its dtype before whatever follows. XLA fuses a*b + c into one multiply-add
    (one rounding where bnb has two) and drops optimization barriers before it fuses; a select
    on the value itself is not fused through (its NaN test keeps it from being folded away)."""
    return jnp.where(x == x, x, jnp.nan)


def _block_absmax(q: "Nf4Array") -> jax.Array:
    """The fp32 absmax per block, undoing double quantization as bnb does: code * nested
    absmax, rounded, then + offset."""
    if q.nested_absmax is None:
        return q.absmax
    codes = _blocks(q.absmax.astype(jnp.int32), NESTED_BLOCKSIZE)
    scaled = _rounded(jnp.asarray(DYNAMIC_CODE)[codes] * q.nested_absmax[:, None])
    return scaled.reshape(-1)[: q.absmax.shape[0]] + q.offset


def _decode(packed: jax.Array, absmax: jax.Array, blocksize: int, quant_type: str, dtype) -> jax.Array:
    """Codebook value times block absmax in fp32, cast to dtype: (len(absmax) * blocksize,)
    values from `packed` (padded with zeros to whole blocks)."""
    blocks = absmax.shape[0]
    # A 256-entry table from a byte to its two values (high nibble first) decodes a byte per
    # lookup; the absmax scaling fuses into the same loop.
    code = CODEBOOKS[quant_type]
    pairs = jnp.asarray(np.stack([code[np.arange(256) >> 4], code[np.arange(256) & 15]], axis=1))
    packed = jnp.pad(packed, (0, blocks * blocksize // 2 - packed.shape[0]))
    return (pairs[packed].reshape(blocks, blocksize) * absmax[:, None]).reshape(-1).astype(dtype)


@functools.partial(jax.jit, static_argnames="dtype")
def _dequantize(q: "Nf4Array", dtype) -> jax.Array:
    values = _decode(q.packed, _block_absmax(q), q.blocksize, q.quant_type, dtype)
    dense = values[: math.prod(q.quant_shape)].reshape(q.quant_shape)
    return jnp.swapaxes(dense, -1, -2) if q.transposed else dense


def dequantize(q: "Nf4Array", dtype=None) -> jax.Array:
    """The dense array: codebook value times block absmax in fp32, then cast (bnb's
    dequantize_4bit, bit for bit).

    Args:
        q: an `Nf4Array` (layers stacked on leading axes are dequantized layer by layer).
        dtype: output dtype; default q.dtype (the dtype that was quantized).

    Returns:
        An array of q.shape. Runs under jit, inside whatever computation uses it.

    Example:
        >>> w_hat = lorax.nf4.dequantize(q, jnp.bfloat16)
        >>> w_hat.shape, w_hat.dtype
        ((64, 32), dtype(bfloat16))
    """
    dtype = jnp.dtype(q.dtype if dtype is None else dtype)
    decode = functools.partial(_dequantize, dtype=dtype)
    for _ in range(q.packed.ndim - 1):
        decode = jax.vmap(decode)
    return decode(q)


class Nf4Array(quax.ArrayValue):
    """A 4-bit quantized weight (NF4 or FP4, bitsandbytes' layout), used like the dense weight.

    Fields (bitsandbytes' QuantState names):
        packed: (ceil(numel/2),) uint8, two 4-bit codes per byte, the first in the high nibble
            (bnb's Params4bit data, flattened).
        absmax: (blocks,) fp32 block maxima; with double quantization, their uint8 codes.
        nested_absmax: double quantization only: (ceil(blocks/256),) fp32, bnb's state2.absmax.
        offset: double quantization only: () fp32 mean of the absmax values, subtracted before
            their 8-bit quantization.
        quant_shape, quant_dtype: shape and dtype of the quantized tensor (QuantState.shape /
            .dtype); dequantization returns this dtype.
        blocksize, quant_type: as in `quantize`.
        transposed: present the tensor with its last two axes swapped. `lorax.lora` quantizes a
            (in, out) kernel as torch's (out, in) Linear weight, as bitsandbytes would, and keeps
            it transposed, so the stored bytes are a bnb checkpoint's.

    Leading axes on every array field stack independently quantized tensors (layers run by
    `lax.scan`), which slicing, `jax.vmap` and `lax.scan` handle like any pytree.

    The rules: `dot_general` (x @ w, w @ x, any dimension numbers) dequantizes inside the
    computation and multiplies; `convert_element_type` changes the dequantization dtype;
    `transpose` of the last two axes flips `transposed`; `copy`. Other operations raise
    `UnsupportedOpError`. Gradients never reach the quantized fields.

    Example:
        >>> q = lorax.nf4.quantize(w)                                  # w: (in, out) = (64, 32)
        >>> quax.quaxify(lambda x, w: x @ w)(jnp.ones((2, 64)), q).shape   # x @ dequantize(q)
        (2, 32)
    """

    packed: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None = None
    offset: jax.Array | None = None
    quant_shape: tuple[int, ...] = eqx.field(static=True, default=())
    quant_dtype: Any = eqx.field(static=True, converter=jnp.dtype, default=jnp.float32)
    blocksize: int = eqx.field(static=True, default=64)
    quant_type: str = eqx.field(static=True, default="nf4")
    transposed: bool = eqx.field(static=True, default=False)

    def aval(self) -> jax.core.ShapedArray:
        shape = tuple(self.quant_shape)
        if self.transposed:
            shape = (*shape[:-2], shape[-1], shape[-2])
        return jax.core.ShapedArray((*self.packed.shape[:-1], *shape), self.quant_dtype)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def T(self) -> "Nf4Array":
        """The 2-D transpose, still quantized."""
        if self.ndim != 2:
            raise UnsupportedOpError(
                f"NF4 weight {self.shape}: .T is for 2-D weights; swap the last two axes with jnp.swapaxes"
            )
        return dataclasses.replace(self, transposed=not self.transposed)

    def astype(self, dtype) -> "Nf4Array":
        """The same quantized weight, dequantizing to `dtype`."""
        return dataclasses.replace(self, quant_dtype=dtype)

    def stored_bytes(self) -> int:
        """Bytes held: packed codes plus statistics."""
        fields = (self.packed, self.absmax, self.nested_absmax, self.offset)
        return sum(int(a.size) * a.dtype.itemsize for a in fields if a is not None)

    def materialise(self) -> jax.Array:
        return lax.stop_gradient(dequantize(self))

    @staticmethod
    def default(primitive, values: Sequence[Any], params: dict[str, Any]):
        weight = next(v for v in values if isinstance(v, Nf4Array))
        raise UnsupportedOpError(
            f"NF4-quantized weight {weight.shape} {weight.dtype.name} met `{primitive.name}`, which has no rule "
            "(rules: dot_general, convert_element_type, transpose, copy). Use lorax.nf4.dequantize(q) for the "
            "dense array."
        )


def _frozen_product(x: jax.Array, weight: "Nf4Array", product, *extra) -> jax.Array:
    """`product(x, dequantize(weight), *extra)` for a frozen 4-bit weight, with a backward pass that
    dequantizes the weight again rather than keeping the dense copy from the forward pass.

    The dense weight is 8 times the 4-bit bytes in fp32; kept as a residual it would live from
    the forward pass to the backward pass, for every quantized matrix of the model. Here the
    residual is the quantized weight itself (held anyway), and the backward pass computes the
    cotangent of x only: the weight is frozen. x is not kept either. `extra`: further arrays
    without a gradient (ragged_dot's group sizes), passed as arguments (custom_vjp must not close
    over traced values).
    """
    x_shape = jax.ShapeDtypeStruct(x.shape, x.dtype)

    @jax.custom_vjp
    def frozen_product(x, weight, *extra):
        return product(x, weight.materialise(), *extra)

    def forward(x, weight, *extra):
        return product(x, weight.materialise(), *extra), (weight, extra)

    def backward(residuals, cotangent):
        weight, extra = residuals
        dense = weight.materialise()
        (x_cotangent,) = jax.linear_transpose(lambda x: product(x, dense, *extra), x_shape)(cotangent)
        return (x_cotangent, None, *[None] * len(extra))  # None: no cotangent for the frozen weight

    frozen_product.defvjp(forward, backward)
    return frozen_product(x, weight, *extra)


# A weight whose dense form has more elements than this is multiplied a block of output features
# at a time (`_blocked_product`), so its dense copy never exists whole.
DENSE_BLOCK_ELEMENTS = 1 << 18


def _output_blocks(weight: "Nf4Array") -> int:
    """How many blocks of output features `_blocked_product` cuts `weight` into: 1 (no blocking)
    unless it is a large 2-D (in, out) weight stored as torch's (out, in) (`transposed`, as
    `lorax.lora` and bitsandbytes store linear weights), whose output features are consecutive in
    storage; each block is then whole quantization blocks."""
    if weight.packed.ndim != 1 or not weight.transposed or len(weight.quant_shape) != 2:
        return 1
    out_features, in_features = weight.quant_shape
    count = 1
    while out_features * in_features // count > DENSE_BLOCK_ELEMENTS:
        count *= 2
        if out_features % count or (out_features // count * in_features) % weight.blocksize:
            return count // 2
    return count


def _blocked_product(x: jax.Array, weight: "Nf4Array", count: int, params: dict) -> jax.Array:
    """`x @ dequantize(weight)` for a 2-D weight cut into `count` blocks of output features, each
    dequantized just before its matmul (forward) and again in the backward pass, so at most one
    block of the dense weight is alive at a time. Each output feature is one dot product over all
    inputs either way; only the matmul kernel's summation order may differ (float rounding)."""
    out_features, in_features = weight.quant_shape
    rows = out_features // count
    contract_x = (((x.ndim - 1,), (1,)), ((), ()))  # x (..., in) with a dense block (rows, in)

    def dense_block(weight, absmax, k):
        values = rows * in_features
        packed = lax.dynamic_slice_in_dim(weight.packed, k * (values // 2), values // 2)
        scales = lax.dynamic_slice_in_dim(absmax, k * (values // weight.blocksize), values // weight.blocksize)
        return _decode(packed, scales, weight.blocksize, weight.quant_type, weight.dtype).reshape(rows, in_features)

    def forward(x, weight):
        absmax = _block_absmax(weight)

        def block(k, y):
            part = lax.dot_general(x, dense_block(weight, absmax, k), contract_x, **params)
            return lax.dynamic_update_slice_in_dim(y, part.astype(y.dtype), k * rows, axis=-1)

        shape = jax.eval_shape(lambda x: lax.dot_general(x, jnp.zeros((out_features, in_features), weight.dtype),
                                                         contract_x, **params), x)
        return lax.fori_loop(0, count, block, jnp.zeros(shape.shape, shape.dtype)), weight

    def backward(weight, cotangent):
        absmax = _block_absmax(weight)
        blocks = jnp.moveaxis(cotangent.reshape(*cotangent.shape[:-1], count, rows), -2, 0)

        def block(x_cotangent, k_and_cotangent):
            k, part = k_and_cotangent
            dense = dense_block(weight, absmax, k)
            contract = (((part.ndim - 1,), (0,)), ((), ()))
            return x_cotangent + lax.dot_general(part, dense.astype(part.dtype), contract,
                                                 preferred_element_type=jnp.float32), None

        start = jnp.zeros(x.shape, jnp.float32)
        x_cotangent, _ = lax.scan(block, start, (jnp.arange(count), blocks))
        return x_cotangent.astype(x.dtype), None

    @jax.custom_vjp
    def product(x, weight):
        return forward(x, weight)[0]

    product.defvjp(forward, backward)
    return product(x, weight)


@quax.register(lax.dot_general_p)
def _dot_general_rhs(x: ArrayLike, weight: Nf4Array, *, dimension_numbers, **params):
    """x·W: W dequantized in its dtype inside the same (jitted) computation, then an ordinary
    dot_general; no gradient reaches W, and the backward pass dequantizes W again. A large
    linear weight (x @ W) is dequantized a block of output features at a time."""
    count = _output_blocks(weight)
    plain_matmul = tuple(map(tuple, dimension_numbers[0])) == ((jnp.ndim(x) - 1,), (0,)) \
        and not any(dimension_numbers[1])
    if count > 1 and plain_matmul:
        return _blocked_product(jnp.asarray(x), weight, count, params)
    return _frozen_product(x, weight, lambda x, w: lax.dot_general(x, w, dimension_numbers, **params))


@quax.register(lax.dot_general_p)
def _dot_general_lhs(weight: Nf4Array, x: ArrayLike, *, dimension_numbers, **params):
    """W·x, the mirror image."""
    return _frozen_product(x, weight, lambda x, w: lax.dot_general(w, x, dimension_numbers, **params))


@quax.register(ragged_dot_general_p)
def _ragged_dot(x: ArrayLike, weight: Nf4Array, group_sizes: ArrayLike, **params):
    """Rows grouped by expert times each expert's W (a mixture-of-experts layer's experts, stored
    (experts, in, out)): W dequantized inside the computation, no gradient to it."""
    return _frozen_product(x, weight, lambda x, w, sizes: ragged_dot_general_p.bind(x, w, sizes, **params),
                           jnp.asarray(group_sizes))


@quax.register(lax.convert_element_type_p)
def _convert(weight: Nf4Array, *, new_dtype, **params):
    return weight.astype(new_dtype)


@quax.register(lax.transpose_p)
def _transpose(weight: Nf4Array, *, permutation):
    keep = tuple(range(weight.ndim))
    swap_last = (*keep[:-2], keep[-1], keep[-2])
    if tuple(permutation) == keep:
        return weight
    if weight.ndim >= 2 and tuple(permutation) == swap_last:
        return dataclasses.replace(weight, transposed=not weight.transposed)
    raise UnsupportedOpError(f"NF4 weight {weight.shape}: transpose with permutation={permutation} (only the last "
                             "two axes can be swapped)")


@quax.register(lax.copy_p)
def _copy(weight: Nf4Array):
    return weight


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How `lorax.lora(..., quantize=...)` stores the frozen base: transformers'
    BitsAndBytesConfig(load_in_4bit=True, ...) in lorax's words.

    Example:
        >>> qlora = lorax.lora(base, config, key=key, quantize=QuantConfig("nf4", double_quant=True))
        >>> qlora = lorax.lora(base, config, key=key, quantize="nf4")   # the defaults below
        >>> type(qlora["model"]["layers"]["*"]["self_attn"]["q_proj"]["kernel"].w).__name__
        'Nf4Array'
    """

    # "nf4" or "fp4" (bnb_4bit_quant_type).
    quant_type: str = "nf4"
    # Values per absmax (bitsandbytes' 4-bit layers use 64).
    blocksize: int = 64
    # Quantize the absmax values too (bnb_4bit_use_double_quant): 0.127 instead of 0.5 bits per parameter.
    double_quant: bool = False

    def __post_init__(self):
        _check(jnp.float32, 1, self.blocksize, self.quant_type)

    def quantize_kernel(self, kernel: jax.Array) -> Nf4Array:
        """Quantize a (..., in, out) kernel as torch's (out, in) Linear weight, one matrix per
        leading index, and present it as (..., in, out) again (`transposed=True`).

        Example:
            >>> q = QuantConfig(double_quant=True).quantize_kernel(w)     # w: (in, out) = (64, 32)
            >>> q.shape, q.quant_shape, q.transposed
            ((64, 32), (32, 64), True)
        """
        _check(kernel.dtype, kernel.size, self.blocksize, self.quant_type)
        one = functools.partial(_quantize, blocksize=self.blocksize, quant_type=self.quant_type,
                                double_quant=self.double_quant)
        for _ in range(kernel.ndim - 2):
            one = jax.vmap(one)
        return dataclasses.replace(one(jnp.swapaxes(kernel, -1, -2)), transposed=True)


def quantize_like(x: jax.Array, like: Nf4Array) -> Nf4Array:
    """Quantize `x` (shaped and laid out like `like`) with `like`'s type, blocksize, double
    quantization, orientation and stacking.

    Example:
        >>> w2 = quantize_like(dequantize(q) + 0.01, q)
        >>> (w2.shape, w2.blocksize, w2.double_quant) == (q.shape, q.blocksize, q.double_quant)
        True
    """
    config = QuantConfig(like.quant_type, like.blocksize, like.double_quant)
    if like.transposed:
        return config.quantize_kernel(x.astype(like.dtype))
    one = functools.partial(_quantize, blocksize=like.blocksize, quant_type=like.quant_type,
                            double_quant=like.double_quant)
    for _ in range(like.packed.ndim - 1):
        one = jax.vmap(one)
    return one(x.astype(like.dtype))
