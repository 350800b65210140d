"""Rematerialisation (gradient checkpointing) through implicit arrays.

`jax.checkpoint` (and `nnx.remat`, which calls it) records its function as one `remat`
primitive. Inside `lorax.apply` the model sees LoraArray and Nf4Array leaves, so that primitive
meets implicit arrays too; the rule below re-traces the checkpointed function with their own
rules (quax) and checkpoints the result, with the same policy. With it, a model may
checkpoint its layer body and stay a LoRA/QLoRA model:

>>> import jax, jax.numpy as jnp, quax, lorax
>>> w = lorax.nf4.quantize(jnp.ones((64, 4)))
>>> layer = jax.checkpoint(lambda x, w: jnp.tanh(x @ w))
>>> quax.quaxify(layer)(jnp.ones((2, 64)), w).shape
(2, 4)
"""

import jax
import quax
from jax.extend.core import ClosedJaxpr, jaxpr_as_fun
from jax.extend.core.primitives import remat_p
from jaxtyping import ArrayLike


@quax.register(remat_p)
def _checkpoint(*args: ArrayLike | quax.ArrayValue, jaxpr, prevent_cse, differentiated, policy):
    # `differentiated` is bookkeeping of JAX's own transformations; a fresh checkpoint re-derives it.
    del differentiated
    body = quax.quaxify(jaxpr_as_fun(ClosedJaxpr(jaxpr, ())))
    # prevent_cse is a bool or one flag per argument; an implicit argument keeps its flag for all its arrays.
    return jax.checkpoint(body, prevent_cse=prevent_cse, policy=policy)(*args)
