"""Mixture-of-experts models (Mixtral, Qwen3-MoE) loaded from transformers' own save_pretrained
folders: logits, generation, gradients, LoRA counts and PeftModel outputs, merged export, all
against the real libraries."""

import functools
import warnings

import bitsandbytes.functional as F
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
from conftest import (adapted_paths, logits_of, lorax_line, padded_tokens, peft_line, perturb_constants, save_checkpoint,
                      save_each, sync_into_peft)
from interop.checkpoint import read_tensors
from lorax.models import LlamaConfig
from lorax.models.generate import generate

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2)
# 4 experts, 2 per token: with 2 x 9 tokens every expert gets some tokens and some get none of a
# sequence's; Qwen3-MoE's experts are narrower than its (unused) dense intermediate size.
VARIANTS = {
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
    "mixtral-window": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=4)),
    "qwen3-moe": (transformers.Qwen3MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                                   head_dim=16)),
    "qwen3-moe-normed": (transformers.Qwen3MoeConfig, dict(num_experts=4, num_experts_per_tok=3, moe_intermediate_size=16,
                                                          norm_topk_prob=True, use_sliding_window=True, sliding_window=4)),
}


def hf_model(variant, **changes):
    config_class, extra = VARIANTS[variant]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**SMALL, **{**extra, **changes})).eval()
    # transformers' init (std 0.02) leaves the experts' outputs too small to see in the logits, and
    # the routers' choices close to ties: both are scaled up so that a test sees every expert's part.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mlp." in name:
                param.normal_(0, 1 if name.endswith("gate.weight") else 0.2,
                              generator=torch.Generator().manual_seed(len(name)))
    return perturb_constants(model)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> (torch model, folder saved as safetensors)."""
    return save_each(tmp_path_factory, VARIANTS, hf_model)


tokens = functools.partial(padded_tokens, SMALL["vocab_size"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_equal_transformers(saved, variant):
    model, folder = saved[variant]
    names = [name for name, _ in read_tensors(folder)]
    assert any(".experts.3." in name for name in names)  # the checkpoint stores one Linear per expert
    graphdef, params = lorax.split(interop.from_pretrained(folder, progress=False))
    ids, mask = tokens()
    with torch.no_grad():
        plain, padded = model(ids).logits.numpy(), model(ids, attention_mask=mask).logits.numpy()
    np.testing.assert_allclose(logits_of(graphdef, params, ids), plain, atol=1e-4, rtol=1e-4)
    real = mask.numpy().astype(bool)
    np.testing.assert_allclose(logits_of(graphdef, params, ids, mask)[real], padded[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["mixtral", "qwen3-moe"])
def test_fused_expert_checkpoint_loads_as_transformers_loads_it(variant, tmp_path):
    """A checkpoint holding transformers 5's own fused expert parameters (model.state_dict() names:
    `experts.gate_up_proj` (experts, 2 x intermediate, hidden), `experts.down_proj`), as tools other
    than save_pretrained write it: transformers loads it, and our logits equal its."""
    from safetensors.torch import save_file

    model = hf_model(variant)
    model.config.save_pretrained(tmp_path)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state and state["model.layers.0.mlp.experts.gate_up_proj"].ndim == 3
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    graphdef, params = lorax.split(interop.from_pretrained(tmp_path, progress=False))
    ids, mask = tokens()
    with torch.no_grad():
        expected = theirs(ids, attention_mask=mask).logits.numpy()
        np.testing.assert_allclose(model(ids, attention_mask=mask).logits.numpy(), expected, atol=1e-6)
    real = mask.numpy().astype(bool)
    np.testing.assert_allclose(logits_of(graphdef, params, ids, mask)[real], expected[real], atol=1e-4, rtol=1e-4)

    wrong = {**state, "model.layers.1.mlp.experts.down_proj": state["model.layers.1.mlp.experts.down_proj"][:3].contiguous()}
    save_file(wrong, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(interop.CheckpointError, match=r"'model\.layers\.1\.mlp\.experts\.down_proj' has shape \(3, "):
        interop.from_pretrained(tmp_path, progress=False)


@pytest.mark.parametrize("variant", ["mixtral", "qwen3-moe"])
@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16-params", "fp32-params"])
def test_bf16_compute_is_close(saved, variant, param_dtype):
    """bf16 compute over bf16 or fp32 parameters (QLoRA's and mixed precision's setting): the expert block
    returns the compute dtype, as a dense MLP does, and the logits stay near transformers' fp32 ones."""
    model, folder = saved[variant]
    graphdef, params = lorax.split(interop.from_pretrained(folder, dtype=jnp.bfloat16, param_dtype=param_dtype,
                                                           progress=False))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(param_dtype)}
    ids, _ = tokens()
    ours = logits_of(graphdef, params, ids)
    assert ours.dtype == jnp.bfloat16
    with torch.no_grad():
        reference = model(ids).logits.numpy()
    # bf16 rounding can flip a near-tied router choice for a few tokens; most logits stay within bf16's error
    close = np.abs(ours.astype(np.float32) - reference) < 0.05 * np.abs(reference).max()
    assert close.mean() > 0.95, close.mean()


