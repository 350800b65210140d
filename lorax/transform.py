"""LoRA as a transform of a parameter tree.

    params ──lora()──▶ params' (targeted kernels are LoraArray(w, a, b); the model code is unchanged)
    params' ──merge()──▶ plain arrays again, w + scale·a@b

Nothing here knows about models: a tree of arrays goes in, a tree comes out, and
`lorax.apply` runs any function of that tree with the implicit arrays dispatched.

>>> import jax, jax.numpy as jnp
>>> from lorax.config import LoraConfig
>>> params = {"seq": {0: {"kernel": jnp.ones((20, 2000)), "bias": jnp.zeros(2000)}}}
>>> adapted = lora(params, LoraConfig(r=3, target_modules=["seq.0"]), key=jax.random.key(0))
>>> count_parameters(adapted)
(6060, 48060)
"""

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from lorax.arrays import DoraArray, ExpertLoraArray, LoraArray, TrainableArray, is_adapter
from lorax.config import LoraConfig, is_decomposition
from lorax.decomposition import decompose_leaf
from lorax.errors import LoraConfigError, LoraError, listing
from lorax.nf4 import QUANT_TYPES, Nf4Array, QuantConfig, quantize_like
from lorax.targets import (BIAS_LEAF, EMBEDDING_LEAF, EXPERTS, PEFT_EMBEDDING_LAYER_NAMES, Target, dotted, is_value, modules,
                           saved_module_paths, select_targets, with_task_modules, with_tied_head)


