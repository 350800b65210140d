"""Implicit arrays that stand in for weights: the model code sees an array, the rules below
decide what each operation on it computes.

`LoraArray` is the LoRA weight `W + scale·A·B` kept as three pieces (the LoRA paper's
`h = W x + (α/r)·B A x`, written here in our (in, out) layout). Its `dot_general` rule computes
`x@w + scale·(x@a)@b` and never forms the (in, out) sum; its `gather` rule serves embedding
lookups the same way. The frozen base `w` sits behind `stop_gradient`, so no gradient ever
reaches it. An operation without a rule raises `UnsupportedOpError` naming the operation and
the weight, unless the array was built with `allow_materialize=True`.

`DoraArray` is a LoraArray with DoRA's trained magnitude per output feature (`use_dora=True`).

`TrainableArray` marks a plain leaf as trained (a bias under `bias="all"`, or a
`modules_to_save` copy that keeps its frozen original beside it, as peft does).

>>> import jax, jax.numpy as jnp, quax
>>> w = jnp.ones((4, 3)); a = jnp.ones((4, 2)); b = jnp.zeros((2, 3))
>>> weight = LoraArray(w, a, b, scale=2.0, path="layer")
>>> quax.quaxify(lambda x, k: x @ k)(jnp.ones((1, 4)), weight).shape
(1, 3)
"""

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import quax
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from lorax.errors import UnsupportedOpError
from lorax.ragged import RAGGED_DOT_NUMBERS, ragged_dot_general_p


