"""Adapters across the bridge, checked by the real peft: ours -> PeftModel.from_pretrained, and
peft's save_pretrained -> interop.load_adapter, with equal outputs both ways."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import interop
import lorax
from conftest import jax_mlp, jax_tiny, perturb_trained_leaves, torch_to_params

MLP_CONFIGS = [
    dict(r=3, target_modules=["seq.0", "seq.2"]),
    dict(r=4, target_modules=r"seq\.[02]", use_rslora=True),
    dict(r=3, target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"]),
    dict(r=3, target_modules=["seq.0", "seq.2"], bias="all"),
    dict(r=3, target_modules=["seq.0"], bias="lora_only"),
    dict(r=4, lora_alpha=16, target_modules=["seq.0", "seq.2", "seq.4"], rank_pattern={"seq.2": 2}, alpha_pattern={"seq.4": 3}),
]
TINY_CONFIGS = [
    dict(r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2]),
    dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj", "up_proj"]),
    dict(r=2, target_modules="all-linear", exclude_modules=["lm_head"]),
    dict(r=3, target_modules=["embed_tokens", "q_proj", "down_proj"], use_dora=True),
]


def adapted(base, config, seed=1):
    params = lorax.lora(base, lorax.LoraConfig(init_lora_weights=False, **config), key=jax.random.key(seed))
    return perturb_trained_leaves(params, jax.random.key(seed + 1))


def peft_outputs(torch_model, directory, inputs):
    model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), directory).eval()
    with torch.no_grad():
        return model(inputs).numpy()


@pytest.mark.parametrize("config", MLP_CONFIGS, ids=str)
def test_mlp_adapter_round_trips_through_peft(torch_mlp, config, tmp_path):
    base = torch_to_params(torch_mlp)
    x = torch.rand(6, 20, generator=torch.Generator().manual_seed(0))
    params = adapted(base, config)
    ours = np.asarray(lorax.apply(jax_mlp, params, jnp.asarray(x.numpy())))
    assert np.abs(ours - np.asarray(jax_mlp(base, jnp.asarray(x.numpy())))).max() > 1e-3

    interop.save_adapter(tmp_path / "ours", params, lorax.LoraConfig(**config))
    np.testing.assert_allclose(peft_outputs(torch_mlp, tmp_path / "ours", x), ours, atol=1e-5, rtol=1e-5)

    # peft -> ours: peft's own save, loaded onto the base tree.
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(copy.deepcopy(torch_mlp), peft.LoraConfig(init_lora_weights=False, **config)).eval()
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad:  # make trained biases and copies differ from the base
                parameter.add_(0.05 * torch.randn_like(parameter))
        theirs = peft_model(x).numpy()
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = interop.load_adapter(tmp_path / "peft", base)
    np.testing.assert_allclose(lorax.apply(jax_mlp, loaded, jnp.asarray(x.numpy())), theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", TINY_CONFIGS, ids=str)
def test_tiny_decoder_adapter_round_trips(torch_tiny, config, tmp_path):
    base = torch_to_params(torch_tiny)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    params = adapted(base, config)
    ours = np.asarray(lorax.apply(jax_tiny, params, jnp.asarray(ids.numpy())))
    interop.save_adapter(tmp_path, params, lorax.LoraConfig(**config))
    np.testing.assert_allclose(peft_outputs(torch_tiny, tmp_path, ids), ours, atol=1e-5, rtol=1e-5)
    reloaded = interop.load_adapter(tmp_path, base)
    np.testing.assert_allclose(lorax.apply(jax_tiny, reloaded, jnp.asarray(ids.numpy())), ours, atol=1e-6)


@pytest.mark.parametrize("use_dora", [False, True])
def test_llama_adapter_both_ways(tmp_path, use_dora):
    """A stacked-layer Llama: our adapter loads in PeftModel over transformers' Llama, and back
    (DoRA too: a magnitude per adapted layer)."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "base")
    graphdef, base = lorax.split(interop.from_pretrained(tmp_path / "base", progress=False))
    lora_config = dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[0, 2],
                       rank_pattern={"model.layers.2.self_attn.q_proj": 2}, use_dora=use_dora)
    params = adapted(base, lora_config)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    ours = np.asarray(lorax.apply(graphdef, params, jnp.asarray(ids.numpy())))
    interop.save_adapter(tmp_path / "adapter", params, lorax.LoraConfig(**lora_config), base_model_name_or_path="tiny")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(ids).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    loaded = interop.load_adapter(tmp_path / "adapter", base)
    np.testing.assert_allclose(lorax.apply(graphdef, loaded, jnp.asarray(ids.numpy())), ours, atol=1e-6)


