"""Training touches only what LoRA trains: no gradient, no optimizer state, no change for the base."""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lorax


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.seq = nnx.List([nnx.Linear(20, 64, rngs=rngs), nnx.relu, nnx.Linear(64, 32, rngs=rngs), nnx.relu,
                             nnx.Linear(32, 2, rngs=rngs)])

    def __call__(self, x):
        for layer in self.seq:
            x = layer(x)
        return x


CONFIG = lorax.LoraConfig(r=3, target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"], bias="lora_only")


def setup():
    graphdef, base = lorax.split(MLP(nnx.Rngs(0)))
    params = lorax.lora(base, CONFIG, key=jax.random.key(1))
    x = jax.random.uniform(jax.random.key(2), (16, 20))
    y = (x.sum(1) > 10).astype(jnp.int32)
    return graphdef, base, params, x, y


def loss_fn(graphdef, params, x, y):
    logits = lorax.apply(graphdef, params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def trained_arrays(params):
    mask = lorax.trainable_mask(params)
    return [leaf for leaf, m in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(mask)) if m]


def test_optimizer_state_exists_only_for_trainable_leaves():
    graphdef, base, params, x, y = setup()
    opt = lorax.optimizer(optax.adamw(1e-2), params)
    state = opt.init(params)
    state_arrays = [leaf for leaf in jax.tree_util.tree_leaves(state) if leaf.ndim > 0]
    expected = [leaf.shape for leaf in trained_arrays(params)]
    # AdamW keeps mu and nu: two arrays per trainable leaf, none for the base.
    assert sorted(a.shape for a in state_arrays) == sorted(expected * 2)
    trainable, _ = lorax.partition(params)
    assert sorted(a.shape for a in jax.tree_util.tree_leaves(opt.init(trainable)) if a.ndim) == sorted(expected * 2)


def test_adamw_step_changes_only_trainable_leaves():
    graphdef, base, params, x, y = setup()
    opt = lorax.optimizer(optax.adamw(1e-2), params)
    state = opt.init(params)
    grads = jax.grad(lambda p: loss_fn(graphdef, p, x, y))(params)
    updates, state = opt.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    mask = jax.tree_util.tree_leaves(lorax.trainable_mask(params))
    for old_leaf, new_leaf, trained in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(new), mask):
        if trained:
            assert not np.array_equal(old_leaf, new_leaf)
        else:
            np.testing.assert_array_equal(old_leaf, new_leaf)
    # The base gets no gradient at all (stop_gradient inside the LoRA rules).
    assert not np.any(np.asarray(grads["seq"][0]["kernel"].w))
    assert not np.any(np.asarray(grads["seq"][4]["kernel"].original))


def test_jitted_step_on_the_trainable_half():
    """The step takes and returns only the trainable half: the base is an input, never an output."""
    graphdef, base, params, x, y = setup()
    trainable, frozen = lorax.partition(params)
    opt = lorax.optimizer(optax.adamw(1e-2), params)
    state = opt.init(trainable)

    @jax.jit
    def step(trainable, state, frozen, x, y):
        loss, grads = jax.value_and_grad(lambda t: loss_fn(graphdef, lorax.combine(t, frozen), x, y))(trainable)
        updates, state = opt.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, loss

    losses = []
    for _ in range(30):
        trainable, state, loss = step(trainable, state, frozen, x, y)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    compiled = step.lower(trainable, state, frozen, x, y).compile()
    out_sizes = sum(leaf.size for leaf in jax.tree_util.tree_leaves(compiled.out_info))
    trained_size = sum(leaf.size for leaf in trained_arrays(params))
    assert out_sizes < 4 * trained_size  # params + mu + nu (+ scalars); the ~3,700-weight base is not written
    adapted = lorax.combine(trainable, frozen)
    for path in (0, 2):
        np.testing.assert_array_equal(adapted["seq"][path]["kernel"].w, base["seq"][path]["kernel"])


def test_merge_and_disable_jit():
    graphdef, base, params, x, y = setup()
    merged = jax.jit(lorax.merge)(params)
    np.testing.assert_allclose(lorax.apply(graphdef, merged, x), jax.jit(lambda p, x: lorax.apply(graphdef, p, x))(params, x),
                               atol=1e-5)
    np.testing.assert_array_equal(jax.jit(lorax.disable_adapters)(params)["seq"][0]["kernel"], base["seq"][0]["kernel"])


def test_linen_and_plain_functions():
    """lorax.apply runs Flax linen modules and plain functions of the tree the same way."""
    model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
    x = jax.random.normal(jax.random.key(0), (3, 8))
    base = model.init(jax.random.key(1), x)["params"]
    config = lorax.LoraConfig(r=2, target_modules=["layers_0", "layers_2"], init_lora_weights=False)
    params = lorax.lora(base, config, key=jax.random.key(2))
    got = lorax.apply(lambda p, x: model.apply({"params": p}, x), params, x)
    want = model.apply({"params": lorax.merge(params)}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, model.apply({"params": base}, x), atol=1e-3)


def test_importing_lorax_imports_no_torch():
    code = "import sys, lorax, interop; print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
