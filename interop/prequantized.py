"""Pre-quantized checkpoints in: a folder that transformers saved from a model loaded with
`BitsAndBytesConfig(load_in_4bit=True, ...)` becomes `Nf4Array` kernels, without dequantizing.

transformers stores each 4-bit Linear weight `W` as the tensors
    W                                      packed codes, uint8 (numel/2, 1) (bitsandbytes' Params4bit)
    W.absmax                               fp32 per block, or uint8 codes with double quantization
    W.quant_map                            the 16-value NF4/FP4 codebook
    W.nested_absmax, W.nested_quant_map    double quantization only: state2's absmax and dynamic map
    W.quant_state.bitsandbytes__nf4|fp4    JSON as uint8: quant_type, blocksize, dtype, shape,
                                           nested_blocksize, nested_offset
which is everything an `Nf4Array` holds, so they are read with numpy and moved as they are (no
torch, no bitsandbytes). The layers of a stacked kernel (`model.layers.*....kernel`) become one
Nf4Array whose array fields have a leading layer axis. Modules that transformers left
unquantized (embeddings, lm_head, llm_int8_skip_modules) load as before.

Usage (tests/test_bnb_checkpoint.py makes such a folder with transformers and bitsandbytes)::

    model = interop.from_pretrained("path/to/llama-bnb-4bit")
    graphdef, params = lorax.split(model)      # q_proj kernels are Nf4Array
"""

import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from interop.checkpoint import CheckpointError, leaf_at
from lorax.nf4 import BLOCKSIZES, CODEBOOKS, DYNAMIC_CODE, FLOAT_DTYPES, NESTED_BLOCKSIZE, Nf4Array

_QUANT_STATE = re.compile(r"(?P<weight>.+)\.quant_state\.bitsandbytes__(?P<type>nf4|fp4)")
_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def check_quantization(hf_config: dict) -> bool:
    """Whether config.json declares bitsandbytes 4-bit quantization (False: no quantization_config).

    Raises:
        CheckpointError: any other quantization (8-bit bitsandbytes, GPTQ, AWQ, ...), named.
    """
    quantization = hf_config.get("quantization_config")
    if not quantization:
        return False
    if not isinstance(quantization, dict):
        raise CheckpointError(f"config.json's quantization_config is a {type(quantization).__name__}, not an object of "
                              "fields (as BitsAndBytesConfig.to_dict() writes it)")
    method = quantization.get("quant_method", "bitsandbytes")
    four_bit = quantization.get("load_in_4bit", quantization.get("_load_in_4bit", False))
    eight_bit = quantization.get("load_in_8bit", quantization.get("_load_in_8bit", False))
    if method == "bitsandbytes" and four_bit and not eight_bit:
        return True
    described = "bitsandbytes load_in_8bit (LLM.int8)" if method == "bitsandbytes" and eight_bit else repr(method)
    raise CheckpointError(
        f"config.json's quantization_config is {described}, which lorax does not read; it reads bitsandbytes 4-bit "
        "checkpoints (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4' or 'fp4')) or unquantized ones"
    )


class QuantizedWeights:
    """Collects the tensors of every 4-bit weight of a checkpoint as they stream past, then
    builds one `Nf4Array` per parameter leaf.

    Args:
        names: every tensor name in the checkpoint (read from the headers).
    """

    def __init__(self, names: Iterable[str]):
        names = list(names)
        self._part_of: dict[str, tuple[str, str]] = {}
        for name in names:
            match = _QUANT_STATE.fullmatch(name)
            if match:
                weight = match["weight"]
                self._part_of[weight] = (weight, "packed")
                self._part_of[name] = (weight, "quant_state")
                for part in _PARTS:
                    self._part_of[f"{weight}.{part}"] = (weight, part)
        self._tensors: dict[str, dict[str, np.ndarray]] = defaultdict(dict)

    @property
    def names(self) -> set[str]:
        """The quantized weights' checkpoint names (`model.layers.0.self_attn.q_proj.weight`)."""
        return {weight for weight, part in self._part_of.values() if part == "packed"}

    def take(self, name: str, tensor: np.ndarray) -> bool:
        """Keep `tensor` if it is part of a quantized weight (True), else leave it (False)."""
        found = self._part_of.get(name)
        if found is None:
            return False
        weight, part = found
        self._tensors[weight][part] = np.array(tensor)  # a copy: the checkpoint is memory-mapped
        return True

    def place(self, arrays: dict, slots: dict, normalize: Callable[[str], str]) -> tuple[set[str], list[str]]:
        """Put an `Nf4Array` into `arrays` (our parameter tree of numpy arrays) for every leaf
        whose checkpoint weights are quantized, in the leaf's dtype (the param_dtype).

        Returns:
            (slot names filled, quantized checkpoint weights that fit no parameter).
        """
        filled, unexpected = set(), []
        by_leaf: dict[tuple, dict[int | None, Nf4Array]] = defaultdict(dict)
        for weight, tensors in self._tensors.items():
            key = normalize(weight)
            slot = slots.get(key)
            if slot is None:
                unexpected.append(weight)
                continue
            if slot.leaf[-1] != "kernel":
                raise CheckpointError(f"{weight!r} is 4-bit quantized, but lorax holds it as {slot.leaf[-1]!r}, which "
                                      "is not a linear kernel")
            # bitsandbytes quantizes torch's (out, in) Linear weight; our kernel is (in, out). GPT-2's
            # Conv1D is already (in, out) in torch, and transformers quantizes it as a Linear4bit too.
            out_in = slot.shape if slot.transpose else slot.shape[::-1]
            target = leaf_at(arrays, slot.leaf)
            by_leaf[slot.leaf][slot.layer] = _nf4_layer(weight, tensors, out_in, target.dtype)
            filled.add(key)
        for leaf, layers in by_leaf.items():
            target = leaf_at(arrays, leaf)
            path = ".".join(map(str, leaf))
            if None in layers:
                value = layers[None]
            else:
                absent = sorted(set(range(target.shape[0])) - set(layers))
                if absent:
                    raise CheckpointError(
                        f"{path}: layers {absent} are not 4-bit quantized but the others are; lorax stores stacked "
                        "layers as one quantized array (skip all of them with llm_int8_skip_modules, or none)"
                    )
                value = _stack([layers[i] for i in range(target.shape[0])], path)
            _set_leaf(arrays, leaf, value)
        return filled, unexpected


