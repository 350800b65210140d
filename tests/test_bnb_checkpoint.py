"""Pre-quantized checkpoints: a tiny Llama that transformers quantized with bitsandbytes (on CPU)
and saved loads with `interop.from_pretrained` straight into Nf4Array kernels: the same bytes
(dequantized bit for bit like bnb), the same logits, and QLoRA counted like peft."""

import json
import shutil

import bitsandbytes.functional as F
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import interop
import lorax
from conftest import lorax_line, peft_line, perturb_trained_leaves, sync_into_peft
from lorax import nf4

SMALL = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
QUANTIZATIONS = {
    "nf4-double": dict(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False),
}
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
QLORA = dict(r=4, target_modules=["q_proj", "v_proj"])


def load_bnb(folder, quantization=None):
    """transformers' 4-bit model of `folder` on CPU, fp32 compute (quantizing it unless it already is)."""
    extra = {} if quantization is None else dict(quantization_config=transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, **QUANTIZATIONS[quantization]))
    return transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32,
                                                             **extra).eval()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SMALL)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def quantized(plain, tmp_path_factory):
    """quantization -> (bnb model, the folder it saved, our (graphdef, params) loaded from it)."""
    out = {}
    for name in QUANTIZATIONS:
        model = load_bnb(plain, name)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, folder, lorax.split(interop.from_pretrained(folder, progress=False)))
    return out