class LoraArray(quax.ArrayValue):
    """A weight `w + scale·(a @ b)` held factored.

    Fields:
        w: the frozen base, (in, out) for a linear kernel or (num_embeddings, dim) for
            an embedding table. Leading axes (layers stacked for `lax.scan`) are allowed.
        a: (..., in, r). peft's `lora_A.weight` transposed (`lora_embedding_A` for tables).
        b: (..., r, out). peft's `lora_B.weight` transposed.
        scale: lora_alpha / r (or / √r with rsLoRA); for stacked layers one value per layer
            (0 for layers that layers_to_transform leaves out).
        path: the module path, for error messages and export (`model.layers.*.mlp.up_proj`
            for stacked layers).
        ranks: for stacked layers, each layer's rank (0 = not adapted); a and b are padded
            with zeros to the largest. None for a single weight.
        dropout_rate: lora_dropout, applied to the adapter's input when `dropout_key` is set.
        dropout_key: a PRNG key, set by `lorax.apply(..., dropout_key=...)` during training.
        allow_materialize: let operations without a rule form `w + scale·a@b` instead of failing.
        ensure_weight_tying: an output head tied to this table (`tied_weight`) sees the adapted
            table; False: it sees `w` (LoraConfig.ensure_weight_tying, peft's behaviour).
    """

    w: jax.Array
    a: jax.Array
    b: jax.Array
    scale: jax.Array = eqx.field(converter=jnp.asarray, default=1.0)
    dropout_key: jax.Array | None = None
    path: str = eqx.field(static=True, default="")
    ranks: tuple[int, ...] | None = eqx.field(static=True, default=None)
    dropout_rate: float = eqx.field(static=True, default=0.0)
    allow_materialize: bool = eqx.field(static=True, default=False)
    ensure_weight_tying: bool = eqx.field(static=True, default=False)

    trainable_fields: ClassVar[tuple[str, ...]] = ("a", "b")

    def aval(self):
        return jax.core.ShapedArray(self.w.shape, self.w.dtype)

    @property
    def r(self) -> int:
        return self.a.shape[-1]

    def adapter_size(self) -> int:
        """Number of adapter parameters, as peft counts them (padding of stacked ranks excluded)."""
        d_in, d_out = self.w.shape[-2:]
        if self.ranks is None:
            return int(self.a.size + self.b.size)
        return sum(r * (d_in + d_out) for r in self.ranks)

    def delta(self, dtype=None) -> jax.Array:
        """`scale·a@b` in w's layout and in `dtype` (default w's): the update that merging adds to w."""
        scale = jnp.asarray(self.scale)[..., None, None]
        return (scale * jnp.matmul(self.a, self.b)).astype(dtype or self.w.dtype)

    def base(self) -> jax.Array:
        """w as a dense array: an implicit base (an NF4-quantized weight: QLoRA) dequantized."""
        return self.w.materialise() if isinstance(self.w, quax.ArrayValue) else self.w

    def materialise(self) -> jax.Array:
        return lax.stop_gradient(self.base()) + self.delta()

    def merged(self) -> jax.Array:
        """The weight the adapter stands for, as one dense array in w's dtype (what merging writes):
        the update added in the wider of the two dtypes and rounded once, as peft's merge of a
        Linear (or a target parameter) adds its fp32 delta to a bf16 weight in place. (peft's
        Embedding rounds the delta to the table's dtype first: `materialise`.)"""
        w = self.base()
        wide = jnp.promote_types(w.dtype, self.a.dtype)
        return (w.astype(wide) + self.delta(wide)).astype(w.dtype)

    def unmerged(self, merged: jax.Array) -> jax.Array:
        """The base weight that `merged` holds beneath this adapter (the inverse of `merged`)."""
        return merged - self.delta()

    @staticmethod
    def default(primitive, values: Sequence[Any], params: dict[str, Any]):
        for value in values:
            if isinstance(value, LoraArray) and not value.allow_materialize:
                raise UnsupportedOpError(
                    f"LoRA weight {value.path!r} {value.shape} met `{primitive.name}`, which has no factored rule "
                    f"(rules: dot_general, gather, transpose, convert_element_type, copy). Computing it would form the "
                    f"full W + scale·A·B. Build the params with lorax.lora(..., allow_materialize=True) to allow that."
                )
        return quax.Value.default(primitive, values, params)

    def transposed(self) -> "LoraArray":
        """The 2-D transpose, still factored: (w + s·a b)ᵀ = wᵀ + s·bᵀ aᵀ."""
        return eqx.tree_at(lambda l: (l.w, l.a, l.b), self, (self.w.T, self.b.T, self.a.T))

    def adapter_input(self, x: jax.Array) -> jax.Array:
        """x as the adapter sees it: in the adapter's dtype (as peft casts it to lora_A's), with
        lora_dropout when training."""
        dtype = self.a.dtype
        x = x.astype(dtype)
        if self.dropout_key is None or self.dropout_rate == 0.0:
            return x
        keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout_rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout_rate), 0).astype(dtype)

    def add_delta(self, dense: jax.Array, delta: jax.Array) -> jax.Array:
        """`dense + scale·delta`, summed in the wider of the two dtypes and returned in dense's,
        as peft does (bf16 base output + fp32 adapter output, cast back to bf16)."""
        return (dense + self.scale.astype(delta.dtype) * delta).astype(dense.dtype)


