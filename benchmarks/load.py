"""Checkpoint load time: `interop.from_pretrained` vs `transformers.AutoModelForCausalLM.from_pretrained`
on the same safetensors folder, side by side in one run.

The checkpoint is a Llama-style model written by transformers itself (hidden 512, 8 layers,
vocab 32000, untied head: 58.1M parameters, 232 MB in fp32), into a temporary folder. Each loader
runs a few times after a warm-up (so both read from the page cache); the median counts. Ours
includes the copy into JAX arrays (`block_until_ready`).

Into fp32 (as stored), transformers reads no weight at load time: its parameters are views of
the memory-mapped safetensors file, and the pages come in at first use. Ours copies every weight
once, into (in, out) kernels stacked over layers. So a third line, for information, times
transformers' load followed by one read of every parameter (a sum): the same bytes touched.
A fourth, also for information, is the floor for any loader that owns its memory: a plain copy
of the file's bytes into freshly allocated memory, on the threads ours uses, with no transposing,
no dtype and no Python per tensor (the kernel zeroing the new pages is most of it). A fifth copies
only the decoder layers' tensors the same way: what stacking layers for `nnx.scan` (which the
issue asks for) must move whatever the kernel layout, since a file's per-layer tensors are not
one array. And the count of tensors that lie 64-byte aligned in the mapping, the alignment
XLA:CPU needs to adopt a host buffer without copying it: the others must be copied by any JAX
loader, whatever the layout.

    python benchmarks/load.py

The last line is `ours_over_transformers_load=<ratio>` (below 1.0: we load faster). The same
comparison loading into bfloat16 (both sides convert every weight) is printed before it.
"""

import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

import interop  # noqa: E402
from interop.checkpoint import safetensors_header  # noqa: E402
from interop.hf import ALIGNMENT, aligned_empty  # noqa: E402
from interop.layout_copy import Copy, copy_all  # noqa: E402

REPEATS = 5


def timed(load) -> float:
    load()  # warm-up: imports, page cache, first compilation of nothing
    times = []
    for _ in range(REPEATS):
        # The previous load's model is garbage now; transformers' modules hold reference cycles,
        # so without a collection here their memory would be freed at a random point of a later
        # timing. (timeit takes the garbage collector out of its timings for the same reason.)
        gc.collect()
        start = time.perf_counter()
        load()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                      num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.save_pretrained(folder)
        parameters = sum(p.numel() for p in model.parameters())
        del model
        size = os.path.getsize(os.path.join(folder, "model.safetensors")) / 1e6

        def ours(dtype=jnp.float32):
            loaded = interop.from_pretrained(folder, progress=False, dtype=dtype)
            jax.block_until_ready(nnx.state(loaded))

        def theirs(dtype=torch.float32):
            return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)

        def theirs_read():
            with torch.no_grad():
                sum(float(p.sum()) for p in theirs().parameters())

        path = os.path.join(folder, "model.safetensors")
        data_start, entries = safetensors_header(Path(path))
        ranges = {name: (data_start + start, data_start + end) for name, (_, _, start, end) in entries.items()}
        aligned = sum(start % ALIGNMENT == 0 for start, _ in ranges.values())  # the mapping itself is page-aligned

        def plain_copy(names=None):
            """The whole file in one piece, or the tensors `names`, each into its own fresh memory."""
            stored = np.memmap(path, np.uint8, mode="r")
            pieces = [stored] if names is None else [stored[slice(*ranges[n])] for n in names]
            copy_all([Copy(aligned_empty(piece.shape, np.uint8), piece) for piece in pieces], progress=False)

        layer_names = [name for name in ranges if ".layers." in name]
        layer_size = sum(ranges[n][1] - ranges[n][0] for n in layer_names) / 1e6

        # Also into bfloat16, where both sides must convert (and so read) every weight; shown for
        # information, the fp32 load is the one the ratio is about.
        ours_bf16, theirs_bf16 = timed(lambda: ours(jnp.bfloat16)), timed(lambda: theirs(torch.bfloat16))
        ours_s, theirs_s, theirs_read_s, plain_s = timed(ours), timed(theirs), timed(theirs_read), timed(plain_copy)
        layers_s = timed(lambda: plain_copy(layer_names))
    print(f"checkpoint: Llama-style, {parameters / 1e6:.1f}M parameters, {size:.0f} MB safetensors (fp32)")
    print(f"machine: {jax.devices()[0].platform}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, jax {jax.__version__}")
    width = 56
    print(f"{'interop.from_pretrained, bf16':<{width}}{ours_bf16:8.3f} s (median of {REPEATS})")
    print(f"{'transformers AutoModelForCausalLM.from_pretrained, bf16':<{width}}{theirs_bf16:8.3f} s")
    print(f"ours_over_transformers_load_bf16={ours_bf16 / theirs_bf16:.3f}")
    print(f"{'interop.from_pretrained':<{width}}{ours_s:8.3f} s (median of {REPEATS})")
    print(f"{'transformers AutoModelForCausalLM.from_pretrained':<{width}}{theirs_s:8.3f} s")
    print(f"{'  the same, then one read of every parameter':<{width}}{theirs_read_s:8.3f} s")
    print(f"{'a plain copy of the file into fresh memory':<{width}}{plain_s:8.3f} s")
    print(f"{f'a plain copy of the layers only ({layer_size:.0f} MB)':<{width}}{layers_s:8.3f} s")
    print(f"tensors 64-byte aligned in the mapping: {aligned} of {len(ranges)}")
    print(f"plain_copy_over_transformers_load={plain_s / theirs_s:.3f}")
    print(f"layers_copy_over_transformers_load={layers_s / theirs_s:.3f}")
    print(f"ours_over_transformers_load_and_read={ours_s / theirs_read_s:.3f}")
    print(f"ours_over_transformers_load={ours_s / theirs_s:.3f}")


if __name__ == "__main__":
    main()
