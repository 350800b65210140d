"""Training touches only what LoRA trains: no gradient, no optimizer state, no change for the base."""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
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


# A small Llama whose every decoder linear is trainable LoRA over an NF4 base or frozen NF4 (QLoRA as
# bitsandbytes loads it): remat and chunked loss must go through both rules.
LLAMA = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2)


def qlora_llama():
    from lorax.models import LlamaConfig, LlamaForCausalLM
    from lorax.nf4 import QuantConfig
    from lorax.targets import dotted

    quant = QuantConfig(blocksize=32, double_quant=True)
    graphdef, base = lorax.split(LlamaForCausalLM(LlamaConfig(**LLAMA), rngs=nnx.Rngs(0)))
    config = lorax.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    params = lorax.lora(base, config, key=jax.random.key(1), quantize=quant)

    def quantize(keypath, leaf):
        frozen_linear = dotted(keypath).startswith("model.layers.") and dotted(keypath).endswith(".kernel")
        return quant.quantize_kernel(leaf) if frozen_linear and not isinstance(leaf, lorax.LoraArray) else leaf

    params = jax.tree_util.tree_map_with_path(quantize, params, is_leaf=lambda x: isinstance(x, lorax.LoraArray))
    ids = jax.random.randint(jax.random.key(2), (2, 11), 0, LLAMA["vocab_size"])
    # Padding and ignored labels, so that the chunked loss must weight its chunks as the plain one does.
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids).at[1, 8:].set(0),
             "labels": ids.at[0, 3].set(-100)}
    return graphdef, params, batch


def test_remat_and_chunked_loss_give_the_plain_step(monkeypatch):
    """remat (checkpointed layer scan), loss_chunk_size (head + loss a few positions at a time)
    and 4-bit weights dequantized a block at a time change memory, not the step: same loss,
    same gradients (SGD with rate 1 writes them out) as the plain step."""
    from lorax.train import TrainState, causal_lm_loss, make_train_step

    graphdef, params, batch = qlora_llama()
    trainable, frozen = lorax.partition(params)
    tx = lorax.optimizer(optax.sgd(1.0), params)
    results = {}
    for remat, chunk in ((False, None), (True, None), (True, 3)):
        if remat:  # the (64, 32) and (32, 64) 4-bit kernels in blocks of 16 output features or fewer
            monkeypatch.setattr(lorax.nf4, "DENSE_BLOCK_ELEMENTS", 512)
        step = make_train_step(graphdef, frozen, tx, causal_lm_loss, remat=remat, loss_chunk_size=chunk)
        state = TrainState.create(jax.tree_util.tree_map(jnp.copy, trainable), tx, jax.random.key(0))
        new_state, metrics = step(state, batch)
        results[remat, chunk] = (metrics, jax.tree_util.tree_map(jnp.subtract, trainable, new_state.trainable))
    (want_metrics, want_grads) = results.pop((False, None))
    assert float(want_metrics["grad_norm"]) > 0
    for (metrics, grads) in results.values():
        np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-5)
        np.testing.assert_allclose(metrics["grad_norm"], want_metrics["grad_norm"], rtol=1e-4)
        for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_remat_keeps_less_for_the_backward_pass():
    """The compiled remat step needs fewer temporary bytes than the plain one (same model and batch)."""
    from lorax.train import TrainState, causal_lm_loss, make_train_step

    graphdef, params, batch = qlora_llama()
    batch = {"input_ids": jnp.zeros((2, 64), jnp.int32)}
    trainable, frozen = lorax.partition(params)
    tx = lorax.optimizer(optax.adamw(1e-3), params)
    state = TrainState.create(trainable, tx, jax.random.key(0))
    temp = {}
    for remat in (False, True):
        step = make_train_step(graphdef, frozen, tx, causal_lm_loss, remat=remat)
        temp[remat] = step.jitted.lower(state, frozen, batch).compile().memory_analysis().temp_size_in_bytes
    assert temp[True] < 0.7 * temp[False]


