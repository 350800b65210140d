"""lorax.nf4 against bitsandbytes on CPU: the same packed bytes, statistics and dequantized values
for NF4/FP4, with and without double quantization; error bounds; jit; QLoRA; the bnb bridge."""

import copy
import itertools
import os
import subprocess
import sys

import bitsandbytes as bnb
import bitsandbytes.functional as F
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import quax
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lorax
from conftest import jax_mlp, lorax_line, peft_line, perturb_trained_leaves, sync_into_peft, torch_to_params
from interop.bnb import from_bnb, to_bnb
from lorax import nf4
from lorax.arrays import LoraArray

TORCH_DTYPES = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16, jnp.float16: torch.float16}
SHAPES = [(1000,), (4096 + 7,), (33, 65)]
BLOCKSIZES = [64, 128, 256]


def test_codebooks_are_bitsandbytes():
    assert np.array_equal(nf4.NF4_CODE, F.get_4bit_type("nf4", device="cpu").numpy())
    assert np.array_equal(nf4.FP4_CODE, F.get_4bit_type("fp4", device="cpu").numpy())
    assert np.array_equal(nf4.DYNAMIC_CODE, F.create_dynamic_map().numpy())
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    for quant_type in nf4.QUANT_TYPES:
        bounds, order = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
        ours_bounds, ours_order = nf4._bounds(quant_type)
        assert np.array_equal(ours_bounds, bounds.numpy()) and np.array_equal(ours_order, order.numpy())


def weight(shape, dtype, seed):
    """Normal values at one of three scales, plus what stresses the format: an all-zero block,
    an all-zero trailing block, and a block of tiny positives (FP4 sends them to -0)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * [0.02, 1.0, 30.0][seed % 3]).astype(np.float32).reshape(-1)
    x[64:128] = 0
    if x.size % 64:
        x[-(x.size % 64):] = 0  # bnb stores absmax 1e-38 for an all-zero trailing block
    x[256:320] = rng.random(64) * 1e-3
    x[319] = 1.0  # the block's absmax: the others scale below FP4's first midpoint
    return jnp.asarray(x.reshape(shape)).astype(dtype)


def torch_of(x: jax.Array) -> torch.Tensor:
    return torch.from_numpy(np.array(x.astype(jnp.float32))).to(TORCH_DTYPES[x.dtype.type])


# Each (quant_type, double_quant, dtype) meets every blocksize and every shape, and every
# (blocksize, shape) pair occurs: a Latin square instead of the full 108-case product.
BIT_EXACT_CASES = [
    (quant_type, double_quant, dtype, BLOCKSIZES[j], SHAPES[(j + k) % 3])
    for k, (quant_type, double_quant, dtype) in enumerate(
        itertools.product(nf4.QUANT_TYPES, [False, True], [jnp.float32, jnp.bfloat16, jnp.float16]))
    for j in range(3)
]


@pytest.mark.parametrize("quant_type, double_quant, dtype, blocksize, shape", BIT_EXACT_CASES)
def test_bit_exact_with_bitsandbytes(quant_type, double_quant, dtype, blocksize, shape):
    x = weight(shape, dtype, seed=len(shape) + blocksize)
    packed, state = F.quantize_4bit(torch_of(x), blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=double_quant)
    q = nf4.quantize(x, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)

    np.testing.assert_array_equal(np.asarray(q.packed), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.absmax), state.absmax.numpy())
    if double_quant:
        np.testing.assert_array_equal(np.asarray(q.nested_absmax), state.state2.absmax.numpy())
        assert np.asarray(q.offset).tobytes() == state.offset.numpy().tobytes()
    else:
        assert q.nested_absmax is None and q.offset is None
    theirs = F.dequantize_4bit(packed, state)  # quirk: bnb returns (1, n) for a 1-D weight
    ours = nf4.dequantize(q)
    assert ours.shape == shape and ours.dtype == dtype
    np.testing.assert_array_equal(np.asarray(ours.astype(jnp.float32)), theirs.float().numpy().reshape(shape))


def test_bit_exact_at_xla_default_optimization():
    """The suite compiles with LLVM at -O0 (conftest.py); the bitsandbytes bit-exactness tests run
    again at XLA's default level, where LLVM may contract multiply-adds, in a fresh interpreter."""
    # (An XLA_FLAGS of blanks would be read as a file name: keep only the other flags.)
    flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split() if flag != "--xla_backend_optimization_level=0"]
    env = {**os.environ, "LORAX_TEST_DEFAULT_XLA": "1", "XLA_FLAGS": " ".join(flags)}
    # Every (quant_type, double_quant, dtype) at blocksize 64, and the rounding-boundary tests.
    selected = "(bit_exact_with and 64) or rounds_like_bnb or double_quant_codes"
    # In the one process (-n 0): xdist workers would each import torch and jax again, beside the suite's own.
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", __file__, "-k",
                             selected],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


