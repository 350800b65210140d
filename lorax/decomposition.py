"""PiSSA and OLoRA: adapters initialised from a decomposition of the base weight, the base
replaced by what is left (peft's `init_lora_weights="pissa"`, `"pissa_niter_<n>"`, `"olora"`).

With W the torch-layout weight (out, in) and s the LoRA scale:

- PiSSA (Meng et al. 2024): W = V S Uᵀ; A = √(S_r/s)·U_rᵀ, B = V_r·√(S_r/s). The adapter
  starts on the r principal directions of W; `pissa_niter_<n>` finds them with `n` subspace
  iterations of a randomized SVD (Halko et al., torch.svd_lowrank's algorithm) instead of a
  full SVD: much faster on large weights, and random.
- OLoRA (Büyükakyüz 2024): W = Q R; A = R[:r], B = Q[:, :r].

Either way the stored base becomes the residual W - s·B·A, so the adapted model equals the base
at init, and a trained adapter only means something on top of that residual. peft (and we) write
`init_lora_weights` into adapter_config.json, so loading the adapter onto the *original* base
recomputes the same residual (exactly for "pissa" and "olora"; with "pissa_niter_<n>" only as
far as the random iterations agree). `interop.save_adapter(..., initial=...)` instead writes a
plain LoRA adapter of rank 2r that needs nothing but the original base (peft's
`path_initial_model_for_weight_conversion`). `lorax.disable_adapters` gives the residual
model, not the original (peft's `disable_adapter()` too).

Decompositions run in float32 on the dense weight; the residual keeps the base's dtype.
QLoRA: `lorax.lora(..., quantize="nf4")` quantizes the *residual* (the QPiSSA recipe: the
principal part stays in the full-precision adapter). An already 4-bit base is dequantized,
decomposed and quantized again for OLoRA, as peft does with bitsandbytes weights; PiSSA refuses
it, as peft does.

>>> import jax, jax.numpy as jnp
>>> kernel = jax.random.normal(jax.random.key(0), (6, 4))          # our (in, out)
>>> a, b, residual = decompose(kernel, r=2, scale=1.0, method="pissa", key=jax.random.key(1))
>>> bool(jnp.allclose(residual + a @ b, kernel, atol=1e-5))
True
"""

import functools

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from lorax.config import DECOMPOSITION_INITS, LoraConfig
from lorax.errors import LoraConfigError
from lorax.nf4 import Nf4Array, dequantize, quantize_like
from lorax.targets import Target

OLORA = "olora"


def _randomized_svd(w: jax.Array, r: int, niter: int, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """U (m, r), S (r,), Vh (r, n) of w's r leading singular triplets, as torch.svd_lowrank(w, q=r,
    niter=niter) finds them: a random range, refined by `niter` power iterations (Halko et al.
    2009, algorithms 4.4 and 5.1)."""
    tall = w.shape[0] >= w.shape[1]
    x = w if tall else w.T  # work on the tall side, as torch does

    def orthonormal(y):
        return jnp.linalg.qr(y)[0]

    q = orthonormal(x @ jax.random.normal(key, (x.shape[1], r), x.dtype))
    for _ in range(niter):
        q = orthonormal(x @ orthonormal(x.T @ q))
    u, s, vh = jnp.linalg.svd(q.T @ x, full_matrices=False)
    u = q @ u
    return (u, s, vh) if tall else (vh.T, s, u.T)


@functools.partial(jax.jit, static_argnames=("r", "method"))
def decompose(kernel: jax.Array, *, r: int, scale: float, method: str,
              key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(a (in, r), b (r, out), residual (in, out)) for one kernel in our (in, out) layout, all float32:
    residual + scale·a@b equals the kernel (up to rounding).

    Args:
        kernel: the dense base weight, (in, out).
        r: the adapter's rank (at most min(in, out)).
        scale: the adapter's scale (lora_alpha / r, or / √r with rsLoRA).
        method: "pissa", "pissa_niter_<n>" or "olora".
        key: randomness for "pissa_niter_<n>" (unused otherwise).
    """
    w = kernel.astype(jnp.float32).T  # torch's (out, in), so the formulas read as peft's
    if method == OLORA:
        q, upper = jnp.linalg.qr(w)
        lora_a, lora_b = upper[:r], q[:, :r]  # (r, in), (out, r)
    else:
        match = DECOMPOSITION_INITS.fullmatch(method)
        if match is None:
            raise LoraConfigError(f"unknown decomposition {method!r}; use 'pissa', 'pissa_niter_<n>' or 'olora'")
        if match.group(1) is None:  # "pissa": the full SVD
            v, s, uh = jnp.linalg.svd(w, full_matrices=False)
        else:
            v, s, uh = _randomized_svd(w, r, int(match.group(1)), key)
        root = jnp.sqrt(s[:r] / scale)
        lora_a, lora_b = root[:, None] * uh[:r], v[:, :r] * root[None, :]
    a, b = lora_a.T, lora_b.T
    return a, b, kernel.astype(jnp.float32) - scale * (a @ b)


def decompose_leaf(leaf: jax.Array | Nf4Array, targets: list[Target], config: LoraConfig, key: jax.Array,
                   bar: tqdm | None = None) -> tuple[jax.Array | Nf4Array, dict[int | None, tuple[jax.Array, jax.Array]]]:
    """The residual base of one stored kernel (a single module, or a stack whose layers `targets`
    name) and each target's float32 (a, b), keyed by layer (None for a single module).

    A stack's layers that no target names keep their weight. A 4-bit base comes back 4-bit,
    quantized as it was (OLoRA only; PiSSA refuses it, as peft does)."""
    method = config.init_lora_weights
    dense = leaf
    if isinstance(leaf, Nf4Array):
        if method != OLORA:
            raise LoraConfigError(
                f"{targets[0].path!r} is already 4-bit: init_lora_weights={method!r} needs the full-precision "
                "weight (peft refuses it too). Decompose first, then quantize the residual: "
                "lorax.lora(full_precision_params, config, key=key, quantize='nf4') does both"
            )
        dense = dequantize(leaf)
    factors, residuals = {}, {}
    for t in targets:
        kernel = dense if t.layer is None else dense[t.layer]
        if t.r > min(kernel.shape):
            raise LoraConfigError(f"{t.path!r}: init_lora_weights={method!r} needs r <= min(in, out) = "
                                  f"{min(kernel.shape)} (the rank of the weight), got r={t.r}")
        a, b, residual = decompose(kernel, r=t.r, scale=config.scale_for(t.r, t.lora_alpha), method=method,
                                   key=key if t.layer is None else jax.random.fold_in(key, t.layer))
        factors[t.layer], residuals[t.layer] = (a, b), residual.astype(dense.dtype)
        if bar is not None:
            bar.update()
    if None in residuals:
        dense = residuals[None]
    else:  # one new stack (not a copy of the whole stack per adapted layer)
        dense = jnp.stack([residuals.get(i, dense[i]) for i in range(dense.shape[0])])
    return (quantize_like(dense, leaf) if isinstance(leaf, Nf4Array) else dense), factors
