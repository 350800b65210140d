"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE): a router picks `top_k` experts per token, each a
SwiGLU MLP, and their outputs are summed with the router's weights.

Parameter names are transformers 5's modules: `mlp.gate` (the router, a linear layer with
kernel (hidden, experts); transformers holds it as a bare parameter `mlp.gate.weight`, which peft
adapts the same way), `mlp.experts.gate_up_proj` and `mlp.experts.down_proj` (every expert's
projections fused into one 3-D parameter, gate then up on the output axis). Like all our kernels
the expert weights are (in, out): (experts, hidden, 2·intermediate) and (experts, intermediate,
hidden), transformers' per-expert matrices transposed. LoRA adapts them per expert
(`lorax.ExpertLoraArray`, peft's `target_parameters`).

The tokens are sorted by expert and each expert's group multiplied at once with
`jax.lax.ragged_dot` (grouped matmuls: native on GPU and TPU; XLA:CPU computes it densely, once
per expert, which is fine for tests but not for training large MoE models on a CPU).

>>> block = SparseMoeBlock(hidden=8, intermediate=4, num_experts=4, top_k=2, norm_topk_prob=True,
...                        act="silu", dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
>>> block(jnp.ones((2, 3, 8))).shape
(2, 3, 8)
>>> block.experts.gate_up_proj.shape, block.gate.kernel.shape
((4, 8, 8), (8, 4))
"""

import jax
import jax.numpy as jnp
from flax import nnx

from lorax.models.layers import activation


def route(logits: jax.Array, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """Router logits (tokens, experts) -> (weights (tokens, top_k) fp32, experts (tokens, top_k)):
    softmax in fp32, the `top_k` largest probabilities; with `norm_topk_prob` rescaled to sum to
    one (Mixtral always, Qwen3-MoE as its config says)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    return weights, experts


class Experts(nnx.Module):
    """`num_experts` SwiGLU MLPs, stored fused: gate_up_proj (experts, hidden, 2·inner), down_proj
    (experts, inner, hidden)."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, act: str, dtype, param_dtype,
                 rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=0)
        self.gate_up_proj = nnx.Param(init(rngs.params(), (num_experts, hidden, 2 * intermediate), param_dtype))
        self.down_proj = nnx.Param(init(rngs.params(), (num_experts, intermediate, hidden), param_dtype))
        self.act = act
        self.dtype = dtype

    def __call__(self, h: jax.Array, group_sizes: jax.Array) -> jax.Array:
        """h (rows, hidden), its rows sorted by expert, `group_sizes[e]` rows for expert e."""
        gate_up = jax.lax.ragged_dot(h, self.gate_up_proj.get_value().astype(self.dtype), group_sizes,
                                     preferred_element_type=jnp.float32).astype(self.dtype)
        gate, up = jnp.split(gate_up, 2, axis=-1)
        return jax.lax.ragged_dot(activation(self.act)(gate) * up, self.down_proj.get_value().astype(self.dtype),
                                  group_sizes, preferred_element_type=jnp.float32).astype(self.dtype)


class SparseMoeBlock(nnx.Module):
    """Token-choice top-k routing over `num_experts` experts (transformers' *SparseMoeBlock)."""

    def __init__(self, *, hidden: int, intermediate: int, num_experts: int, top_k: int, norm_topk_prob: bool,
                 act: str, dtype, param_dtype, rngs: nnx.Rngs):
        self.gate = nnx.Linear(hidden, num_experts, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.experts = Experts(hidden, intermediate, num_experts, act, dtype, param_dtype, rngs)
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob

    def __call__(self, h: jax.Array) -> jax.Array:
        shape = h.shape
        h = h.reshape(-1, shape[-1])
        weights, experts = route(self.gate(h), self.top_k, self.norm_topk_prob)
        # Every (token, choice) pair becomes a row; rows sorted by expert form one group per expert.
        chosen = experts.reshape(-1)
        order = jnp.argsort(chosen, stable=True)
        token = order // self.top_k
        group_sizes = jnp.bincount(chosen, length=self.num_experts).astype(jnp.int32)
        out = self.experts(h[token], group_sizes)
        weighted = out.astype(jnp.float32) * weights.reshape(-1)[order, None]
        summed = jnp.zeros(h.shape, jnp.float32).at[token].add(weighted)
        # The compute dtype, as a dense MLP's Linear returns it (not h's: an fp32 norm's output).
        return summed.astype(self.experts.dtype).reshape(shape)