@pytest.mark.parametrize("quant_type", nf4.QUANT_TYPES)
def test_scaling_rounds_like_bnb_at_code_boundaries(quant_type):
    """bnb multiplies full blocks by 1/absmax but divides the trailing partial block by its
    absmax; values a few ulps around absmax × each midpoint tell the two apart (and XLA would
    turn a division by one scalar into a reciprocal multiplication if it could)."""
    absmax = np.float32(3.7)
    near = [np.float32(bound) * absmax for bound in nf4._bounds(quant_type)[0]]
    near = np.concatenate([c + np.arange(-6, 7) * np.spacing(c) for c in near]).astype(np.float32)
    near = near[np.abs(near) >= np.finfo(np.float32).tiny]  # XLA flushes subnormals (FP4's 0 | -0 bound)
    bounds = nf4._bounds(quant_type)[0]
    assert np.any(np.searchsorted(bounds, near * (np.float32(1) / absmax)) != np.searchsorted(bounds, near / absmax))
    block = np.concatenate([[absmax], near])
    x = np.concatenate([block, np.zeros(256 - block.size, np.float32), block]).astype(np.float32)  # full + tail
    packed, state = F.quantize_4bit(torch.from_numpy(x), blocksize=256, quant_type=quant_type)
    q = nf4.quantize(jnp.asarray(x), blocksize=256, quant_type=quant_type)
    np.testing.assert_array_equal(np.asarray(q.packed), packed.numpy().reshape(-1))