class DoraArray(LoraArray):
    """A DoRA weight (Liu et al. 2024, peft's `use_dora=True`): the LoRA weight with each output
    feature's column rescaled to a trained magnitude,

        W' = m · (w + s·a b) / ‖w + s·a b‖

    the norm taken over the input axis, one value per output feature, and treated as a constant
    in the backward pass (the paper's section 4.3; peft detaches it too). `m` (..., out) starts
    at that norm, so W' = w + s·a b at init. For an embedding table (num_embeddings, dim) the
    same holds with the vocabulary as the input axis: one magnitude per feature, as peft's
    DoraEmbeddingLayer has it.

    In a product, `x·W' = mns·(x·w) + mns·s·((x·a)·b)` with `mns = m / ‖w + s·a b‖`: the norm needs
    the dense sum once per call (peft forms it as well); the products stay factored. With
    lora_dropout, the adapter and the magnitude's share of the base product see the dropped
    input, as in peft.

    >>> w = jnp.ones((4, 3)); a = jnp.ones((4, 2)); b = jnp.zeros((2, 3))
    >>> weight = DoraArray(w, a, b, scale=2.0, m=jnp.full(3, 4.0), path="layer")   # ‖column‖ = 2
    >>> quax.quaxify(lambda x, k: x @ k)(jnp.ones((1, 4)), weight)
    Array([[8., 8., 8.]], dtype=float32)
    """

    m: jax.Array | None = None

    trainable_fields: ClassVar[tuple[str, ...]] = ("a", "b", "m")

    @classmethod
    def from_lora(cls, leaf: LoraArray) -> "DoraArray":
        """`leaf` with a magnitude, initialised to the norm of its columns (so nothing changes at init)."""
        fields = {f.name: getattr(leaf, f.name) for f in dataclasses.fields(leaf)}
        norm = jnp.linalg.norm(leaf.materialise().astype(jnp.float32), axis=-2)
        return cls(**{**fields, "m": norm.astype(leaf.a.dtype)})

    def adapter_size(self) -> int:
        d_out = self.w.shape[-1]
        adapted = 1 if self.ranks is None else sum(1 for r in self.ranks if r)
        return super().adapter_size() + adapted * d_out

    def magnitude_scale(self) -> jax.Array:
        """m / ‖w + s·a b‖ per output feature (..., out), the norm without gradient. Layers of a
        stack that the config leaves out (scale 0) have no DoRA in peft: their factor is 1."""
        norm = jnp.linalg.norm(lax.stop_gradient(self.materialise()).astype(jnp.float32), axis=-2)
        factor = self.m.astype(jnp.float32) / norm
        return jnp.where(jnp.asarray(self.scale)[..., None] == 0, 1.0, factor)

    def merged(self) -> jax.Array:
        w_plus = self.materialise()
        return (w_plus * self.magnitude_scale()[..., None, :]).astype(w_plus.dtype)

    def unmerged(self, merged: jax.Array) -> jax.Array:
        return (merged / self.magnitude_scale()[..., None, :]).astype(merged.dtype) - self.delta()


class ExpertLoraArray(LoraArray):
    """LoRA on a mixture-of-experts layer's experts, each expert with its own factors: w
    (..., experts, in, out), a (..., experts, in, r), b (..., experts, r, out) — peft's
    `ParamWrapper` on a 3-D parameter (`target_parameters`), whose lora_A (experts·r, in) and
    lora_B (out, r·experts) hold the same numbers (interop/peft.py reorders them). Its rule is
    for `jax.lax.ragged_dot` (rows grouped by expert): the base grouped product plus
    s·((x·a_e)·b_e) per group, never forming the experts' sums.

    >>> w = jnp.zeros((2, 4, 3)); a = jnp.ones((2, 4, 1)); b = jnp.ones((2, 1, 3))
    >>> weight = ExpertLoraArray(w, a, b, scale=0.5, path="experts.down_proj")
    >>> rows = jnp.ones((3, 4)); group_sizes = jnp.array([1, 2])     # row 0: expert 0; rows 1, 2: expert 1
    >>> quax.quaxify(jax.lax.ragged_dot)(rows, weight, group_sizes)[:, 0]
    Array([2., 2., 2.], dtype=float32)
    """

    def adapter_size(self) -> int:
        experts = self.w.shape[-3]
        return experts * super().adapter_size()

    def delta(self, dtype=None) -> jax.Array:
        scale = jnp.asarray(self.scale)[..., None, None, None]
        return (scale * jnp.matmul(self.a, self.b)).astype(dtype or self.w.dtype)


class TrainableArray(quax.ArrayValue):
    """A plain leaf that is trained: a bias (bias="all"/"lora_only") or a modules_to_save copy.

    Fields:
        value: the trained array the model uses.
        original: the frozen original (modules_to_save keeps one, as peft's
            ModulesToSaveWrapper does; it counts in "all params" and is what the model
            uses with adapters disabled). None for biases.
        ensure_weight_tying: an output head tied to this table (`tied_weight`) sees `value`;
            False: it sees `original`, as in peft.
    """

    value: jax.Array
    original: jax.Array | None = None
    ensure_weight_tying: bool = eqx.field(static=True, default=False)

    trainable_fields: ClassVar[tuple[str, ...]] = ("value",)

    def aval(self):
        return jax.core.ShapedArray(self.value.shape, self.value.dtype)

    def materialise(self) -> jax.Array:
        # Every operation sees the trained value: this wrapper changes training, not math.
        return self.value


