"""LoraArray's rules against the materialized weight W + s·A·B, for random shapes and ranks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import quax
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import lorax
from lorax.arrays import LoraArray

SETTINGS = settings(max_examples=10, deadline=None)


def normal(seed: int, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    # numpy's generator: jax.random would compile anew for every shape hypothesis draws.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def random_lora(seed, d_in, d_out, r, scale, dtype=jnp.float32):
    return LoraArray(
        normal(seed, (d_in, d_out), dtype),
        normal(seed + 1, (d_in, r), dtype),
        normal(seed + 2, (r, d_out), dtype),
        scale=scale,
        path="layer",
    )


def dense(weight: LoraArray):
    """The reference: W + s·A·B formed in numpy float64."""
    return np.asarray(weight.w, np.float64) + weight.scale * np.asarray(weight.a, np.float64) @ np.asarray(weight.b, np.float64)


# (in, out, r, batch). Sizes of 1 make jnp.einsum squeeze axes, which has no rule (and an error).
shapes = st.tuples(st.integers(2, 24), st.integers(2, 24), st.integers(1, 8), st.integers(1, 5))


@SETTINGS
@given(shapes, st.floats(0.1, 4.0), st.integers(0, 2**16))
def test_factored_matmul_equals_materialized(shape, scale, seed):
    d_in, d_out, r, batch = shape
    weight = random_lora(seed, d_in, d_out, r, scale)
    x = normal(seed + 3, (batch, 3, d_in))
    expected = np.asarray(x, np.float64) @ dense(weight)
    tolerance = dict(rtol=1e-4, atol=1e-4 * (1 + np.abs(expected).max()))
    np.testing.assert_allclose(quax.quaxify(lambda x, w: x @ w)(x, weight), expected, **tolerance)
    np.testing.assert_allclose(quax.quaxify(lambda x, w: jnp.einsum("bti,io->bto", x, w))(x, weight), expected, **tolerance)


def test_factored_matmul_under_jit_never_forms_the_sum():
    """Under jit the compiled program holds no (in, out) product of A and B: only the base matmul
    and the two thin ones."""
    weight = random_lora(0, 64, 48, 4, 1.0)
    x = jax.random.normal(jax.random.key(1), (8, 64))
    step = jax.jit(quax.quaxify(lambda x, w: x @ w))
    np.testing.assert_allclose(step(x, weight), np.asarray(x, np.float64) @ dense(weight), rtol=1e-4, atol=1e-3)
    jaxpr = str(jax.make_jaxpr(quax.quaxify(lambda x, w: x @ w))(x, weight))
    assert "f32[64,48] = dot_general" not in jaxpr and jaxpr.count("dot_general") == 3


@SETTINGS
@given(shapes, st.integers(0, 2**16))
def test_weight_on_the_left_and_transposed(shape, seed):
    d_in, d_out, r, batch = shape
    weight = random_lora(seed, d_in, d_out, r, 0.5)
    y = normal(seed + 3, (d_out, batch))
    expected = dense(weight) @ np.asarray(y, np.float64)
    got = quax.quaxify(lambda w, y: w @ y)(weight, y)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * (1 + np.abs(expected).max()))
    z = normal(seed + 4, (batch, d_out))
    got_t = quax.quaxify(lambda z, w: z @ w.T)(z, weight)
    np.testing.assert_allclose(got_t, np.asarray(z, np.float64) @ dense(weight).T, rtol=1e-4,
                               atol=1e-4 * (1 + np.abs(got_t).max()))


@SETTINGS
@given(shapes, st.integers(0, 2**16))
def test_merge_then_unmerge_restores_w(shape, seed):
    d_in, d_out, r, _ = shape
    weight = random_lora(seed, d_in, d_out, r, 2.0)
    params = {"layer": {"kernel": weight}}
    merged = lorax.merge(params)
    np.testing.assert_allclose(merged["layer"]["kernel"], dense(weight), rtol=1e-5, atol=1e-4)
    restored = lorax.unmerge(merged, params)
    np.testing.assert_allclose(restored["layer"]["kernel"].w, weight.w, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(restored["layer"]["kernel"].a, weight.a)


def test_embedding_lookup_and_tied_head():
    """nnx.Embed's lookup (gather) and a tied head (x @ embedding.T) through a LoRA table."""
    embed = nnx.Embed(11, 6, rngs=nnx.Rngs(0))
    graphdef, params = lorax.split(embed)
    tree = {"embed": params}
    adapted = lorax.lora(tree, lorax.LoraConfig(r=3, target_modules=["embed"], init_lora_weights=False),
                         key=jax.random.key(0))
    table = adapted["embed"]["embedding"]
    ids = jnp.array([[0, 3, 10], [5, 5, 1]])
    got = lorax.apply(graphdef, adapted["embed"], ids)
    np.testing.assert_allclose(got, dense(table)[np.asarray(ids)], rtol=1e-5, atol=1e-5)
    h = jax.random.normal(jax.random.key(1), (2, 6))
    tied = lorax.apply(lambda p, h: h @ p["embed"]["embedding"].T, adapted, h)
    np.testing.assert_allclose(tied, np.asarray(h, np.float64) @ dense(table).T, rtol=1e-5, atol=1e-5)


