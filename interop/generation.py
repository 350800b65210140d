"""The special tokens that transformers' `generate` uses for a checkpoint by default, so that
`lorax.models.generate.generate` stops where it would.

transformers reads them from generation_config.json when the folder has one, otherwise from
config.json (`GenerationConfig.from_model_config`: the top-level fields, then those of a nested
`text_config`, `decoder` or `generator`). With no pad token it pads finished rows with the first
EOS token, and so do we.

>>> generation_tokens(path)                                 # an encoder: no EOS, pad token 0
{'eos_token_id': None, 'pad_token_id': 0}
>>> tokens = generation_tokens(folder)                      # doctest: +SKIP
>>> generate(graphdef, params, input_ids, max_new_tokens=20, **tokens)   # doctest: +SKIP
"""

import os
from pathlib import Path

from interop.checkpoint import CheckpointError, local_folder, read_json_object
from interop.hf import read_config

# Where GenerationConfig.from_model_config looks when the top level leaves a token unset.
NESTED_CONFIGS = ("decoder", "generator", "text_config")


def _token_field(fields: dict, name: str, path: Path) -> tuple[int, ...] | None:
    value = fields.get(name)
    if value is None:
        return None
    ids = [value] if isinstance(value, int) else value
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise CheckpointError(f"{path}: {name} should be a token id or a list of them, got {value!r}")
    return tuple(ids)


def _from_model_config(folder: Path, name: str) -> tuple[int, ...] | None:
    config = read_config(folder)
    path = folder / "config.json"
    ids = _token_field(config, name, path)
    if ids is not None:
        return ids
    nested = next((config[key] for key in NESTED_CONFIGS if isinstance(config.get(key), dict)), {})
    return _token_field(nested, name, path)


def generation_tokens(path: str | os.PathLike) -> dict:
    """`eos_token_id` (a tuple of ids, or None: never stop early) and `pad_token_id` for
    `generate`, as transformers' `generate` takes them for the checkpoint folder (or cached repo
    id) `path`.

    >>> generation_tokens(path)["eos_token_id"] is None          # all-MiniLM-L6-v2: an encoder
    True
    """
    folder = local_folder(path)
    file = folder / "generation_config.json"
    if file.is_file():
        fields = read_json_object(file, "a JSON {kind}, not a generation config")
        eos, pad = (_token_field(fields, name, file) for name in ("eos_token_id", "pad_token_id"))
    else:
        eos, pad = (_from_model_config(folder, name) for name in ("eos_token_id", "pad_token_id"))
    # transformers' generate pads with the first EOS when there is no pad token; with neither,
    # nothing is ever padded and the value does not matter.
    pad_token_id = pad[0] if pad else eos[0] if eos else 0
    return {"eos_token_id": eos, "pad_token_id": pad_token_id}