def test_double_quant_codes_at_every_threshold():
    """bnb's 8-bit quantizer picks codes through a 65536-entry table and a fused multiply-add;
    values at each derived threshold and one float below it land where bnb puts them."""
    thresholds = nf4._DYNAMIC_THRESHOLDS
    values = np.concatenate([thresholds, np.nextafter(thresholds, -np.float32(2))]).astype(np.float32)
    rows = -(-values.size // 255)
    blocks = np.concatenate([values, np.zeros(rows * 255 - values.size, np.float32)]).reshape(rows, 255)
    data = np.concatenate([blocks, np.ones((rows, 1), np.float32)], axis=1).reshape(-1)  # absmax 1: normed = value
    codes, absmax = F.quantize_blockwise(torch.from_numpy(data), blocksize=256)
    ours_codes, ours_absmax = jax.jit(nf4._quantize_blockwise_8bit)(jnp.asarray(data))
    np.testing.assert_array_equal(np.asarray(ours_codes), codes.numpy())
    np.testing.assert_array_equal(np.asarray(ours_absmax), absmax.absmax.numpy())


@pytest.mark.parametrize("size", [1, 5, 8, 13, 100, 1023, 4100, 20000])
def test_offset_is_torch_mean(size):
    """The double-quantization offset is torch's float32 mean, whose summation order is its own."""
    x = np.random.default_rng(size).random(size, dtype=np.float32) * 3
    ours = np.asarray(jax.jit(nf4._torch_mean)(jnp.asarray(x)))
    assert ours.tobytes() == torch.from_numpy(x).mean().numpy().tobytes()


LARGEST_HALF_GAP = {t: np.diff(np.sort(nf4.CODEBOOKS[t])).max() / 2 for t in nf4.QUANT_TYPES}


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from(nf4.QUANT_TYPES),
    st.booleans(),
    st.sampled_from([(40, 24), (200,)]),
    st.data(),
)
def test_error_is_at_most_half_a_codebook_gap_per_block(quant_type, double_quant, shape, data):
    """|x - dq(q(x))| ≤ (largest gap between neighbouring code values)/2 × block absmax; with
    double quantization plus the error of the block's absmax itself."""
    elements = st.floats(-1e4, 1e4, width=32, allow_subnormal=False) | st.sampled_from([0.0, 1e-30, -2.5])
    x = data.draw(hnp.arrays(np.float32, shape, elements=elements))
    q = nf4.quantize(jnp.asarray(x), blocksize=64, quant_type=quant_type, double_quant=double_quant)
    error = np.abs(np.asarray(nf4.dequantize(q), np.float64) - x).reshape(-1)
    blocks = -(-x.size // 64)
    block_of = np.arange(x.size) // 64
    true_absmax = np.array([np.abs(x.reshape(-1)[b * 64:(b + 1) * 64]).max() for b in range(blocks)], np.float64)
    used_absmax = np.asarray(nf4._block_absmax(q), np.float64)
    bound = LARGEST_HALF_GAP[quant_type] * true_absmax + np.abs(used_absmax - true_absmax)
    assert np.all(error <= bound[block_of] * (1 + 1e-6) + 1e-30)


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_jit_eager_and_fused_agree(quant_type, double_quant):
    """The same bytes and values op by op, jitted, and inside a larger jitted computation."""
    x = weight((33, 65), jnp.float32, seed=7)
    jitted = nf4.quantize(x, quant_type=quant_type, double_quant=double_quant)
    with jax.disable_jit():
        eager = nf4.quantize(x, quant_type=quant_type, double_quant=double_quant)
        eager_values = nf4.dequantize(eager)
    for a, b in zip(jax.tree_util.tree_leaves(jitted), jax.tree_util.tree_leaves(eager)):
        np.testing.assert_array_equal(a, b)
    def step(x):
        values = nf4.dequantize(nf4.quantize(x, quant_type=quant_type, double_quant=double_quant))
        return values, jnp.tanh(values @ values.T)

    np.testing.assert_array_equal(jax.jit(step)(x)[0], eager_values)
    np.testing.assert_array_equal(nf4.dequantize(jitted), eager_values)


def test_blocked_product_never_forms_the_whole_dense_weight(monkeypatch):
    """A large linear weight is dequantized a block of output features at a time, forward and
    backward: no array of the dense weight's size appears in the computation, and the values
    and input gradient are those of dequantize-then-multiply."""
    monkeypatch.setattr(nf4, "DENSE_BLOCK_ELEMENTS", 128 * 64)
    q = nf4.QuantConfig(double_quant=True).quantize_kernel(jax.random.normal(jax.random.key(0), (256, 128)))
    assert nf4._output_blocks(q) == 4
    x = jax.random.normal(jax.random.key(1), (2, 3, 256))

    def loss(x):
        return jnp.sum(jnp.sin(quax.quaxify(lambda x, w: x @ w)(x, q)))

    text = str(jax.make_jaxpr(jax.value_and_grad(loss))(x))
    assert "f32[32,256]" in text  # one block of the dense weight (out 32 x in 256)
    assert not any(shape in text for shape in ("f32[128,256]", "f32[256,128]", "f32[32768]"))
    value, grad = jax.jit(jax.value_and_grad(loss))(x)
    want_value, want_grad = jax.value_and_grad(lambda x: jnp.sum(jnp.sin(x @ nf4.dequantize(q))))(x)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    # The blocks sum the 128 output features in another order than one dense product: fp32
    # rounding differs by ~1e-5 of the O(10) gradients (more with AVX-512's wider reductions);
    # a wrong block would be off by O(1).
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-4)
    # Sizes that do not cut into whole quantization blocks are not cut there.
    odd = nf4.QuantConfig(blocksize=256).quantize_kernel(jnp.ones((96, 40)))
    monkeypatch.setattr(nf4, "DENSE_BLOCK_ELEMENTS", 100)
    assert nf4._output_blocks(odd) == 1


