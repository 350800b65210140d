"""Training pieces: an optax optimizer that only ever holds state for trainable leaves.

>>> import optax
>>> opt = optimizer(optax.adamw(1e-3), params)            # doctest: +SKIP
>>> trainable, frozen = lorax.partition(params)            # doctest: +SKIP
>>> opt_state = opt.init(trainable)                        # doctest: +SKIP
"""

from typing import Any

import jax
import optax

from lorax.errors import LoraError
from lorax.transform import trainable_mask

TRAINABLE, FROZEN = "trainable", "frozen"


def _labels(params: Any) -> Any:
    return jax.tree_util.tree_map(lambda trained: TRAINABLE if trained else FROZEN, trainable_mask(params))


def optimizer(tx: optax.GradientTransformation, params: Any) -> optax.GradientTransformation:
    """Wrap `tx` so that it updates the trainable leaves of a LoRA tree and nothing else.

    Works on the full tree (frozen leaves get zero updates and no state) and on the
    `trainable` half of `lorax.partition(params)` (the cheap way: the frozen base is never
    differentiated, copied or written).

    Args:
        tx: any optax transformation (adamw, a chain with clipping and a schedule, ...).
        params: the LoRA tree, to check that something is trainable.

    Returns:
        An optax GradientTransformation.

    Example:
        >>> opt = lorax.optimizer(optax.adamw(1e-3), params)
        >>> trainable, frozen = lorax.partition(params)
        >>> opt_state = opt.init(trainable)
        >>> updates, opt_state = opt.update(grads, opt_state, trainable)
    """
    if not any(jax.tree_util.tree_leaves(trainable_mask(params))):
        raise LoraError("params have no trainable leaves: call lorax.lora(params, config, key=...) first")
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, _labels)
