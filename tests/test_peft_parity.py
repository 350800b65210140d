"""lorax against peft on the same torch/JAX models: which modules are adapted, the printed
counts, the outputs with the same A/B, the merged weights, and the disabled-adapter outputs."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import interop
import lorax
from conftest import (
    adapted_paths,
    jax_mlp,
    perturb_trained_leaves,
    sync_into_peft,
    jax_tiny,
    lorax_line,
    peft_line,
    peft_model_for,
    torch_to_params,
)

MLP_CONFIGS = [
    dict(r=3, target_modules=["seq.0", "seq.2"]),
    dict(r=3, target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"]),
    dict(r=4, target_modules=r"seq\.[02]"),
    dict(r=2, target_modules="all-linear"),
    dict(r=2, target_modules="all-linear", exclude_modules=["seq.4"]),
    dict(r=3, target_modules=["seq.0", "seq.2"], bias="all"),
    dict(r=3, target_modules=["seq.0"], bias="lora_only"),
    dict(r=3, target_modules=["seq.0"], modules_to_save=["seq.4"], bias="lora_only"),
    dict(r=4, lora_alpha=16, target_modules=["seq.0", "seq.2", "seq.4"], rank_pattern={"seq.2": 2}, alpha_pattern={"seq.4": 3}),
    dict(r=4, lora_alpha=8, target_modules=["seq.0", "seq.2"], use_rslora=True),
    dict(r=3, target_modules=["seq.0", "seq.2"], use_dora=True),
    dict(r=4, target_modules=["seq.0", "seq.2", "seq.4"], use_dora=True, rank_pattern={"seq.2": 2}, bias="lora_only"),
]

TINY_CONFIGS = [
    dict(r=2, target_modules=["q_proj", "v_proj"]),
    dict(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2]),
    dict(r=2, target_modules=["q_proj"], layers_to_transform=1, layers_pattern="layers"),
    dict(r=2, target_modules=r".*\.mlp\..*_proj"),
    dict(r=2, target_modules="all-linear", exclude_modules=["lm_head"]),
    dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"]),
    dict(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], bias="all"),
    dict(r=4, target_modules=["q_proj", "up_proj"], rank_pattern={r"layers\.1\.self_attn\.q_proj": 1}, alpha_pattern={"up_proj": 2}),
    dict(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2], use_dora=True),
    dict(r=3, target_modules=["embed_tokens", "q_proj"], use_dora=True),
]

def check_against_peft(torch_model, jax_fn, inputs, config, output_head=None):
    base = torch_to_params(torch_model)
    peft_model = peft_model_for(torch_model, init_lora_weights=False, **config)
    params = lorax.lora(base, lorax.LoraConfig(init_lora_weights=False, **config), key=jax.random.key(1),
                        output_head=output_head)
    params = perturb_trained_leaves(params, jax.random.key(2))
    sync_into_peft(params, peft_model)

    assert adapted_paths(params) == sorted(peft_model.base_model.targeted_module_names)
    assert lorax_line(params) == peft_line(peft_model)

    ours = lorax.apply(jax_fn, params, jnp.asarray(inputs.numpy()))
    with torch.no_grad():
        theirs = peft_model(inputs).numpy()
        with peft_model.disable_adapter():
            theirs_disabled = peft_model(inputs).numpy()
    base_out = jax_fn(base, jnp.asarray(inputs.numpy()))
    assert np.abs(np.asarray(ours) - np.asarray(base_out)).max() > 1e-3, "the adapters must change the output"
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(jax_fn(lorax.disable_adapters(params), jnp.asarray(inputs.numpy())),
                               theirs_disabled, atol=1e-5, rtol=1e-5)

    merged = lorax.merge(params)
    peft_merged = torch_to_params(peft_model.merge_and_unload())
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(peft_merged)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), merged, peft_merged)
    np.testing.assert_allclose(jax_fn(merged, jnp.asarray(inputs.numpy())), ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config", MLP_CONFIGS, ids=lambda c: str(c))
def test_mlp_matches_peft(torch_mlp, config):
    x = torch.rand(8, 20, generator=torch.Generator().manual_seed(0))
    check_against_peft(torch_mlp, jax_mlp, x, config)


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=lambda c: str(c))
def test_tiny_decoder_matches_peft(torch_tiny, config):
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    check_against_peft(torch_tiny, jax_tiny, ids, config)


def test_seed_000_numbers(torch_mlp):
    """Seed 000's printed figures, produced by peft and by us on the same MLP."""
    base = torch_to_params(torch_mlp)
    cases = [
        (dict(r=3, target_modules=["seq.0", "seq.2"]), "trainable params: 12,660 || all params: 455,262 || trainable%: 2.7808"),
        (dict(r=3, target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"]),
         "trainable params: 13,062 || all params: 455,664 || trainable%: 2.8666"),
    ]
    for config, line in cases:
        params = lorax.lora(base, lorax.LoraConfig(**config), key=jax.random.key(0))
        assert lorax_line(params) == peft_line(peft_model_for(torch_mlp, **config)) == line
        assert lorax.count_parameters(lorax.merge(params)) == (0, 442_602)


def test_all_linear_leaves_out_the_head_of_a_transformers_model():
    """On a transformers model peft's "all-linear" skips the output head; output_head= does that here."""
    import peft
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    base = torch_to_params(model)  # before peft rewrites the modules in place
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
    params = lorax.lora(base, lorax.LoraConfig(r=4, target_modules="all-linear"), key=jax.random.key(0),
                        output_head="lm_head")
    assert adapted_paths(params) == sorted(peft_model.base_model.targeted_module_names)
    assert "lm_head" not in adapted_paths(params)
    assert lorax_line(params) == peft_line(peft_model)


def test_init_equals_base_and_b_is_zero(torch_mlp):
    """At init (peft's default init) B is zero, so the adapted model computes the base model."""
    base = torch_to_params(torch_mlp)
    x = jnp.asarray(np.random.default_rng(0).random((4, 20), dtype=np.float32))
    for init in (True, "gaussian"):
        params = lorax.lora(base, lorax.LoraConfig(r=3, target_modules=["seq.0", "seq.2"], init_lora_weights=init),
                            key=jax.random.key(0))
        np.testing.assert_array_equal(lorax.apply(jax_mlp, params, x), jax_mlp(base, x))
        for leaf in jax.tree_util.tree_leaves(params, is_leaf=lorax.is_adapter):
            if isinstance(leaf, lorax.LoraArray):
                assert not np.any(np.asarray(leaf.b))
                assert np.any(np.asarray(leaf.a))


def test_kaiming_init_distribution_matches_peft(torch_mlp):
    """A is kaiming-uniform(a=√5) like peft's: same bound 1/√in, and the samples fill it."""
    params = lorax.lora(torch_to_params(torch_mlp), lorax.LoraConfig(r=64, target_modules=["seq.2"]),
                        key=jax.random.key(0))
    ours = np.asarray(params["seq"][2]["kernel"].a)
    theirs = peft_model_for(torch_mlp, r=64, target_modules=["seq.2"]).base_model.model.seq[2].lora_A["default"].weight
    theirs = theirs.detach().numpy()
    assert ours.shape == theirs.T.shape
    np.testing.assert_allclose(np.abs(ours).max(), np.abs(theirs).max(), rtol=1e-2)
    np.testing.assert_allclose(ours.std(), theirs.std(), rtol=2e-2)


def test_orthogonal_init_matches_peft(torch_mlp, tmp_path):
    """init_lora_weights="orthogonal": A and B both non-zero with B·A = 0 (the base at init), their
    entries spread like peft's; odd ranks refused as peft refuses them; our adapter loads in peft."""
    config = dict(r=64, target_modules=["seq.2"], init_lora_weights="orthogonal")
    params = lorax.lora(torch_to_params(torch_mlp), lorax.LoraConfig(**config), key=jax.random.key(0))
    leaf = params["seq"][2]["kernel"]
    torch.manual_seed(0)
    peft_model = peft_model_for(torch_mlp, **config)
    theirs = peft_model.base_model.model.seq[2]
    a_t, b_t = theirs.lora_A["default"].weight.detach().numpy().T, theirs.lora_B["default"].weight.detach().numpy().T
    a, b = np.asarray(leaf.a), np.asarray(leaf.b)
    assert a.shape == a_t.shape and b.shape == b_t.shape
    np.testing.assert_allclose(a @ b, 0, atol=1e-6)
    np.testing.assert_allclose(a_t @ b_t, 0, atol=1e-6)
    np.testing.assert_allclose([a.std(), b.std()], [a_t.std(), b_t.std()], rtol=0.05)
    with pytest.raises(lorax.LoraConfigError, match="even ranks.*'seq.0': 3"):
        lorax.LoraConfig(r=4, target_modules=["seq.0"], init_lora_weights="orthogonal", rank_pattern={"seq.0": 3})
    with pytest.raises(ValueError, match="even"):
        peft_model_for(torch_mlp, r=3, target_modules=["seq.2"], init_lora_weights="orthogonal")
    interop.save_adapter(tmp_path / "ours", params, lorax.LoraConfig(**config))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_mlp), tmp_path / "ours").base_model.model.seq[2]
    np.testing.assert_array_equal(loaded.lora_B["default"].weight.detach().numpy().T, b)
    peft_model.save_pretrained(tmp_path / "peft")
    np.testing.assert_array_equal(interop.load_adapter(tmp_path / "peft", torch_to_params(torch_mlp))["seq"][2]["kernel"].a, a_t)
