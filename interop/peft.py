"""peft's adapter format, both ways: what we train loads in `PeftModel.from_pretrained`, and an
adapter saved by peft loads back as LoraArray leaves.

A peft LoRA adapter is a folder with `adapter_config.json` (peft's LoraConfig fields plus
`peft_type: "LORA"`) and `adapter_model.safetensors`, whose keys are
`base_model.model.<module path>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r)
(`lora_embedding_A` (r, num_embeddings) / `lora_embedding_B` (dim, r) for embeddings),
modules_to_save copies as `base_model.model.<module path>.weight`, and trained biases as
`...<module path>.base_layer.bias` (adapted modules) or `...<module path>.bias`.

>>> interop.save_adapter("out/adapter", params, config)                   # doctest: +SKIP
>>> params = interop.load_adapter("out/adapter", base_params)              # doctest: +SKIP
"""

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from interop.checkpoint import CheckpointError, read_safetensors
from lorax.arrays import LoraArray, TrainableArray, is_adapter
from lorax.config import LoraConfig
from lorax.errors import LoraError, listing
from lorax.targets import dotted
from lorax.transform import lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Modules whose torch weight is (in, out) already: GPT-2's Conv1D layers.
CONV1D_MODULES = frozenset({"c_attn", "c_proj", "c_fc"})
# peft fields that describe bookkeeping or features left at their defaults; anything else
# unknown to LoraConfig is refused by name.
PEFT_BOOKKEEPING = {
    "peft_type": "LORA", "base_model_name_or_path": None, "revision": None, "inference_mode": True,
    "auto_mapping": None, "peft_version": None, "megatron_core": "megatron.core", "qalora_group_size": 16,
    "lora_bias": False, "layer_replication": None, "megatron_config": None, "loftq_config": {},
    "eva_config": None, "corda_config": None, "target_parameters": None, "trainable_token_indices": None,
    "use_qalora": False, "alora_invocation_tokens": None, "arrow_config": None, "ensure_weight_tying": False,
    "kasa_config": None, "lora_ga_config": None, "monteclora_config": None, "use_bdlora": None,
    "velora_config": None,
}


def _torch_name(module: str, leaf: str) -> tuple[str, bool]:
    """(peft tensor name suffix, transpose?) for one of our leaves."""
    if leaf == "kernel":
        return "weight", module.rsplit(".", 1)[-1] not in CONV1D_MODULES
    return ("weight" if leaf in ("embedding", "scale") else leaf), False


def _module_factors(leaf: LoraArray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(module path, a (in, r), b (r, out)) per adapted module; a stack gives one per adapted layer."""
    a, b = np.asarray(leaf.a), np.asarray(leaf.b)
    if leaf.ranks is None:
        return [(leaf.path, a, b)]
    return [(leaf.path.replace("*", str(i)), a[i, :, :r], b[i, :r]) for i, r in enumerate(leaf.ranks) if r]


def adapter_state(params: Any) -> dict[str, np.ndarray]:
    """The tensors peft saves for these params, by peft's names, in their dtypes."""
    tensors = {}
    lora_modules = set()
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_adapter)[0]:
        if isinstance(leaf, LoraArray):
            embedding = dotted(keypath).endswith(".embedding")
            for path, a, b in _module_factors(leaf):
                lora_modules.add(path)
                names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
                tensors[f"{PREFIX}{path}.{names[0]}"] = np.ascontiguousarray(a.T)
                tensors[f"{PREFIX}{path}.{names[1]}"] = np.ascontiguousarray(b.T)
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_adapter)[0]:
        if isinstance(leaf, TrainableArray):
            module, _, name = dotted(keypath).rpartition(".")
            if "*" in module:
                raise LoraError(f"{module}.{name}: trained leaves of stacked layers cannot be written in peft's format yet")
            torch_leaf, transpose = _torch_name(module, name)
            value = np.asarray(leaf.value)
            where = f"{module}.base_layer" if module in lora_modules else module
            tensors[f"{PREFIX}{where}.{torch_leaf}"] = np.ascontiguousarray(value.T if transpose else value)
    return tensors


