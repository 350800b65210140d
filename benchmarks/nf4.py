"""NF4 storage and dequantization speed: lorax.nf4 against bitsandbytes on the same tensor.

(a) Storage: bytes held per parameter by an NF4 + double-quantization 4096x4096 base
    (packed codes + statistics) / numel. At blocksize 64 the limit is
    0.5 + 1/64 + 4/(64*256) = 0.5156 bytes (4 bits, an 8-bit code per 64 values, an fp32 per
    64*256 values), plus the 4-byte offset.
(b) Dequantization throughput on the CPU, side by side in one process on one tensor: ours
    (`lorax.nf4.dequantize`, jitted, block_until_ready) and bitsandbytes'
    `dequantize_4bit` (its C kernel on CPU). Each call returns a new array, as both public
    APIs do. Runs alternate between the two libraries; warm-up calls are excluded; the
    figure is the median. Both produce the same values (checked).

    Memory, the same for both libraries. Both torch and XLA take the output from glibc
    malloc, which serves allocations of 32 MiB and more with a fresh mmap per call, so every
    call also pays the kernel for 64 MiB of new zeroed pages (16,384 page faults; on the VM
    where this was written, ~38 ms, more than either kernel). In a training loop freed
    memory is handed out again, so two phases are timed:

    - steady state (the headline): the process asks glibc to keep freed memory and hand it
      out again (mallopt: one arena, mmap threshold and trim threshold 1 GiB), so neither
      side page-faults after warm-up. One arena is needed because XLA allocates on its
      worker threads, and a thread's own arena (a 64 MiB heap) cannot hold a 64 MiB array,
      which glibc then mmaps whatever the threshold.
    - fresh memory (reference): the mmap threshold back to glibc's largest default, 32 MiB,
      so each output is new pages again, as with glibc's defaults.

    Page faults per call (getrusage) are printed beside the times to show which is which.

Run it (CPU, Linux with glibc):

    python benchmarks/nf4.py

The last line is `ours_over_bnb_dequant=<ratio>`: our throughput over bitsandbytes' for the
fp32 output in the steady state (higher is better); the line before it,
`ours_over_bnb_dequant_fresh=<ratio>`, the same with fresh pages for every output.
"""

import ctypes

# Must run before jax and torch start their threads: a thread keeps the arena it first used.
GLIBC = ctypes.CDLL("libc.so.6")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
assert GLIBC.mallopt(M_ARENA_MAX, 1) == 1

import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import bitsandbytes.functional as F  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from interop.bnb import to_bnb  # noqa: E402
from lorax import nf4  # noqa: E402

SHAPE = (4096, 4096)
RUNS = 21
GLIBC_MAX_DEFAULT_MMAP_THRESHOLD = 32 << 20


def reuse_freed_memory(reuse: bool):
    """Steady state (True): glibc keeps freed memory and serves large allocations from it.
    Fresh (False): allocations of 32 MiB and more get new pages, as with glibc's defaults."""
    threshold = 1 << 30 if reuse else GLIBC_MAX_DEFAULT_MMAP_THRESHOLD
    assert GLIBC.mallopt(M_MMAP_THRESHOLD, threshold) == 1
    assert GLIBC.mallopt(M_TRIM_THRESHOLD, threshold) == 1


def page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def median_seconds(calls: dict, runs: int = RUNS) -> dict:
    """Median and best wall time and mean page faults per call, the calls interleaved so that
    machine noise hits all alike."""
    for call in calls.values():
        call()  # warm-up: compilation, first touch of tables, the allocator's first request
        call()
    times = {name: [] for name in calls}
    faults = {name: 0 for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            faults_before = page_faults()
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
            faults[name] += page_faults() - faults_before
    return {name: (statistics.median(times[name]), min(times[name]), faults[name] / runs) for name in calls}


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
    ratios = {}
    for reuse in (False, True):
        reuse_freed_memory(reuse)
        memory = "steady state (freed memory reused)" if reuse else "fresh pages for every output"
        for dtype in (jnp.float32, jnp.bfloat16):
            bnb_state.dtype = getattr(torch, jnp.dtype(dtype).name)
            ours_q = q.astype(dtype)
            np.testing.assert_array_equal(np.asarray(nf4.dequantize(ours_q).astype(jnp.float32)),
                                          F.dequantize_4bit(bnb_packed, bnb_state).float().numpy())
            results = median_seconds({
                "bitsandbytes": lambda: F.dequantize_4bit(bnb_packed, bnb_state),
                "ours": lambda: nf4.dequantize(ours_q).block_until_ready(),
            })
            out_bytes = numel * jnp.dtype(dtype).itemsize
            print(f"dequantize to {jnp.dtype(dtype).name} ({out_bytes / 2**20:.0f} MiB out), {memory}, "
                  f"median of {RUNS}:")
            for name, (seconds, best, faults) in results.items():
                print(f"  {name:13s} {1e3 * seconds:8.2f} ms (best {1e3 * best:6.2f})  "
                      f"{numel / seconds / 1e9:6.3f} Gparams/s  {out_bytes / seconds / 1e9:6.2f} GB/s written  "
                      f"{faults:6.0f} page faults/call")
            ratios[reuse, dtype] = results["bitsandbytes"][0] / results["ours"][0]
            # The best calls are the ones other processes disturbed least: a second estimate
            # when the machine is shared.
            print(f"  ours/bitsandbytes throughput: {ratios[reuse, dtype]:.2f} "
                  f"(best call over best call: {results['bitsandbytes'][1] / results['ours'][1]:.2f})")
    print(f"ours_over_bnb_dequant_fresh={ratios[False, jnp.float32]:.2f}")
    print(f"ours_over_bnb_dequant={ratios[True, jnp.float32]:.2f}")


if __name__ == "__main__":
    main()