def test_sharded_and_bin_saves_load(tmp_path):
    model = hf_model("mixtral")
    ids, _ = tokens()
    with torch.no_grad():
        theirs = model(ids).logits.numpy()
    for save in ("sharded", "bin", "sharded-bin"):
        save_checkpoint(model, tmp_path / save, save, "40KB")
        graphdef, params = lorax.split(interop.from_pretrained(tmp_path / save, progress=False))
        np.testing.assert_allclose(logits_of(graphdef, params, ids), theirs, atol=1e-4, rtol=1e-4)


def test_routing_matters():
    """The parity above sees the routing: another top-k gives other logits (same weights)."""
    ids, _ = tokens()
    with torch.no_grad():
        two = hf_model("qwen3-moe")(ids).logits.numpy()
        three = hf_model("qwen3-moe", num_experts_per_tok=3)(ids).logits.numpy()
        normed = hf_model("qwen3-moe", norm_topk_prob=True)(ids).logits.numpy()
    assert np.abs(two - three).max() > 1e-2 and np.abs(two - normed).max() > 1e-2


def test_config_fields_left_out_read_as_transformers_fills_them():
    for config_class in (transformers.MixtralConfig, transformers.Qwen3MoeConfig):
        sparse = dict(model_type=config_class.model_type, **SMALL)
        full = config_class(**SMALL).to_dict()
        assert LlamaConfig.from_hf(sparse) == LlamaConfig.from_hf(full), config_class.__name__
    qwen = LlamaConfig.from_hf(transformers.Qwen3MoeConfig(**SMALL).to_dict())
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.moe_intermediate_size, qwen.norm_topk_prob) == (128, 8, 768, False)


def test_dense_layers_among_expert_layers_are_refused():
    hf = transformers.Qwen3MoeConfig(**SMALL, decoder_sparse_step=2).to_dict()
    with pytest.raises(NotImplementedError, match="decoder_sparse_step"):
        LlamaConfig.from_hf(hf)


@pytest.mark.parametrize("variant", ["mixtral-window", "qwen3-moe"])
def test_greedy_generation_equals_transformers(saved, variant):
    model, folder = saved[variant]
    graphdef, params = lorax.split(interop.from_pretrained(folder, progress=False))
    ids, mask = tokens(length=5, seed=1)
    with torch.no_grad():
        # No eos: Mixtral's (2) would end transformers' generation early; ours runs max_new_tokens.
        model.generation_config.eos_token_id = None
        theirs = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0).numpy()
    ours = generate(graphdef, params, jnp.asarray(ids.numpy()), attention_mask=jnp.asarray(mask.numpy()),
                    max_new_tokens=10)
    np.testing.assert_array_equal(ours, theirs)


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA_CASES = [("mixtral", dict(r=4, target_modules=["q_proj", "v_proj"])),
              ("mixtral", dict(r=2, target_modules=ATTENTION, layers_to_transform=[0, 2])),
              ("qwen3-moe-normed", dict(r=2, target_modules=r".*\.(q|o)_proj", use_rslora=True))]