def random_qlora(key, d_in, d_out, r, scale, config=nf4.QuantConfig()):
    kw, ka, kb = jax.random.split(key, 3)
    w = config.quantize_kernel(jax.random.normal(kw, (d_in, d_out)))
    return LoraArray(w, jax.random.normal(ka, (d_in, r)), jax.random.normal(kb, (r, d_out)), scale=scale, path="layer")


def dense(weight: LoraArray) -> np.ndarray:
    """x@dequant(w) + s·(x@a)@b's weight, formed in float64."""
    a, b = np.asarray(weight.a, np.float64), np.asarray(weight.b, np.float64)
    return np.asarray(nf4.dequantize(weight.w), np.float64) + float(weight.scale) * a @ b


@pytest.mark.parametrize("config", [nf4.QuantConfig(), nf4.QuantConfig("fp4", 128, double_quant=True)])
def test_qlora_product_and_gradients(config, dense_blocks):
    weight = random_qlora(jax.random.key(0), 96, 40, 4, 0.5, config)
    x = jax.random.normal(jax.random.key(1), (3, 5, 96))
    product = jax.jit(quax.quaxify(lambda x, w: x @ w))
    expected = np.asarray(x, np.float64) @ dense(weight)
    np.testing.assert_allclose(product(x, weight), expected, rtol=1e-5, atol=1e-4)
    y = jax.random.normal(jax.random.key(2), (40, 2))
    np.testing.assert_allclose(quax.quaxify(lambda w, y: w @ y)(weight, y), dense(weight) @ np.asarray(y, np.float64),
                               rtol=1e-5, atol=1e-4)
    z = jax.random.normal(jax.random.key(3), (2, 40))
    np.testing.assert_allclose(quax.quaxify(lambda z, w: z @ w.T)(z, weight),
                               np.asarray(z, np.float64) @ dense(weight).T, rtol=1e-5, atol=1e-4)

    def loss(x, weight):
        return jnp.sum(jnp.sin(product(x, weight)))

    grad_x, grad_w = jax.grad(loss, argnums=(0, 1), allow_int=True)(x, weight)
    w_dense = jnp.asarray(dense(weight), jnp.float32)
    want_x = jax.grad(lambda x: jnp.sum(jnp.sin(x @ w_dense)))(x)
    np.testing.assert_allclose(grad_x, want_x, rtol=1e-4, atol=1e-4)
    base = jnp.asarray(nf4.dequantize(weight.w))
    want_a, want_b = jax.grad(lambda a, b: jnp.sum(jnp.sin(x @ (base + weight.scale * a @ b))),
                              argnums=(0, 1))(weight.a, weight.b)
    np.testing.assert_allclose(grad_w.a, want_a, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(grad_w.b, want_b, rtol=1e-4, atol=1e-3)
    # The quantized base gets nothing: float0 for the integer codes, zeros for the fp32 statistics.
    for leaf in jax.tree_util.tree_leaves(grad_w.w):
        assert leaf.dtype == jax.dtypes.float0 or not np.any(np.asarray(leaf))


@pytest.mark.parametrize("side", ["x @ w", "w.T @ x"])
def test_backward_pass_dequantizes_again_instead_of_keeping_the_dense_weight(side, dense_blocks):
    """The vjp of a product with an NF4 weight keeps the 4-bit weight, not its dense copy (8x
    the bytes in fp32), and gives the gradient that dequantize-then-multiply gives."""
    q = nf4.QuantConfig(double_quant=True).quantize_kernel(jax.random.normal(jax.random.key(0), (256, 128)))
    if side == "x @ w":
        x = jax.random.normal(jax.random.key(1), (4, 256))
        ours, reference = (lambda x: quax.quaxify(lambda x, w: x @ w)(x, q)), (lambda x: x @ nf4.dequantize(q))
    else:
        x = jax.random.normal(jax.random.key(1), (256, 4))
        ours, reference = (lambda x: quax.quaxify(lambda w, x: w.T @ x)(q, x)), (lambda x: nf4.dequantize(q).T @ x)
    out, vjp_ours = jax.vjp(ours, x)
    want, vjp_reference = jax.vjp(reference, x)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)  # blocked: the matmul sums in another order
    cotangent = jax.random.normal(jax.random.key(2), out.shape)
    np.testing.assert_allclose(vjp_ours(cotangent)[0], vjp_reference(cotangent)[0], rtol=1e-6, atol=1e-5)
    # What each vjp keeps for the backward pass: its residuals are the leaves of the returned function.
    dense_bytes = 256 * 128 * 4
    assert sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(vjp_reference)) >= dense_bytes
    assert sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(vjp_ours)) <= q.stored_bytes()