def test_chunked_causal_lm_loss_equals_causal_lm_loss():
    from lorax.train import causal_lm_loss, chunked_causal_lm_loss

    keys = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(keys[0], (2, 9, 8))
    head = jax.random.normal(keys[1], (8, 30))
    ids = jax.random.randint(keys[2], (2, 9), 0, 30)
    batch = {"input_ids": ids, "labels": ids.at[1, 2].set(-100), "attention_mask": jnp.ones_like(ids).at[0, 7:].set(0)}
    want = jax.value_and_grad(lambda h, w: causal_lm_loss(h @ w, batch), argnums=(0, 1))(hidden, head)
    for chunk_size in (1, 3, 20):
        got = jax.jit(jax.value_and_grad(lambda h, w: chunked_causal_lm_loss(h, lambda x: x @ w, batch, chunk_size),
                                         argnums=(0, 1)))(hidden, head)
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_remat_and_chunking_need_a_model_that_supports_them():
    from lorax.train import causal_lm_loss, classification_loss, make_train_step

    graphdef, base, params, x, y = setup()
    _, frozen = lorax.partition(params)
    tx = lorax.optimizer(optax.sgd(0.1), params)
    with pytest.raises(lorax.LoraError, match="causal_lm_loss only"):
        make_train_step(graphdef, frozen, tx, classification_loss, loss_chunk_size=8)
    with pytest.raises(lorax.LoraError, match="not a plain function"):
        make_train_step(lambda p, **inputs: inputs, frozen, tx, causal_lm_loss, remat=True)
    from lorax.train import TrainState

    step = make_train_step(graphdef, frozen, tx, classification_loss, remat=True)
    trainable, _ = lorax.partition(params)
    with pytest.raises(lorax.LoraError, match="no module with a `remat` attribute"):
        step(TrainState.create(trainable, tx, jax.random.key(0)), {"input_ids": x, "labels": y})


@pytest.mark.parametrize("architecture", ["gpt2", "bert"])
def test_remat_in_gpt2_and_bert(architecture):
    """GPT-2 blocks and BERT layers checkpoint too (with lora_dropout on, so the recomputed
    forward must draw the same dropout masks), GPT-2 with its loss in chunks: the same loss and
    gradients as the plain step."""
    from lorax.models import BertConfig, BertForSequenceClassification, BertModel, GPT2Config, GPT2LMHeadModel
    from lorax.train import TrainState, causal_lm_loss, classification_loss, make_train_step

    ids = jax.random.randint(jax.random.key(2), (2, 9), 0, 40)
    if architecture == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=4),
                                rngs=nnx.Rngs(0))
        targets, loss_fn, batch = ["c_attn"], causal_lm_loss, {"input_ids": ids}
    else:
        encoder = BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=32), rngs=nnx.Rngs(0))
        model = BertForSequenceClassification.from_encoder(encoder, num_labels=2, rngs=nnx.Rngs(1))
        targets, loss_fn, batch = ["query", "value"], classification_loss, {"input_ids": ids, "labels": ids[:, 0] % 2}
    graphdef, base = lorax.split(model)
    params = lorax.lora(base, lorax.LoraConfig(r=4, target_modules=targets, lora_dropout=0.1, init_lora_weights=False),
                        key=jax.random.key(1))
    trainable, frozen = lorax.partition(params)
    tx = lorax.optimizer(optax.sgd(1.0), params)
    # GPT-2 has hidden_states/logits, so its head and loss can run in chunks as well.
    chunk = 4 if architecture == "gpt2" else None
    results = []
    for remat in (False, True):
        step = make_train_step(graphdef, frozen, tx, loss_fn, remat=remat, loss_chunk_size=chunk if remat else None)
        new_state, metrics = step(TrainState.create(jax.tree_util.tree_map(jnp.copy, trainable), tx,
                                                    jax.random.key(0)), batch)
        results.append((metrics["loss"], jax.tree_util.tree_map(jnp.subtract, trainable, new_state.trainable)))
    (loss, grads), (remat_loss, remat_grads) = results
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-5)
    for got, want in zip(jax.tree_util.tree_leaves(remat_grads), jax.tree_util.tree_leaves(grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
