"""Checkpoint files: reading tensor by tensor from safetensors and PyTorch `.bin` (single files or
shards with an index; `.bin` only with `torch.load(weights_only=True)`); writing a set of files so that an
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
import math
import os
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from lorax.errors import LoraError, listing


class CheckpointError(LoraError, OSError):
    """A checkpoint folder or file is missing, truncated, corrupt or does not fit the model."""


SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


# transformers' file names, in the order it prefers them: a single file, else an index of shards.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def local_folder(path: str | os.PathLike) -> Path:
    """`path` itself if it exists; otherwise a Hugging Face repo id ("org/name") already in the
    local hub cache (where transformers' and peft's downloads go) resolves to its cached snapshot,
    as transformers resolves it offline. Nothing is downloaded.

    >>> local_folder(path) == Path(path)                    # path: the all-MiniLM-L6-v2 folder
    True
    """
    folder = Path(path)
    if folder.exists() or not isinstance(path, str) or path.count("/") != 1 or path.startswith((".", "/", "~")):
        return folder
    try:
        import huggingface_hub  # installed with transformers ([torch] extra); only needed here
    except ImportError:
        raise CheckpointError(f"no folder {path!r} (to read it from the Hugging Face cache as a repo id, install "
                              "huggingface_hub)") from None
    try:
        return Path(huggingface_hub.snapshot_download(path, local_files_only=True))
    except Exception as error:  # not a valid repo id, or not cached: huggingface_hub's own message says which
        raise CheckpointError(f"no folder {path!r}, and it is not a repo id in the Hugging Face cache "
                              f"({huggingface_hub.constants.HF_HUB_CACHE}): nothing is downloaded here, so download "
                              f"it first (`hf download {path}`) or pass a local folder ({type(error).__name__}: "
                              f"{error})") from None


def read_json_object(path: Path, not_an_object: str) -> dict:
    """The JSON object in the file at `path` (a config). A file that is not UTF-8 JSON is named;
    one that holds another JSON value is named with `not_an_object`, a message in which {kind}
    is that value's type.

    >>> read_json_object(Path(path) / "config.json", "a JSON {kind}, not a model config")["model_type"]
    'bert'
    """
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: " + not_an_object.format(kind=type(value).__name__))
    return value


def checkpoint_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a Hugging Face folder, in the order transformers prefers them."""
    return _weight_files(Path(folder))[1]


def _weight_files(folder: Path) -> tuple[Path | None, list[Path]]:
    """(the index, or None for a single file; the weight files)."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return None, [path]
        files = [folder / shard for shard in dict.fromkeys(read_index(path).values())]
        if not files:
            raise CheckpointError(f"{path} lists no shards (its weight_map is empty)")
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path} lists shards that are not in the folder: {missing}")
        return path, files
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(f"no weights in {folder}: expected {', '.join(WEIGHT_FILES)}; found {present or 'nothing'}")


def read_index(index: Path) -> dict[str, str]:
    """A sharded checkpoint's weight_map (tensor name -> shard file name), checked: the shards are
    plain file names in the index's folder (not paths that leave it)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index}: not a valid safetensors index ({type(error).__name__}: {error})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
    outside = sorted({shard for shard in weight_map.values() if Path(shard).name != shard or shard in ("", ".", "..")})
    if outside:
        raise CheckpointError(f"{index}: shard names must be file names in its folder, not paths: {outside}")
    return weight_map


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"tensors named more than once: {repeated}")
    return dict(pairs)


def _check_entry(path: Path, name: str, info: Any) -> tuple[Any, tuple[int, ...], int, int]:
    """(numpy dtype, shape, start, end) of one header entry, or a CheckpointError naming the file and tensor."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} needs dtype, shape and data_offsets, "
                              f"has {info!r}"[:500])
    dtype = SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype']!r}, which is not supported "
                              f"(supported: {', '.join(SAFETENSORS_DTYPES)})")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
        raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} has shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} has data_offsets {offsets!r}")
    start, end = offsets
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if end - start != nbytes:
        raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} of shape {tuple(shape)} and dtype "
                              f"{info['dtype']} needs {nbytes} bytes, its data_offsets span {end - start}")
    return dtype, tuple(shape), start, end


def safetensors_header(path: Path) -> tuple[int, dict[str, tuple[Any, tuple[int, ...], int, int]]]:
    """(where the data starts, name -> (dtype, shape, start, end)) of a safetensors file, every entry
    checked against the format and the file's size: a truncated or corrupt file is named, not misread."""
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
            header = json.loads(file.read(header_size), object_pairs_hook=_unique_keys)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as error:
            raise CheckpointError(f"{path}: corrupt safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - header_size
    entries = {name: _check_entry(path, name, info) for name, info in header.items()}
    spans = sorted((start, end, name) for name, (_, _, start, end) in entries.items() if end > start)
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensors {name!r} and {other!r} overlap")
    if spans and spans[-1][1] > data_size:
        _, end, name = max(spans, key=lambda span: span[1])
        raise CheckpointError(f"{path}: truncated: tensor {name!r} needs bytes up to {end} of the {data_size} "
                              "after the header")
    return 8 + header_size, entries


def read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for each tensor of a safetensors file, memory-mapped (no copy)."""
    data_start, entries = safetensors_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start) if path.stat().st_size > data_start \
        else np.zeros(0, np.uint8)
    for name, (dtype, shape, start, end) in entries.items():
        yield name, data[start:end].view(dtype).reshape(shape)


def read_torch_bin(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for each tensor of a PyTorch `.bin`, loaded with weights_only=True (no pickled code runs)."""
    import torch

    TORCH_DTYPES = (torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
                    torch.uint8, torch.bool)
    try:
        # Memory-mapped where the file is torch's zip format; a legacy (pre-1.6) file cannot be mapped.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # torch raises many types for a bad file; say which file
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint with weights_only=True ({error})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(tensor).__name__}, not a tensor "
                                  "(expected a flat state dict, as model.state_dict() saves it)")
        if tensor.dtype == torch.bfloat16:
            yield name, tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        elif tensor.dtype in TORCH_DTYPES:
            yield name, tensor.numpy()
        else:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, which is not supported "
                                  f"(supported: bfloat16, {', '.join(str(d) for d in TORCH_DTYPES)})")


