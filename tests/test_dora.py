"""DoRA (use_dora=True) against peft's: gradients (the norm is a constant in the backward pass),
lora_dropout in training, adapter files both ways, QDoRA on a bitsandbytes 4-bit model, and
a clear error where DoRA does not apply. Counts, outputs and merges are in test_peft_parity.py
(MLP, tiny decoder with DoRA embeddings) and test_llama.py (stacked layers)."""

import copy

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import quax
import torch

import interop
import lorax
from conftest import jax_mlp, perturb_trained_leaves, per_module_layers, sync_into_peft, torch_to_params

DORA = dict(r=3, target_modules=["seq.0", "seq.2"], use_dora=True, init_lora_weights=False)


def dora_pair(torch_mlp, **extra):
    """Our DoRA params on the MLP (magnitudes moved off their initial norms) and peft's model with the same values."""
    config = {**DORA, **extra}
    params = lorax.lora(torch_to_params(torch_mlp), lorax.LoraConfig(**config), key=jax.random.key(1))
    params = perturb_trained_leaves(params, jax.random.key(2))
    peft_model = peft.get_peft_model(copy.deepcopy(torch_mlp), peft.LoraConfig(**config))
    sync_into_peft(params, peft_model)
    return params, peft_model


def test_gradients_equal_peft(torch_mlp):
    """d loss / d (A, B, magnitude) equal torch autograd through peft's DoRA layers: the column
    norm gets no gradient on either side."""
    params, peft_model = dora_pair(torch_mlp)
    x = torch.rand(8, 20, generator=torch.Generator().manual_seed(0))
    weights = torch.rand(8, 2, generator=torch.Generator().manual_seed(1))
    peft_model.train()
    (peft_model(x) * weights).sum().backward()

    trainable, frozen = lorax.partition(params)
    loss = lambda t: (lorax.apply(jax_mlp, lorax.combine(t, frozen), jnp.asarray(x.numpy())) * weights.numpy()).sum()
    grads = jax.grad(loss)(trainable)
    torch_grads = {name: p.grad.numpy() for name, p in peft_model.named_parameters() if p.requires_grad}
    for i in (0, 2):
        ours = grads["seq"][i]["kernel"]
        prefix = f"base_model.model.seq.{i}"
        np.testing.assert_allclose(ours.a, torch_grads[f"{prefix}.lora_A.default.weight"].T, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ours.b, torch_grads[f"{prefix}.lora_B.default.weight"].T, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ours.m, torch_grads[f"{prefix}.lora_magnitude_vector.default.weight"],
                                   rtol=1e-4, atol=1e-6)


class FixedDropout(torch.nn.Module):
    """Dropout with a given keep mask, so that torch drops what JAX drops."""

    def __init__(self, keep: np.ndarray, rate: float):
        super().__init__()
        self.keep, self.rate = torch.from_numpy(keep.copy()), rate

    def forward(self, x):
        return x * self.keep / (1 - self.rate)


def test_dropout_in_training_equals_peft():
    """With lora_dropout, peft computes x·w + (mns - 1)·(x̃·w) + mns·s·B A x̃ for the dropped x̃: so do we."""
    rate, key = 0.5, jax.random.key(7)
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(6, 5))
    config = dict(r=2, target_modules=["0"], use_dora=True, init_lora_weights=False, lora_dropout=rate)
    params = lorax.lora(torch_to_params(layer), lorax.LoraConfig(**config), key=jax.random.key(1))
    params = perturb_trained_leaves(params, jax.random.key(2))
    peft_model = peft.get_peft_model(copy.deepcopy(layer), peft.LoraConfig(**config))
    sync_into_peft(params, peft_model)

    x = np.random.default_rng(0).standard_normal((4, 6), dtype=np.float32)
    kernel = eqx.tree_at(lambda l: l.dropout_key, params[0]["kernel"], key, is_leaf=lambda v: v is None)
    ours = quax.quaxify(lambda x, k, b: x @ k + b)(jnp.asarray(x), kernel, params[0]["bias"])
    keep = np.asarray(jax.random.bernoulli(key, 1 - rate, x.shape))
    peft_model.base_model.model[0].lora_dropout["default"] = FixedDropout(keep, rate)
    peft_model.train()
    with torch.no_grad():
        theirs = peft_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert np.abs(ours - np.asarray(quax.quaxify(lambda x, k, b: x @ k + b)(
        jnp.asarray(x), params[0]["kernel"], params[0]["bias"]))).max() > 1e-3, "dropout must change the output"