# `tied_weight`'s primitive: the identity on plain arrays; LoraArray and TrainableArray answer
# with the table a tied output head multiplies by.
tied_weight_p = Primitive("lorax_tied_weight")
tied_weight_p.def_impl(lambda x: x)
tied_weight_p.def_abstract_eval(lambda x: x)
mlir.register_lowering(tied_weight_p, lambda ctx, x: [x])
ad.deflinear2(tied_weight_p, lambda cotangent, x: [cotangent])
batching.primitive_batchers[tied_weight_p] = lambda args, dims: (tied_weight_p.bind(*args), dims[0])


def tied_weight(table: jax.Array) -> jax.Array:
    """The embedding table as an output head tied to it sees it: `logits = h @ tied_weight(E).T`.

    A plain table is returned as it is. An adapted one answers as peft's tied `lm_head` does:
    by default the head keeps the frozen base (`w` of a LoraArray, the original of a
    modules_to_save copy), since peft adapts the embedding module and leaves the head's shared
    weight alone; with `LoraConfig(ensure_weight_tying=True)` the head sees the adapted table.

    >>> table = jnp.ones((5, 3))
    >>> weight = LoraArray(table, jnp.ones((5, 2)), jnp.ones((2, 3)), path="embed_tokens")
    >>> quax.quaxify(lambda e: tied_weight(e).sum())(weight)
    Array(15., dtype=float32)
    """
    return tied_weight_p.bind(table)


@quax.register(tied_weight_p)
def _tied_lora(table: LoraArray):
    return table if table.ensure_weight_tying else table.w


@quax.register(tied_weight_p)
def _tied_trainable(table: TrainableArray):
    return table if table.ensure_weight_tying or table.original is None else table.original


def is_adapter(x: Any) -> bool:
    """True for the leaves that `lorax.lora` introduces."""
    return isinstance(x, (LoraArray, TrainableArray))


def _dims(dimension_numbers):
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    return tuple(lhs_contract), tuple(rhs_contract), tuple(lhs_batch), tuple(rhs_batch)


def _unsupported(weight: LoraArray, what: str):
    return UnsupportedOpError(f"LoRA weight {weight.path!r} {weight.shape}: {what}")


def _frozen(w):
    """The base weight without a gradient. It may itself be an implicit array (an NF4-quantized
    weight: QLoRA); stop_gradient then applies to its arrays, and its own rules compute with it."""
    return jax.tree_util.tree_map(lax.stop_gradient, w)


def _dot(lhs, rhs, dimension_numbers, params):
    return quax.quaxify(lax.dot_general)(lhs, rhs, dimension_numbers, **params)


def _adapter_params(params: dict) -> dict:
    """The caller's dot_general options for the adapter's own products, which run in the adapter's
    dtype: a requested output dtype belongs to the base product (the sum is cast to it)."""
    return {**params, "preferred_element_type": None}


@quax.register(lax.dot_general_p)
def _dot_general_rhs(x: jax.Array | quax.ArrayValue, weight: LoraArray, *, dimension_numbers, **params):
    """x·W with W = w + s·a b: the base product plus s·((x·a)·b), never forming W."""
    if isinstance(x, LoraArray):
        raise _unsupported(weight, "a product of two LoRA weights has no factored rule")
    x = x.materialise() if isinstance(x, quax.ArrayValue) else x
    x_contract, w_contract, x_batch, w_batch = _dims(dimension_numbers)
    if weight.ndim != 2 or w_batch or len(w_contract) != 1:
        raise _unsupported(weight, f"dot_general with dimension_numbers={dimension_numbers} (expected a 2-D weight "
                           "contracted on one axis; stacked weights must be sliced, e.g. by lax.scan)")
    if w_contract == (1,):
        weight = weight.transposed()
    dense = _dot(x, _frozen(weight.w), ((x_contract, (0,)), ((), ())), params)
    params = _adapter_params(params)
    xa = lax.dot_general(weight.adapter_input(x), weight.a, ((x_contract, (0,)), ((), ())), **params)
    delta = lax.dot_general(xa, weight.b, (((xa.ndim - 1,), (0,)), ((), ())), **params)
    return weight.add_delta(dense, delta)