def test_jitted_qlora_gradients_through_the_recomputing_rule(dense_blocks):
    """Through a LoraArray whose base is NF4, under jit: the a, b and x gradients of
    dequantize-then-multiply."""
    weight = random_qlora(jax.random.key(0), 512, 256, 4, 0.5, nf4.QuantConfig(double_quant=True))
    x = jax.random.normal(jax.random.key(1), (8, 512))

    def loss(x, a, b):
        return jnp.sum(jnp.tanh(quax.quaxify(lambda x, w: x @ w)(x, LoraArray(weight.w, a, b, scale=weight.scale))))

    def reference(x, a, b):
        # Factored like the LoraArray rule, so that both round alike.
        return jnp.sum(jnp.tanh(x @ nf4.dequantize(weight.w) + weight.scale * (x @ a) @ b))

    ours, want = (jax.jit(jax.grad(f, argnums=(0, 1, 2))) for f in (loss, reference))
    for got, expected in zip(ours(x, weight.a, weight.b), want(x, weight.a, weight.b)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_stacked_qlora_under_scan_and_merge(dense_blocks):
    """Layers stacked on a leading axis are quantized one by one and sliced by lax.scan."""
    layers, d, r = 3, 64, 2
    keys = jax.random.split(jax.random.key(0), 3)
    kernels = jax.random.normal(keys[0], (layers, d, d)) / 8
    base = nf4.QuantConfig().quantize_kernel(kernels)
    assert base.shape == (layers, d, d) and base.packed.shape == (layers, d * d // 2)
    one = nf4.QuantConfig().quantize_kernel(kernels[1])
    np.testing.assert_array_equal(base.packed[1], one.packed)
    stacked = LoraArray(base, jax.random.normal(keys[1], (layers, d, r)), jax.random.normal(keys[2], (layers, r, d)),
                        scale=jnp.full((layers,), 0.5), path="layers.*", ranks=(r,) * layers)
    x = jax.random.normal(jax.random.key(1), (2, d))

    def model(w, x):
        return jax.lax.scan(lambda h, w_i: (jnp.tanh(h @ w_i), None), x, w)[0]

    merged = lorax.merge({"layers": {"kernel": stacked}})["layers"]["kernel"]
    assert isinstance(merged, jax.Array)
    np.testing.assert_allclose(merged, nf4.dequantize(base) + 0.5 * stacked.a @ stacked.b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(quax.quaxify(model))(stacked, x), model(merged, x), rtol=1e-5, atol=1e-5)


def bnb_mlp(torch_mlp, quant: nf4.QuantConfig):
    """Seed 000's MLP with seq.0 and seq.2 as bitsandbytes Linear4bit layers (quantized on CPU)."""
    model = copy.deepcopy(torch_mlp)
    for i in (0, 2):
        linear = model.seq[i]
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, compute_dtype=torch.float32,
                                  compress_statistics=quant.double_quant, quant_type=quant.quant_type)
        layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, blocksize=quant.blocksize,
                                         compress_statistics=quant.double_quant, quant_type=quant.quant_type)
        layer.bias = linear.bias
        model.seq[i] = layer
    return model.to("cpu")