def tokens():
    return torch.randint(0, SMALL["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(0))


def logits_of(graphdef, params, ids):
    return np.asarray(jax.jit(lambda p, x: lorax.apply(graphdef, p, x))(params, jnp.asarray(ids.numpy())))


def layer(q, i):
    return jax.tree_util.tree_map(lambda a: a[i], q)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_kernels_are_bnb_bytes(quantized, quantization):
    model, folder, (_, params) = quantized[quantization]
    stored = {"quant_type": QUANTIZATIONS[quantization]["bnb_4bit_quant_type"],
              "double_quant": QUANTIZATIONS[quantization]["bnb_4bit_use_double_quant"]}
    layers = params["model"]["layers"]["*"]
    for projection in PROJECTIONS:
        module, name = projection.split(".")
        kernel = layers[module][name]["kernel"]
        assert isinstance(kernel, lorax.Nf4Array) and kernel.transposed
        assert (kernel.quant_type, kernel.double_quant) == (stored["quant_type"], stored["double_quant"])
        assert kernel.packed.dtype == jnp.uint8 and kernel.packed.ndim == 2  # stacked: (layers, bytes)
        for i in range(SMALL["num_hidden_layers"]):
            weight = getattr(getattr(model.model.layers[i], module), name).weight
            theirs = F.dequantize_4bit(weight.data, weight.quant_state).numpy()
            np.testing.assert_array_equal(np.asarray(nf4.dequantize(layer(kernel, i))), theirs.T)
            np.testing.assert_array_equal(np.asarray(layer(kernel, i).packed), weight.data.numpy().reshape(-1))
    # transformers leaves the embeddings, norms and head in fp32; so do we.
    np.testing.assert_array_equal(params["lm_head"]["kernel"], model.lm_head.weight.detach().numpy().T)
    np.testing.assert_array_equal(params["model"]["embed_tokens"]["embedding"],
                                  model.model.embed_tokens.weight.detach().numpy())
    # 4 bits per weight plus statistics, not a dense copy.
    attention = layers["self_attn"]["q_proj"]["kernel"]
    assert attention.stored_bytes() < 0.6 * attention.size


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_logits_equal_bnb(quantized, quantization, dense_blocks):
    model, _, (graphdef, params) = quantized[quantization]
    ids = tokens()
    with torch.no_grad():
        theirs = model(ids).logits.numpy()
    np.testing.assert_allclose(logits_of(graphdef, params, ids), theirs, atol=1e-4, rtol=1e-4)


def qlora_pair(quantized, quantization):
    """(graphdef, our QLoRA params on the loaded 4-bit base, peft's QLoRA on the bnb model, before
    and after ours' random A and B are copied into it): the same adapter on both sides."""
    _, folder, (graphdef, base) = quantized[quantization]
    params = lorax.lora(base, lorax.LoraConfig(init_lora_weights=False, **QLORA), key=jax.random.key(1))
    peft_model = peft.get_peft_model(load_bnb(folder), peft.LoraConfig(init_lora_weights=False, **QLORA))
    line = peft_line(peft_model)
    sync_into_peft(params, peft_model)
    return graphdef, params, peft_model, line


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_qlora_on_loaded_params_matches_peft(quantized, quantization, dense_blocks):
    graphdef, params, peft_model, line = qlora_pair(quantized, quantization)
    q_proj = params["model"]["layers"]["*"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q_proj, lorax.LoraArray) and isinstance(q_proj.w, lorax.Nf4Array)
    assert lorax_line(params) == line
    ids = tokens()
    with torch.no_grad():
        theirs = peft_model(ids).logits.numpy()
    np.testing.assert_allclose(logits_of(graphdef, params, ids), theirs, atol=1e-4, rtol=1e-4)


def test_qdora_on_loaded_params_matches_peft(quantized):
    """DoRA on the 4-bit base (QDoRA): peft dequantizes the bitsandbytes weight for the column
    norm, we dequantize the Nf4Array: the same counts and logits."""
    _, folder, (graphdef, base) = quantized["nf4-double"]
    config = dict(init_lora_weights=False, use_dora=True, **QLORA)
    params = perturb_trained_leaves(lorax.lora(base, lorax.LoraConfig(**config), key=jax.random.key(1)),
                                    jax.random.key(2))
    q_proj = params["model"]["layers"]["*"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q_proj, lorax.DoraArray) and isinstance(q_proj.w, lorax.Nf4Array)
    peft_model = peft.get_peft_model(load_bnb(folder), peft.LoraConfig(**config))
    assert lorax_line(params) == peft_line(peft_model)
    sync_into_peft(params, peft_model)
    ids = tokens()
    with torch.no_grad():
        theirs = peft_model(ids).logits.numpy()
    np.testing.assert_allclose(logits_of(graphdef, params, ids), theirs, atol=1e-4, rtol=1e-4)


def test_olora_on_the_4bit_base_matches_peft(quantized):
    """OLoRA on a bitsandbytes 4-bit base: peft dequantizes, takes the QR, and quantizes the
    residual again; so do we (Nf4Array in, Nf4Array out): the same factors, residual codes, logits."""
    _, folder, (graphdef, base) = quantized["nf4-double"]
    config = dict(init_lora_weights="olora", **QLORA)
    params = lorax.lora(base, lorax.LoraConfig(**config), key=jax.random.key(1))
    peft_model = peft.get_peft_model(load_bnb(folder), peft.LoraConfig(**config)).eval()
    q_proj = params["model"]["layers"]["*"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q_proj.w, lorax.Nf4Array) and q_proj.w.double_quant
    for i in range(SMALL["num_hidden_layers"]):
        theirs = peft_model.base_model.model.model.layers[i].self_attn.q_proj
        np.testing.assert_allclose(np.asarray(q_proj.a[i]), theirs.lora_A["default"].weight.detach().numpy().T, atol=1e-5)
        np.testing.assert_allclose(np.asarray(q_proj.b[i]), theirs.lora_B["default"].weight.detach().numpy().T, atol=1e-5)
        weight = theirs.base_layer.weight
        # Rounding differences between two LAPACK builds' QRs could move a value across a code
        # boundary (here every byte agrees): allow one byte in a thousand.
        assert np.mean(np.asarray(layer(q_proj.w, i).packed) == weight.data.numpy().reshape(-1)) > 0.999
    ids = tokens()
    with torch.no_grad():
        np.testing.assert_allclose(logits_of(graphdef, params, ids), peft_model(ids).logits.numpy(), atol=1e-4)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_requantizing_merge_equals_peft(quantized, quantization):
    """merge(requantize=True) is peft's merge_and_unload on a bitsandbytes 4-bit model:
    dequantize, add the delta, quantize again: the same bytes, the same logits."""
    graphdef, params, peft_model, _ = qlora_pair(quantized, quantization)
    theirs = peft_model.merge_and_unload()
    merged = lorax.merge(params, requantize=True)
    for name in ("q_proj", "v_proj"):
        kernel = merged["model"]["layers"]["*"]["self_attn"][name]["kernel"]
        assert isinstance(kernel, lorax.Nf4Array)
        for i in range(SMALL["num_hidden_layers"]):
            weight = getattr(theirs.model.layers[i].self_attn, name).weight
            np.testing.assert_array_equal(np.asarray(layer(kernel, i).packed), weight.data.numpy().reshape(-1))
            # The bytes agree; the absmax can differ in the last bit: each side's BLAS sums B @ A
            # (the delta) in its own order (seen with torch's AVX-512 kernels), and absmax is a
            # max of the sums.
            np.testing.assert_allclose(np.asarray(nf4.dequantize(layer(kernel, i))),
                                       F.dequantize_4bit(weight.data, weight.quant_state).numpy().T, rtol=1e-6, atol=0)
    ids = tokens()
    with torch.no_grad():
        np.testing.assert_allclose(logits_of(graphdef, merged, ids), theirs(ids).logits.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quantization", ["nf4-double", "fp4"])
def test_dense_merged_export_of_a_4bit_checkpoint(quantized, quantization, tmp_path):
    """lorax.merge dequantizes every 4-bit weight, the adapted ones and the others, so save_merged
    writes a dense checkpoint (without the source's quantization_config, which would make
    transformers build 4-bit layers over dense weights): transformers loads it with the logits of
    peft's unmerged QLoRA model, which computes with the same dequantized weights."""
    graphdef, params, peft_model, _ = qlora_pair(quantized, quantization)
    merged = lorax.merge(params)
    assert not any(isinstance(leaf, lorax.Nf4Array) for leaf in jax.tree_util.tree_leaves(
        merged, is_leaf=lambda x: isinstance(x, lorax.Nf4Array)))
    interop.save_merged(tmp_path, graphdef, merged, progress=False)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = tokens()
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(ids).logits.numpy(), peft_model(ids).logits.numpy(), atol=1e-4, rtol=1e-4)


def test_peft_counts_the_loaded_4bit_base(quantized):
    """Without adapters too: count_parameters of the loaded tree is peft's count of the bnb model
    (a 4-bit weight counts twice its packed bytes)."""
    model, _, (_, params) = quantized["nf4-double"]
    assert lorax.count_parameters(params)[1] == sum(
        p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())


@pytest.mark.parametrize("quantization_config, named", [
    ({"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}, "load_in_8bit"),
    ({"quant_method": "gptq", "bits": 4}, "gptq"),
])
def test_unsupported_quantization_is_named(plain, tmp_path, quantization_config, named):
    shutil.copytree(plain, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    with pytest.raises(interop.CheckpointError, match=named):
        interop.from_pretrained(tmp_path, progress=False)


def test_partly_quantized_stack_is_an_error(quantized, tmp_path):
    """One layer's q_proj quantized and the other's not cannot be one stacked array: said, not misloaded."""
    _, folder, _ = quantized["fp4"]
    from interop.checkpoint import read_tensors
    from safetensors.numpy import save_file

    tensors = {name: np.array(t) for name, t in read_tensors(folder)
               if not name.startswith("model.layers.1.self_attn.q_proj.weight")}
    tensors["model.layers.1.self_attn.q_proj.weight"] = np.zeros((SMALL["hidden_size"],) * 2, np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    with pytest.raises(interop.CheckpointError, match=r"q_proj.*layers \[1\] are not 4-bit quantized"):
        interop.from_pretrained(tmp_path, progress=False)


def test_gpt2_conv1d_kernels(tmp_path):
    """GPT-2's Conv1D weights are (in, out) in torch; transformers quantizes them as Linear4bit
    (out, in) weights, and a square c_proj must still come out the right way round."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "plain")
    model = load_bnb(tmp_path / "plain", "nf4-double")
    model.save_pretrained(tmp_path / "bnb")
    graphdef, params = lorax.split(interop.from_pretrained(tmp_path / "bnb", progress=False))
    assert isinstance(params["transformer"]["h"]["*"]["attn"]["c_proj"]["kernel"], lorax.Nf4Array)
    ids = tokens()
    with torch.no_grad():
        theirs = model(ids).logits.numpy()
    np.testing.assert_allclose(logits_of(graphdef, params, ids), theirs, atol=1e-4, rtol=1e-4)


def _edited_quant_state(folder, out, edit):
    """A copy of `folder` with layer 0's q_proj quant_state JSON (bitsandbytes stores it as uint8 bytes) edited."""
    from interop.checkpoint import read_tensors
    from safetensors.numpy import save_file

    tensors = {name: np.array(t) for name, t in read_tensors(folder)}
    [name] = [n for n in tensors if n.startswith("model.layers.0.self_attn.q_proj.weight.quant_state.")]
    state = json.loads(tensors[name].tobytes())
    edit(state)
    tensors[name] = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()
    save_file(tensors, out / "model.safetensors")
    shutil.copy(folder / "config.json", out / "config.json")
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(nested_offset="abc"), r"nested_offset must be a number, got 'abc'"),
    (lambda s: s.update(blocksize=100), r"blocksize 100, dtype float32 is not a bitsandbytes 4-bit format"),
    (lambda s: s.update(quant_type="int4"), r"quant_type 'int4'"),
    (lambda s: s.pop("nested_offset"), r"double quantization other than bitsandbytes'"),
])
def test_corrupt_quant_state_is_named(quantized, tmp_path, edit, message):
    _, folder, _ = quantized["nf4-double"]
    with pytest.raises(interop.CheckpointError, match=r"model.layers.0.self_attn.q_proj.weight: .*" + message):
        interop.from_pretrained(_edited_quant_state(folder, tmp_path, edit), progress=False)