@pytest.mark.parametrize("variant,config", LORA_CASES, ids=str)
def test_lora_matches_peft(saved, variant, config, tmp_path):
    """peft's targets, counts (every expert in the total), logits and merge; our adapter file in
    PeftModel and peft's in ours."""
    model, folder = saved[variant]
    graphdef, base = lorax.split(interop.from_pretrained(folder, progress=False))
    ids, mask = tokens()
    params = lorax.lora(base, lorax.LoraConfig(init_lora_weights=False, **config), key=jax.random.key(1),
                        output_head="lm_head")
    peft_model = peft.get_peft_model(hf_model(variant), peft.LoraConfig(init_lora_weights=False, **config))
    sync_into_peft(params, peft_model)
    assert adapted_paths(params) == sorted(peft_model.base_model.targeted_module_names)
    assert lorax_line(params) == peft_line(peft_model)
    real = mask.numpy().astype(bool)
    with torch.no_grad():
        theirs = peft_model(ids, attention_mask=mask).logits.numpy()
    ours = logits_of(graphdef, params, ids, mask)
    assert np.abs(ours - logits_of(graphdef, base, ids, mask))[real].max() > 1e-2, "the adapters must change the logits"
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
    lora_config = lorax.LoraConfig(init_lora_weights=False, **config)
    interop.save_adapter(tmp_path / "ours", params, lora_config)
    with torch.no_grad():
        loaded = peft.PeftModel.from_pretrained(hf_model(variant), tmp_path / "ours").eval()
        np.testing.assert_allclose(loaded(ids, attention_mask=mask).logits.numpy()[real], ours[real], atol=1e-4, rtol=1e-4)
    peft_model.save_pretrained(tmp_path / "theirs")
    back = interop.load_adapter(tmp_path / "theirs", base, output_head="lm_head")
    np.testing.assert_allclose(logits_of(graphdef, back, ids, mask), ours, atol=1e-5)
    with torch.no_grad():
        theirs_merged = peft_model.merge_and_unload()(ids, attention_mask=mask).logits.numpy()
    np.testing.assert_allclose(logits_of(graphdef, lorax.merge(params), ids, mask)[real], theirs_merged[real],
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["mixtral", "qwen3-moe"])
def test_lora_gradients_equal_torch(saved, variant):
    """The loss gradient of every adapter (attention, routers, each expert's) equals torch's through
    peft: the backward pass runs through the routed experts (jax.lax.ragged_dot's transpose) and
    through the experts' own factors (ExpertLoraArray's rule)."""
    model, folder = saved[variant]
    graphdef, base = lorax.split(interop.from_pretrained(folder, progress=False))
    config = dict(r=2, target_modules="all-linear")
    params = lorax.lora(base, lorax.LoraConfig(init_lora_weights=False, **config), key=jax.random.key(1),
                        output_head="lm_head")
    trainable, frozen = lorax.partition(params)
    peft_model = peft.get_peft_model(hf_model(variant), peft.LoraConfig(init_lora_weights=False, **config))
    state = dict(peft_model.named_parameters())
    with torch.no_grad():  # our factors into peft's model, by the names of the adapter file
        for name, value in interop.peft.adapter_state(params).items():
            state[name.replace(".weight", ".default.weight")].copy_(torch.from_numpy(value))
    ids, _ = tokens()

    def loss(trainable):
        logits = lorax.apply(graphdef, lorax.combine(trainable, frozen), jnp.asarray(ids.numpy()[:, :-1]))
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(ids.numpy()[:, 1:])).mean()

    grads = jax.jit(jax.grad(loss))(trainable)
    logits = peft_model(ids[:, :-1]).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    ours = interop.peft.adapter_state(lorax.combine(grads, frozen))
    assert any(".experts.base_layer.lora_A" in name for name in ours)
    assert len(ours) == len([p for p in state.values() if p.grad is not None])
    for name, value in ours.items():
        theirs = state[name.replace(".weight", ".default.weight")].grad.numpy()
        # Relative to the tensor's largest gradient: fp32 sums in each side's order differ by up to
        # ~2e-4 of it (Qwen3-MoE's q/k norms amplify them; seen with torch's AVX-512 kernels); a
        # wrong rule would be off by the gradient itself.
        np.testing.assert_allclose(value, theirs, atol=1e-3 * np.abs(theirs).max(), rtol=1e-3, err_msg=name)