def test_lora_quantize_matches_peft_with_bitsandbytes(torch_mlp):
    """lorax.lora(..., quantize=) holds the bytes that bnb's Linear4bit holds, prints peft's line,
    and computes what peft's QLoRA model computes."""
    quant = nf4.QuantConfig("nf4", 64, double_quant=True)
    config = dict(r=3, target_modules=["seq.0", "seq.2"])
    peft_model = peft.get_peft_model(bnb_mlp(torch_mlp, quant), peft.LoraConfig(init_lora_weights=False, **config))
    params = lorax.lora(torch_to_params(torch_mlp), lorax.LoraConfig(init_lora_weights=False, **config),
                        key=jax.random.key(1), quantize=quant)
    params = perturb_trained_leaves(params, jax.random.key(2))
    sync_into_peft(params, peft_model)
    assert lorax_line(params) == peft_line(peft_model) == (
        "trainable params: 12,660 || all params: 455,262 || trainable%: 2.7808")
    for i in (0, 2):
        ours = params["seq"][i]["kernel"].w
        theirs = peft_model.base_model.model.seq[i].base_layer.weight
        assert isinstance(ours, lorax.Nf4Array) and ours.transposed and ours.shape == params["seq"][i]["kernel"].shape
        np.testing.assert_array_equal(ours.packed, theirs.data.numpy().reshape(-1))
        for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(from_bnb(theirs, transposed=True))):
            np.testing.assert_array_equal(a, b)
    assert not isinstance(params["seq"][4]["kernel"], LoraArray)  # untargeted: stays as it was
    x = torch.randn(8, 20)
    with torch.no_grad():
        theirs = peft_model(x).numpy()
    np.testing.assert_allclose(lorax.apply(jax_mlp, params, jnp.asarray(x.numpy())), theirs, rtol=1e-5, atol=1e-5)
    trainable, frozen = lorax.partition(params)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(trainable))
    assert isinstance(frozen["seq"][0]["kernel"].w, lorax.Nf4Array)
    merged = lorax.merge(params)
    np.testing.assert_allclose(jax_mlp(merged, jnp.asarray(x.numpy())), theirs, rtol=1e-5, atol=1e-5)
    restored = lorax.unmerge(merged, params)
    np.testing.assert_array_equal(restored["seq"][2]["kernel"].w.packed, params["seq"][2]["kernel"].w.packed)


