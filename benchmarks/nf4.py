"""NF4 storage and dequantization speed: lorax.nf4 against bitsandbytes on the same tensor.

(a) Storage: bytes held per parameter by an NF4 + double-quantization 4096x4096 base
    (packed codes + statistics) / numel. At blocksize 64 the limit is
    0.5 + 1/64 + 4/(64*256) = 0.5156 bytes (4 bits, an 8-bit code per 64 values, an fp32 per
    64*256 values), plus the 4-byte offset.
(b) Dequantization throughput on the CPU, side by side in one process on one tensor: ours
    (`lorax.nf4.dequantize`, jitted, block_until_ready) and bitsandbytes'
    `dequantize_4bit` (its C kernel on CPU). Each call returns a fresh array, as both public
    APIs do. Runs alternate between the two libraries; warm-up calls are excluded; the
    figure is the median. Both produce the same values (checked).

Run it (CPU):

    python benchmarks/nf4.py

The last line is `ours_over_bnb_dequant=<ratio>`: our throughput over bitsandbytes' for the
fp32 output (higher is better).
"""

import statistics
import time

import bitsandbytes.functional as F
import jax
import jax.numpy as jnp
import numpy as np
import torch

from interop.bnb import to_bnb
from lorax import nf4

SHAPE = (4096, 4096)
RUNS = 15


def median_seconds(calls: dict, runs: int = RUNS) -> dict:
    """Median wall time per call, the calls interleaved so that machine noise hits all alike."""
    for call in calls.values():
        call()  # warm-up: compilation, first-touch of tables
    times = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    weight = jax.random.normal(jax.random.key(0), SHAPE, jnp.float32) * 0.02
    q = jax.block_until_ready(nf4.quantize(weight, blocksize=64, quant_type="nf4", double_quant=True))
    numel = q.size

    # (a) storage
    packed, state = to_bnb(q)
    bnb_bytes = sum(t.numel() * t.element_size() for t in (packed, state.absmax, state.state2.absmax, state.offset))
    print(f"storage: NF4 + double quant, blocksize 64, {SHAPE[0]}x{SHAPE[1]}")
    print(f"  ours: {q.stored_bytes():,d} bytes = {q.stored_bytes() / numel:.5f} bytes/param "
          f"(packed {q.packed.nbytes:,d}, absmax codes {q.absmax.nbytes:,d}, "
          f"nested absmax {q.nested_absmax.nbytes:,d}, offset {q.offset.nbytes})")
    print(f"  bitsandbytes QuantState of the same tensor: {bnb_bytes:,d} bytes = {bnb_bytes / numel:.5f} bytes/param")
    print(f"storage_bytes_per_param={q.stored_bytes() / numel:.5f}")

    # (b) throughput; bnb quantizes the same tensor itself
    bnb_packed, bnb_state = F.quantize_4bit(torch.from_numpy(np.array(weight)), blocksize=64, quant_type="nf4",
                                            compress_statistics=True)
    assert np.array_equal(bnb_packed.numpy().reshape(-1), np.asarray(q.packed))
    results = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        torch_dtype = getattr(torch, jnp.dtype(dtype).name)
        bnb_state.dtype = torch_dtype
        ours_q = q.astype(dtype)
        np.testing.assert_array_equal(np.asarray(nf4.dequantize(ours_q).astype(jnp.float32)),
                                      F.dequantize_4bit(bnb_packed, bnb_state).float().numpy())
        seconds = median_seconds({
            "bitsandbytes": lambda: F.dequantize_4bit(bnb_packed, bnb_state),
            "ours": lambda: nf4.dequantize(ours_q).block_until_ready(),
        })
        out_bytes = numel * jnp.dtype(dtype).itemsize
        print(f"dequantize to {jnp.dtype(dtype).name} ({out_bytes / 2**20:.0f} MiB out), median of {RUNS}:")
        for name, s in seconds.items():
            print(f"  {name:13s} {1e3 * s:8.2f} ms  {numel / s / 1e9:6.3f} Gparams/s  "
                  f"{out_bytes / s / 1e9:6.2f} GB/s written")
        results[dtype] = seconds["bitsandbytes"] / seconds["ours"]
        print(f"  ours/bitsandbytes throughput: {results[dtype]:.2f}")
        # Where our time goes: the same computation writing into a donated buffer, so no fresh
        # pages are needed (bitsandbytes' dequantize_4bit has no CPU variant that takes `out`).
        into = jax.jit(lambda out, q: nf4.dequantize(q), donate_argnums=0, keep_unused=True)
        buffer = [jnp.zeros(SHAPE, dtype)]

        def ours_in_place():
            buffer[0] = into(buffer[0], ours_q).block_until_ready()

        in_place = median_seconds({"ours in place": ours_in_place})["ours in place"]
        print(f"  ours, into a donated buffer: {1e3 * in_place:.2f} ms  {numel / in_place / 1e9:6.3f} Gparams/s "
              f"(the rest of the fresh-array time is the OS supplying {out_bytes / 2**20:.0f} MiB of new pages)")
    print(f"ours_over_bnb_dequant={results[jnp.float32]:.2f}")


if __name__ == "__main__":
    main()
