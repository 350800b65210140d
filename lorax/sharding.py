"""Scaling past one device with `jax.sharding` alone: a mesh with a data axis and an FSDP axis,
batches split over both, and parameters (the frozen base, optionally the adapters) split
FSDP-style along one dimension each. `jax.jit` then inserts the all-gathers and reductions.

>>> mesh = make_mesh(data=1, fsdp=len(jax.devices()))       # on 8 devices e.g. make_mesh(data=2, fsdp=4)
>>> params = shard_params(params, mesh)
>>> batch = jax.device_put({"input_ids": input_ids}, batch_sharding(mesh))

Many hosts: call `jax.distributed.initialize()` first on every host; `make_mesh` then spans
all of `jax.devices()`, and each host feeds its own slice of the global batch (e.g. with
`jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch)`).
"""

from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lorax.arrays import LoraArray, is_adapter
from lorax.errors import LoraError
from lorax.nf4 import Nf4Array

DATA, FSDP = "data", "fsdp"


def make_mesh(data: int = 1, fsdp: int | None = None, devices=None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all). fsdp=None takes the devices data leaves."""
    devices = list(devices if devices is not None else jax.devices())
    fsdp = fsdp if fsdp is not None else len(devices) // data
    if data * fsdp != len(devices):
        raise LoraError(f"a mesh of data={data} x fsdp={fsdp} needs {data * fsdp} devices; there are {len(devices)}")
    return Mesh(np.asarray(devices).reshape(data, fsdp), (DATA, FSDP))


def _fsdp_spec(shape: tuple[int, ...], fsdp: int, skip_leading: bool) -> PartitionSpec:
    """Split the largest dimension that fsdp divides (never the layer axis of a stack)."""
    dims = [d for d in range(len(shape)) if not (skip_leading and d == 0) and shape[d] % fsdp == 0]
    if fsdp == 1 or not dims:
        return PartitionSpec()
    dim = max(dims, key=lambda d: shape[d])
    return PartitionSpec(*[FSDP if d == dim else None for d in range(len(shape))])


def _flat_spec(shape: tuple[int, ...], fsdp: int) -> PartitionSpec:
    """Split the last axis: an Nf4Array's bytes and block statistics are flat (one row per layer
    when stacked), so their last axis is the one to split."""
    if fsdp == 1 or not shape or shape[-1] % fsdp:
        return PartitionSpec()
    return PartitionSpec(*[None] * (len(shape) - 1), FSDP)


def param_shardings(params: Any, mesh: Mesh, *, shard_adapters: bool = False) -> Any:
    """NamedShardings for every array of a (LoRA) tree: frozen weights FSDP-sharded, adapters
    replicated (they are small) unless `shard_adapters`. 4-bit bases (`Nf4Array`, QLoRA) are
    sharded in their packed form: each device holds a slice of the bytes, and XLA gathers them
    where the weight is used."""
    fsdp = mesh.shape[FSDP]
    replicated = NamedSharding(mesh, PartitionSpec())

    def quantized(q: Nf4Array):
        return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, _flat_spec(x.shape, fsdp)), q)

    def for_leaf(leaf):
        if isinstance(leaf, Nf4Array):
            return quantized(leaf)
        if isinstance(leaf, LoraArray):
            stacked = leaf.ranks is not None

            def spec(name, array):
                if name in ("a", "b") and not shard_adapters:
                    return replicated
                if name in ("w", "a", "b"):
                    return NamedSharding(mesh, _fsdp_spec(array.shape, fsdp, stacked))
                return replicated

            shardings = jax.tree_util.tree_map_with_path(lambda path, x: spec(path[0].name, x), leaf)
            if isinstance(leaf.w, Nf4Array):
                shardings = eqx.tree_at(lambda tree: tree.w, shardings, quantized(leaf.w))
            return shardings
        return jax.tree_util.tree_map(
            lambda x: NamedSharding(mesh, _fsdp_spec(x.shape, fsdp, False) if x.ndim >= 2 else PartitionSpec()), leaf)

    return jax.tree_util.tree_map(for_leaf, params, is_leaf=lambda x: is_adapter(x) or isinstance(x, Nf4Array))


def shard_params(params: Any, mesh: Mesh, *, shard_adapters: bool = False) -> Any:
    """Place a parameter tree on the mesh (see `param_shardings`)."""
    return jax.device_put(params, param_shardings(params, mesh, shard_adapters=shard_adapters))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split the leading (batch) axis over every device: data and fsdp axes alike (ZeRO-style)."""
    return NamedSharding(mesh, PartitionSpec((DATA, FSDP)))
