"""bitsandbytes' 4-bit tensors to and from `lorax.nf4.Nf4Array`, without requantizing.

An Nf4Array holds exactly what bitsandbytes holds for a 4-bit weight, so the conversion only
moves arrays: `to_bnb(q)` returns the packed uint8 tensor and the `QuantState` that
`bitsandbytes.functional.quantize_4bit` would return for the same weight, and `from_bnb` takes
them (or a `Params4bit`) back.

>>> import bitsandbytes
>>> packed, state = interop.bnb.to_bnb(lorax.nf4.quantize(w, double_quant=True))
>>> w_bnb = bitsandbytes.functional.dequantize_4bit(packed, state)
>>> bool((w_bnb.numpy() == np.asarray(lorax.nf4.dequantize(q))).all())     # q: the same quantization
True
>>> q_again = interop.bnb.from_bnb(packed, state)           # or from_bnb(linear4bit.weight), a Params4bit
"""

import math

import jax.numpy as jnp
import numpy as np

from lorax.nf4 import BLOCKSIZES, CODEBOOKS, DYNAMIC_CODE, NESTED_BLOCKSIZE, QUANT_TYPES, Nf4Array, QuantizationError

_DTYPES = ("float32", "bfloat16", "float16")


def _torch_array(array):
    import torch

    return torch.from_numpy(np.array(array))  # a copy: torch must not alias a read-only JAX buffer


