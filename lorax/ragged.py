"""`jax.lax.ragged_dot`'s primitive, for the quax rules of the weights that a mixture-of-experts
layer multiplies with it (`lorax.arrays.ExpertLoraArray`, `lorax.nf4.Nf4Array`).

JAX exports the function (`jax.lax.ragged_dot`) but not its primitive (neither `jax.lax` nor
`jax.extend` has `ragged_dot_general_p`), and quax rules are registered on primitives: it is read
from the function's own jaxpr, with the dimension numbers the function uses.

>>> ragged_dot_general_p.name
'ragged_dot_general'
"""

import jax
import jax.numpy as jnp
from jax import lax


def _ragged_dot_equation():
    jaxpr = jax.make_jaxpr(lax.ragged_dot)(jnp.zeros((2, 2)), jnp.zeros((1, 2, 2)), jnp.array([2], jnp.int32))
    (equation,) = jaxpr.eqns
    return equation.primitive, equation.params["ragged_dot_dimension_numbers"]


# RAGGED_DOT_NUMBERS: rows (m, in) grouped along m, weights (groups, in, out).
ragged_dot_general_p, RAGGED_DOT_NUMBERS = _ragged_dot_equation()