@pytest.mark.parametrize("variant", ["mixtral", "qwen3-moe"])
def test_merged_export_loads_in_transformers(saved, variant, tmp_path):
    """save_merged writes one tensor per expert under the checkpoint's names (Mixtral's
    block_sparse_moe / w1 w2 w3): transformers loads them and gives our logits."""
    model, folder = saved[variant]
    graphdef, base = lorax.split(interop.from_pretrained(folder, progress=False))
    params = lorax.lora(base, lorax.LoraConfig(r=4, target_modules=ATTENTION, init_lora_weights=False),
                        key=jax.random.key(0))
    merged = lorax.merge(params)
    interop.save_merged(tmp_path, graphdef, merged)
    assert sorted(name for name, _ in read_tensors(tmp_path)) == sorted(name for name, _ in read_tensors(folder))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    ids, mask = tokens()
    real = mask.numpy().astype(bool)
    with torch.no_grad():
        theirs = loaded(ids, attention_mask=mask).logits.numpy()
    np.testing.assert_allclose(theirs[real], logits_of(graphdef, merged, ids, mask)[real], atol=1e-4, rtol=1e-4)


EXPERT_CASES = [
    ("mixtral", dict(r=2, target_modules="all-linear")),  # + the router and every expert (gate_up_proj at rank 4)
    ("qwen3-moe", dict(r=2, target_modules="all-linear", use_rslora=True)),
    # old per-expert names: gate_proj + up_proj -> gate_up_proj; layers_to_transform applies to q_proj only
    ("qwen3-moe", dict(r=3, target_modules=["q_proj", "gate_proj", "up_proj"], layers_to_transform=[1])),
    ("mixtral", dict(r=2, target_modules=["w2", "gate"], rank_pattern={"down_proj": 3})),  # down_proj and the router
    ("qwen3-moe-normed", dict(r=2, target_modules=r".*\.(v_proj|down_proj)")),  # a regex, resolved to names as peft does
    ("qwen3-moe", dict(r=2, target_modules=["o_proj"], target_parameters=["mlp.experts.gate_up_proj", "gate.weight"])),
]


@pytest.mark.parametrize("variant,config", EXPERT_CASES, ids=str)
def test_lora_on_the_experts_matches_peft(saved, variant, config, tmp_path):
    """LoRA per expert and on the router, as peft's target_parameters (and its translation of
    "all-linear" and the transformers 4 names): peft's counts; our adapter file in PeftModel gives
    our logits; peft's file in ours gives peft's; merges agree."""
    model, folder = saved[variant]
    loaded_model = interop.from_pretrained(folder, progress=False)
    graphdef, base = lorax.split(loaded_model)
    lora_config = lorax.LoraConfig(init_lora_weights=False, **config)
    family = dict(output_head="lm_head", moe_names=loaded_model.moe_names)
    params = lorax.lora(base, lora_config, key=jax.random.key(1), **family)
    assert any(isinstance(leaf, lorax.ExpertLoraArray)
               for leaf in jax.tree_util.tree_leaves(params, is_leaf=lorax.is_adapter))
    peft_model = peft.get_peft_model(hf_model(variant), peft.LoraConfig(init_lora_weights=False, **config)).eval()
    assert lorax_line(params) == peft_line(peft_model)
    ids, mask = tokens()
    real = mask.numpy().astype(bool)
    ours = logits_of(graphdef, params, ids, mask)
    assert np.abs(ours - logits_of(graphdef, base, ids, mask))[real].max() > 1e-2, "the adapters must change the logits"
    loaded = exchange_adapter_files(variant, graphdef, base, params, lora_config, peft_model, family, tmp_path)
    with torch.no_grad():
        theirs_merged = loaded.merge_and_unload()(ids, attention_mask=mask).logits.numpy()
    np.testing.assert_allclose(logits_of(graphdef, lorax.merge(params), ids, mask)[real], theirs_merged[real],
                               atol=1e-4, rtol=1e-4)


