"""Merged models out: plain (merged) params written back under transformers' names and layouts,
with a config.json, so `AutoModelForCausalLM.from_pretrained(directory)` loads them.

>>> graphdef, base = lorax.split(interop.from_pretrained(path, progress=False))   # path: all-MiniLM-L6-v2
>>> params = lorax.lora(base, lorax.LoraConfig(target_modules=["query", "value"]), key=key)
>>> folder = getfixture("tmp_path") / "merged"
>>> interop.save_merged(folder, graphdef, lorax.merge(params))    # transformers' from_pretrained(folder) loads it
>>> sorted(path.name for path in folder.iterdir())
['config.json', 'model.safetensors']
"""

import functools
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from interop.checkpoint import CheckpointError, atomic_write, leaf_at, read_index
from interop.hf import abstract_model, architecture_for, checkpoint_slots, float_dtype, model_config, renamed
from interop.layout_copy import Copy, copy_all
from lorax.arrays import is_adapter
from lorax.errors import LoraError, listing
from lorax.nf4 import Nf4Array
from lorax.targets import leaves_by_path

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped, in order, into shards of at most `max_shard_bytes` (a larger tensor alone)."""
    shards, current, size = [], [], 0
    for name, nbytes in sizes.items():
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + [current]


def _check_params(params: Any, model) -> None:
    """params must be the model's own tree: the same leaves, shapes and floating dtypes, dense.
    Anything else would be written as a checkpoint transformers refuses, or loads wrongly."""
    quantized = [path for path, leaf in leaves_by_path(params) if isinstance(leaf, Nf4Array)]
    if quantized:
        raise LoraError(f"params hold 4-bit weights ({listing(quantized)}); save_merged writes dense weights: pass "
                        "lorax.merge(params) (without requantize=True), which dequantizes them")
    _, abstract = abstract_model(type(model), model.config)
    ours, expected = dict(leaves_by_path(params)), dict(leaves_by_path(abstract))
    missing, unexpected = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
    if missing or unexpected:
        raise LoraError(f"params are not {type(model).__name__}'s tree"
                        + (f"; missing: {listing(missing)}" if missing else "")
                        + (f"; unexpected: {listing(unexpected)}" if unexpected else ""))
    for path, leaf in ours.items():
        if tuple(leaf.shape) != tuple(expected[path].shape):
            raise LoraError(f"params[{path!r}] has shape {tuple(leaf.shape)}, {type(model).__name__} needs "
                            f"{tuple(expected[path].shape)}")
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise LoraError(f"params[{path!r}] has dtype {leaf.dtype}; save_merged writes floating-point weights")


def _previous_shards(folder: Path) -> set[str]:
    """The shard files a previous sharded save in `folder` lists (none if its index is unreadable)."""
    try:
        return {shard for shard in read_index(folder / INDEX).values() if shard.endswith(".safetensors")}
    except (OSError, CheckpointError):
        return set()


def save_merged(directory: str | os.PathLike, graphdef, params: Any, *, dtype: Any = None,
                max_shard_size: int = 5 * 2**30, progress: bool = True) -> None:
    """Write merged params as a transformers checkpoint: config.json + model.safetensors (or shards
    with model.safetensors.index.json above `max_shard_size` bytes). Shards are produced one at a
    time (memory grows by one shard, not by the model), written under temporary names, and renamed
    into place once all are written. A vision-language model loaded text-only is written as its
    language model's causal LM (Gemma3ForConditionalGeneration as Gemma3ForCausalLM,
    Mistral3ForConditionalGeneration as MistralForCausalLM or Ministral3ForCausalLM: the
    `text_config` as config.json, `model.layers...` names), since its vision tower was never loaded;
    likewise a BertForMaskedLM or BertForPreTraining checkpoint is written as the BertModel it loaded as.

    Args:
        directory: output folder (created if needed).
        graphdef: from `lorax.split(interop.from_pretrained(...))`.
        params: plain arrays, e.g. `lorax.merge(params)` (adapters must be merged first).
        dtype: dtype of the written tensors (default: as they are); recorded in config.json.
        max_shard_size: shard size limit in bytes.
        progress: show a tqdm bar while each shard's tensors are copied.

    Raises:
        LoraError: params that still hold adapters or 4-bit weights, or are not the graphdef's
            tree (leaves, shapes, floating dtypes: the offending leaf is named); a dtype that is
            not floating point; max_shard_size not a positive int. Nothing is written then.
    """
    from safetensors.numpy import save_file

    if any(is_adapter(leaf) for leaf in jax.tree_util.tree_leaves(params, is_leaf=is_adapter)):
        raise LoraError("params still hold adapters: pass lorax.merge(params) to save_merged")
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size <= 0:
        raise LoraError(f"max_shard_size must be a positive number of bytes, got {max_shard_size!r}")
    if dtype is not None:
        dtype = float_dtype(dtype)
    try:
        model = graphdef.module(params)
    except ValueError as error:  # a leaf missing or added: nnx counts them
        raise LoraError(f"params do not fit graphdef ({error}): pass the tree lorax.split returned, merged") from None
    config_json = getattr(model, "hf_config_json", None)
    if config_json is None:
        raise LoraError("save_merged needs the model's Hugging Face config: load the model with "
                        "interop.from_pretrained (it remembers config.json)")
    _check_params(params, model)
    arch = architecture_for(model)
    # A text-only vision-language model is written as its language model's causal LM (Gemma 3 4B -> Gemma3ForCausalLM).
    slots = {renamed(name, arch.merged_renames): slot for name, slot in checkpoint_slots(params, arch).items()}
    dtypes = {name: dtype if dtype is not None else np.dtype(leaf_at(params, slot.leaf).dtype)
              for name, slot in slots.items()}
    sizes = {name: dtypes[name].itemsize * int(np.prod(slot.shape)) for name, slot in slots.items()}
    shards = _shards(sizes, max_shard_size)

    # Slots of one stacked leaf come one after another: keep only the current leaf on the host.
    host = functools.lru_cache(maxsize=1)(lambda keys: np.asarray(leaf_at(params, keys)))

    def writer(names: list[str], label: str):
        def write(path: str):
            tensors, copies = {}, []
            for name in names:
                slot = slots[name]
                value = host(slot.leaf)
                tensors[name] = np.empty(slot.shape, dtypes[name])
                copies.append(Copy(tensors[name], value[slot.index], slot.transpose))
            copy_all(copies, progress=progress, desc=f"writing {label}")
            save_file(tensors, path, metadata={"format": "pt"})
        return write

    config = json.loads(config_json)
    if arch.merged_as is not None:
        text = model_config(config, arch)
        if text["model_type"] not in arch.merged_as:
            raise LoraError(f"save_merged cannot write a {text['model_type']!r} language model as a causal LM; "
                            f"known: {listing(arch.merged_as)}")
        # The special tokens a composite config sets at its top level win over its text_config's,
        # as GenerationConfig.from_model_config reads them.
        tokens = {key: config[key] for key in SPECIAL_TOKENS if config.get(key) is not None}
        config = {**text, **arch.merged_config, **tokens, "architectures": [arch.merged_as[text["model_type"]]]}
        if hasattr(model.config, "tie_word_embeddings"):
            config["tie_word_embeddings"] = model.config.tie_word_embeddings
    config["dtype"] = config["torch_dtype"] = str(dtypes[next(iter(slots))])
    # The weights written are dense: a bitsandbytes checkpoint's quantization_config would make
    # transformers rebuild 4-bit layers over them.
    config.pop("quantization_config", None)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"config.json": json.dumps(config, indent=2, sort_keys=True).encode()}
    generation = getattr(model, "hf_generation_json", None)
    if generation is not None:  # the checkpoint's generation defaults (EOS ids, sampling), as transformers saves them
        files[GENERATION_CONFIG] = generation.encode()
    if len(shards) == 1:
        files[WEIGHTS] = writer(shards[0], WEIGHTS)
    else:
        weight_map = {}
        for number, names in enumerate(shards, 1):
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            files[name] = writer(names, name)
            weight_map.update(dict.fromkeys(names, name))
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        files[INDEX] = json.dumps(index, indent=2, sort_keys=True).encode()
    # A previous single-file or sharded save, which would shadow this one or lie beside it.
    stale = [name for name in ({WEIGHTS, INDEX} | _previous_shards(folder)) - set(files) if (folder / name).is_file()]
    atomic_write(folder, files)
    for name in sorted(stale):
        os.remove(folder / name)