def to_bnb(q: Nf4Array):
    """The bitsandbytes form of `q`: (packed, quant_state).

    Args:
        q: an unstacked `Nf4Array`. A kernel quantized by `lorax.lora` is stored as torch's
            (out, in) Linear weight and shown transposed; bitsandbytes gets the stored tensor,
            i.e. the Linear weight (QuantState.shape is `q.quant_shape`).

    Returns:
        packed: a CPU torch uint8 tensor (ceil(numel/2), 1), bnb's Params4bit layout.
        quant_state: a `bitsandbytes.functional.QuantState` with absmax, blocksize, quant_type,
            dtype and shape, and for double quantization the offset and nested state.

    Example:
        >>> import bitsandbytes
        >>> packed, state = interop.bnb.to_bnb(q)
        >>> bitsandbytes.functional.dequantize_4bit(packed, state).shape   # == lorax.nf4.dequantize(q)
        torch.Size([64, 32])
    """
    import torch
    from bitsandbytes.functional import QuantState, get_4bit_type

    if q.packed.ndim != 1:
        raise QuantizationError(
            f"to_bnb takes one quantized tensor; this one stacks {q.packed.shape[:-1]} of them. Convert each, e.g. "
            "jax.tree_util.tree_map(lambda a: a[i], q)"
        )
    nested = None
    offset = None
    if q.double_quant:
        nested = QuantState(absmax=_torch_array(q.nested_absmax), code=_torch_array(DYNAMIC_CODE),
                            blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        offset = torch.tensor(float(q.offset), dtype=torch.float32)
    state = QuantState(
        absmax=_torch_array(q.absmax), shape=torch.Size(q.quant_shape), code=get_4bit_type(q.quant_type, device="cpu"),
        blocksize=q.blocksize, quant_type=q.quant_type, dtype=getattr(torch, q.quant_dtype.name), offset=offset,
        state2=nested,
    )
    return _torch_array(q.packed).reshape(-1, 1), state


def from_bnb(packed, quant_state=None, *, transposed: bool = False) -> Nf4Array:
    """An `Nf4Array` holding bitsandbytes' 4-bit tensor as it is (no requantization).

    Args:
        packed: the packed tensor (any shape; uint8 or another quant_storage dtype, read as
            bytes), or a `bitsandbytes.nn.Params4bit`, whose own quant_state is used.
        quant_state: its `QuantState`; None when `packed` is a Params4bit.
        transposed: present the tensor with its last two axes swapped: pass True for a torch
            Linear weight (out, in) that is to serve as a lorax kernel (in, out).

    Returns:
        The `Nf4Array`; `lorax.nf4.dequantize` of it equals bnb's `dequantize_4bit`. A weight that
        bitsandbytes repacked for its AVX512-BF16 CPU kernel (`quant_state.packing_format_for_cpu`,
        after an eval-mode forward pass on such a CPU) is read back into bitsandbytes' usual
        layout, with the bfloat16 absmax that the layer now computes with.

    Example:
        >>> interop.bnb.from_bnb(*interop.bnb.to_bnb(q)).packed.shape == q.packed.shape   # the same q
        True
        >>> interop.bnb.from_bnb(*interop.bnb.to_bnb(q), transposed=True).shape   # a Linear weight as a kernel
        (32, 64)
    """
    import torch

    if quant_state is None:
        quant_state = getattr(packed, "quant_state", None)
        if quant_state is None:
            raise QuantizationError("from_bnb needs a quant_state (or a Params4bit that carries one)")
    state = quant_state
    if state.quant_type not in QUANT_TYPES:
        raise QuantizationError(f"quant_type {state.quant_type!r} is not supported; lorax reads {QUANT_TYPES}")
    if state.blocksize not in BLOCKSIZES:
        raise QuantizationError(f"blocksize {state.blocksize} is not one of bitsandbytes' {BLOCKSIZES}")
    dtype = str(getattr(state, "original_dtype", state.dtype)).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise QuantizationError(f"QuantState.dtype {state.dtype} is not supported; lorax reads {_DTYPES}")
    if state.code is not None and not np.array_equal(state.code.float().cpu().numpy(), CODEBOOKS[state.quant_type]):
        raise QuantizationError(f"QuantState.code is not bitsandbytes' {state.quant_type} codebook")
    shape = tuple(state.shape)
    data = packed.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy()
    if data.size != -(-math.prod(shape) // 2):
        raise QuantizationError(f"{data.size} packed bytes cannot hold a 4-bit tensor of shape {shape} "
                                f"({-(-math.prod(shape) // 2)} bytes)")
    nested_absmax = offset = None
    if getattr(state, "packing_format_for_cpu", False):
        data, absmax = _unpack_cpu_format(data, state)
    else:
        absmax = state.absmax.detach().cpu().numpy()
    if state.nested:  # never after CPU packing: bitsandbytes dequantizes the absmax then
        nested_code = state.state2.code.cpu().numpy()
        if state.state2.blocksize != NESTED_BLOCKSIZE or not np.array_equal(nested_code, DYNAMIC_CODE):
            raise QuantizationError("double quantization other than bitsandbytes' (dynamic map, blocks of 256) is not "
                                    "supported")
        nested_absmax = jnp.asarray(state.state2.absmax.detach().cpu().numpy())
        offset = jnp.asarray(np.float32(state.offset.item() if hasattr(state.offset, "item") else state.offset))
    return Nf4Array(jnp.asarray(data), jnp.asarray(absmax), nested_absmax, offset, quant_shape=shape,
                    quant_dtype=jnp.dtype(dtype), blocksize=state.blocksize, quant_type=state.quant_type,
                    transposed=transposed)


def _unpack_cpu_format(data, state):
    """bitsandbytes' own layout back from the one its AVX512-BF16 CPU kernel repacks a weight into.

    On such a CPU, a `Linear4bit` in eval mode rewrites its weight at the first forward pass
    without grad (`bitsandbytes.functional._convert_weight_packed_for_cpu`): the 4-bit codes are
    reordered in tiles of 32 output rows, and the absmax (first dequantized, when they were double
    quantized) are stored as a transposed bfloat16 matrix. The reordering is undone here exactly;
    the absmax stay what the layer now computes with (their bfloat16 values, single quantized).
    """
    tile = 32  # bitsandbytes' block_n
    if len(state.shape) != 2 or state.shape[0] % tile or state.shape[1] % 2:
        raise QuantizationError(f"a weight in bitsandbytes' CPU packing format has shape (N, K) with N a multiple "
                                f"of {tile} and K even; this one's QuantState.shape is {tuple(state.shape)}")
    rows, columns = state.shape
    nibbles = data.reshape(-1, tile)
    codes = np.concatenate([nibbles & 0xF, nibbles >> 4], axis=-1)  # each row: 32 low nibbles, then 32 high
    codes = codes.reshape(rows // tile, columns // 2, tile, 2).transpose(0, 2, 1, 3).reshape(-1)
    data = (codes[0::2] << 4 | codes[1::2]).astype(np.uint8)  # element 2i in the high nibble, as quantize_4bit
    absmax = state.absmax.detach().cpu().float().T.contiguous().reshape(-1).numpy()
    return data, absmax