def test_bf16_compute_with_fp32_adapters():
    """The model casts its kernel to bf16: all pieces compute in bf16, A/B stay fp32 and get fp32 grads."""
    weight = random_lora(0, 8, 4, 2, 1.0)
    x = jax.random.normal(jax.random.key(1), (3, 8)).astype(jnp.bfloat16)

    def model(x, w):
        return x @ w.astype(jnp.bfloat16)

    out = quax.quaxify(model)(x, weight)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), np.asarray(x, np.float64) @ dense(weight), rtol=5e-2, atol=5e-2)
    grads = jax.grad(lambda w: quax.quaxify(model)(x, w).astype(jnp.float32).sum())(weight)
    assert grads.a.dtype == jnp.float32 and grads.b.dtype == jnp.float32


def test_base_weight_gets_no_gradient():
    weight = random_lora(0, 5, 4, 2, 1.0)
    x = jax.random.normal(jax.random.key(1), (3, 5))
    grads = jax.grad(lambda w: quax.quaxify(lambda x, w: jnp.sum((x @ w) ** 2))(x, w))(weight)
    assert not np.any(np.asarray(grads.w))
    assert np.any(np.asarray(grads.a)) and np.any(np.asarray(grads.b))


def test_unsupported_op_names_the_op_and_the_weight():
    weight = random_lora(0, 5, 4, 2, 1.0)
    with pytest.raises(lorax.UnsupportedOpError, match=r"'layer'.*`exp`.*allow_materialize=True"):
        quax.quaxify(jnp.exp)(weight)
    allowed = LoraArray(weight.w, weight.a, weight.b, scale=1.0, path="layer", allow_materialize=True)
    np.testing.assert_allclose(quax.quaxify(jnp.exp)(allowed), np.exp(dense(weight)), rtol=1e-4)


def test_lora_dropout_touches_only_the_adapter_input():
    """With a key, lora_dropout zeroes (and rescales) entries of the adapter's input only."""
    weight = random_lora(0, 64, 8, 4, 1.0)
    weight = LoraArray(weight.w, weight.a, weight.b, scale=1.0, path="layer", dropout_rate=0.5)
    x = jax.random.normal(jax.random.key(1), (16, 64))
    params = {"layer": {"kernel": weight}}
    fn = lambda p, x: x @ p["layer"]["kernel"]  # noqa: E731
    np.testing.assert_allclose(lorax.apply(fn, params, x), np.asarray(x, np.float64) @ dense(weight), rtol=1e-4, atol=1e-3)
    key = jax.random.key(7)
    dropped = lorax.apply(fn, params, x, dropout_key=key)
    keep = jax.random.bernoulli(jax.random.fold_in(key, 0), 0.5, x.shape)
    x_dropped = np.where(keep, np.asarray(x) / 0.5, 0.0)
    expected = np.asarray(x, np.float64) @ np.asarray(weight.w) + (x_dropped @ np.asarray(weight.a)) @ np.asarray(weight.b)
    np.testing.assert_allclose(dropped, expected, rtol=1e-4, atol=1e-3)
    assert not np.allclose(dropped, lorax.apply(fn, params, x), atol=1e-2)


def test_stacked_layers_under_scan():
    """Weights stacked over layers (leading axis) are sliced by lax.scan and stay factored."""
    layers, d, r = 3, 6, 2
    keys = jax.random.split(jax.random.key(0), 3)
    stacked = LoraArray(jax.random.normal(keys[0], (layers, d, d)) / 3, jax.random.normal(keys[1], (layers, d, r)),
                        jax.random.normal(keys[2], (layers, r, d)), scale=jnp.full((layers,), 0.5), path="layers.*",
                        ranks=(r,) * layers)
    x = jax.random.normal(jax.random.key(1), (2, d))

    def model(w, x):
        return jax.lax.scan(lambda h, w_i: (jnp.tanh(h @ w_i), None), x, w)[0]

    got = jax.jit(quax.quaxify(model))(stacked, x)
    np.testing.assert_allclose(got, model(stacked.w + 0.5 * stacked.a @ stacked.b, x), rtol=1e-5, atol=1e-5)


def test_gradients_match_the_materialized_weight():
    """Input and adapter gradients equal those of x @ (W + s·A·B) formed densely."""
    weight = random_lora(0, 7, 5, 3, 0.7)
    x = jax.random.normal(jax.random.key(1), (4, 7))

    def loss(x, a, b):
        w = LoraArray(weight.w, a, b, scale=weight.scale, path="layer")
        return jnp.sum(jnp.sin(quax.quaxify(lambda x, w: x @ w)(x, w)))

    def dense_loss(x, a, b):
        return jnp.sum(jnp.sin(x @ (weight.w + weight.scale * a @ b)))

    got = jax.grad(loss, argnums=(0, 1, 2))(x, weight.a, weight.b)
    want = jax.grad(dense_loss, argnums=(0, 1, 2))(x, weight.a, weight.b)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
