"""peft's adapter format, both ways: what we train loads in `PeftModel.from_pretrained`, and an
adapter saved by peft loads back as LoraArray leaves.

A peft LoRA adapter is a folder with `adapter_config.json` (peft's LoraConfig fields plus
`peft_type: "LORA"`) and `adapter_model.safetensors`, whose keys are
`base_model.model.<module path>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r)
(`lora_embedding_A` (r, num_embeddings) / `lora_embedding_B` (dim, r) for embeddings),
modules_to_save copies as `base_model.model.<module path>.weight`, trained biases as
`...<module path>.base_layer.bias` (adapted modules) or `...<module path>.bias`, and DoRA's
magnitudes as `...<module path>.lora_magnitude_vector` (out,). Stacked layers are written one
module per layer, as torch names them. A PiSSA/OLoRA adapter is written as it is (its config
makes peft recompute the residual base), or with `initial=` as a plain LoRA of rank 2r.

>>> folder = getfixture("tmp_path") / "adapter"
>>> interop.save_adapter(folder, params, config)            # PeftModel.from_pretrained(torch_model, folder)
>>> sorted(path.name for path in folder.iterdir())
['adapter_config.json', 'adapter_model.safetensors']
>>> params = interop.load_adapter(folder, base)             # also a folder written by peft
"""

import dataclasses
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from interop.checkpoint import (CheckpointError, atomic_write, local_folder, read_json_object, read_safetensors,
                                read_torch_bin)
from lorax.arrays import DoraArray, ExpertLoraArray, LoraArray, TrainableArray, is_adapter
from lorax.config import LoraConfig
from lorax.errors import LoraConfigError, LoraError, TargetError, listing
from lorax.targets import (MOE_OLD_NAMES, STACK, dotted, expert_modules, leaves_by_path, modules,
                           with_tied_head)
from lorax.transform import disable_adapters, lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# peft's file with safe_serialization=False; read with torch.load(weights_only=True) only.
ADAPTER_BIN = "adapter_model.bin"
PREFIX = "base_model.model."
# Modules whose torch weight is (in, out) already: GPT-2's Conv1D layers.
CONV1D_MODULES = frozenset({"c_attn", "c_proj", "c_fc"})
# The output head that tie_word_embeddings ties to the input embeddings.
TIED_HEAD = "lm_head"
# Modules of a vision-language model that its text-only load leaves out (interop.hf.VISION_PARTS).
VISION_MODULES = r"\.(vision_tower|multi_modal_projector)\."
# DoRA's magnitude vector (out,) of an adapted module: `<module>.lora_magnitude_vector`.
MAGNITUDE = "lora_magnitude_vector"
# peft fields that describe bookkeeping or features left at their defaults; anything else
# unknown to LoraConfig is refused by name.
PEFT_BOOKKEEPING = {
    "peft_type": "LORA", "base_model_name_or_path": None, "revision": None, "inference_mode": True,
    "auto_mapping": None, "peft_version": None, "megatron_core": "megatron.core", "qalora_group_size": 16,
    "lora_bias": False, "layer_replication": None, "megatron_config": None, "loftq_config": {},
    "eva_config": None, "corda_config": None, "trainable_token_indices": None,
    "use_qalora": False, "alora_invocation_tokens": None, "arrow_config": None,
    "kasa_config": None, "lora_ga_config": None, "monteclora_config": None, "use_bdlora": None,
    "velora_config": None,
}


def _torch_name(module: str, leaf: str) -> tuple[str, bool]:
    """(peft tensor name suffix, transpose?) for one of our leaves."""
    if leaf == "kernel":
        return "weight", module.rsplit(".", 1)[-1] not in CONV1D_MODULES
    return ("weight" if leaf in ("embedding", "scale") else leaf), False


def _adapted_modules(leaf: LoraArray) -> list[tuple[str, int | None]]:
    """(module path, layer) per adapted module of a LoRA leaf; a stack gives one per adapted layer."""
    if leaf.ranks is None:
        return [(leaf.path, None)]
    return [(leaf.path.replace(STACK, str(i)), i) for i, r in enumerate(leaf.ranks) if r]