@pytest.mark.parametrize("double_quant", [False, True])
def test_bnb_round_trip_is_identity(double_quant):
    x = weight((33, 65), jnp.bfloat16, seed=3)
    q = nf4.quantize(x, blocksize=128, quant_type="fp4", double_quant=double_quant)
    packed, state = to_bnb(q)
    assert packed.dtype == torch.uint8 and packed.shape == (q.packed.size, 1) and state.dtype == torch.bfloat16
    back = from_bnb(packed, state)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(q)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(q)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(F.dequantize_4bit(packed, state).float().numpy(),
                                  np.asarray(nf4.dequantize(q).astype(jnp.float32)))
    theirs_packed, theirs_state = F.quantize_4bit(torch_of(x), blocksize=128, quant_type="fp4",
                                                  compress_statistics=double_quant)
    for a, b in zip(jax.tree_util.tree_leaves(from_bnb(theirs_packed, theirs_state)), jax.tree_util.tree_leaves(q)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("double_quant", [False, True])
def test_from_bnb_reads_the_cpu_packing_format(double_quant):
    """A Linear4bit on an AVX512-BF16 CPU repacks its weight at the first eval forward pass
    (bitsandbytes' `_convert_weight_packed_for_cpu`): from_bnb reads it back into bitsandbytes'
    usual bytes, with the bfloat16 absmax that the layer computes with from then on."""
    w = torch_of(weight((64, 128), jnp.float16, seed=5))
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if double_quant else state.absmax
    repacked, repacked_state = F._convert_weight_packed_for_cpu(packed.clone(), copy.deepcopy(state))
    assert repacked_state.packing_format_for_cpu and not torch.equal(repacked.reshape(-1), packed.reshape(-1))
    q = from_bnb(repacked, repacked_state)
    np.testing.assert_array_equal(q.packed, packed.reshape(-1).numpy())
    np.testing.assert_array_equal(q.absmax, absmax.bfloat16().float().numpy())
    assert q.quant_dtype == jnp.float16 and q.quant_shape == (64, 128) and not q.double_quant
    theirs = F.dequantize_4bit(packed, F.QuantState(absmax=absmax.bfloat16().float(), shape=state.shape,
                                                    code=state.code, blocksize=64, quant_type="nf4",
                                                    dtype=torch.float16))
    np.testing.assert_array_equal(np.asarray(nf4.dequantize(q)), theirs.numpy())
    # bitsandbytes repacks only (N, K) weights with N a multiple of its 32-row tiles; anything else
    # marked as repacked is named, not misread.
    odd, odd_state = F.quantize_4bit(torch_of(weight((48, 128), jnp.float16, seed=6)), blocksize=64)
    odd_state.packing_format_for_cpu, odd_state.original_dtype = True, torch.float16
    with pytest.raises(lorax.QuantizationError, match=r"CPU packing format.*multiple of 32.*\(48, 128\)"):
        from_bnb(odd, odd_state)


def test_rules_cast_transpose_and_unsupported_ops():
    q = nf4.quantize(jax.random.normal(jax.random.key(0), (64, 32)))
    x = jax.random.normal(jax.random.key(1), (4, 64))
    out = quax.quaxify(lambda x, w: x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16))(x, q)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), x.astype(jnp.bfloat16) @ nf4.dequantize(q, jnp.bfloat16),
                               rtol=1e-2, atol=1e-2)
    z = jax.random.normal(jax.random.key(2), (3, 32))
    np.testing.assert_allclose(quax.quaxify(lambda z, w: z @ jnp.transpose(w))(z, q), z @ nf4.dequantize(q).T,
                               rtol=1e-6)
    assert q.T.T.transposed is False and q.T.shape == (32, 64)
    with pytest.raises(lorax.UnsupportedOpError, match=r"NF4-quantized weight \(64, 32\).*`exp`.*dequantize"):
        quax.quaxify(jnp.exp)(q)


def test_storage_per_parameter():
    q = nf4.quantize(jnp.ones((256, 256)), blocksize=64, double_quant=True)
    # packed + 1 byte per block + 4 bytes per 256 blocks + the 4-byte offset
    assert q.stored_bytes() == 256 * 256 // 2 + 1024 + 4 * 4 + 4
    assert q.stored_bytes() / q.size < 0.5160


def test_errors_say_what_is_allowed():
    w = jnp.ones((8, 8))
    with pytest.raises(lorax.QuantizationError, match=r"blocksize must be one of \(32, 64.*got 100; nearest: 128"):
        nf4.quantize(w, blocksize=100)
    with pytest.raises(lorax.QuantizationError, match=r"quant_type must be one of \('nf4', 'fp4'\), got 'nf3'"):
        nf4.quantize(w, quant_type="nf3")
    with pytest.raises(lorax.QuantizationError, match=r"float32, bfloat16 or float16 weights, got int32"):
        nf4.quantize(jnp.ones((8, 8), jnp.int32))
    with pytest.raises(lorax.QuantizationError, match="empty"):
        nf4.quantize(jnp.ones((0, 8)))
    with pytest.raises(lorax.QuantizationError, match="blocksize"):
        nf4.QuantConfig(blocksize=48)
    with pytest.raises(lorax.LoraConfigError, match=r"quantize must be None, one of \('nf4', 'fp4'\).*'int8'"):
        lorax.lora({"fc": {"kernel": w}}, lorax.LoraConfig(target_modules=["fc"]), key=jax.random.key(0),
                   quantize="int8")
    stacked = nf4.QuantConfig().quantize_kernel(jnp.ones((2, 8, 8)))
    with pytest.raises(lorax.QuantizationError, match="stacks"):
        to_bnb(stacked)
    packed, state = to_bnb(nf4.quantize(w))
    with pytest.raises(lorax.QuantizationError,
                       match=r"64 packed bytes cannot hold a 4-bit tensor of shape \(8, 8\) \(32 bytes\)"):
        from_bnb(torch.cat([packed, packed]), state)
