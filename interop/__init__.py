"""interop: the only part of lorax-jax that touches torch, transformers, peft and bitsandbytes.

Those libraries are imported lazily, inside the functions that need them, so that
`import interop` works without the `[torch]` extra. Checkpoint loading, peft adapter
export/import and merged-model export arrive here.
"""

from interop.checkpoint import CheckpointError
from interop.hf import from_pretrained

__all__ = ["CheckpointError", "from_pretrained"]

from interop.peft import load_adapter, save_adapter  # noqa: E402

__all__ += ["load_adapter", "save_adapter"]

from interop.export import save_merged  # noqa: E402

__all__ += ["save_merged"]

from interop.generation import generation_tokens  # noqa: E402

__all__ += ["generation_tokens"]
