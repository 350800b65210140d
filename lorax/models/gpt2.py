"""GPT-2 as a Flax NNX model whose parameter paths are Hugging Face's module names:
`transformer.wte`, `transformer.h.3.attn.c_attn`, `transformer.ln_f`.

GPT-2's projections are transformers' `Conv1D`, whose weight is stored (in, out): the layout of
an `nnx.Linear` kernel, so these layers are plain `nnx.Linear`s and the loader copies their
weights without a transpose (`fan_in_fan_out`, as peft calls it). `c_attn` is one fused q/k/v
projection, as in the checkpoint, so `target_modules=["c_attn"]` adapts what it adapts in peft.
The blocks are stored stacked under `transformer.h.*` and run with `nnx.scan`, as in llama.py.

>>> config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=4)
>>> model = GPT2LMHeadModel(config, rngs=nnx.Rngs(0))
>>> model(jnp.array([[1, 2, 3]])).shape
(1, 3, 64)
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lorax.models.layers import (STACK, LayerNorm, activation, attention, cached_mask, causal_mask, check_positions,
                                  empty_cache, linear, lm_logits, run_stacked, stacked)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The fields of transformers' GPT2Config that change the computation, with config.json's names
    (`n_embd` is the hidden size, `n_inner` the MLP width, 4·n_embd when None)."""

    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_size(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "GPT2Config":
        """From a config.json dict. `reorder_and_upcast_attn` needs nothing: scores are fp32 here anyway."""
        if hf.get("add_cross_attention"):
            raise NotImplementedError("GPT-2 with cross-attention (add_cross_attention=True) is not supported yet")
        activation(hf.get("activation_function", "gelu_new"))  # an unsupported activation fails here, by name
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in fields and k != "dtype"}
        return cls(**{**values, **overrides})


class GPT2Attention(nnx.Module):
    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        hidden = config.n_embd
        self.c_attn = linear(hidden, 3 * hidden, True, config, rngs)  # q, k, v side by side on the out axis
        self.c_proj = linear(hidden, hidden, True, config, rngs)
        self.heads, self.head = config.n_head, config.head_size

    def __call__(self, h, mask, scale, cache=None, cache_index=None):
        batch, seq, hidden = h.shape
        q, k, v = (x.reshape(batch, seq, self.heads, self.head) for x in jnp.split(self.c_attn(h), 3, axis=-1))
        if cache is not None:
            k, v = (jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), cache_index, axis=1)
                    for c, new in zip(cache, (k, v)))
            cache = (k, v)
        out = attention(q, k, v, mask, scale=scale)
        return self.c_proj(out.reshape(batch, seq, hidden)), cache


class GPT2MLP(nnx.Module):
    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.c_fc = linear(config.n_embd, config.inner_size, True, config, rngs)
        self.c_proj = linear(config.inner_size, config.n_embd, True, config, rngs)
        self.activation_function = config.activation_function

    def __call__(self, h):
        return self.c_proj(activation(self.activation_function)(self.c_fc(h)))


class GPT2Block(nnx.Module):
    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_epsilon, config)
        self.attn = GPT2Attention(config, rngs=rngs)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_epsilon, config)
        self.mlp = GPT2MLP(config, rngs=rngs)

    def __call__(self, h, mask, scale, cache=None, cache_index=None):
        attended, cache = self.attn(self.ln_1(h), mask, scale, cache, cache_index)
        h = h + attended
        return h + self.mlp(self.ln_2(h)), cache


class GPT2Model(nnx.Module):
    """The GPT-2 transformer: `model(input_ids, attention_mask=None, position_ids=None)` -> hidden
    states (b, s, n_embd) after the final norm `ln_f`."""

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.config = config
        embed = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.wte = nnx.Embed(config.vocab_size, config.n_embd, **embed)
        self.wpe = nnx.Embed(config.n_positions, config.n_embd, **embed)
        self.h = stacked(lambda r: GPT2Block(config, rngs=r), config.n_layer, rngs)
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon, config)
        self.remat = False  # gradient checkpointing of the blocks (see layers.scan_layers)

    def attention_scales(self) -> jax.Array:
        """(n_layer,) the factor on q·k in each layer: 1/√head_dim, and 1/(layer + 1) when configured."""
        c = self.config
        scale = c.head_size**-0.5 if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            return scale / jnp.arange(1, c.n_layer + 1, dtype=jnp.float32)
        return jnp.full((c.n_layer,), scale, jnp.float32)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, cache_index=None):
        """Hidden states (b, s, n_embd). With a KV cache (`init_cache`), the tokens are written at
        `cache_index` and attend to everything before them; returns (hidden, new cache) then."""
        batch, seq = input_ids.shape
        check_positions(seq if cache is None else cache[0].shape[2], self.config.n_positions, "n_positions")
        if position_ids is None:
            # as transformers: positions count from the start (or the cache), padding included
            start = 0 if cache_index is None else cache_index
            position_ids = jnp.broadcast_to(start + jnp.arange(seq), (batch, seq))
        if cache is None:
            mask = causal_mask(seq, attention_mask)
        else:
            mask = cached_mask(seq, cache[0].shape[2], cache_index, attention_mask)
        h = self.wte(input_ids) + self.wpe(position_ids)

        h, cache = run_stacked(self.h[STACK], h, mask, self.attention_scales(), cache, cache_index, remat=self.remat,
                               in_axes=(None, 0, 0, None), out_axes=(nnx.Carry, 0))
        h = self.ln_f(h)
        return h if cache is None else (h, cache)

    def init_cache(self, batch: int, max_length: int, dtype=None):
        """An empty KV cache: (keys, values), each (n_layer, batch, max_length, n_head, head_dim)."""
        c = self.config
        check_positions(max_length, c.n_positions, "n_positions")
        return empty_cache(c.n_layer, batch, max_length, c.n_head, c.head_size, dtype or c.dtype)


class GPT2LMHeadModel(nnx.Module):
    """Causal LM: `model(input_ids, attention_mask=None, position_ids=None) -> logits` (b, s, vocab).

    The head is tied to `transformer.wte` (GPT-2's checkpoints store no `lm_head`); a config with
    tie_word_embeddings=False gets its own `lm_head`, as in transformers.
    """

    output_head = "lm_head"

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.transformer = GPT2Model(config, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = linear(config.n_embd, config.vocab_size, False, config, rngs)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, cache_index=None):
        out = self.transformer(input_ids, attention_mask, position_ids, cache, cache_index)
        h, cache = (out, None) if cache is None else out
        logits = self.logits(h)
        return logits if cache is None else (logits, cache)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None):
        """The final (ln_f) hidden states (b, s, n_embd) that the output head reads."""
        return self.transformer(input_ids, attention_mask, position_ids)

    def logits(self, h):
        """The output head: (..., n_embd) -> (..., vocab), tied to `wte` unless the config unties it."""
        return lm_logits(h, self.transformer.wte, None if self.config.tie_word_embeddings else self.lm_head)

    def init_cache(self, batch: int, max_length: int, dtype=None):
        return self.transformer.init_cache(batch, max_length, dtype)
