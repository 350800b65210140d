"""Building blocks shared by the models: linear layers, norms, masks, attention, and stacked
layers that run under `nnx.scan`.

Stacked layers live under the key `*` (`STACK`): `model.layers.*.self_attn.q_proj.kernel` has a
leading layer axis, and `lorax` reads the `*` as "one module per index"
(`model.layers.0.self_attn.q_proj`, ...), the names peft and transformers use.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

import lorax.remat  # noqa: F401  (the rule that lets nnx.remat run on LoRA and NF4 weights)
from lorax.arrays import tied_weight
from lorax.targets import STACK


# transformers' activation names (ACT2FN) -> the same function. "gelu" is the exact (erf) GELU;
# "gelu_new" and "gelu_pytorch_tanh" are its tanh approximation (GPT-2).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation transformers calls `name` (config.json's hidden_act / activation_function).

    >>> activation("gelu_new")(jnp.zeros(2))
    Array([0., 0.], dtype=float32)
    """
    if name not in ACTIVATIONS:
        raise NotImplementedError(f"activation {name!r} is not supported yet (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def linear(d_in: int, d_out: int, bias: bool, config, rngs: nnx.Rngs) -> nnx.Linear:
    """An nnx.Linear with kernel (in, out) in the config's param dtype, computing in its dtype."""
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)


def stacked(make_layer: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Dict:
    """`count` layers with their parameters stacked on a leading axis, under the key `*`."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return make_layer(rngs)

    return nnx.Dict({STACK: make(rngs)})


def run_stacked(stack: nnx.Module, h: jax.Array, *args, remat: bool, in_axes: tuple, out_axes=nnx.Carry):
    """`h` through every layer of `stack` (layers stacked on a leading axis), with `nnx.scan`:
    `layer(h, *args)` per layer; `in_axes` says which of `args` are per layer (0) or shared (None).
    With `remat`, the layer is checkpointed inside the scan, so the backward pass keeps each
    layer's input and recomputes that layer alone (a checkpoint around the whole scan would
    recompute every layer's activations at once)."""

    def layer_step(h, layer, *args):
        return layer(h, *args)

    if remat:
        layer_step = nnx.remat(layer_step, prevent_cse=False)
    return nnx.scan(layer_step, in_axes=(nnx.Carry, 0, *in_axes), out_axes=out_axes)(h, stack, *args)


def lm_logits(h: jax.Array, embed: nnx.Embed, lm_head: nnx.Linear | None) -> jax.Array:
    """A causal LM's output head, (..., hidden) -> (..., vocab): `lm_head(h)`, or, for a model
    whose head is tied to its input embeddings (no `lm_head`), `h @ embeddingᵀ`, with the table
    that peft's tied head would use when the embeddings are adapted (`lorax.arrays.tied_weight`)."""
    if lm_head is None:
        return h @ tied_weight(embed.embedding.get_value()).T.astype(h.dtype)
    return lm_head(h)


def check_positions(length: int, limit: int, field: str) -> None:
    """A learned position table has `limit` rows: `length` positions past it would be gathered out
    of range (JAX clamps or fills NaN there, silently; transformers raises IndexError). Shapes are
    static, so this runs while tracing and costs nothing in the jitted code."""
    if length > limit:
        raise ValueError(f"{length} positions do not fit the model's position embeddings ({field}={limit}); "
                         f"use at most {limit} tokens")


def empty_cache(layers: int, batch: int, max_length: int, kv_heads: int, head_dim: int, dtype) -> tuple:
    """An empty KV cache: (keys, values), each (layers, batch, max_length, kv_heads, head_dim)."""
    shape = (layers, batch, max_length, kv_heads, head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) · weight, computed in fp32 as transformers does (parameter named `weight`).

    With `unit_offset` (Gemma), the weight is stored as an offset from one: x / rms(x) · (1 + weight),
    multiplied in fp32 before the cast back (Llama casts first, then multiplies: transformers'
    two orders differ in bf16, so both are kept).
    """

    def __init__(self, size: int, eps: float, config, unit_offset: bool = False):
        self.weight = nnx.Param(jnp.full((size,), 0.0 if unit_offset else 1.0, config.param_dtype))
        self.eps = eps
        self.unit_offset = unit_offset

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight.get_value().astype(jnp.float32))).astype(x.dtype)
        return self.weight.get_value() * normed.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with transformers' parameter names (`weight`, `bias`), statistics in fp32."""

    def __init__(self, size: int, eps: float, config):
        self.weight = nnx.Param(jnp.ones((size,), config.param_dtype))
        self.bias = nnx.Param(jnp.zeros((size,), config.param_dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        normed = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return normed * self.weight.get_value().astype(x.dtype) + self.bias.get_value().astype(x.dtype)


def causal_mask(seq: int, attention_mask: jax.Array | None, window: int | None = None) -> jax.Array:
    """(batch or 1, 1, seq, seq) booleans: query i sees key j <= i, and only unpadded keys; with a
    sliding `window`, only the last `window` keys (i - window < j), as transformers masks them."""
    return cached_mask(seq, seq, 0, attention_mask, window)  # a whole sequence is a cache written at 0


def cached_mask(seq: int, max_length: int, cache_index, attention_mask: jax.Array | None,
                window: int | None = None) -> jax.Array:
    """(batch or 1, 1, seq, max_length) booleans for tokens written at cache_index: query i sees
    cached key j when j <= cache_index + i (and j > cache_index + i - window with a sliding
    window), and only unpadded keys (attention_mask is (b, max_length))."""
    query, key = cache_index + jnp.arange(seq)[:, None], jnp.arange(max_length)[None, :]
    mask = (key <= query)[None, None]
    if window is not None:
        mask = mask & (key > query - window)[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask.astype(bool)[:, None, None, :]
    return mask


def padding_mask(attention_mask: jax.Array | None, seq: int) -> jax.Array:
    """(batch or 1, 1, 1, seq) booleans for a bidirectional encoder: every query sees unpadded keys."""
    if attention_mask is None:
        return jnp.ones((1, 1, 1, seq), bool)
    return attention_mask.astype(bool)[:, None, None, :]


def attention(q, k, v, mask, *, scale: float, softcap: float | None = None) -> jax.Array:
    """Softmax attention with grouped-query heads; scores and softmax in fp32.

    Args:
        q: (batch, q_len, heads, head_dim); k, v: (batch, k_len, kv_heads, head_dim).
        mask: booleans broadcastable to (batch, 1, q_len, k_len); False = masked.
        softcap: scores become softcap·tanh(scores / softcap) before the mask (Gemma 2).

    Returns:
        (batch, q_len, heads, head_dim) in v's dtype.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bqkgd,btkd->bkgqt", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    # A large negative number rather than -inf: fully padded rows stay finite (no NaN gradients).
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqt,btkd->bqkgd", weights, v)
    return out.reshape(batch, q_len, heads, head_dim)
