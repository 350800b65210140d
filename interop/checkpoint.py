"""Checkpoint files: reading tensor by tensor from safetensors (single or sharded with an index)
and PyTorch `.bin` (only with `torch.load(weights_only=True)`); writing a set of files so that an
interrupted save leaves the previous ones whole (`atomic_write`).

safetensors files are memory-mapped and read with numpy: the `safetensors` package's numpy
backend cannot return bfloat16, and its flax backend would copy every tensor to the device and
back. The format is an 8-byte header length, a JSON header, then raw little-endian bytes, so
reading it here is short; every offset is checked so a truncated file is named, not misread.

>>> name, array = next(read_tensors(path))                   # path: the all-MiniLM-L6-v2 folder
>>> name, array.shape, array.dtype
('embeddings.position_ids', (1, 512), dtype('int64'))
"""

import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from lorax.errors import LoraError


class CheckpointError(LoraError, OSError):
    """A checkpoint folder or file is missing, truncated, corrupt or does not fit the model."""


SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def checkpoint_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a Hugging Face folder, in the order transformers prefers them."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise CheckpointError(f"{index}: not a valid safetensors index ({error})") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not in the folder: {missing}")
        return files
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"]
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(
        f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json or "
        f"pytorch_model.bin; found {present or 'nothing'}"
    )


def read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for each tensor of a safetensors file, memory-mapped (no copy)."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_size,) = struct.unpack("<Q", head)
        if 8 + header_size > size:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file (header of {header_size} bytes, "
                                  f"file of {size})")
        try:
            header = json.loads(file.read(header_size))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path}: corrupt safetensors header ({error})") from None
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size) if size > 8 + header_size else np.zeros(0, np.uint8)
    for name, info in header.items():
        start, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which is not supported")
        if end > data.size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} needs bytes {start}..{end} of "
                                  f"{data.size}")
        yield name, data[start:end].view(dtype).reshape(info["shape"])


def read_torch_bin(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for each tensor of a PyTorch `.bin`, loaded with weights_only=True (no pickled code runs)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for a bad file; say which file
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint with weights_only=True ({error})") from None
    for name, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
            yield name, tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            yield name, tensor.numpy()


def read_tensors(folder: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Every (name, array) of a Hugging Face checkpoint folder, one tensor at a time."""
    for path in checkpoint_files(folder):
        yield from (read_torch_bin(path) if path.suffix == ".bin" else read_safetensors(path))


def count_tensors(folder: str | os.PathLike) -> int | None:
    """How many tensors the folder holds, from the headers alone (for a progress bar)."""
    total = 0
    for path in checkpoint_files(folder):
        if path.suffix == ".bin":
            return None
        try:
            with open(path, "rb") as file:
                (header_size,) = struct.unpack("<Q", file.read(8))
                header = json.loads(file.read(header_size))
        except (struct.error, ValueError, OSError):
            return None  # read_tensors will name the bad file
        total += len(header) - ("__metadata__" in header)
    return total


def leaf_at(tree: dict, keys: tuple) -> Any:
    """The leaf of a nested parameter dict at `keys` (e.g. a checkpoint slot's path in our tree)."""
    for key in keys:
        tree = tree[key]
    return tree


def atomic_write(folder: Path, files: dict[str, bytes | Callable[[str], None]]) -> None:
    """Write every file to a temporary name in `folder` first, then rename each into place: an
    interrupted save leaves the previous files whole. A file's content is bytes, or a function that
    writes the file at the path it is given (so that large files are produced one at a time).

    >>> atomic_write(getfixture("tmp_path"), {"a.txt": b"1", "b.txt": lambda p: Path(p).write_text("2")})
    """
    temporary = {}
    try:
        for name, content in files.items():
            handle, path = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            os.close(handle)
            temporary[name] = path
            if callable(content):
                content(path)
            else:
                Path(path).write_bytes(content)
        for name, path in temporary.items():
            os.replace(path, folder / name)
    finally:
        for path in temporary.values():
            if os.path.exists(path):
                os.remove(path)
