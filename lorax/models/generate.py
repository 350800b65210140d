"""Greedy and sampled generation with a KV cache, for any causal LM of `lorax.models` and for
LoRA trees (it runs through `lorax.apply`).

>>> graphdef, params = lorax.split(model)                      # model: a Llama or GPT-2 (lorax.models)
>>> generate(graphdef, params, input_ids, max_new_tokens=4).shape   # the prompt, then 4 new tokens
(1, 12)
"""

import functools

import jax
import jax.numpy as jnp

from lorax.apply import ModelDef, apply


def _token_ids(eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    ids = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"eos_token_id must be an int or a sequence of ints, got {eos_token_id!r}")
    return ids


def generate(graphdef: ModelDef, params, input_ids: jax.Array, *, max_new_tokens: int,
             attention_mask: jax.Array | None = None, temperature: float = 0.0,
             key: jax.Array | None = None, eos_token_id: int | tuple[int, ...] | None = None,
             pad_token_id: int = 0) -> jax.Array:
    """Continue `input_ids` (batch, prompt) by `max_new_tokens` tokens.

    Args:
        graphdef, params: from `lorax.split(model)` (params may hold LoRA arrays).
        input_ids: (batch, prompt_length) int tokens; left-pad ragged prompts.
        max_new_tokens: how many tokens to add.
        attention_mask: (batch, prompt_length), 0 on padding. Positions count only real tokens,
            as transformers' generate does. None: every prompt token is real (transformers'
            generate would instead infer a mask from `pad_token_id`; pass the tokenizer's mask).
        temperature: 0 for greedy decoding, otherwise softmax sampling at this temperature.
        key: PRNG key, required when sampling.
        eos_token_id: end-of-sequence token(s) (config.json's eos_token_id): a row that produces
            one is finished, and every later token of it is `pad_token_id`, as in transformers'
            generate; the loop stops when all rows are finished. None: always max_new_tokens.
        pad_token_id: the token after a row's end.

    Returns:
        (batch, prompt_length + max_new_tokens) tokens: the prompt, then the continuation. The
        shape is fixed (it is jitted): where transformers stops early, its output is this one's
        prefix and the rest here is `pad_token_id`.
    """
    return _generate(graphdef, params, input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
                     temperature=temperature, key=key, eos_token_id=_token_ids(eos_token_id),
                     pad_token_id=pad_token_id)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "eos_token_id",
                                             "pad_token_id"))
def _generate(graphdef, params, input_ids, *, max_new_tokens, attention_mask, temperature, key, eos_token_id,
              pad_token_id):
    batch, prompt = input_ids.shape
    total = prompt + max_new_tokens
    if attention_mask is None:
        attention_mask = jnp.ones((batch, prompt), jnp.int32)
    mask = jnp.concatenate([attention_mask.astype(jnp.int32), jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    cache = apply(lambda p: graphdef.module(p).init_cache(batch, total), params)
    if key is None:
        key = jax.random.key(0)

    def pick(logits, key):
        if temperature == 0.0:
            return jnp.argmax(logits, axis=-1)
        return jax.random.categorical(key, logits / temperature, axis=-1)

    eos = jnp.asarray(eos_token_id, input_ids.dtype)

    def finished(chosen):
        return jnp.isin(chosen, eos) if eos_token_id else jnp.zeros(chosen.shape, bool)

    logits, cache = apply(graphdef, params, input_ids, mask, positions[:, :prompt], cache, 0)
    tokens = jnp.full((batch, total), pad_token_id, input_ids.dtype).at[:, :prompt].set(input_ids)
    first = pick(logits[:, -1], jax.random.fold_in(key, 0)).astype(tokens.dtype)
    tokens = tokens.at[:, prompt].set(first)

    def one_token(index, tokens, cache):
        current = jax.lax.dynamic_slice_in_dim(tokens, index, 1, axis=1)
        position = jax.lax.dynamic_slice_in_dim(positions, index, 1, axis=1)
        logits, cache = apply(graphdef, params, current, mask, position, cache, index)
        return logits[:, -1], cache

    def everything(index, tokens, cache):
        """The cache rebuilt from all tokens so far (those after `index` are placeholders: causally
        masked now, overwritten when generated; their positions are held at index's, so that they
        do not count towards the longest position)."""
        held = jnp.where(jnp.arange(total) > index, jax.lax.dynamic_slice_in_dim(positions, index, 1, axis=1), positions)
        logits, cache = apply(graphdef, params, tokens, mask, held, jax.tree_util.tree_map(jnp.zeros_like, cache), 0)
        return jax.lax.dynamic_index_in_dim(logits, index, axis=1, keepdims=False), cache

    # Phi-3 with LongRoPE: when the input first grows past the pretraining length, transformers'
    # generate drops the cache and runs the whole sequence again (its keys were rotated by the
    # short factors); so do we, at that one step.
    recompute_at = apply(lambda p: getattr(graphdef.module(p), "cache_recompute_length", None), params)

    def step(state):
        index, tokens, cache, done = state
        if recompute_at is None or prompt > recompute_at:
            logits, cache = one_token(index, tokens, cache)
        else:
            logits, cache = jax.lax.cond(index == recompute_at, everything, one_token, index, tokens, cache)
        chosen = pick(logits, jax.random.fold_in(key, index)).astype(tokens.dtype)
        chosen = jnp.where(done, jnp.asarray(pad_token_id, tokens.dtype), chosen)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, chosen[:, None], index + 1, axis=1)
        return index + 1, tokens, cache, done | finished(chosen)

    def running(state):
        index, _, _, done = state
        return (index < total - 1) & ~jnp.all(done)

    _, tokens, _, _ = jax.lax.while_loop(running, step, (prompt, tokens, cache, finished(first)))
    return tokens
