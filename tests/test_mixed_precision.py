"""bf16 compute with fp32 adapters and optimizer state, against peft on the same bf16 model.

peft keeps LoRA weights in fp32 on a bf16 model (autocast_adapter_dtype=True), casts the
layer input to fp32 for the adapter, adds the fp32 adapter output to the bf16 base output and
casts the sum back to bf16. Ours loads the same bf16 checkpoint and the same fp32 adapter and
must train the same way: bf16 activations, fp32 A/B, fp32 gradients and AdamW moments.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers

import interop
import lorax
from lorax.train import TrainState, causal_lm_loss, make_train_step

CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=False)
STEPS, LEARNING_RATE = 4, 1e-2


@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory):
    """(peft model on a bf16 Llama with fp32 adapters, our params loaded from the same files)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).to(torch.bfloat16)
    base_dir, adapter_dir = tmp_path_factory.mktemp("bf16-base"), tmp_path_factory.mktemp("bf16-adapter")
    model.save_pretrained(base_dir)
    # init_lora_weights=False: B is random too, so the adapters change the outputs from the first step.
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False, lora_dropout=0.0))
    peft_model.save_pretrained(adapter_dir)
    graphdef, base = lorax.split(interop.from_pretrained(base_dir, dtype=jnp.bfloat16, progress=False))
    return peft_model, graphdef, interop.load_adapter(adapter_dir, base)


def fresh(params):
    """A copy: a train step donates (deletes) the trainable arrays it is given."""
    return jax.tree_util.tree_map(jnp.copy, params)


def batches():
    """One batch, seen STEPS times: the loss must fall."""
    ids = torch.randint(0, CONFIG["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(1))
    return [ids] * STEPS


def test_dtypes_are_mixed(bf16_pair):
    peft_model, graphdef, params = bf16_pair
    params = fresh(params)
    q = params["model"]["layers"]["*"]["self_attn"]["q_proj"]["kernel"]
    assert q.w.dtype == jnp.bfloat16 and q.a.dtype == q.b.dtype == jnp.float32
    assert peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32

    ids = batches()[0]
    logits = lorax.apply(graphdef, params, jnp.asarray(ids.numpy()))
    assert logits.dtype == jnp.bfloat16
    with torch.no_grad():
        theirs = peft_model.eval()(input_ids=ids).logits.float().numpy()
    # bf16 keeps 8 bits of mantissa: logits of ~0.1 agree to a few 1e-3.
    np.testing.assert_allclose(np.asarray(logits.astype(jnp.float32)), theirs, atol=1e-2)
    ids = jnp.asarray(ids.numpy())
    trainable, frozen = lorax.partition(params)
    tx = lorax.optimizer(optax.adamw(LEARNING_RATE), params)
    state = TrainState.create(trainable, tx, jax.random.key(0))
    state, _ = make_train_step(graphdef, frozen, tx, causal_lm_loss)(state, {"input_ids": ids})
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves((state.trainable, state.opt_state))} <= {
        jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}


def test_bf16_training_follows_peft(bf16_pair):
    peft_model, graphdef, params = bf16_pair
    params = fresh(params)
    data = batches()

    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    peft_losses = []
    for ids in data:
        optimizer.zero_grad(set_to_none=True)
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        peft_losses.append(loss.item())

    start = np.asarray(params["model"]["layers"]["*"]["self_attn"]["q_proj"]["kernel"].a)
    trainable, frozen = lorax.partition(params)
    tx = lorax.optimizer(optax.adamw(LEARNING_RATE), params)
    state = TrainState.create(trainable, tx, jax.random.key(0))
    step = make_train_step(graphdef, frozen, tx, causal_lm_loss)
    ours_losses = []
    for ids in data:
        state, metrics = step(state, {"input_ids": jnp.asarray(ids.numpy())})
        ours_losses.append(float(metrics["loss"]))

    # Both compute in bf16 (about 3 significant digits), with different summation orders.
    np.testing.assert_allclose(ours_losses, peft_losses, rtol=2e-2)
    assert ours_losses[-1] < ours_losses[0] - 0.1
    # The fp32 adapters moved the same way. (AdamW's steps are about lr·sign(gradient), so an
    # entry whose gradient is near 0 may step either way under bf16 noise: compare directions.)
    ours = np.asarray(state.trainable["model"]["layers"]["*"]["self_attn"]["q_proj"]["kernel"].a) - start
    theirs = np.stack([layer.self_attn.q_proj.lora_A["default"].weight.detach().numpy().T
                       for layer in peft_model.base_model.model.model.layers]) - start
    cosine = (ours * theirs).sum() / np.linalg.norm(ours) / np.linalg.norm(theirs)
    assert cosine > 0.95, cosine


def test_bf16_merge_rounds_as_peft(tmp_path):
    """Merging fp32 adapters into a bf16 model: peft's Linear adds its fp32 update to the bf16
    weight in place (one rounding), its Embedding rounds the update to bf16 first; ours does each
    the same way, so the merged weights are peft's merge_and_unload's: equal but for rare ties that
    the two BLAS' summation orders of B·A round apart, one bf16 step (before, rounding the linear
    update first left about 30% of the entries one step off)."""
    from conftest import sync_into_peft

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    graphdef, base = lorax.split(interop.from_pretrained(tmp_path, dtype="auto", progress=False))
    fields = dict(r=8, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=False)
    params = lorax.lora(base, lorax.LoraConfig(**fields), key=jax.random.key(0))
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**fields))
    sync_into_peft(params, peft_model)
    theirs = peft_model.merge_and_unload().state_dict()
    merged = lorax.merge(params)
    layers = merged["model"]["layers"]["*"]["self_attn"]
    for i in range(CONFIG["num_hidden_layers"]):
        for name in ("q_proj", "v_proj"):
            ours = np.asarray(layers[name]["kernel"][i].T.astype(jnp.float32))
            reference = theirs[f"model.layers.{i}.self_attn.{name}.weight"].float().numpy()
            assert (ours == reference).mean() > 0.99, name
            np.testing.assert_allclose(ours, reference, rtol=2 ** -7, atol=0)  # within one bf16 step
    np.testing.assert_array_equal(np.asarray(merged["model"]["embed_tokens"]["embedding"].astype(jnp.float32)),
                                  theirs["model.embed_tokens.weight"].float().numpy())