def _init_factors(kind: str, r: int, w_shape: tuple, init: bool | str, key: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """A (in, r) and B (r, out) initialised like peft's LoraLayer.reset_lora_parameters.

    Linear: A is kaiming-uniform with a=√5 (uniform in ±1/√in, torch's nn.Linear default)
    or N(0, 1/r²) for "gaussian"; B is zero, so the adapted model equals the base at init.
    "orthogonal" (peft's orthogonal_init): A = G_a·Q_odd/10, B = Q_evenᵀ·G_b/10 with G Gaussian and
    Q_odd, Q_even the odd and even rows of a random orthogonal r×r matrix, so both factors are
    non-zero but a·b = G_a·Q_odd·Q_evenᵀ·G_b/100 = 0 (the rows of Q are orthonormal).
    Embedding: A zero, B standard normal (peft's choice for lora_embedding_A/B).
    init=False: both random, so the update is non-zero (for tests).
    """
    d_in, d_out = w_shape
    key_a, key_b = jax.random.split(key)
    a_shape, b_shape = (d_in, r), (r, d_out)
    if kind == "embedding":
        a = jax.random.normal(key_a, a_shape, dtype) if init is False else jnp.zeros(a_shape, dtype)
        return a, jax.random.normal(key_b, b_shape, dtype)
    if init == "orthogonal":
        key_q, key_a, key_b = jax.random.split(key, 3)
        q = jnp.linalg.qr(jax.random.normal(key_q, (r, r), jnp.float32))[0]
        a = jax.random.normal(key_a, (d_in, r // 2), jnp.float32) @ q[0::2] / 10.0
        b = q[1::2].T @ jax.random.normal(key_b, (r // 2, d_out), jnp.float32) / 10.0
        return a.astype(dtype), b.astype(dtype)
    if init == "gaussian":
        a = jax.random.normal(key_a, a_shape, dtype) / r
    else:
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(key_a, a_shape, dtype, -bound, bound)
    if init is False:
        # torch's default nn.Linear(r, out) init for lora_B: uniform in ±1/√r.
        bound = 1.0 / math.sqrt(r)
        return a, jax.random.uniform(key_b, b_shape, dtype, -bound, bound)
    return a, jnp.zeros(b_shape, dtype)


def _lora_array(w: jax.Array, targets: list[Target], config: LoraConfig, key: jax.Array, dtype,
                decomposed: dict | None = None, **fields) -> LoraArray:
    """One LoraArray for a stored kernel: a single module, or the adapted layers of a stack.

    A stack gets a and b padded to its largest rank (zeros: they add nothing and receive no
    gradient) and a per-layer scale that is 0 for layers the config leaves out. With use_dora,
    a DoraArray. `decomposed`: each target's (a, b) from `decompose_leaf` (PiSSA/OLoRA), keyed
    by layer, instead of the random init."""
    first = targets[0]
    leaf = _factors(w, targets, config, key, dtype, decomposed or {}, **fields)
    if not config.use_dora:
        return leaf
    if leaf.ensure_weight_tying:
        raise LoraConfigError(f"use_dora=True with ensure_weight_tying=True: the tied output head of {first.path!r} "
                              "cannot share a DoRA embedding yet; use ensure_weight_tying=False")
    return DoraArray.from_lora(leaf)


def _factors(w: jax.Array, targets: list[Target], config: LoraConfig, key: jax.Array, dtype, decomposed: dict,
             **fields) -> LoraArray:
    init = config.init_lora_weights
    first = targets[0]
    # A mixture-of-experts parameter (..., experts, in, out) gets one pair of factors per expert.
    experts = w.shape[-3] if first.kind == EXPERTS else None

    def factors(t: Target, shape: tuple, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        if t.layer in decomposed:
            a, b = decomposed[t.layer]
            return a.astype(dtype), b.astype(dtype)
        if experts:
            return jax.vmap(lambda k: _init_factors("linear", t.r, shape, init, k, dtype))(jax.random.split(key, experts))
        return _init_factors(t.kind, t.r, shape, init, key, dtype)

    array = ExpertLoraArray if experts else LoraArray
    d_in, d_out = w.shape[-2:]
    if first.layer is None:
        a, b = factors(first, (d_in, d_out), key)
        return array(w, a, b, scale=config.scale_for(first.r, first.lora_alpha), path=first.path, **fields)
    layers, middle = w.shape[0], w.shape[1:-2]
    rank = max(t.r for t in targets)
    a, b = jnp.zeros((layers, *middle, d_in, rank), dtype), jnp.zeros((layers, *middle, rank, d_out), dtype)
    scale, ranks = [0.0] * layers, [0] * layers
    for t in targets:
        a_t, b_t = factors(t, (d_in, d_out), jax.random.fold_in(key, t.layer))
        a, b = a.at[t.layer, ..., : t.r].set(a_t), b.at[t.layer, ..., : t.r, :].set(b_t)
        scale[t.layer], ranks[t.layer] = config.scale_for(t.r, t.lora_alpha), t.r
    return array(w, a, b, scale=jnp.asarray(scale, jnp.float32), path=first.stored_path, ranks=tuple(ranks), **fields)


def _check_parameter_targets(config: LoraConfig, targets: list[Target]) -> None:
    """What peft's ParamWrapper (its LoRA on a bare parameter: experts, routers) refuses, refused here too."""
    reached = [t.path for t in targets if t.parameter]
    if not reached:
        return
    problem = ("use_dora=True" if config.use_dora else f"lora_dropout={config.lora_dropout}" if config.lora_dropout
               else f"init_lora_weights={config.init_lora_weights!r}" if config.init_lora_weights not in
               (True, False, "gaussian") else None)
    if problem:
        raise LoraConfigError(
            f"{problem} on the experts and routers of a mixture-of-experts model ({listing(reached, 3)}): peft adapts "
            "these as target_parameters, which do not support it; target the other modules only (e.g. the "
            "attention projections by name) or drop the option")


def _adapter_dtype(w_dtype, adapter_dtype):
    """peft keeps adapters in fp32 when the base is bf16/fp16 (autocast_adapter_dtype=True)."""
    if adapter_dtype is not None:
        return jnp.dtype(adapter_dtype)
    return jnp.promote_types(w_dtype, jnp.float32)


def lora(
    params: Any,
    config: LoraConfig,
    *,
    key: jax.Array,
    output_head: str | None = None,
    moe_names: str | None = None,
    adapter_dtype=None,
    allow_materialize: bool = False,
    quantize: str | QuantConfig | None = None,
) -> Any:
    """Add LoRA adapters to the modules that `config` targets.

    Args:
        params: a parameter tree of arrays (e.g. from `lorax.split(model)`).
        config: which modules to adapt and how (`LoraConfig`, peft's fields).
        key: PRNG key for A (and B with init_lora_weights=False, and pissa_niter_<n>'s iterations).
        output_head: module path of the output head that "all-linear" leaves out ("lm_head").
        moe_names: a mixture-of-experts model's family for peft's old expert names ("mixtral" or
            "qwen2_moe"; `model.moe_names` of an `interop.from_pretrained` model): see `select_targets`.
        adapter_dtype: dtype of A and B; default fp32 (or the base dtype if wider).
        allow_materialize: let operations without a factored rule form W + s·A·B.
        quantize: QLoRA: "nf4" or "fp4" (blocksize 64, no double quantization), or a
            `lorax.nf4.QuantConfig`, stores the frozen base of every adapted linear kernel in 4
            bits (an `Nf4Array`, quantized as torch's (out, in) weight, as bitsandbytes does), and
            of every adapted mixture-of-experts parameter (each expert's matrix quantized alike).
            Embeddings, norms, the `output_head` and untargeted weights keep their dtype. The
            4-bit codes are integers: differentiate the trainable half of `lorax.partition`.

    Returns:
        The same tree with each targeted weight a `LoraArray`, trained biases and
        modules_to_save leaves `TrainableArray`s, and every other leaf unchanged. With
        init_lora_weights "pissa", "pissa_niter_<n>" or "olora" the LoraArrays' bases are the
        residuals of their decomposition (lorax/decomposition.py), quantized after it.

    Example:
        >>> params = lora(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), key=jax.random.key(0))
        >>> qlora = lora(base, config, key=key, quantize=lorax.nf4.QuantConfig("nf4", double_quant=True))
    """
    if any(is_adapter(leaf) for leaf in jax.tree_util.tree_leaves(params, is_leaf=is_adapter)):
        raise LoraError("params already hold adapters; call lorax.merge(params) first to add a second LoRA on top")
    all_modules = modules(params)
    config = with_tied_head(with_task_modules(config, all_modules), all_modules, output_head)
    targets = select_targets(config, params, output_head=output_head, moe_names=moe_names)
    by_leaf: dict[str, list[Target]] = {}
    for t in targets:
        by_leaf.setdefault(t.stored_leaf, []).append(t)
    adapted = {t.stored_path for t in targets}
    _check_lora_only_bias(config, targets, all_modules)
    _check_parameter_targets(config, targets)
    saved = saved_module_paths(config, params)
    keys = dict(zip(by_leaf, jax.random.split(key, len(by_leaf))))
    quant = _quant_config(quantize)
    # PiSSA/OLoRA decompose every adapted linear weight (embeddings keep the default init, as in
    # peft): an SVD or QR per module, minutes on a large model, hence the bar.
    decomposing = is_decomposition(config.init_lora_weights)
    bar = tqdm(total=sum(t.kind == "linear" for t in targets), desc=f"{config.init_lora_weights} init",
               unit="module", disable=not decomposing, leave=False)

    def transform(keypath, leaf):
        path = dotted(keypath)
        module_path, _, leaf_name = path.rpartition(".")
        # peft ties adapters to a tied output head only for modules with these names.
        tie = config.ensure_weight_tying and module_path.rsplit(".", 1)[-1] in PEFT_EMBEDDING_LAYER_NAMES
        if path in by_leaf:
            group = by_leaf[path]
            base, decomposed = leaf, None
            if decomposing and group[0].kind == "linear":
                # Before quantizing: the residual is what gets stored in 4 bits (QPiSSA).
                base, decomposed = decompose_leaf(leaf, group, config, keys[path], bar)
            if quant is not None and group[0].kind in ("linear", EXPERTS) and module_path != output_head \
                    and not isinstance(leaf, Nf4Array):  # a pre-quantized base stays as it was
                base = quant.quantize_kernel(base)
            return _lora_array(
                base, group, config, keys[path], _adapter_dtype(leaf.dtype, adapter_dtype), decomposed,
                dropout_rate=config.lora_dropout if group[0].kind == "linear" else 0.0,
                allow_materialize=allow_materialize, ensure_weight_tying=tie,
            )
        if any(module_path == p or module_path.startswith(p + ".") for p in saved):
            return TrainableArray(leaf, original=leaf, ensure_weight_tying=tie)
        if leaf_name == BIAS_LEAF and (config.bias == "all" or (config.bias == "lora_only" and module_path in adapted)):
            return TrainableArray(leaf)
        return leaf

    # Implicit arrays (a pre-quantized Nf4Array kernel) are leaves, not trees to walk into.
    with bar:
        return jax.tree_util.tree_map_with_path(transform, params, is_leaf=is_value)


def _quant_config(quantize: str | QuantConfig | None) -> QuantConfig | None:
    if quantize is None or isinstance(quantize, QuantConfig):
        return quantize
    if quantize in QUANT_TYPES:
        return QuantConfig(quant_type=quantize)
    raise LoraConfigError(
        f"quantize must be None, one of {QUANT_TYPES} or a lorax.nf4.QuantConfig, got {quantize!r}"
    )


def _check_lora_only_bias(config: LoraConfig, targets: list[Target], all_modules) -> None:
    """bias="lora_only" trains the biases of adapted modules; a stacked bias is one array, so
    either every layer of the stack is adapted or the request cannot be met exactly."""
    if config.bias != "lora_only":
        return
    layers: dict[str, set] = {}
    for t in targets:
        if t.layer is not None and t.kind != EXPERTS and BIAS_LEAF in all_modules[t.path].leaves:
            layers.setdefault(t.stored_path, set()).add(t.layer)
    for stored, chosen in layers.items():
        count = all_modules[next(t.path for t in targets if t.stored_path == stored)].leaves[BIAS_LEAF].shape[0]
        if len(chosen) != count:
            raise LoraConfigError(
                f'bias="lora_only" with some layers of {stored!r} adapted ({sorted(chosen)} of {count}) is not '
                'supported: its bias is stored for all layers at once. Use bias="none" or adapt every layer'
            )


def _map_adapters(fn, params: Any) -> Any:
    """Apply fn to every LoraArray / TrainableArray leaf; other leaves pass through."""
    return jax.tree_util.tree_map(lambda x: fn(x) if is_adapter(x) else x, params, is_leaf=is_adapter)


def merge(params: Any, *, requantize: bool = False) -> Any:
    """Fold every adapter into its weight: `w + scale·a@b`; modules_to_save copies replace
    their originals (peft's merge_and_unload). Returns a tree of plain arrays; a 4-bit base
    (QLoRA) is dequantized first, in its dtype, and so is a 4-bit weight without an adapter (a
    bitsandbytes 4-bit checkpoint's: the tree is dense, ready for `interop.save_merged`).

    Args:
        params: a LoRA tree.
        requantize: quantize merged 4-bit bases again, with their own type, blocksize and
            double quantization, and return them as `Nf4Array`s: what peft's merge does on a
            bitsandbytes 4-bit model (dequantize, add the delta, quantize). Rounding to 4 bits
            again loses some of the update; the default keeps the merged weights exact. 4-bit
            weights without an adapter then stay as they are.

    Example:
        >>> merged = lorax.merge(params)   # same outputs, no adapter cost at inference
        >>> qlora = lorax.lora(base, config, key=key, quantize="nf4")
        >>> small = lorax.merge(qlora, requantize=True)   # still 4-bit
        >>> type(small["model"]["layers"]["*"]["self_attn"]["q_proj"]["kernel"]).__name__
        'Nf4Array'
    """
    def merged(keypath, leaf):
        if isinstance(leaf, LoraArray):
            # peft's Embedding rounds the update to the table's dtype before adding it; its Linear adds
            # it in fp32 and rounds once (LoraArray.merged). DoRA has its own merged().
            embedding = dotted(keypath).endswith(f".{EMBEDDING_LEAF}") and type(leaf) is LoraArray
            weight = leaf.materialise() if embedding else leaf.merged()
            return quantize_like(weight, leaf.w) if requantize and isinstance(leaf.w, Nf4Array) else weight
        if isinstance(leaf, Nf4Array):  # a 4-bit weight without adapter (a bitsandbytes 4-bit checkpoint's)
            return leaf if requantize else leaf.materialise()
        if isinstance(leaf, TrainableArray):
            return leaf.value
        return leaf

    is_merged = lambda x: is_adapter(x) or isinstance(x, Nf4Array)  # noqa: E731
    return jax.tree_util.tree_map_with_path(merged, params, is_leaf=is_merged)


def unmerge(merged: Any, adapted: Any) -> Any:
    """Take the adapters of `adapted` back out of `merged` weights: `w = merged - scale·a@b`.

    Args:
        merged: plain arrays, as returned by `merge(adapted)` (or trained further).
        adapted: the LoRA tree whose A/B (and modules_to_save originals) to separate out.

    Returns:
        A LoRA tree like `adapted` whose base weights come from `merged` (4-bit bases are
        quantized again, the way they were).
    """
    def separate(merged_leaf, leaf):
        if isinstance(leaf, LoraArray):
            base = leaf.unmerged(merged_leaf)
            if isinstance(leaf.w, Nf4Array):
                base = quantize_like(base, leaf.w)
            return eqx.tree_at(lambda l: l.w, leaf, base)
        if isinstance(leaf, TrainableArray):
            return eqx.tree_at(lambda l: l.value, leaf, merged_leaf)
        return merged_leaf

    return jax.tree_util.tree_map(separate, merged, adapted, is_leaf=is_adapter)


def disable_adapters(params: Any) -> Any:
    """The base model's tree: LoRA weights become their frozen `w`, modules_to_save copies their
    originals (peft's `disable_adapter()`); trained biases stay as trained, as in peft.

    Example:
        >>> base_out = lorax.apply(graphdef, lorax.disable_adapters(params), input_ids)
    """
    def base(leaf):
        if isinstance(leaf, LoraArray):
            return leaf.w
        return leaf.value if leaf.original is None else leaf.original

    return _map_adapters(base, params)


def trainable_mask(params: Any) -> Any:
    """A tree like `params` with True on trained arrays (A, B, trained biases and copies) and
    False elsewhere. Works on partitioned trees too (None leaves stay None).

    Example:
        >>> tx = optax.masked(optax.adamw(1e-3), lorax.trainable_mask(params))
    """
    def mask(leaf):
        if is_adapter(leaf):
            fields = type(leaf).trainable_fields
            return jax.tree_util.tree_map_with_path(lambda path, _: path[0].name in fields, leaf)
        return jax.tree_util.tree_map(lambda _: False, leaf)

    return jax.tree_util.tree_map(mask, params, is_leaf=is_adapter)


def partition(params: Any) -> tuple[Any, Any]:
    """Split into (trainable, frozen): two trees of the same structure with None where the
    other one has the array. Differentiate and optimize `trainable` only.

    Example:
        >>> trainable, frozen = lorax.partition(params)
        >>> def loss(params):
        ...     return lorax.apply(graphdef, params, input_ids).sum()
        >>> grads = jax.grad(lambda t: loss(lorax.combine(t, frozen)))(trainable)
    """
    return eqx.partition(params, trainable_mask(params))


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of `partition`."""
    return eqx.combine(trainable, frozen)


def trainable(params: Any) -> Any:
    """The trainable half of `partition(params)`: A/B, trained biases and modules_to_save copies,
    None elsewhere. What a checkpoint of the training needs besides the frozen base.

    Example:
        >>> adapters = lorax.trainable(params)
        >>> sum(x.size for x in jax.tree_util.tree_leaves(adapters)) == lorax.count_parameters(params)[0]
        True
    """
    return partition(params)[0]


def count_parameters(params: Any) -> tuple[int, int]:
    """(trainable, all) parameter counts, counted as peft counts them: A and B are added to the
    base, a modules_to_save copy counts beside its original, and a 4-bit base counts twice its
    packed bytes (the original size; peft's rule for bitsandbytes' Params4bit).

    Example:
        >>> lorax.count_parameters(params)   # r=8 on q_proj and v_proj of a 2-layer, hidden-32 Llama
        (2048, 26784)
    """
    def base_size(w) -> int:
        return 2 * int(w.packed.size) if isinstance(w, Nf4Array) else int(w.size)

    trainable = total = 0
    for leaf in jax.tree_util.tree_leaves(params, is_leaf=lambda x: is_adapter(x) or isinstance(x, Nf4Array)):
        if isinstance(leaf, LoraArray):
            total += base_size(leaf.w) + leaf.adapter_size()
            trainable += leaf.adapter_size()
        elif isinstance(leaf, Nf4Array):
            total += base_size(leaf)
        elif isinstance(leaf, TrainableArray):
            total += int(leaf.value.size) + (0 if leaf.original is None else int(leaf.original.size))
            trainable += int(leaf.value.size)
        elif hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.number):  # not PRNG keys
            total += int(leaf.size)
    return trainable, total


def print_trainable_parameters(params: Any) -> None:
    """Print peft's line: `trainable params: 12,660 || all params: 455,262 || trainable%: 2.7808`."""
    trainable, total = count_parameters(params)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")