def exchange_adapter_files(variant, graphdef, base, params, lora_config, peft_model, family, tmp_path):
    """Our adapter file in PeftModel gives our logits, and peft's file in ours gives peft's
    (padding excluded). Returns the PeftModel loaded from our file."""
    ids, mask = tokens()
    real = mask.numpy().astype(bool)
    interop.save_adapter(tmp_path / "ours", params, lora_config)
    with torch.no_grad():
        loaded = peft.PeftModel.from_pretrained(hf_model(variant), tmp_path / "ours").eval()
        np.testing.assert_allclose(loaded(ids, attention_mask=mask).logits.numpy()[real],
                                   logits_of(graphdef, params, ids, mask)[real], atol=1e-4, rtol=1e-4)
        theirs = peft_model(ids, attention_mask=mask).logits.numpy()
    peft_model.save_pretrained(tmp_path / "theirs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # names peft ignores on this family (the test of those checks its warning)
        back = interop.load_adapter(tmp_path / "theirs", base, **family)
    np.testing.assert_allclose(logits_of(graphdef, back, ids, mask)[real], theirs[real], atol=1e-4, rtol=1e-4)
    return loaded


OTHER_FAMILY_CASES = [
    ("mixtral", dict(r=2, target_modules=["q_proj", "down_proj"])),
    ("mixtral", dict(r=2, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])),  # the usual list
    ("qwen3-moe", dict(r=2, target_modules=["q_proj", "w1", "w3", "w2"])),
    ("mixtral", dict(r=2, target_modules=r".*\.(q_proj|down_proj)")),
]