def read_tensors(folder: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Every (name, array) of a Hugging Face checkpoint folder, one tensor at a time. A sharded
    checkpoint's shards must hold exactly the tensors its index places in them."""
    index, files = _weight_files(Path(folder))
    if index is not None:
        yield from _read_shards(index, read_index(index), files)
        return
    (path,) = files
    yield from (read_torch_bin(path) if path.suffix == ".bin" else read_safetensors(path))


def _read_shards(index: Path, weight_map: dict[str, str], files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """The tensors of every shard, each checked to be in the shard the index names, once. Safetensors
    shards are checked from their headers before any tensor is read; .bin shards as they load."""
    found: dict[str, str] = {}

    def place(name: str, shard: str):
        if name in found:
            raise CheckpointError(f"{index} does not match its shards: tensor {name!r} is in both {found[name]} "
                                  f"and {shard}")
        found[name] = shard

    def check_complete():
        misplaced = sorted(f"{name!r} is listed in {weight_map[name]}, found in {shard}" for name, shard in found.items()
                           if weight_map.get(name, shard) != shard)
        unlisted, absent = sorted(set(found) - set(weight_map)), sorted(set(weight_map) - set(found))
        if misplaced or unlisted or absent:
            raise CheckpointError(f"{index} does not match its shards: "
                                  + (f"tensor {listing(misplaced)}. " if misplaced else "")
                                  + (f"not in the index: {listing(unlisted)}. " if unlisted else "")
                                  + (f"listed but in no shard: {listing(absent)}." if absent else ""))

    if files[0].suffix == ".safetensors":
        for path in files:
            for name in safetensors_header(path)[1]:
                place(name, path.name)
        check_complete()
        for path in files:
            yield from read_safetensors(path)
        return
    for path in files:
        for name, tensor in read_torch_bin(path):
            place(name, path.name)
            yield name, tensor
    check_complete()


def count_tensors(folder: str | os.PathLike) -> int | None:
    """How many tensors the folder holds, from the headers alone (for a progress bar)."""
    total = 0
    for path in checkpoint_files(folder):
        if path.suffix == ".bin":
            return None
        try:
            total += len(safetensors_header(path)[1])
        except (CheckpointError, OSError):
            return None  # read_tensors will name the bad file
    return total


def leaf_at(tree: dict, keys: tuple) -> Any:
    """The leaf of a nested parameter dict at `keys` (e.g. a checkpoint slot's path in our tree)."""
    for key in keys:
        tree = tree[key]
    return tree


def _file_mode() -> int:
    """The mode `open()` gives a new file (0o666 less the umask); mkstemp's files are 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _keep_copy(path: Path) -> str:
    """A second name for the file at `path` (a hard link, or a copy where links are not
    supported), so that it can be put back."""
    handle, backup = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old")
    os.close(handle)
    os.remove(backup)
    try:
        os.link(path, backup)
    except OSError:
        shutil.copy2(path, backup)
    return backup


def atomic_write(folder: Path, files: dict[str, bytes | Callable[[str], None]]) -> None:
    """Write a set of files into `folder` so that a failed or interrupted save loses nothing:
    every file goes to a temporary name first; then each is renamed into place, the file it
    replaces kept under a second name until all are in; if anything fails (Ctrl-C included), the
    files already replaced are put back and the new ones removed, so the folder holds the whole
    previous save, never a mix of two. A file's content is bytes, or a function that writes the
    file at the path it is given (so that large files are produced one at a time). Files get the
    mode a plain `open()` gives them.

    >>> atomic_write(getfixture("tmp_path"), {"a.txt": b"1", "b.txt": lambda p: Path(p).write_text("2")})
    """
    temporary, replaced = {}, []  # name -> new file's temporary path; (name, backup path or None)
    mode = _file_mode()
    try:
        for name, content in files.items():
            handle, path = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            os.close(handle)
            temporary[name] = path
            if callable(content):
                content(path)
            else:
                Path(path).write_bytes(content)
            os.chmod(path, mode)
        for name, path in temporary.items():
            target = folder / name
            backup = _keep_copy(target) if target.exists() else None
            replaced.append((name, backup))
            os.replace(path, target)
    except BaseException:
        for name, backup in reversed(replaced):
            if os.path.exists(temporary[name]):
                continue  # its rename did not happen: the previous file is still in place
            if backup is not None:
                os.replace(backup, folder / name)
            else:
                os.remove(folder / name)
        raise
    finally:
        for path in [*temporary.values(), *(backup for _, backup in replaced if backup)]:
            if os.path.exists(path):
                os.remove(path)
