"""Running a model on a LoRA tree: `split` a Flax NNX module into a graph and a pure-dict tree,
`apply` any model to a tree whose leaves may be implicit arrays.

>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> graphdef, params = split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
>>> apply(graphdef, params, jnp.ones((2, 4))).shape
(2, 3)
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import quax
from flax import nnx

from lorax.arrays import LoraArray


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelDef:
    """What `split` keeps apart from the parameters: the NNX graph (static) and any
    non-parameter state (rng counters, caches) as arrays."""

    graphdef: nnx.GraphDef = dataclasses.field(metadata={"static": True})
    rest: Any = None

    def module(self, params: Any) -> nnx.Module:
        """The NNX module rebuilt around `params` (its leaves may be quax tracers)."""
        if self.rest is None:
            return nnx.merge(self.graphdef, params)
        return nnx.merge(self.graphdef, params, self.rest)


def split(model: nnx.Module) -> tuple[ModelDef, dict]:
    """Split an NNX module into (graph, params), params being a pure dict of its nnx.Param
    arrays keyed like the module's attributes (`{"seq": {0: {"kernel": ...}}}`).

    Example:
        >>> graphdef, params = lorax.split(model)
        >>> params["model"]["layers"]["*"]["self_attn"]["q_proj"]["kernel"].shape   # 2 layers, stacked
        (2, 32, 32)
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rest = nnx.to_pure_dict(rest)
    return ModelDef(graphdef, rest or None), nnx.to_pure_dict(params)


def with_dropout(params: Any, key: jax.Array) -> Any:
    """Give every LoraArray with lora_dropout > 0 its own dropout key derived from `key`."""
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=lambda x: isinstance(x, LoraArray))

    def leaf_key(leaf, index):
        leaf_key = jax.random.fold_in(key, index)
        # Stacked layers are scanned over: every array of the LoraArray, its key too, needs the layer axis.
        return leaf_key if leaf.ranks is None else jax.random.split(leaf_key, leaf.w.shape[0])

    keyed = [
        eqx.tree_at(lambda l: l.dropout_key, leaf, leaf_key(leaf, index), is_leaf=lambda x: x is None)
        if isinstance(leaf, LoraArray) and leaf.dropout_rate > 0
        else leaf
        for index, leaf in enumerate(leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, keyed)


def apply(model: ModelDef | nnx.GraphDef | Callable, params: Any, *args, dropout_key: jax.Array | None = None, **kwargs):
    """Run a model on a tree that may hold LoRA (or other implicit) arrays.

    Args:
        model: a `ModelDef`/`nnx.GraphDef` from `split`, or any function `fn(params, *args, **kwargs)`
            (a plain JAX model, or `lambda p, x: linen_module.apply({"params": p}, x)`).
        params: the parameter tree.
        *args, **kwargs: the model's inputs.
        dropout_key: a PRNG key to turn on lora_dropout (training); None means no dropout.

    Returns:
        The model's output, computed with `x@w + scale·(x@a)@b` wherever a LoRA weight is used.

    Example:
        >>> lorax.apply(graphdef, params, input_ids).shape                        # an NNX model
        (1, 8, 64)
        >>> lorax.apply(lambda p, x: mlp.apply({"params": p}, x), mlp_params, x).shape   # a Linen one
        (4, 2)
    """
    if isinstance(model, nnx.GraphDef):
        model = ModelDef(model)
    if isinstance(model, ModelDef):
        graph = model

        def model(p, *a, **k):
            return graph.module(p)(*a, **k)

    if dropout_key is not None:
        params = with_dropout(params, dropout_key)
    return quax.quaxify(model)(params, *args, **kwargs)
