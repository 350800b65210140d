"""`interop.from_pretrained` keeps memory near the size of the result: the weights are copied
once, from the memory-mapped file into the arrays that become the model's (JAX aliases them on
CPU), with no second full copy (no per-layer lists stacked afterwards, no device_put copy).

A fresh process loads a ~100 MB checkpoint written by transformers and reports its peak resident
memory (ru_maxrss) above what it had before the load. The file's mapped pages count in that
figure, so the expected peak is the file plus the result; one extra copy of the model would add a
whole result on top.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

LOAD_AND_MEASURE = r"""
import json, resource, sys
import jax, jax.numpy as jnp
from flax import nnx
import interop
folder, dtype = sys.argv[1], getattr(jnp, sys.argv[2])
interop.from_pretrained(sys.argv[3], progress=False, dtype=dtype)  # warm-up: imports, tracing, thread pool
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = interop.from_pretrained(folder, progress=False, dtype=dtype)
jax.block_until_ready(nnx.state(model))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model)))
print(json.dumps({"peak_above_before": (peak - before) * 1024, "result": result}))
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folders = {}
    for name, vocab, layers in [("big", 32000, 4), ("small", 500, 1)]:
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=384, intermediate_size=1024,
                                          num_hidden_layers=layers, num_attention_heads=6, num_key_value_heads=2,
                                          tie_word_embeddings=False)
        torch.manual_seed(0)
        folders[name] = tmp_path_factory.mktemp(name)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folders[name])
    return folders


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_memory_is_the_file_plus_the_result(checkpoints, dtype):
    file_size = os.path.getsize(checkpoints["big"] / "model.safetensors")
    run = subprocess.run([sys.executable, "-c", LOAD_AND_MEASURE, str(checkpoints["big"]), dtype,
                          str(checkpoints["small"])], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert abs(measured["result"] - file_size / (1 if dtype == "float32" else 2)) < 0.01 * file_size
    expected = file_size + measured["result"]
    # A second full copy of the model would add `result` (50-100 MB) above `expected`.
    assert measured["peak_above_before"] < expected + 0.4 * measured["result"], (measured, file_size)
