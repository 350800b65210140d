"""GPT-2 loaded from transformers' own save_pretrained folders: logits, generation, LoRA counts
and PeftModel outputs (Conv1D layers, fan_in_fan_out=True in peft) all equal the real libraries'."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import interop
import lorax
from conftest import (SAVES, adapted_paths, lorax_line, peft_line, perturb_constants, perturb_trained_leaves, save_checkpoint,
                      sync_into_peft)
from lorax.models.generate import generate

# A larger initializer_range than GPT-2's 0.02: the tiny model's predictions then depend on the
# context (with 0.02 it mostly repeats a token), so generation and padding are really tested.
SMALL = dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=3, n_head=4, initializer_range=0.3,
             bos_token_id=None, eos_token_id=None)  # no EOS: generate runs the full length, as ours does
VARIANTS = {
    "gpt2": {},
    # the other options transformers' GPT-2 honours: exact GELU, a set MLP width, per-layer attention
    # scaling, unscaled scores, an untied head
    "gpt2-options": dict(activation_function="gelu", n_inner=40, scale_attn_by_inverse_layer_idx=True,
                         scale_attn_weights=False, tie_word_embeddings=False),
}
# One jitted function for every test: it compiles once per model and tree structure.
apply = jax.jit(lorax.apply)
SHARD_SIZE = "20KB"  # a few shards of the tiny model


def hf_model(variant="gpt2", model_class=transformers.GPT2LMHeadModel):
    torch.manual_seed(0)
    return perturb_constants(model_class(transformers.GPT2Config(**SMALL, **VARIANTS[variant])).eval())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(torch GPT2LMHeadModel, folder saved as safetensors)."""
    model = hf_model()
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    return model, folder