@pytest.mark.parametrize("variant,config", OTHER_FAMILY_CASES, ids=str)
def test_the_other_familys_expert_names_adapt_nothing_as_in_peft(saved, variant, config, tmp_path):
    """peft maps only the model family's own transformers 4 expert names (Mixtral: w1/w3/w2;
    Qwen-MoE: gate_proj/up_proj/down_proj) onto the fused experts; the other family's match
    nothing there. With `model.moe_names`, ours adapt the same modules: peft's counts, and each
    side's adapter file gives the other's logits."""
    model, folder = saved[variant]
    loaded_model = interop.from_pretrained(folder, progress=False)
    graphdef, base = lorax.split(loaded_model)
    family = dict(output_head="lm_head", moe_names=loaded_model.moe_names)
    lora_config = lorax.LoraConfig(init_lora_weights=False, **config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params = lorax.lora(base, lora_config, key=jax.random.key(1), **family)
    assert any("adapt nothing on this" in str(w.message) for w in caught) == isinstance(config["target_modules"], list)
    assert not any(isinstance(leaf, lorax.ExpertLoraArray)
                   for leaf in jax.tree_util.tree_leaves(params, is_leaf=lorax.is_adapter))
    peft_model = peft.get_peft_model(hf_model(variant), peft.LoraConfig(init_lora_weights=False, **config)).eval()
    assert lorax_line(params) == peft_line(peft_model)
    exchange_adapter_files(variant, graphdef, base, params, lora_config, peft_model, family, tmp_path)


@pytest.mark.parametrize("config,error,match", [
    (dict(target_modules=["q_proj", "gate_proj"]), lorax.TargetError, "fused into one parameter per layer, 'gate_up_proj'"),
    (dict(target_modules="all-linear", lora_dropout=0.1), lorax.LoraConfigError, "lora_dropout=0.1 on the experts"),
    (dict(target_modules=["down_proj"], use_dora=True), lorax.LoraConfigError, "use_dora=True on the experts"),
])
def test_what_peft_refuses_on_the_experts_is_refused(saved, config, error, match):
    """peft raises on these too (fused modules half-targeted; ParamWrapper without dropout or DoRA)."""
    with pytest.raises((ValueError, KeyError)):
        peft.get_peft_model(hf_model("qwen3-moe"), peft.LoraConfig(**config))
    _, base = lorax.split(interop.from_pretrained(saved["qwen3-moe"][1], progress=False))
    with pytest.raises(error, match=match):
        lorax.lora(base, lorax.LoraConfig(**config), key=jax.random.key(0))


def test_a_target_parameter_that_matches_nothing_is_an_error(saved):
    """peft only warns (and adapts the rest); a misspelt name is an error here, listing the names."""
    config = dict(target_modules=["q_proj"], target_parameters=["experts.up_proj"])
    with pytest.warns(RuntimeWarning, match="no parameter was matched"):
        peft.get_peft_model(hf_model("qwen3-moe"), peft.LoraConfig(**config))
    _, base = lorax.split(interop.from_pretrained(saved["qwen3-moe"][1], progress=False))
    with pytest.raises(lorax.TargetError, match=r"\['experts.up_proj'\] match no expert parameter.*down_proj, gate.weight, gate_up_proj"):
        lorax.lora(base, lorax.LoraConfig(**config), key=jax.random.key(0))


def test_qlora_stores_each_expert_as_bitsandbytes_would(saved, tmp_path):
    """quantize= on the experts: each expert's matrix is bitsandbytes' NF4 of torch's (out, in)
    weight, byte for byte (transformers + bitsandbytes leave the 3-D experts unquantized, so the
    reference is bnb's quantize_4bit per expert); the logits are PeftModel's with our adapter on
    the bnb-dequantized weights; and the step differentiates through the 4-bit experts."""
    model, folder = saved["mixtral"]
    graphdef, base = lorax.split(interop.from_pretrained(folder, progress=False))
    config = lorax.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
    params = lorax.lora(base, config, key=jax.random.key(1), output_head="lm_head",
                        quantize=lorax.QuantConfig("nf4", double_quant=True))
    experts = params["model"]["layers"]["*"]["mlp"]["experts"]["gate_up_proj"].w
    assert isinstance(experts, lorax.Nf4Array) and experts.shape == (3, 4, 32, 96)

    def bnb(weight):
        return F.quantize_4bit(weight.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True)

    packed, state = bnb(model.model.layers[1].mlp.experts.gate_up_proj.detach()[2])
    np.testing.assert_array_equal(np.asarray(experts.packed[1, 2]), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(experts.absmax[1, 2]), state.absmax.numpy())

    interop.save_adapter(tmp_path, params, config)
    torch_model = hf_model("mixtral")
    with torch.no_grad():  # the quantized bases, as bitsandbytes dequantizes them
        for name, weight in torch_model.named_parameters():
            if weight.ndim >= 2 and any(part in name for part in ("self_attn", "experts", "mlp.gate")):
                for matrix in weight.data if weight.ndim == 3 else weight.data[None]:
                    matrix.copy_(F.dequantize_4bit(*bnb(matrix)))
        theirs = peft.PeftModel.from_pretrained(torch_model, tmp_path).eval()
    ids, mask = tokens()
    real = mask.numpy().astype(bool)
    with torch.no_grad():
        np.testing.assert_allclose(logits_of(graphdef, params, ids, mask)[real],
                                   theirs(ids, attention_mask=mask).logits.numpy()[real], atol=1e-4, rtol=1e-4)
    trainable, frozen = lorax.partition(params)

    def loss(trainable):
        logits = lorax.apply(graphdef, lorax.combine(trainable, frozen), jnp.asarray(ids.numpy()[:, :-1]))
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(ids.numpy()[:, 1:])).mean()

    grads = jax.jit(jax.grad(loss))(trainable)
    expert_grad = grads["model"]["layers"]["*"]["mlp"]["experts"]["gate_up_proj"]
    assert np.isfinite(np.asarray(expert_grad.a)).all() and np.abs(np.asarray(expert_grad.a)).max() > 0


def test_experts_container_is_not_a_module_target(saved):
    """`experts` holds parameters, not a linear layer: as a target_modules name it is refused (peft
    refuses the module too); its parameters are named with target_parameters."""
    _, base = lorax.split(interop.from_pretrained(saved["qwen3-moe"][1], progress=False))
    with pytest.raises(lorax.TargetError, match="cannot adapt"):
        lorax.lora(base, lorax.LoraConfig(r=2, target_modules=["experts"]), key=jax.random.key(0))