def adapter_config(config: LoraConfig, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json's content: our config's fields plus what peft needs to load it."""
    fields = config.to_dict()
    if not isinstance(fields["target_modules"], str):
        fields["target_modules"] = sorted(fields["target_modules"])
    return {**PEFT_BOOKKEEPING, **fields, "base_model_name_or_path": base_model_name_or_path, "inference_mode": True}


def _atomic_write(folder: Path, files: dict[str, bytes]) -> None:
    """Write every file to a temporary name in the folder first, then rename each into place:
    an interrupted save leaves the previous adapter's files whole."""
    temporary = {}
    try:
        for name, data in files.items():
            handle, path = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            temporary[name] = path
        for name, path in temporary.items():
            os.replace(path, folder / name)
    finally:
        for path in temporary.values():
            if os.path.exists(path):
                os.remove(path)


def _safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.flax import save

    # The flax backend writes bfloat16 too (numpy's backend cannot).
    return save({name: jnp.asarray(value) for name, value in tensors.items()}, metadata={"format": "pt"})


def save_adapter(directory: str | os.PathLike, params: Any, config: LoraConfig,
                 base_model_name_or_path: str | None = None) -> None:
    """Write params' adapters in peft's format: `PeftModel.from_pretrained(model, directory)` loads them.

    Args:
        directory: the adapter folder (created if needed; previous files are replaced atomically).
        params: a tree from `lorax.lora` (after training).
        config: the LoraConfig used to make it.
        base_model_name_or_path: recorded in adapter_config.json, as peft does.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state(params)
    if not tensors:
        raise LoraError("params hold no adapters to save: call lorax.lora(params, config, key=...) first")
    config_json = json.dumps(adapter_config(config, base_model_name_or_path), indent=2, sort_keys=True)
    _atomic_write(folder, {ADAPTER_WEIGHTS: _safetensors_bytes(tensors), ADAPTER_CONFIG: config_json.encode()})


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    """peft's adapter_config.json as our LoraConfig; other adapter types and unsupported features are refused."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"no {ADAPTER_CONFIG} in {directory}: not a peft adapter folder")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise LoraError(f"{path}: peft_type {peft_type!r} is not supported; only LoRA adapters (peft_type 'LORA') load")
    if raw.get("use_dora"):
        raise LoraError(f"{path}: a DoRA adapter (use_dora=true); DoRA is not implemented yet")
    for name, default in PEFT_BOOKKEEPING.items():
        if name in raw and name not in ("peft_type", "base_model_name_or_path", "revision", "inference_mode",
                                        "auto_mapping", "peft_version") and raw[name] not in (default, None, {}, False):
            raise LoraError(f"{path}: {name}={raw[name]!r} is a peft feature lorax does not support yet")
    fields = {k: v for k, v in raw.items() if k not in PEFT_BOOKKEEPING}
    return LoraConfig.from_dict(fields)


def load_adapter(directory: str | os.PathLike, base_params: Any, *, output_head: str | None = None) -> Any:
    """Load a peft LoRA adapter onto base params: the result holds LoraArray leaves with the file's A and B.

    Args:
        directory: a folder written by `PeftModel.save_pretrained` or `save_adapter`.
        base_params: the base model's tree (e.g. from `lorax.split(interop.from_pretrained(...))`).
        output_head: as in `lorax.lora`, for configs that say "all-linear".

    Raises:
        CheckpointError / LoraError: missing or corrupt files, another peft type, tensors that
            do not fit the base (named, with both shapes), or tensors the config does not explain.
    """
    folder = Path(directory)
    config = read_adapter_config(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"no {ADAPTER_WEIGHTS} in {folder}")
    tensors = dict(read_safetensors(weights))
    params = lora(base_params, config, key=jax.random.key(0), output_head=output_head)
    expected = adapter_state(params)
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unexpected or missing:
        raise CheckpointError(
            f"{weights} does not fit these params"
            + (f"; missing: {listing(missing)}" if missing else "")
            + (f"; unexpected: {listing(unexpected)}" if unexpected else "")
        )
    for name, value in expected.items():
        if tuple(tensors[name].shape) != value.shape:
            raise CheckpointError(f"{weights}: tensor {name!r} has shape {tuple(tensors[name].shape)}, the base model "
                                  f"needs {value.shape} (an adapter for another model?)")
    return _fill(params, tensors)


def _fill(params: Any, tensors: dict[str, np.ndarray]) -> Any:
    """params with A/B and trained leaves replaced by the file's tensors (names as adapter_state gives them)."""
    lora_modules = set()

    def fill_lora(keypath, leaf):
        if not isinstance(leaf, LoraArray):
            return leaf
        embedding = dotted(keypath).endswith(".embedding")
        names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        modules = _module_factors(leaf)
        # The adapter keeps the file's dtype (a bf16 adapter stays bf16).
        dtype = tensors[f"{PREFIX}{modules[0][0]}.{names[0]}"].dtype
        a, b = np.array(leaf.a).astype(dtype), np.array(leaf.b).astype(dtype)
        for index, (path, _, _) in enumerate(modules):
            lora_modules.add(path)
            a_file, b_file = tensors[f"{PREFIX}{path}.{names[0]}"].T, tensors[f"{PREFIX}{path}.{names[1]}"].T
            if leaf.ranks is None:
                a, b = a_file, b_file
            else:
                layer = [i for i, r in enumerate(leaf.ranks) if r][index]
                a[layer, :, : a_file.shape[1]], b[layer, : b_file.shape[0]] = a_file, b_file
        return eqx.tree_at(lambda l: (l.a, l.b), leaf, (jnp.asarray(a), jnp.asarray(b)))

    def fill_trained(keypath, leaf):
        if not isinstance(leaf, TrainableArray):
            return leaf
        module, _, name = dotted(keypath).rpartition(".")
        torch_leaf, transpose = _torch_name(module, name)
        where = f"{module}.base_layer" if module in lora_modules else module
        value = tensors[f"{PREFIX}{where}.{torch_leaf}"]
        return eqx.tree_at(lambda l: l.value, leaf, jnp.asarray(value.T if transpose else value, leaf.value.dtype))

    params = jax.tree_util.tree_map_with_path(fill_lora, params, is_leaf=is_adapter)
    return jax.tree_util.tree_map_with_path(fill_trained, params, is_leaf=is_adapter)