def test_bf16_adapters_keep_their_dtype(torch_mlp, tmp_path):
    base = torch_to_params(torch_mlp)
    params = lorax.lora(base, lorax.LoraConfig(r=3, target_modules=["seq.0"], init_lora_weights=False),
                        key=jax.random.key(0), adapter_dtype=jnp.bfloat16)
    interop.save_adapter(tmp_path, params, lorax.LoraConfig(r=3, target_modules=["seq.0"]))
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter_model.safetensors", framework="pt") as file:
        assert {file.get_tensor(k).dtype for k in file.keys()} == {torch.bfloat16}
    loaded = interop.load_adapter(tmp_path, base)
    assert loaded["seq"][0]["kernel"].a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(loaded["seq"][0]["kernel"].a, params["seq"][0]["kernel"].a)


def test_adapter_errors(torch_mlp, tmp_path):
    base = torch_to_params(torch_mlp)
    config = lorax.LoraConfig(r=3, target_modules=["seq.0"])
    params = adapted(base, dict(r=3, target_modules=["seq.0"]))
    with pytest.raises(interop.CheckpointError, match="no adapter_config.json in"):
        interop.load_adapter(tmp_path, base)
    interop.save_adapter(tmp_path / "good", params, config)

    other = dict(torch_to_params(torch_mlp))
    other["seq"] = dict(other["seq"])
    other["seq"][0] = {"kernel": jnp.zeros((10, 2000)), "bias": jnp.zeros(2000)}
    with pytest.raises(interop.CheckpointError, match=r"'base_model.model.seq.0.lora_A.weight' has shape \(3, 20\), the base model needs \(3, 10\)"):
        interop.load_adapter(tmp_path / "good", other)

    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 20}))
    with pytest.raises(lorax.LoraError, match=r"peft_type 'PREFIX_TUNING' is not supported"):
        interop.load_adapter(prefix, base)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes((tmp_path / "good" / "adapter_model.safetensors").read_bytes()[:100])
    with pytest.raises(interop.CheckpointError, match=r"corrupt/adapter_model.safetensors: (corrupt|truncated)"):
        interop.load_adapter(corrupt, base)


@pytest.mark.parametrize("other, message", [
    (dict(r=4, target_modules=["seq.0"]), r"seq.0.kernel: params \('LoraArray', \(20, 3\), \(3, \d+\), None\), config "
                                           r"\('LoraArray', \(20, 4\), \(4, \d+\), None\)"),
    (dict(r=3, target_modules=["seq.0", "seq.2"]), r"seq.2.kernel: params not adapted, config \('LoraArray'"),
    (dict(r=3, lora_alpha=16, target_modules=["seq.0"]), r"seq.0.kernel: params scale 2.66.*, config \(lora_alpha / r\) 5.33"),
    (dict(r=3, target_modules=["seq.0"], bias="all"), r"seq.2.bias: params not adapted, config \('trained'"),
])
def test_save_adapter_refuses_another_config(torch_mlp, tmp_path, other, message):
    """adapter_config.json is what peft builds the adapters from: written from a config the params
    were not made with, it would load with the wrong rank, scale or modules (or not at all)."""
    params = adapted(torch_to_params(torch_mlp), dict(r=3, target_modules=["seq.0"]))
    with pytest.raises(lorax.LoraError, match=r"config is not the one these params were made with.*" + message):
        interop.save_adapter(tmp_path / "adapter", params, lorax.LoraConfig(**other))
    with pytest.raises(lorax.LoraError, match=r"config must be the lorax.LoraConfig .*, not dict"):
        interop.save_adapter(tmp_path / "adapter", params, other)
    assert not (tmp_path / "adapter").exists()