@quax.register(lax.dot_general_p)
def _dot_general_lhs(weight: LoraArray, x: jax.Array | quax.ArrayValue, *, dimension_numbers, **params):
    """W·x: the mirror image of the rule above (W's free axis comes first in the result)."""
    x = x.materialise() if isinstance(x, quax.ArrayValue) else x
    w_contract, x_contract, w_batch, x_batch = _dims(dimension_numbers)
    if weight.ndim != 2 or w_batch or len(w_contract) != 1:
        raise _unsupported(weight, f"dot_general with dimension_numbers={dimension_numbers} (expected a 2-D weight "
                           "contracted on one axis)")
    if w_contract == (0,):
        weight = weight.transposed()
    dense = _dot(_frozen(weight.w), x, (((1,), x_contract), ((), ())), params)
    params = _adapter_params(params)
    bx = lax.dot_general(weight.b, weight.adapter_input(x), (((1,), x_contract), ((), ())), **params)
    delta = lax.dot_general(weight.a, bx, (((1,), (0,)), ((), ())), **params)
    return weight.add_delta(dense, delta)


@quax.register(lax.dot_general_p)
def _dot_general_dora_rhs(x: jax.Array | quax.ArrayValue, weight: DoraArray, *, dimension_numbers, **params):
    """x·W' for a DoRA kernel: mns·(x·w) + mns·s·((x·a)·b) (see DoraArray); with dropout, peft's
    `x·w + (mns - 1)·(x̃·w) + mns·s·((x̃·a)·b)` for the dropped input x̃."""
    if isinstance(x, LoraArray):
        raise _unsupported(weight, "a product of two LoRA weights has no factored rule")
    x = x.materialise() if isinstance(x, quax.ArrayValue) else x
    x_contract, w_contract, x_batch, w_batch = _dims(dimension_numbers)
    if weight.ndim != 2 or w_batch or w_contract != (0,):
        raise _unsupported(weight, f"dot_general with dimension_numbers={dimension_numbers} on a DoRA weight (expected "
                           "x @ kernel: a 2-D (in, out) kernel contracted on its input axis)")
    numbers = ((x_contract, (0,)), ((), ()))
    dense = _dot(x, _frozen(weight.w), numbers, params)
    x_adapter = weight.adapter_input(x)
    adapter_params = _adapter_params(params)
    xa = lax.dot_general(x_adapter, weight.a, numbers, **adapter_params)
    delta = lax.dot_general(xa, weight.b, (((xa.ndim - 1,), (0,)), ((), ())), **adapter_params)
    mns = weight.magnitude_scale()
    dropped = weight.dropout_key is not None and weight.dropout_rate > 0.0
    dropped_dense = _dot(x_adapter.astype(x.dtype), _frozen(weight.w), numbers, params) if dropped else dense
    extra = (mns - 1) * dropped_dense + mns * weight.scale.astype(delta.dtype) * delta
    return (dense + extra).astype(dense.dtype)


@quax.register(lax.dot_general_p)
def _dot_general_dora_lhs(weight: DoraArray, x: jax.Array | quax.ArrayValue, *, dimension_numbers, **params):
    raise _unsupported(weight, "W @ x with a DoRA weight has no rule (DoRA kernels are used as x @ kernel)")


@quax.register(lax.gather_p)
def _gather_dora(table: DoraArray, indices: jax.Array | quax.ArrayValue, *, dimension_numbers, slice_sizes, **params):
    """A DoRA embedding lookup: the LoRA rows times mns, one factor per feature (the table's
    columns are normed over the vocabulary, as peft's DoraEmbeddingLayer does)."""
    lora_rows = _lora_rows(table, indices, dimension_numbers, slice_sizes, params)
    offset = dimension_numbers.offset_dims[0]
    mns = table.magnitude_scale().reshape([-1 if axis == offset else 1 for axis in range(lora_rows.ndim)])
    return (mns * lora_rows).astype(lora_rows.dtype)