def _nf4_layer(weight: str, tensors: dict[str, np.ndarray], expected: tuple[int, ...], dtype) -> Nf4Array:
    """One quantized weight's tensors as an (unstacked, numpy-backed) Nf4Array presenting the
    (out, in) `expected` weight as an (in, out) kernel (`transposed=True`), checked."""
    missing = [f"{weight}.{part}" if part != "packed" else weight
               for part in ("packed", "quant_state", "absmax", "quant_map") if part not in tensors]
    if missing:
        raise CheckpointError(f"quantized weight {weight!r} lacks the tensors {missing}")
    try:
        state = json.loads(tensors["quant_state"].tobytes().decode())
        quant_type, blocksize, shape = state["quant_type"], int(state["blocksize"]), tuple(state["shape"])
        stored_dtype = jnp.dtype(state["dtype"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{weight}: unreadable bitsandbytes quant_state ({error!r})") from None
    if quant_type not in CODEBOOKS or blocksize not in BLOCKSIZES or stored_dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{weight}: quant_type {quant_type!r}, blocksize {blocksize}, dtype {stored_dtype} is not "
                              f"a bitsandbytes 4-bit format lorax reads ({tuple(CODEBOOKS)}, {BLOCKSIZES})")
    if shape != expected:
        raise CheckpointError(f"quantized weight {weight!r} has shape {shape}, the model expects {expected} "
                              "(config.json and the weights disagree)")
    if not np.array_equal(tensors["quant_map"].astype(np.float32), CODEBOOKS[quant_type]):
        raise CheckpointError(f"{weight}.quant_map is not bitsandbytes' {quant_type} codebook")
    packed = tensors["packed"].view(np.uint8).reshape(-1)
    size = int(np.prod(shape))
    if packed.size != -(-size // 2):
        raise CheckpointError(f"{weight}: {packed.size} packed bytes cannot hold a 4-bit tensor of shape {shape}")
    blocks = -(-size // blocksize)
    absmax = tensors["absmax"].reshape(-1)
    if absmax.size != blocks:
        raise CheckpointError(f"{weight}.absmax has {absmax.size} values for {blocks} blocks")
    nested_absmax = offset = None
    if "nested_absmax" in tensors:
        if (int(state.get("nested_blocksize", 0)) != NESTED_BLOCKSIZE or "nested_quant_map" not in tensors
                or not np.array_equal(tensors["nested_quant_map"].astype(np.float32), DYNAMIC_CODE)
                or absmax.dtype != np.uint8 or "nested_offset" not in state):
            raise CheckpointError(f"{weight}: double quantization other than bitsandbytes' (dynamic map, blocks of "
                                  "256, uint8 codes) is not supported")
        nested_absmax = tensors["nested_absmax"].astype(np.float32).reshape(-1)
        if isinstance(state["nested_offset"], bool) or not isinstance(state["nested_offset"], (int, float)):
            raise CheckpointError(f"{weight}: quant_state's nested_offset must be a number, got "
                                  f"{state['nested_offset']!r}")
        offset = np.float32(state["nested_offset"])
    elif absmax.dtype != np.float32:
        raise CheckpointError(f"{weight}.absmax is {absmax.dtype} without double quantization; expected float32")
    return Nf4Array(packed, absmax, nested_absmax, offset, quant_shape=shape, quant_dtype=jnp.dtype(dtype),
                    blocksize=blocksize, quant_type=quant_type, transposed=True)


def _stack(layers: list[Nf4Array], path: str) -> Nf4Array:
    """One Nf4Array whose array fields stack the layers' along a new leading axis."""
    try:
        return jax.tree_util.tree_map(lambda *fields: np.stack(fields), *layers)
    except ValueError:  # a different treedef: static fields (type, blocksize, double quant) differ
        kinds = sorted({(q.quant_type, q.blocksize, q.double_quant) for q in layers})
        raise CheckpointError(f"{path}: the layers are quantized differently ((quant_type, blocksize, double_quant): "
                              f"{kinds}); lorax stacks them into one array, which needs one format") from None


def _set_leaf(tree: dict, keys: tuple, value: Any) -> None:
    for key in keys[:-1]:
        tree = tree[key]
    tree[keys[-1]] = value
