"""The Llama family (Llama 2/3, Mistral, Qwen2) as a Flax NNX model whose parameter paths are
Hugging Face's module names: `model.embed_tokens`, `model.layers.3.self_attn.q_proj`, `lm_head`.

The decoder layers are stored stacked, under `model.layers.*` (leading axis = layer), and run
with `nnx.scan`: one compiled layer body whatever the depth. `lorax` reads `*` as "one module
per index", so `model.layers.3.self_attn.q_proj` means the same to LoraConfig as in peft.

>>> config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
...                      num_attention_heads=4, num_key_value_heads=2)
>>> model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
>>> model(jnp.array([[1, 2, 3]])).shape
(1, 3, 64)
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lorax.models.layers import (STACK, RMSNorm, attention, cached_mask, causal_mask, empty_cache, linear,
                                  lm_logits, run_stacked, stacked)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The fields of transformers' LlamaConfig that change the computation.

    Mistral is this with a sliding window (ignored here: exact for sequences shorter than the
    window); Qwen2 is this with q/k/v biases (`qkv_bias=True`).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # llama3 scaling as sorted (key, value) pairs: hashable
    attention_bias: bool = False  # q, k, v and o biases (Llama's option)
    qkv_bias: bool = False  # q, k, v biases only (Qwen2)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "LlamaConfig":
        """From a config.json dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise NotImplementedError(f"rope type {rope_type!r} is not supported yet (supported: default, llama3)")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in fields and k not in ("rope_scaling", "dtype")}
        values.update(rope_theta=theta, rope_scaling=tuple(sorted(rope.items())) if rope_type == "llama3" else None)
        if hf.get("model_type") == "qwen2":
            values["qkv_bias"] = True  # Qwen2's q/k/v projections always carry a bias
        return cls(**{**values, **overrides})


def rope_frequencies(config: LlamaConfig) -> jax.Array:
    """Inverse frequencies (head_dim/2,), with llama3 scaling when configured (as transformers)."""
    dim = config.head_size
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if not config.rope_scaling:
        return inv_freq
    scaling = dict(config.rope_scaling)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate (batch, seq, heads, head_dim) by position, in transformers' half-split layout."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


class LlamaAttention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        hidden, heads, kv_heads, head = config.hidden_size, config.num_attention_heads, config.kv_heads, config.head_size
        qkv_bias = config.attention_bias or config.qkv_bias
        self.q_proj = linear(hidden, heads * head, qkv_bias, config, rngs)
        self.k_proj = linear(hidden, kv_heads * head, qkv_bias, config, rngs)
        self.v_proj = linear(hidden, kv_heads * head, qkv_bias, config, rngs)
        self.o_proj = linear(heads * head, hidden, config.attention_bias, config, rngs)
        self.heads, self.kv_heads, self.head = heads, kv_heads, head

    def __call__(self, h, cos, sin, mask, cache=None, cache_index=None):
        batch, seq, _ = h.shape
        q = apply_rope(self.q_proj(h).reshape(batch, seq, self.heads, self.head), cos, sin)
        k = apply_rope(self.k_proj(h).reshape(batch, seq, self.kv_heads, self.head), cos, sin)
        v = self.v_proj(h).reshape(batch, seq, self.kv_heads, self.head)
        if cache is not None:
            k, v = (jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), cache_index, axis=1)
                    for c, new in zip(cache, (k, v)))
            cache = (k, v)
        out = attention(q, k, v, mask, scale=self.head**-0.5)
        return self.o_proj(out.reshape(batch, seq, self.heads * self.head)), cache


class LlamaMLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = linear(hidden, inner, config.mlp_bias, config, rngs)
        self.up_proj = linear(hidden, inner, config.mlp_bias, config, rngs)
        self.down_proj = linear(inner, hidden, config.mlp_bias, config, rngs)

    def __call__(self, h):
        return self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.self_attn = LlamaAttention(config, rngs=rngs)
        self.mlp = LlamaMLP(config, rngs=rngs)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)

    def __call__(self, h, cos, sin, mask, cache=None, cache_index=None):
        attended, cache = self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, cache_index)
        h = h + attended
        return h + self.mlp(self.post_attention_layernorm(h)), cache


class LlamaModel(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=config.dtype,
                                      param_dtype=config.param_dtype, rngs=rngs)
        self.layers = stacked(lambda r: LlamaDecoderLayer(config, rngs=r), config.num_hidden_layers, rngs)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
        # Gradient checkpointing of the decoder layers (`model.set_attributes(remat=True)`, or
        # `make_train_step(..., remat=True)`): the backward pass keeps each layer's input and
        # recomputes the rest of the layer, layer by layer, instead of keeping every activation.
        self.remat = False

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, cache_index=None):
        """Hidden states (b, s, hidden). With a KV cache (`init_cache`), the tokens are written at
        `cache_index` and attend to everything before them; returns (hidden, new cache) then."""
        batch, seq = input_ids.shape
        if position_ids is None:
            start = 0 if cache_index is None else cache_index
            position_ids = jnp.broadcast_to(start + jnp.arange(seq), (batch, seq))
        freqs = position_ids[..., None].astype(jnp.float32) * rope_frequencies(self.config)
        angles = jnp.concatenate([freqs, freqs], axis=-1)
        cos, sin = jnp.cos(angles).astype(self.config.dtype), jnp.sin(angles).astype(self.config.dtype)
        if cache is None:
            mask = causal_mask(seq, attention_mask)
        else:
            mask = cached_mask(seq, cache[0].shape[2], cache_index, attention_mask)
        h = self.embed_tokens(input_ids)

        h, cache = run_stacked(self.layers[STACK], h, cos, sin, mask, cache, cache_index, remat=self.remat,
                               in_axes=(None, None, None, 0, None), out_axes=(nnx.Carry, 0))
        h = self.norm(h)
        return h if cache is None else (h, cache)

    def init_cache(self, batch: int, max_length: int, dtype=None):
        """An empty KV cache: (keys, values), each (layers, batch, max_length, kv_heads, head_dim)."""
        c = self.config
        return empty_cache(c.num_hidden_layers, batch, max_length, c.kv_heads, c.head_size, dtype or c.dtype)


class LlamaForCausalLM(nnx.Module):
    """Causal LM: `model(input_ids, attention_mask=None, position_ids=None) -> logits` (b, s, vocab).

    The call is `logits(hidden_states(...))`; the two halves are methods so that a loss can run
    the output head a few positions at a time (`lorax.train.chunked_causal_lm_loss`).
    """

    output_head = "lm_head"

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = LlamaModel(config, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = linear(config.hidden_size, config.vocab_size, False, config, rngs)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, cache_index=None):
        out = self.model(input_ids, attention_mask, position_ids, cache, cache_index)
        h, cache = (out, None) if cache is None else out
        logits = self.logits(h)
        return logits if cache is None else (logits, cache)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None):
        """The final (normed) hidden states (b, s, hidden) that the output head reads."""
        return self.model(input_ids, attention_mask, position_ids)

    def logits(self, h):
        """The output head: (..., hidden) -> (..., vocab), `lm_head` or the tied embeddings."""
        return lm_logits(h, self.model.embed_tokens, None if self.config.tie_word_embeddings else self.lm_head)

    def init_cache(self, batch: int, max_length: int, dtype=None):
        return self.model.init_cache(batch, max_length, dtype)