@quax.register(lax.transpose_p)
def _transpose_dora(weight: DoraArray, *, permutation):
    if tuple(permutation) == tuple(range(weight.ndim)):
        return weight
    raise _unsupported(weight, f"transpose with permutation={permutation} of a DoRA weight (its magnitude belongs "
                       "to the output axis)")


@quax.register(lax.gather_p)
def _gather(table: LoraArray, indices: jax.Array | quax.ArrayValue, *, dimension_numbers, slice_sizes, **params):
    """Embedding lookup: rows of w plus s·(rows of a)·b (peft's Embedding adds no dropout)."""
    return _lora_rows(table, indices, dimension_numbers, slice_sizes, params)


def _lora_rows(table: LoraArray, indices, numbers, slice_sizes, params: dict) -> jax.Array:
    indices = indices.materialise() if isinstance(indices, quax.ArrayValue) else indices
    row_lookup = (
        table.ndim == 2
        and tuple(numbers.collapsed_slice_dims) == (0,)
        and tuple(numbers.start_index_map) == (0,)
        and not numbers.operand_batching_dims
        and tuple(slice_sizes) == (1, table.shape[1])
        and len(numbers.offset_dims) == 1
    )
    if not row_lookup:
        raise _unsupported(table, f"gather other than a row lookup (dimension_numbers={numbers})")
    rows = lax.gather(lax.stop_gradient(table.w), indices, numbers, slice_sizes, **params)
    a_rows = lax.gather(table.a, indices, numbers, (1, table.r), **params)
    offset = numbers.offset_dims[0]
    delta = jnp.moveaxis(jnp.moveaxis(a_rows, offset, -1) @ table.b, -1, offset)
    return table.add_delta(rows, delta)


@quax.register(ragged_dot_general_p)
def _ragged_dot(x: jax.Array | quax.ArrayValue, weight: ExpertLoraArray, group_sizes: jax.Array, *,
                ragged_dot_dimension_numbers, **params):
    """`jax.lax.ragged_dot(x, W, group_sizes)` with each expert's W_e = w_e + s·a_e b_e: rows
    (m, in) grouped by expert, the base product plus s·((x·a_e)·b_e), in two small grouped products."""
    x = x.materialise() if isinstance(x, quax.ArrayValue) else x
    if weight.ndim != 3 or x.ndim != 2 or ragged_dot_dimension_numbers != RAGGED_DOT_NUMBERS:
        raise _unsupported(weight, f"ragged_dot with {ragged_dot_dimension_numbers} on {x.shape} rows (expected "
                           "jax.lax.ragged_dot's own: rows (m, in) grouped by expert; stacked layers sliced by lax.scan)")

    def product(lhs, rhs, params):
        return ragged_dot_general_p.bind(lhs, rhs, group_sizes, ragged_dot_dimension_numbers=RAGGED_DOT_NUMBERS,
                                         **params)

    # quaxify: an implicit base (the experts stored in NF4: QLoRA) answers with its own rule.
    dense = quax.quaxify(product)(x, _frozen(weight.w), params)
    params = _adapter_params(params)
    xa = product(weight.adapter_input(x), weight.a, params)
    return weight.add_delta(dense, product(xa, weight.b, params))


@quax.register(lax.transpose_p)
def _transpose(weight: LoraArray, *, permutation):
    if tuple(permutation) == (1, 0):
        return weight.transposed()
    if tuple(permutation) == tuple(range(weight.ndim)):
        return weight
    raise _unsupported(weight, f"transpose with permutation={permutation}")


@quax.register(lax.convert_element_type_p)
def _convert(weight: LoraArray, *, new_dtype, **params):
    """Casting the weight casts the frozen base only: a model computing in bf16 uses a bf16 base,
    and the adapters keep their own dtype (fp32 adapters on a bf16 model, as peft's
    autocast_adapter_dtype keeps them); their output is cast when it is added."""
    return eqx.tree_at(lambda l: l.w, weight, weight.w.astype(new_dtype))


@quax.register(lax.copy_p)
def _copy(weight: LoraArray):
    return weight