def test_adapter_files_both_ways(torch_mlp, tmp_path):
    """Our DoRA adapter (lora_magnitude_vector per module) loads in PeftModel with our outputs, and
    peft's saved DoRA adapter loads back into ours with them."""
    params, _ = dora_pair(torch_mlp)
    x = torch.rand(8, 20, generator=torch.Generator().manual_seed(0))
    ours = np.asarray(lorax.apply(jax_mlp, params, jnp.asarray(x.numpy())))
    interop.save_adapter(tmp_path / "ours", params, lorax.LoraConfig(**DORA))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_mlp), tmp_path / "ours").eval()
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), ours, rtol=1e-5, atol=1e-5)
    loaded.save_pretrained(tmp_path / "theirs")
    back = interop.load_adapter(tmp_path / "theirs", torch_to_params(torch_mlp))
    assert isinstance(back["seq"][0]["kernel"], lorax.DoraArray)
    np.testing.assert_allclose(lorax.apply(jax_mlp, back, jnp.asarray(x.numpy())), ours, rtol=1e-6, atol=1e-6)


def test_counts_and_layers(torch_mlp):
    """The magnitude counts as trainable, one value per output feature of each adapted module."""
    params, peft_model = dora_pair(torch_mlp)
    leaf = params["seq"][0]["kernel"]
    assert per_module_layers(leaf) == [("seq.0", None)] and leaf.m.shape == (2000,)
    trainable, _ = lorax.count_parameters(params)
    assert trainable == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_dora_with_a_tied_head_sharing_the_embedding_is_refused(torch_tiny):
    config = lorax.LoraConfig(r=2, target_modules=["embed_tokens"], use_dora=True, ensure_weight_tying=True)
    with pytest.raises(lorax.LoraConfigError, match=r"ensure_weight_tying=True: the tied output head of "
                                                    r"'model.embed_tokens' cannot share a DoRA embedding yet"):
        lorax.lora(torch_to_params(torch_tiny), config, key=jax.random.key(0))


def test_unmerge_takes_the_dora_update_back_out(torch_mlp):
    """unmerge(merge(params), params) gives back the base kernels under the DoRA leaves."""
    params, _ = dora_pair(torch_mlp)
    again = lorax.unmerge(lorax.merge(params), params)
    for i in (0, 2):
        np.testing.assert_allclose(again["seq"][i]["kernel"].w, params["seq"][i]["kernel"].w, rtol=1e-4, atol=1e-5)


def test_bf16_model_with_fp32_dora_equals_peft(tmp_path):
    """A bf16 model: the magnitudes stay fp32 on both sides (peft's autocast_adapter_dtype), the
    norm and products follow the model's dtype, and the logits agree to bf16 resolution."""
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).save_pretrained(tmp_path)
    graphdef, base = lorax.split(interop.from_pretrained(tmp_path, progress=False, dtype=jnp.bfloat16))
    config = dict(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False)
    params = perturb_trained_leaves(lorax.lora(base, lorax.LoraConfig(**config), key=jax.random.key(1)),
                                    jax.random.key(2))
    kernel = params["model"]["layers"]["*"]["self_attn"]["q_proj"]["kernel"]
    assert (kernel.w.dtype, kernel.a.dtype, kernel.m.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
    peft_model = peft.get_peft_model(
        transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval(), peft.LoraConfig(**config))
    sync_into_peft(params, peft_model)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = peft_model(ids).logits.float().numpy()
    ours = np.asarray(lorax.apply(graphdef, params, jnp.asarray(ids.numpy())).astype(jnp.float32))
    np.testing.assert_allclose(ours, theirs, atol=2e-2 * np.abs(theirs).max())