def tokens(batch=2, length=9, seed=0):
    ids = torch.randint(0, SMALL["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on the first row
    mask[1, -2:] = 0  # right padding on the second
    return ids, mask


def run(graphdef, params, ids, mask=None):
    args = (jnp.asarray(ids.numpy()),) + (() if mask is None else (jnp.asarray(mask.numpy()),))
    return np.asarray(apply(graphdef, params, *args))


def assert_same_outputs(graphdef, params, torch_model, output="logits"):
    """Our outputs equal the torch model's without a mask and, at unpadded positions, with one."""
    ids, mask = tokens()
    with torch.no_grad():
        plain = getattr(torch_model(ids), output).numpy()
        padded = getattr(torch_model(ids, attention_mask=mask), output).numpy()
    np.testing.assert_allclose(run(graphdef, params, ids), plain, atol=1e-4, rtol=1e-4)
    real = mask.numpy().astype(bool)  # padded positions are not compared: both sides compute junk there
    np.testing.assert_allclose(run(graphdef, params, ids, mask)[real], padded[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("save", SAVES)
def test_logits_equal_transformers(save, tmp_path):
    model = hf_model()
    save_checkpoint(model, tmp_path, save, SHARD_SIZE)
    loaded = interop.from_pretrained(tmp_path, progress=False)
    assert isinstance(loaded, lorax.models.GPT2LMHeadModel)
    assert_same_outputs(*lorax.split(loaded), model)


def test_config_options_equal_transformers(tmp_path):
    model = hf_model("gpt2-options")
    model.save_pretrained(tmp_path)
    graphdef, params = lorax.split(interop.from_pretrained(tmp_path, progress=False))
    assert params["lm_head"]["kernel"].shape == (SMALL["n_embd"], SMALL["vocab_size"])  # untied head
    assert_same_outputs(graphdef, params, model)


def test_gpt2_model_hidden_states_equal_transformers(tmp_path):
    model = hf_model(model_class=transformers.GPT2Model)
    model.save_pretrained(tmp_path)
    loaded = interop.from_pretrained(tmp_path, progress=False)
    assert isinstance(loaded, lorax.models.GPT2Model)
    assert_same_outputs(*lorax.split(loaded), model, output="last_hidden_state")


def test_original_checkpoint_layout(saved, tmp_path):
    """The checkpoints on the Hub (openai-community/gpt2) have no `transformer.` prefix and store
    the attention-mask buffers `h.N.attn.bias` / `attn.masked_bias`: the prefix is added, the buffers skipped."""
    model, folder = saved
    tensors = {name.removeprefix("transformer."): value for name, value in load_file(folder / "model.safetensors").items()}
    for layer in range(SMALL["n_layer"]):
        tensors[f"h.{layer}.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
        tensors[f"h.{layer}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    assert_same_outputs(*lorax.split(interop.from_pretrained(tmp_path, progress=False)), model)


def test_greedy_generation_equals_transformers(saved):
    model, folder = saved
    graphdef, params = lorax.split(interop.from_pretrained(folder, progress=False))
    ids, _ = tokens(length=5, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # generation pads on the left
    with torch.no_grad():
        # an explicit all-ones mask: transformers would otherwise guess padding from pad_token_id
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                               pad_token_id=0).numpy()
        padded = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0).numpy()
    assert not np.array_equal(plain, padded), "the padding must change the continuation, or the test shows nothing"
    for attention_mask, theirs in ((torch.ones_like(ids), plain), (mask, padded)):  # same shapes: one compile
        ours = generate(graphdef, params, jnp.asarray(ids.numpy()), attention_mask=jnp.asarray(attention_mask.numpy()),
                        max_new_tokens=10)
        np.testing.assert_array_equal(ours, theirs)


# peft wraps GPT-2's Conv1D with fan_in_fan_out=True; its lora_A/lora_B are still (r, in) / (out, r).
LORA_CONFIGS = [
    dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True),
    dict(r=2, target_modules="all-linear", fan_in_fan_out=True),
    dict(r=4, lora_alpha=8, target_modules=["c_attn", "mlp.c_proj"], layers_to_transform=[0, 2], fan_in_fan_out=True,
         rank_pattern={"transformer.h.2.attn.c_attn": 2}, use_rslora=True),
]


@pytest.mark.parametrize("config", LORA_CONFIGS, ids=str)
def test_lora_matches_peft(saved, config):
    """Same targets, same printed counts, and with the same non-zero A/B the same logits as PeftModel."""
    model, folder = saved
    graphdef, base = lorax.split(interop.from_pretrained(folder, progress=False))
    ids, mask = tokens()

    at_init = lorax.lora(base, lorax.LoraConfig(**config), key=jax.random.key(0), output_head="lm_head")
    np.testing.assert_allclose(run(graphdef, at_init, ids), run(graphdef, base, ids), atol=1e-6)

    params = lorax.lora(base, lorax.LoraConfig(init_lora_weights=False, **config), key=jax.random.key(1),
                        output_head="lm_head")
    peft_model = peft.get_peft_model(hf_model(), peft.LoraConfig(init_lora_weights=False, **config))
    sync_into_peft(params, peft_model)
    assert adapted_paths(params) == sorted(peft_model.base_model.targeted_module_names)
    assert lorax_line(params) == peft_line(peft_model)
    with torch.no_grad():
        theirs = peft_model(ids, attention_mask=mask).logits.numpy()
    ours = run(graphdef, params, ids, mask)
    real = mask.numpy().astype(bool)
    assert np.abs(ours - run(graphdef, base, ids, mask))[real].max() > 1e-2, "the adapters must change the logits"
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(run(graphdef, lorax.merge(params), ids, mask)[real], theirs[real], atol=1e-4, rtol=1e-4)


def test_adapter_and_merged_exports_load_in_torch(saved, tmp_path):
    """Conv1D is where layouts go wrong: our adapter loads in PeftModel, our merged model in
    transformers, and both give our logits; the adapter loads back into the same tree. The
    stacked layers' trained copies (attn.c_proj, a Conv1D: (in, out) in torch too) and biases
    are written per layer."""
    model, folder = saved
    graphdef, base = lorax.split(interop.from_pretrained(folder, progress=False))
    config = lorax.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False,
                              modules_to_save=["attn.c_proj"], bias="lora_only")
    params = lorax.lora(base, config, key=jax.random.key(1), output_head="lm_head")
    params = perturb_trained_leaves(params, jax.random.key(2))
    ids, mask = tokens()
    ours = run(graphdef, params, ids, mask)
    real = mask.numpy().astype(bool)

    interop.save_adapter(tmp_path / "adapter", params, config)
    peft_model = peft.PeftModel.from_pretrained(hf_model(), tmp_path / "adapter").eval()
    interop.save_merged(tmp_path / "merged", graphdef, lorax.merge(params))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        np.testing.assert_allclose(peft_model(ids, attention_mask=mask).logits.numpy()[real], ours[real], atol=1e-4)
        np.testing.assert_allclose(merged(ids, attention_mask=mask).logits.numpy()[real], ours[real], atol=1e-4)
    reloaded = interop.load_adapter(tmp_path / "adapter", base)
    np.testing.assert_allclose(run(graphdef, reloaded, ids, mask), ours, atol=1e-6)


def test_more_tokens_than_position_embeddings_is_an_error(saved):
    """transformers raises IndexError past n_positions, in a forward pass and in generate; JAX's
    gather would return NaN or clamp there, silently."""
    model, folder = saved
    graphdef, params = lorax.split(interop.from_pretrained(folder, progress=False))
    ids = torch.zeros((1, SMALL["n_positions"] + 1), dtype=torch.long)
    with pytest.raises(IndexError), torch.no_grad():
        model(ids)
    with pytest.raises(ValueError, match=r"33 positions do not fit the model's position embeddings \(n_positions=32\)"):
        apply(graphdef, params, jnp.asarray(ids.numpy()))
    prompt = ids[:, :30]
    with pytest.raises(IndexError), torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
    with pytest.raises(ValueError, match=r"35 positions do not fit"):
        generate(graphdef, params, jnp.asarray(prompt.numpy()), max_new_tokens=5)