def _module_factors(leaf: LoraArray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(module path, a (..., in, r), b (..., r, out)) per adapted module, the padding of stacked ranks removed."""
    a, b = np.asarray(leaf.a), np.asarray(leaf.b)
    return [(path, a, b) if layer is None else
            (path, a[layer, ..., :leaf.ranks[layer]], b[layer, ..., :leaf.ranks[layer], :])
            for path, layer in _adapted_modules(leaf)]


# transformers' order of an experts module's parameters. peft wraps each adapted one in a
# ParamWrapper around the module, in this order, so the first adapted sits innermost: its tensors
# are `experts.base_layer.lora_A.weight` when the second is adapted too (`experts.lora_A.weight`).
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


def _expert_prefixes(params: Any) -> dict[str, str]:
    """Per adapted expert parameter (`model.layers.0.mlp.experts.down_proj`), the module path under
    which peft files its factors (`model.layers.0.mlp.experts[.base_layer...]`)."""
    adapted: dict[str, list[str]] = {}
    for _, leaf in leaves_by_path(params):
        if isinstance(leaf, ExpertLoraArray):
            for path, _ in _adapted_modules(leaf):
                module, _, name = path.rpartition(".")
                adapted.setdefault(module, []).append(name)
    prefixes = {}
    for module, names in adapted.items():
        ordered = sorted(names, key=lambda n: EXPERT_PARAMETERS.index(n) if n in EXPERT_PARAMETERS else len(names))
        for i, name in enumerate(ordered):
            prefixes[f"{module}.{name}"] = module + ".base_layer" * (len(ordered) - 1 - i)
    return prefixes


def _to_file(leaf: LoraArray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Our a (in, r), b (r, out) as peft's lora_A (r, in), lora_B (out, r); for experts, a (experts,
    in, r), b (experts, r, out) as ParamWrapper's lora_A (experts·r, in), rows expert by expert, and
    lora_B (out, r·experts), columns rank by rank."""
    if not isinstance(leaf, ExpertLoraArray):
        return a.T, b.T
    experts, d_in, r = a.shape
    return a.transpose(0, 2, 1).reshape(experts * r, d_in), b.transpose(2, 1, 0).reshape(b.shape[2], r * experts)


def _from_file(leaf: LoraArray, a_file: np.ndarray, b_file: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of `_to_file`."""
    if not isinstance(leaf, ExpertLoraArray):
        return a_file.T, b_file.T
    experts = leaf.w.shape[-3]
    r = a_file.shape[0] // experts
    return (a_file.reshape(experts, r, -1).transpose(0, 2, 1),
            b_file.reshape(b_file.shape[0], r, experts).transpose(2, 1, 0))


def adapter_state(params: Any) -> dict[str, np.ndarray]:
    """The tensors peft saves for these params, by peft's names, in their dtypes."""
    tensors = {}
    lora_modules = set()
    experts = _expert_prefixes(params)
    for path, leaf in leaves_by_path(params):
        if isinstance(leaf, LoraArray):
            embedding = path.endswith(".embedding")
            for path, a, b in _module_factors(leaf):
                lora_modules.add(path)
                names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
                a_file, b_file = _to_file(leaf, a, b)
                tensors[f"{PREFIX}{experts.get(path, path)}.{names[0]}"] = np.ascontiguousarray(a_file)
                tensors[f"{PREFIX}{experts.get(path, path)}.{names[1]}"] = np.ascontiguousarray(b_file)
            if isinstance(leaf, DoraArray):
                m = np.asarray(leaf.m)
                for path, layer in _adapted_modules(leaf):
                    tensors[f"{PREFIX}{path}.{MAGNITUDE}"] = np.ascontiguousarray(m if layer is None else m[layer])
    for path, leaf in leaves_by_path(params):
        if isinstance(leaf, TrainableArray):
            value = np.asarray(leaf.value)
            for name, layer, transpose in _trained_names(path, value.shape, lora_modules):
                one = value if layer is None else value[layer]
                tensors[name] = np.ascontiguousarray(one.T if transpose else one)
    return tensors


def _trained_names(path: str, shape: tuple[int, ...], lora_modules: set[str]) -> list[tuple[str, int | None, bool]]:
    """peft's tensor names for a trained leaf (a bias, a modules_to_save copy) at our dotted `path`,
    as (name, layer, transpose?): one per layer when the leaf is stacked (torch has a module per
    layer), and under `base_layer` where the module (that layer's) has a LoRA adapter."""
    module, _, leaf = path.rpartition(".")
    torch_leaf, transpose = _torch_name(module, leaf)
    stacked = STACK in module.split(".")
    per_layer = [(module.replace(STACK, str(i)), i) for i in range(shape[0])] if stacked else [(module, None)]
    return [(f"{PREFIX}{m}.base_layer.{torch_leaf}" if m in lora_modules else f"{PREFIX}{m}.{torch_leaf}", i, transpose)
            for m, i in per_layer]


def tied_head_state(params: Any, config: LoraConfig) -> dict[str, np.ndarray]:
    """The tensors peft writes for an output head tied to the input embeddings when
    `ensure_weight_tying=True`: the head's adapter is the embeddings' (lora_A = lora_embedding_Bᵀ,
    lora_B = lora_embedding_Aᵀ), its modules_to_save copy is the embeddings' copy. Empty when the
    config does not tie, or the model has a head of its own (no tie)."""
    if not config.ensure_weight_tying or TIED_HEAD in modules(params):
        return {}

    def leaf_ties(leaf):
        return isinstance(leaf, (LoraArray, TrainableArray)) and leaf.ensure_weight_tying

    tensors = {}
    for path, leaf in leaves_by_path(params):
        if not path.endswith(".embedding") or not leaf_ties(leaf):
            continue
        if isinstance(leaf, LoraArray):
            tensors[f"{PREFIX}{TIED_HEAD}.lora_A.weight"] = np.ascontiguousarray(np.asarray(leaf.b))
            tensors[f"{PREFIX}{TIED_HEAD}.lora_B.weight"] = np.ascontiguousarray(np.asarray(leaf.a))
        elif isinstance(leaf, TrainableArray):
            tensors[f"{PREFIX}{TIED_HEAD}.weight"] = np.asarray(leaf.value)
    return tensors


def _embedding_bases(params: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
    """peft's name for the base weight of each adapted embedding, and of an adapted `lm_head`
    (peft saves them beside the adapter: save_embedding_layers="auto" covers its
    EMBEDDING_LAYER_NAMES) -> (our dotted leaf path, the tensor's shape in the file: a head's is
    torch's (out, in))."""
    bases = {}
    for path, leaf in leaves_by_path(params):
        if not isinstance(leaf, LoraArray) or leaf.ranks is not None or not isinstance(leaf.w, jax.Array):
            continue
        if path.endswith(".embedding"):
            bases[f"{PREFIX}{leaf.path}.base_layer.weight"] = (path, leaf.w.shape)
        elif path.endswith(".kernel") and leaf.path.rsplit(".", 1)[-1] == "lm_head":
            bases[f"{PREFIX}{leaf.path}.base_layer.weight"] = (path, leaf.w.shape[::-1])
    return bases


def adapter_config(config: LoraConfig, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json's content: our config's fields plus what peft needs to load it."""
    fields = config.to_dict()
    if not isinstance(fields["target_modules"], str):
        fields["target_modules"] = sorted(fields["target_modules"])
    return {**PEFT_BOOKKEEPING, **fields, "base_model_name_or_path": base_model_name_or_path, "inference_mode": True}


def _safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    # bfloat16 arrays (ml_dtypes) are written as BF16.
    return save({name: np.ascontiguousarray(value) for name, value in tensors.items()}, metadata={"format": "pt"})


def as_plain_lora(params: Any, initial: Any, config: LoraConfig) -> tuple[Any, LoraConfig]:
    """A PiSSA/OLoRA adapter as a plain LoRA adapter for the *original* base weight (peft's
    `path_initial_model_for_weight_conversion`): the trained update on the residual,
    W_res + s·B·A = W + s·(B·A - B₀·A₀), is the rank-2r adapter A' = [A; A₀], B' = [B, -B₀] on W.
    The config doubles r and lora_alpha (√2·lora_alpha with rsLoRA) and the patterns' values, so
    every scale stays, and its init is plain LoRA's.

    Args:
        params: the trained tree. initial: the tree `lorax.lora` returned, before training.
        config: the config both were made with.

    Returns:
        (params holding the rank-2r factors, the matching config): only their adapters mean
        anything (the bases are still the residuals); give both to `adapter_state`/`save_adapter`.
    """
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise LoraError("converting to plain LoRA (initial=...) cannot keep the scales with use_rslora and "
                        "rank_pattern/alpha_pattern (peft refuses it too)")
    initial_leaves = {path: leaf for path, leaf in leaves_by_path(initial) if isinstance(leaf, LoraArray)}

    def convert(keypath, leaf):
        if not isinstance(leaf, LoraArray):
            return leaf
        path = dotted(keypath)
        start = initial_leaves.get(path)
        if start is None or start.a.shape != leaf.a.shape or start.b.shape != leaf.b.shape or start.ranks != leaf.ranks:
            raise LoraError(f"initial params do not match the trained ones at {path!r}: pass the tree that "
                            "lorax.lora returned for these params, before training")
        # On the host, in numpy: a few small arrays per module, assembled once for a file.
        a, b = np.asarray(leaf.a), np.asarray(leaf.b)
        a0, b0 = np.asarray(start.a).astype(a.dtype), np.asarray(start.b).astype(b.dtype)
        if leaf.ranks is None:
            return dataclasses.replace(leaf, a=np.concatenate([a, a0], -1), b=np.concatenate([b, -b0], -2))
        # A stack pads every layer to its largest rank: each layer's 2r columns go first.
        layers, d_in, rank = a.shape
        a2, b2 = np.zeros((layers, d_in, 2 * rank), a.dtype), np.zeros((layers, 2 * rank, b.shape[-1]), b.dtype)
        for i, r in enumerate(leaf.ranks):
            a2[i, :, :2 * r] = np.concatenate([a[i, :, :r], a0[i, :, :r]], -1)
            b2[i, :2 * r] = np.concatenate([b[i, :r], -b0[i, :r]], -2)
        return dataclasses.replace(leaf, a=a2, b=b2, ranks=tuple(2 * r for r in leaf.ranks))

    converted = jax.tree_util.tree_map_with_path(convert, params, is_leaf=is_adapter)
    alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
    return converted, dataclasses.replace(
        config, r=2 * config.r, lora_alpha=alpha, init_lora_weights=True,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
    )


def _adapter_layout(params: Any) -> dict[str, tuple]:
    """What an adapter file records of each adapted or trained leaf: its kind and shapes, its
    layers' ranks, and its scale (lora_alpha / r)."""
    layout = {}
    for path, leaf in leaves_by_path(params):
        if isinstance(leaf, LoraArray):
            layout[path] = (type(leaf).__name__, tuple(leaf.a.shape), tuple(leaf.b.shape), leaf.ranks)
        elif isinstance(leaf, TrainableArray):
            layout[path] = ("trained", tuple(leaf.value.shape), None, None)
    return layout


def _scales(params: Any) -> dict[str, np.ndarray]:
    return {path: np.asarray(leaf.scale, np.float64) for path, leaf in leaves_by_path(params)
            if isinstance(leaf, LoraArray)}


def check_config(params: Any, config: LoraConfig) -> None:
    """`config` must be the one `params` were made with: adapter_config.json tells peft (and
    `load_adapter`) which modules are adapted, with what rank and lora_alpha, so another config
    would write a file that loads wrongly or not at all. Checked by making the adapters again
    from params' base with `config` (plain init: only the layout is compared)."""
    if not isinstance(config, LoraConfig):
        raise LoraError(f"config must be the lorax.LoraConfig the params were made with, not {type(config).__name__}")
    base = disable_adapters(params)
    # peft's "all-linear" leaves out the output head, as lorax.lora(..., output_head="lm_head") does;
    # with ensure_weight_tying a config may name a tied head (lorax.targets.with_tied_head).
    head = TIED_HEAD if TIED_HEAD in modules(base) or config.ensure_weight_tying else None
    ours, ours_scale = _adapter_layout(params), _scales(params)
    # A mixture-of-experts model's family (which old expert names peft maps onto its experts) is
    # not in the tree: the config fits if it makes these adapters under one of them.
    families = (None, *MOE_OLD_NAMES) if expert_modules(modules(base)) else (None,)
    remakes = []
    for moe_names in families:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # names the family's peft ignores: said when the params were made
                remade = lora(base, dataclasses.replace(config, init_lora_weights=True), key=jax.random.key(0),
                              output_head=head, moe_names=moe_names)
        except TargetError:
            if moe_names is None:
                raise
            continue  # under this family's names the config adapts nothing
        remakes.append((_adapter_layout(remade), _scales(remade)))
        if remakes[-1][0] == ours:
            break
    theirs, theirs_scale = remakes[-1] if remakes[-1][0] == ours else remakes[0]
    differences = [f"{path}: params {ours.get(path, 'not adapted')}, config {theirs.get(path, 'not adapted')}"
                   for path in sorted(set(ours) | set(theirs)) if ours.get(path) != theirs.get(path)]
    differences += [f"{path}: params scale {ours_scale[path].tolist()}, config (lora_alpha / r) {theirs_scale[path].tolist()}"
                    for path in sorted(set(ours_scale) & set(theirs_scale)) if not differences
                    and not np.allclose(ours_scale[path], theirs_scale[path], rtol=1e-2)]
    if differences:
        raise LoraError("config is not the one these params were made with (adapter_config.json would not describe "
                        f"the adapters): {listing(differences)}")


def save_adapter(directory: str | os.PathLike, params: Any, config: LoraConfig,
                 base_model_name_or_path: str | None = None, *, initial: Any = None) -> None:
    """Write params' adapters in peft's format: `PeftModel.from_pretrained(model, directory)` loads them.

    Args:
        directory: the adapter folder (created if needed; previous files are replaced atomically).
        params: a tree from `lorax.lora` (after training).
        config: the LoraConfig used to make it (checked: another rank, lora_alpha or set of
            modules would write an adapter_config.json that does not describe the tensors).
        base_model_name_or_path: recorded in adapter_config.json, as peft does.
        initial: for PiSSA/OLoRA (init_lora_weights "pissa", "pissa_niter_<n>", "olora"), the tree
            `lorax.lora` returned before training: the adapter is then written as a plain LoRA
            of rank 2r for the original base (`as_plain_lora`), which needs no recomputed
            residual (and no agreement of "pissa_niter_<n>"'s random iterations). Without it, the
            adapter is written as trained, with its init in the config; peft (and `load_adapter`)
            then recompute the residual from the original base when loading.
    """
    if not any(is_adapter(leaf) for leaf in jax.tree_util.tree_leaves(params, is_leaf=is_adapter)):
        raise LoraError("params hold no adapters to save: call lorax.lora(params, config, key=...) first")
    check_config(params, config)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    if initial is not None:
        params, config = as_plain_lora(params, initial, config)
    tensors = adapter_state(params)
    tensors |= tied_head_state(params, config)
    # As peft saves it: a tied head named with ensure_weight_tying is written as the embeddings it is tied to.
    config = with_tied_head(config, modules(disable_adapters(params)), TIED_HEAD)
    config_json = json.dumps(adapter_config(config, base_model_name_or_path), indent=2, sort_keys=True)
    atomic_write(folder, {ADAPTER_WEIGHTS: _safetensors_bytes(tensors), ADAPTER_CONFIG: config_json.encode()})


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    """peft's adapter_config.json as our LoraConfig; other adapter types and unsupported features are refused."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"no {ADAPTER_CONFIG} in {directory}: not a peft adapter folder")
    raw = read_json_object(path, "must hold a JSON object (peft's LoraConfig fields), not {kind}")
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise LoraError(f"{path}: peft_type {peft_type!r} is not supported; only LoRA adapters (peft_type 'LORA') load")
    for name, default in PEFT_BOOKKEEPING.items():
        if name in raw and name not in ("peft_type", "base_model_name_or_path", "revision", "inference_mode",
                                        "auto_mapping", "peft_version") and raw[name] not in (default, None, {}, [], False):
            raise LoraError(f"{path}: {name}={raw[name]!r} is a peft feature lorax does not support yet")
    fields = {k: v for k, v in raw.items() if k not in PEFT_BOOKKEEPING}
    try:
        return LoraConfig.from_dict(fields)
    except LoraConfigError as error:
        raise LoraConfigError(f"{path}: {error}") from None


def load_adapter(directory: str | os.PathLike, base_params: Any, *, output_head: str | None = None,
                 moe_names: str | None = None) -> Any:
    """Load a peft LoRA adapter onto base params: the result holds LoraArray leaves with the file's A and B.

    Args:
        directory: a folder written by `PeftModel.save_pretrained` or `save_adapter`, or a repo
            id ("org/name") already in the Hugging Face cache.
        base_params: the base model's tree (e.g. from `lorax.split(interop.from_pretrained(...))`).
        output_head: as in `lorax.lora`, for configs that say "all-linear".
        moe_names: as in `lorax.lora`, for a mixture-of-experts model (`model.moe_names`).

    Raises:
        CheckpointError / LoraError: missing or corrupt files, another peft type, tensors that
            do not fit the base (named, with both shapes), or tensors the config does not explain.
    """
    folder = local_folder(directory)
    config = read_adapter_config(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file() and (folder / ADAPTER_BIN).is_file():
        weights = folder / ADAPTER_BIN  # PeftModel.save_pretrained(..., safe_serialization=False)
    elif not weights.is_file():
        raise CheckpointError(f"no {ADAPTER_WEIGHTS} (or {ADAPTER_BIN}) in {folder}")
    read = read_torch_bin if weights.suffix == ".bin" else read_safetensors
    tensors = _without_wrapper_copies(dict(read(weights)), weights)
    params = lora(base_params, config, key=jax.random.key(0), output_head=output_head, moe_names=moe_names)
    expected = adapter_state(params)
    bases = _embedding_bases(params)
    tied = tied_head_state(params, config)
    # Written by peft too, and optional: adapted embeddings' base tables, and with
    # ensure_weight_tying the tied head's copies (checked below) and its base (the embeddings').
    optional = set(bases) | set(tied) | ({f"{PREFIX}{TIED_HEAD}.base_layer.weight"} if tied else set())
    unexpected = sorted(set(tensors) - set(expected) - optional)
    missing = sorted(set(expected) - set(tensors))
    if unexpected or missing:
        raise CheckpointError(
            f"{weights} does not fit these params"
            + (f"; missing: {listing(missing)}" if missing else "")
            + (f"; unexpected: {listing(unexpected)}" if unexpected else "")
            + ("; the adapter also adapts a vision tower, which a text-only model does not have (see README: "
               "vision-language checkpoints)" if any(re.search(VISION_MODULES, name) for name in unexpected) else "")
        )
    shapes = {name: value.shape for name, value in expected.items()}
    shapes |= {name: shape for name, (_, shape) in bases.items() if name in tensors}
    for name, shape in shapes.items():
        if not jnp.issubdtype(tensors[name].dtype, jnp.floating):
            raise CheckpointError(f"{weights}: tensor {name!r} has dtype {tensors[name].dtype}; adapter weights are "
                                  "floating-point")
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"{weights}: tensor {name!r} has shape {tuple(tensors[name].shape)}, the base model "
                                  f"needs {shape} (an adapter for another model?)")
    params = _fill(params, tensors, {path: tensors[name] for name, (path, _) in bases.items() if name in tensors})
    for name, value in tied_head_state(params, config).items():
        if name in tensors and not np.array_equal(tensors[name], value.astype(tensors[name].dtype)):
            raise CheckpointError(f"{weights}: {name!r} should be tied to the input embeddings "
                                  "(ensure_weight_tying=true) but differs from them")
    return params


def _without_wrapper_copies(tensors: dict[str, np.ndarray], weights: Path) -> dict[str, np.ndarray]:
    """peft with bias="all" also writes the biases inside a modules_to_save wrapper under their
    wrapper names (`<module>.modules_to_save.<adapter>.<leaf>`, `<module>.original_module.<leaf>`)
    beside the copy's plain name. The copy must equal the plain tensor; the original is the
    base's own, which the base params already hold."""
    kept = {}
    for name, value in tensors.items():
        if ".original_module." in name:
            continue
        plain = _unwrapped(name)
        if plain != name and plain in tensors:
            if not np.array_equal(value, tensors[plain]):
                raise CheckpointError(f"{weights}: {name!r} differs from {plain!r}, which should be its copy")
            continue
        kept[plain] = value
    return kept


def _unwrapped(name: str) -> str:
    """A modules_to_save wrapper's tensor name as the module's own: peft keeps the adapter name for a
    container's (`mlp.modules_to_save.default.down_proj.bias`) and has removed it for a single
    layer's (`down_proj.modules_to_save.bias`).

    >>> _unwrapped("mlp.modules_to_save.default.down_proj.bias"), _unwrapped("down_proj.modules_to_save.bias")
    ('mlp.down_proj.bias', 'down_proj.bias')
    """
    module, wrapper, rest = name.partition(".modules_to_save.")
    if not wrapper:
        return name
    return f"{module}.{rest.split('.', 1)[1] if '.' in rest else rest}"


def _fill(params: Any, tensors: dict[str, np.ndarray], base_tables: dict[str, np.ndarray]) -> Any:
    """params with A/B and trained leaves replaced by the file's tensors (names as adapter_state
    gives them), and the base tables of adapted embeddings by `base_tables` (leaf path -> table)."""
    lora_modules = set()
    experts = _expert_prefixes(params)

    def fill_lora(keypath, leaf):
        if not isinstance(leaf, LoraArray):
            return leaf
        if dotted(keypath) in base_tables:  # as PeftModel loads it: the file's base replaces the model's
            table = base_tables[dotted(keypath)]
            table = table.T if dotted(keypath).endswith(".kernel") else table
            leaf = eqx.tree_at(lambda l: l.w, leaf, jnp.asarray(table, leaf.w.dtype))
        embedding = dotted(keypath).endswith(".embedding")
        names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        modules = _module_factors(leaf)
        # The adapter keeps the file's dtype (a bf16 adapter stays bf16).
        dtype = tensors[f"{PREFIX}{experts.get(modules[0][0], modules[0][0])}.{names[0]}"].dtype
        a, b = np.array(leaf.a).astype(dtype), np.array(leaf.b).astype(dtype)
        for index, (path, _, _) in enumerate(modules):
            lora_modules.add(path)
            prefix = f"{PREFIX}{experts.get(path, path)}"
            a_file, b_file = _from_file(leaf, tensors[f"{prefix}.{names[0]}"], tensors[f"{prefix}.{names[1]}"])
            if leaf.ranks is None:
                a, b = a_file, b_file
            else:
                layer = [i for i, r in enumerate(leaf.ranks) if r][index]
                a[layer, ..., : a_file.shape[-1]], b[layer, ..., : b_file.shape[-2], :] = a_file, b_file
        leaf = eqx.tree_at(lambda l: (l.a, l.b), leaf, (jnp.asarray(a), jnp.asarray(b)))
        if isinstance(leaf, DoraArray):
            m = np.array(leaf.m).astype(dtype)
            for path, layer in _adapted_modules(leaf):
                if layer is None:
                    m = tensors[f"{PREFIX}{path}.{MAGNITUDE}"]
                else:
                    m[layer] = tensors[f"{PREFIX}{path}.{MAGNITUDE}"]
            leaf = eqx.tree_at(lambda l: l.m, leaf, jnp.asarray(m))
        return leaf

    def fill_trained(keypath, leaf):
        if not isinstance(leaf, TrainableArray):
            return leaf
        names = _trained_names(dotted(keypath), leaf.value.shape, lora_modules)
        values = [tensors[name].T if transpose else tensors[name] for name, _, transpose in names]
        value = values[0] if names[0][1] is None else np.stack(values)
        return eqx.tree_at(lambda l: l.value, leaf, jnp.asarray(value, leaf.value.dtype))

    params = jax.tree_util.tree_map_with_path(fill_lora, params, is_leaf=is_adapter)
    return jax.tree_util.tree_map_with_path(fill_trained, params, is_leaf=is_adapter)
