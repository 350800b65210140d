"""Merged models out: plain (merged) params written back under transformers' names and layouts,
with a config.json, so `AutoModelForCausalLM.from_pretrained(directory)` loads them.

>>> graphdef, base = lorax.split(interop.from_pretrained(path, progress=False))   # path: all-MiniLM-L6-v2
>>> params = lorax.lora(base, lorax.LoraConfig(target_modules=["query", "value"]), key=key)
>>> folder = getfixture("tmp_path") / "merged"
>>> interop.save_merged(folder, graphdef, lorax.merge(params))    # transformers' from_pretrained(folder) loads it
>>> sorted(path.name for path in folder.iterdir())
['config.json', 'model.safetensors']
"""

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from interop.hf import architecture_for, checkpoint_slots
from interop.peft import _atomic_write
from lorax.arrays import is_adapter
from lorax.errors import LoraError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _hf_tensors(graphdef, params) -> tuple[dict[str, np.ndarray], dict]:
    """(transformers name -> array in torch layout, the model's config.json dict)."""
    model = graphdef.module(params)
    config_json = getattr(model, "hf_config_json", None)
    if config_json is None:
        raise LoraError("save_merged needs the model's Hugging Face config: load the model with "
                        "interop.from_pretrained (it remembers config.json)")
    slots = checkpoint_slots(params, architecture_for(model))
    tensors = {}
    for name, slot in slots.items():
        value = params
        for key in slot.leaf:
            value = value[key]
        value = np.asarray(value if slot.layer is None else value[slot.layer])
        tensors[name] = np.ascontiguousarray(value.T if slot.transpose else value)
    return tensors, json.loads(config_json)


def _shards(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
    shards, current, size = [], {}, 0
    for name, value in tensors.items():
        if current and size + value.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = value
        size += value.nbytes
    return shards + [current]


def save_merged(directory: str | os.PathLike, graphdef, params: Any, *, dtype: Any = None,
                max_shard_size: int = 5 * 2**30) -> None:
    """Write merged params as a transformers checkpoint: config.json + model.safetensors (or shards
    with model.safetensors.index.json above `max_shard_size` bytes). Files are written under
    temporary names and renamed into place.

    Args:
        directory: output folder (created if needed).
        graphdef: from `lorax.split(interop.from_pretrained(...))`.
        params: plain arrays, e.g. `lorax.merge(params)` (adapters must be merged first).
        dtype: dtype of the written tensors (default: as they are); recorded in config.json.
        max_shard_size: shard size limit in bytes.
    """
    from safetensors.flax import save

    if any(is_adapter(leaf) for leaf in jax.tree_util.tree_leaves(params, is_leaf=is_adapter)):
        raise LoraError("params still hold adapters: pass lorax.merge(params) to save_merged")
    tensors, config = _hf_tensors(graphdef, params)
    if dtype is not None:
        tensors = {name: value.astype(jnp.dtype(dtype)) for name, value in tensors.items()}
    written_dtype = str(next(iter(tensors.values())).dtype)
    config["dtype"] = config["torch_dtype"] = written_dtype
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    shards = _shards(tensors, max_shard_size)
    files = {"config.json": json.dumps(config, indent=2, sort_keys=True).encode()}
    if len(shards) == 1:
        files[WEIGHTS] = save({k: jnp.asarray(v) for k, v in shards[0].items()}, metadata={"format": "pt"})
    else:
        weight_map = {}
        for number, shard in enumerate(shards, 1):
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            files[name] = save({k: jnp.asarray(v) for k, v in shard.items()}, metadata={"format": "pt"})
            weight_map.update({tensor: name for tensor in shard})
        index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
        files[INDEX] = json.dumps(index, indent=2, sort_keys=True).encode()
    stale = [name for name in (WEIGHTS, INDEX) if (folder / name).exists() and name not in files]
    _atomic_write(folder, files)
    for name in stale:  # a previous single-file or sharded save that would shadow this one
        os.remove(folder / name)