def test_bad_adapter_files_are_named(torch_mlp, tmp_path):
    base = torch_to_params(torch_mlp)
    interop.save_adapter(tmp_path, adapted(base, dict(r=3, target_modules=["seq.0"])),
                         lorax.LoraConfig(r=3, target_modules=["seq.0"]))
    config = (tmp_path / "adapter_config.json").read_text()
    (tmp_path / "adapter_config.json").write_text("[]")
    with pytest.raises(interop.CheckpointError, match=r"adapter_config.json: must hold a JSON object"):
        interop.load_adapter(tmp_path, base)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**json.loads(config), "lora_alpha": "eight"}))
    with pytest.raises(lorax.LoraConfigError, match=r"adapter_config.json: lora_alpha must be a number, got 'eight'"):
        interop.load_adapter(tmp_path, base)
    # a string would read as true: rsLoRA's scale instead of the file's
    (tmp_path / "adapter_config.json").write_text(json.dumps({**json.loads(config), "use_rslora": "false"}))
    with pytest.raises(lorax.LoraConfigError, match=r"adapter_config.json: use_rslora must be a bool"):
        interop.load_adapter(tmp_path, base)
    (tmp_path / "adapter_config.json").write_bytes(b"\xff\xfe" + config.encode("utf-16-le"))
    with pytest.raises(interop.CheckpointError, match=r"adapter_config.json: not valid JSON"):
        interop.load_adapter(tmp_path, base)
    (tmp_path / "adapter_config.json").write_text(config)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.seq.0.lora_A.weight"] = tensors["base_model.model.seq.0.lora_A.weight"].astype(np.int32)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(interop.CheckpointError, match=r"adapter_model.safetensors: tensor "
                                                      r"'base_model.model.seq.0.lora_A.weight' has dtype int32"):
        interop.load_adapter(tmp_path, base)


def test_interrupted_save_keeps_the_previous_adapter(torch_mlp, tmp_path, monkeypatch):
    base = torch_to_params(torch_mlp)
    config = lorax.LoraConfig(r=3, target_modules=["seq.0"])
    first = adapted(base, dict(r=3, target_modules=["seq.0"]), seed=1)
    interop.save_adapter(tmp_path, first, config)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    import interop.checkpoint as checkpoint_module

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed after writing the new files, before renaming them")

    monkeypatch.setattr(checkpoint_module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        interop.save_adapter(tmp_path, adapted(base, dict(r=3, target_modules=["seq.0"]), seed=5), config)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    loaded = interop.load_adapter(tmp_path, base)
    np.testing.assert_array_equal(loaded["seq"][0]["kernel"].a, first["seq"][0]["kernel"].a)


@pytest.mark.parametrize("peft_config", [
    # peft also writes lm_head.base_layer.weight (save_embedding_layers="auto": lm_head is one of its
    # EMBEDDING_LAYER_NAMES); PeftModel loads that base, and so do we.
    dict(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False),
    # with bias="all", a single layer's modules_to_save copy of its bias is written as
    # `down_proj.modules_to_save.bias` (no adapter name), beside `down_proj.bias`
    dict(r=4, target_modules=["q_proj"], bias="all", modules_to_save=["down_proj"], init_lora_weights=False),
], ids=["lm_head-target", "bias-all-with-modules-to-save"])
@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
def test_peft_written_adapters_load(tmp_path, peft_config, safe_serialization):
    """Adapters as PeftModel.save_pretrained writes them by default load with PeftModel's logits,
    and so does its adapter_model.bin (safe_serialization=False, read with weights_only=True);
    the lm_head case's saved base is moved off the model's, so using it is seen."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, mlp_bias=True)

    def hf_model():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval()

    hf_model().save_pretrained(tmp_path / "base")
    peft_model = peft.get_peft_model(hf_model(), peft.LoraConfig(**peft_config))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad or name.endswith("lm_head.base_layer.weight"):
                param.add_(0.1 * torch.randn_like(param))
    peft_model.save_pretrained(tmp_path / "adapter", safe_serialization=safe_serialization)
    assert (tmp_path / "adapter" / "adapter_model.bin").is_file() != safe_serialization
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf_model(), tmp_path / "adapter").eval()(ids).logits.numpy()
        np.testing.assert_allclose(peft_model.eval()(ids).logits.numpy(), theirs, atol=1e-6)
    graphdef, base = lorax.split(interop.from_pretrained(tmp_path / "base", progress=False))
    loaded = interop.load_adapter(tmp_path / "adapter", base)
    np.testing.assert_allclose(np.asarray(lorax.apply(graphdef, loaded, jnp.asarray(ids.numpy()))), theirs,
                               atol=1e-4, rtol=1e-4)
