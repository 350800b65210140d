"""LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): B learns
faster than A. This is peft's `create_loraplus_optimizer` in optax, with the same parameter groups:

| group | what | learning rate | weight decay |
|---|---|---|---|
| A | lora A, modules_to_save copies and other trained arrays of 2+ dims | lr | loraplus_weight_decay |
| embedding | A and B of adapted embeddings | loraplus_lr_embedding | loraplus_weight_decay |
| B | lora B, DoRA magnitudes, other 1-D trained arrays | lr · loraplus_lr_ratio | loraplus_weight_decay |
| B, no decay | trained biases | lr · loraplus_lr_ratio | 0 |

Dims are the torch parameter's: a leaf of stacked layers (`model.layers.*`) has one more.

One difference: peft (through transformers' `get_parameter_names`) also exempts the weights of
torch `nn.LayerNorm` modules from decay; a parameter tree does not say which norm a 1-D weight
belongs to, so a LayerNorm weight trained as a modules_to_save copy decays here (only with
`loraplus_weight_decay > 0`).

>>> tx = lorax.loraplus_optimizer(params, learning_rate=2e-4, loraplus_lr_ratio=16)
>>> trainable, frozen = lorax.partition(params)
>>> opt_state = tx.init(trainable)
"""

from collections.abc import Callable
from typing import Any

import jax
import optax

from lorax.arrays import LoraArray, TrainableArray, is_adapter
from lorax.errors import LoraConfigError
from lorax.targets import STACK, dotted
from lorax.train import require_trainable

A, B, B_NO_DECAY, EMBEDDING, FROZEN = "A", "B", "B_no_decay", "embedding", "frozen"


def loraplus_labels(params: Any) -> Any:
    """The LoRA+ group (A, B, B_no_decay, embedding, or frozen) of every array of a LoRA tree or of
    its trainable half, as peft's create_loraplus_optimizer groups the same parameters."""

    def fields(leaf, label: Callable[[str, jax.Array], str]):
        trained = type(leaf).trainable_fields
        return jax.tree_util.tree_map_with_path(
            lambda path, x: label(path[0].name, x) if path[0].name in trained else FROZEN, leaf)

    def group(keypath, leaf):
        path = dotted(keypath)
        if isinstance(leaf, LoraArray):
            embedding = path.endswith(".embedding")
            return fields(leaf, lambda name, x: EMBEDDING if embedding and name in ("a", "b") else A if name == "a" else B)
        if isinstance(leaf, TrainableArray):
            bias = path.endswith(".bias")
            # peft's rule is on the torch parameter's dims: a leaf of stacked layers has one more.
            stacked = STACK in path.split(".")
            return fields(leaf, lambda name, x: A if x.ndim - stacked != 1 else B_NO_DECAY if bias else B)
        return jax.tree_util.tree_map(lambda _: FROZEN, leaf)

    return jax.tree_util.tree_map_with_path(group, params, is_leaf=is_adapter)


def loraplus_optimizer(params: Any, *, learning_rate: float, loraplus_lr_ratio: float,
                       loraplus_lr_embedding: float = 1e-6, loraplus_weight_decay: float = 0.0,
                       optimizer: Callable[..., optax.GradientTransformation] = optax.adamw,
                       **kwargs) -> optax.GradientTransformation:
    """An optax transformation that trains a LoRA tree the LoRA+ way: like `lorax.optimizer(tx,
    params)` (frozen leaves get no update and no state), with one `optimizer` per group.

    Args:
        params: the LoRA tree (or its trainable half).
        learning_rate: A's learning rate (peft's `lr`); a float or an optax schedule.
        loraplus_lr_ratio: B's learning rate over A's (peft suggests >= 1, e.g. 16).
        loraplus_lr_embedding: the learning rate of adapted embeddings' A and B (peft's default 1e-6);
            with a `learning_rate` schedule, a schedule too where embeddings are adapted (a torch
            scheduler scales every group, this one included; a constant would not be scheduled).
        loraplus_weight_decay: weight decay of every group but the biases (peft's default 0).
        optimizer: an optax optimizer taking `(learning_rate, weight_decay=..., **kwargs)`
            (optax.adamw, optax.lion, ...).
        kwargs: passed to `optimizer` (b1, b2, eps, ...).
    """
    require_trainable(params)
    embeddings = EMBEDDING in jax.tree_util.tree_leaves(loraplus_labels(params))
    if callable(learning_rate) and not callable(loraplus_lr_embedding) and embeddings:
        raise LoraConfigError(
            "learning_rate is a schedule but loraplus_lr_embedding a constant, and embeddings are adapted: their "
            "rate would not follow the schedule (peft's groups under a torch scheduler all do). Give a schedule, "
            "e.g. loraplus_lr_embedding=lambda step: 1e-6 * schedule(step) / peak_learning_rate"
        )
    b_rate = (lambda step: learning_rate(step) * loraplus_lr_ratio) if callable(learning_rate) \
        else learning_rate * loraplus_lr_ratio
    groups = {
        A: optimizer(learning_rate, weight_decay=loraplus_weight_decay, **kwargs),
        EMBEDDING: optimizer(loraplus_lr_embedding, weight_decay=loraplus_weight_decay, **kwargs),
        B: optimizer(b_rate, weight_decay=loraplus_weight_decay, **kwargs),
        B_NO_DECAY: optimizer(b_rate, weight_decay=0.0, **kwargs),
        FROZEN: optax.set_to_zero(),
    }
    return optax.multi_transform(groups, loraplus_labels)
