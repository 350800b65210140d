"""PiSSA and OLoRA inits against peft's: the same factors and residual bases, the same outputs,
and adapters that load both ways (as trained, with the init in the config, and converted to a
plain rank-2r LoRA as peft's path_initial_model_for_weight_conversion writes it)."""

import copy
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import transformers
from safetensors.numpy import load_file

import interop
import lorax
from conftest import jax_mlp, torch_to_params
from lorax import nf4
from lorax.decomposition import decompose
from lorax.targets import leaves_by_path

MLP_CONFIGS = [
    dict(r=3, lora_alpha=6, target_modules=["seq.0", "seq.2"], init_lora_weights="pissa"),
    dict(r=4, lora_alpha=8, target_modules=["seq.0", "seq.2"], init_lora_weights="olora", use_rslora=True),
    dict(r=4, target_modules=["seq.0", "seq.2"], init_lora_weights="pissa", rank_pattern={"seq.2": 2}),
]


def peft_factors(peft_model, module):
    """(residual base (in, out), a (in, r), b (r, out)) of one peft module, in our layout."""
    layer = peft_model.base_model.model.get_submodule(module)
    return (layer.base_layer.weight.detach().numpy().T, layer.lora_A["default"].weight.detach().numpy().T,
            layer.lora_B["default"].weight.detach().numpy().T)


def same_up_to_sign(ours, theirs, atol):
    """A singular (or QR) pair may flip its sign between LAPACK builds: a's column and b's row flip
    together. Compare with each rank component's sign aligned on its largest entry."""
    a, b = ours
    a_t, b_t = theirs
    flip = np.sign(np.take_along_axis(a * a_t, np.abs(a_t).argmax(0)[None], 0))
    np.testing.assert_allclose(a * flip, a_t, atol=atol)
    np.testing.assert_allclose(b * flip.T, b_t, atol=atol)


@pytest.mark.parametrize("config", MLP_CONFIGS, ids=str)
def test_factors_and_residual_equal_peft(torch_mlp, config):
    base = torch_to_params(torch_mlp)
    params = lorax.lora(base, lorax.LoraConfig(**config), key=jax.random.key(0))
    peft_model = peft.get_peft_model(copy.deepcopy(torch_mlp), peft.LoraConfig(**config)).eval()
    for index in (0, 2):
        leaf = params["seq"][index]["kernel"]
        residual, a, b = peft_factors(peft_model, f"seq.{index}")
        np.testing.assert_allclose(np.asarray(leaf.w), residual, atol=5e-5)
        np.testing.assert_allclose(np.asarray(leaf.a @ leaf.b), a @ b, atol=5e-5)
        same_up_to_sign((np.asarray(leaf.a), np.asarray(leaf.b)), (a, b), atol=5e-4)
    x = torch.rand(5, 20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = peft_model(x).numpy()
    ours = np.asarray(lorax.apply(jax_mlp, params, jnp.asarray(x.numpy())))
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    np.testing.assert_allclose(ours, np.asarray(jax_mlp(base, jnp.asarray(x.numpy()))), atol=1e-5)  # = base at init


def with_principal_part(torch_mlp):
    """The MLP with seq.2's weight (200x2000) of rank 4, singular values 40..10, plus small noise:
    a weight whose leading singular directions stand out, as in trained models."""
    model = copy.deepcopy(torch_mlp)
    generator = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(200, 4, generator=generator))[0]
    v = torch.linalg.qr(torch.randn(2000, 4, generator=generator))[0]
    with torch.no_grad():
        model.seq[2].weight.copy_(u @ torch.diag(torch.tensor([40.0, 30.0, 20.0, 10.0])) @ v.T
                                  + 1e-4 * torch.randn(200, 2000, generator=generator))
    return model


def test_pissa_niter_finds_the_same_principal_part(torch_mlp):
    """pissa_niter_<n>'s randomized SVD (torch.svd_lowrank's algorithm in peft, ours in JAX with
    other random numbers): where the leading singular values stand out, both find them."""
    model = with_principal_part(torch_mlp)
    config = dict(r=4, target_modules=["seq.2"], init_lora_weights="pissa_niter_4")
    params = lorax.lora(torch_to_params(model), lorax.LoraConfig(**config), key=jax.random.key(0))
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**config))
    leaf = params["seq"][2]["kernel"]
    residual, a, b = peft_factors(peft_model, "seq.2")
    np.testing.assert_allclose(np.asarray(leaf.w), residual, atol=1e-5)
    same_up_to_sign((np.asarray(leaf.a), np.asarray(leaf.b)), (a, b), atol=1e-4)


def test_qpissa_stores_the_residual_in_4_bits(torch_mlp):
    """quantize= with PiSSA quantizes the residual (the QPiSSA recipe): the principal part stays
    in the full-precision adapter, so the adapted model at init is much closer to the original
    than plain QLoRA's quantized base is."""
    base = torch_to_params(with_principal_part(torch_mlp))
    quant = lorax.QuantConfig("nf4", blocksize=64)
    qpissa = lorax.lora(base, lorax.LoraConfig(r=8, target_modules=["seq.2"], init_lora_weights="pissa"),
                        key=jax.random.key(0), quantize=quant)
    qlora = lorax.lora(base, lorax.LoraConfig(r=8, target_modules=["seq.2"]), key=jax.random.key(0), quantize=quant)
    kernel = np.asarray(base["seq"][2]["kernel"])
    assert isinstance(qpissa["seq"][2]["kernel"].w, lorax.Nf4Array)
    error_pissa = np.abs(np.asarray(lorax.merge(qpissa)["seq"][2]["kernel"]) - kernel).mean()
    error_plain = np.abs(np.asarray(nf4.dequantize(qlora["seq"][2]["kernel"].w)) - kernel).mean()
    assert error_pissa < 0.1 * error_plain


LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
    hf.save_pretrained(folder)
    graphdef, base = lorax.split(interop.from_pretrained(folder, progress=False))
    return hf, graphdef, base


def trained(params, seed):
    """params with every adapter moved, as training would (a stack's padding stays zero)."""
    rng = np.random.default_rng(seed)

    def move(leaf):
        if not isinstance(leaf, lorax.LoraArray):
            return leaf
        a, b = np.array(leaf.a), np.array(leaf.b)
        for index, r in [(..., None)] if leaf.ranks is None else enumerate(leaf.ranks):
            a[index, :, :r] += 0.05 * rng.standard_normal(a[index, :, :r].shape, np.float32)
            b[index, :r] += 0.05 * rng.standard_normal(b[index, :r].shape, np.float32)
        return eqx.tree_at(lambda l: (l.a, l.b), leaf, (jnp.asarray(a), jnp.asarray(b)))

    return jax.tree_util.tree_map(move, params, is_leaf=lorax.is_adapter)


CASES = {
    "pissa-stacked": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[0, 2],
                          rank_pattern={"model.layers.2.self_attn.q_proj": 2}, init_lora_weights="pissa"),
    "olora-dora-embedding": dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "embed_tokens"],
                                 init_lora_weights="olora", use_dora=True),
}


@pytest.mark.parametrize("case", CASES)
def test_llama_adapters_both_ways(llama, tmp_path, case):
    """A stacked Llama: our trained adapter loads in PeftModel over the *original* model, as
    trained (peft recomputes the residual) and converted to plain LoRA (`initial=`); peft's loads
    in ours; our conversion of peft's factors is peft's, tensor for tensor."""
    hf, graphdef, base = llama
    config = CASES[case]
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))

    forward = jax.jit(lambda params, ids: lorax.apply(graphdef, params, ids))

    def ours_on(params):
        return np.asarray(forward(params, jnp.asarray(ids.numpy())))

    def peft_on(folder):
        with torch.no_grad():
            return peft.PeftModel.from_pretrained(copy.deepcopy(hf), folder).eval()(ids).logits.numpy()

    initial = lorax.lora(base, lorax.LoraConfig(**config), key=jax.random.key(0))
    np.testing.assert_allclose(ours_on(initial), ours_on(base), atol=1e-5)
    params = trained(initial, seed=1)
    ours = ours_on(params)
    assert np.abs(ours - ours_on(base)).max() > 1e-2
    interop.save_adapter(tmp_path / "as_trained", params, lorax.LoraConfig(**config))
    np.testing.assert_allclose(peft_on(tmp_path / "as_trained"), ours, atol=1e-4)
    interop.save_adapter(tmp_path / "plain", params, lorax.LoraConfig(**config), initial=initial)
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["init_lora_weights"] is True
    np.testing.assert_allclose(peft_on(tmp_path / "plain"), ours, atol=1e-4)
    for folder in ("as_trained", "plain"):
        np.testing.assert_allclose(ours_on(interop.load_adapter(tmp_path / folder, base)), ours, atol=1e-5)

    # peft's side: its init, moved, saved as trained and converted with its own conversion.
    torch.manual_seed(2)
    peft_model = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(**config)).eval()
    peft_model.save_pretrained(tmp_path / "peft_initial")
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name and "magnitude" not in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
        theirs = peft_model(ids).logits.numpy()
    peft_model.save_pretrained(tmp_path / "peft_trained")
    peft_model.save_pretrained(tmp_path / "peft_plain",
                               path_initial_model_for_weight_conversion=str(tmp_path / "peft_initial"))
    loaded = interop.load_adapter(tmp_path / "peft_trained", base)
    np.testing.assert_allclose(ours_on(loaded), theirs, atol=1e-4)

    # The same factors (peft's, loaded) converted by us: peft's tensors and config fields. peft's
    # conversion keeps lora_A/lora_B only: it drops DoRA magnitudes and embedding adapters (whose
    # files then do not hold the trained model); ours writes them too.
    loaded_initial = interop.load_adapter(tmp_path / "peft_initial", base)  # its config now says True
    interop.save_adapter(tmp_path / "ours_plain", loaded, lorax.LoraConfig(**config), initial=loaded_initial)
    np.testing.assert_allclose(ours_on(interop.load_adapter(tmp_path / "ours_plain", base)), theirs, atol=1e-4)
    expected, written = (load_file(tmp_path / f / "adapter_model.safetensors") for f in ("peft_plain", "ours_plain"))
    assert set(expected) <= set(written)
    assert all("lora_magnitude_vector" in name or "lora_embedding" in name for name in set(written) - set(expected))
    for name in expected:
        np.testing.assert_allclose(written[name], expected[name], atol=1e-6, err_msg=name)
    fields = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights", "use_dora")
    ours_config, peft_config = (json.loads((tmp_path / f / "adapter_config.json").read_text())
                                for f in ("ours_plain", "peft_plain"))
    assert {f: ours_config[f] for f in fields} == {f: peft_config[f] for f in fields}
    if set(written) == set(expected):
        np.testing.assert_allclose(ours_on(interop.load_adapter(tmp_path / "peft_plain", base)), theirs, atol=1e-4)
    else:  # peft's lossy file is refused, with what it lacks named
        with pytest.raises(interop.CheckpointError, match="missing: .*(lora_magnitude_vector|lora_embedding)"):
            interop.load_adapter(tmp_path / "peft_plain", base)


def test_decomposition_errors(torch_mlp, tmp_path):
    base = torch_to_params(torch_mlp)
    with pytest.raises(lorax.LoraConfigError, match="pissa_niter_<n>"):
        lorax.LoraConfig(r=2, target_modules=["seq.0"], init_lora_weights="pissa_niter_two")
    with pytest.raises(lorax.LoraConfigError, match=r"'seq.4'.*r <= min\(in, out\) = 2"):
        lorax.lora(base, lorax.LoraConfig(r=3, target_modules=["seq.4"], init_lora_weights="olora"), key=jax.random.key(0))
    quantized = lorax.lora(base, lorax.LoraConfig(r=2, target_modules=["seq.2"]), key=jax.random.key(0), quantize="nf4")
    four_bit = {**base, "seq": {**base["seq"], 2: {**base["seq"][2], "kernel": quantized["seq"][2]["kernel"].w}}}
    with pytest.raises(lorax.LoraConfigError, match="already 4-bit.*quantize='nf4'"):
        lorax.lora(four_bit, lorax.LoraConfig(r=2, target_modules=["seq.2"], init_lora_weights="pissa"),
                   key=jax.random.key(0))
    config = lorax.LoraConfig(r=2, target_modules=["seq.0", "seq.2"], init_lora_weights="pissa")
    params = lorax.lora(base, config, key=jax.random.key(0))
    other = lorax.lora(base, lorax.LoraConfig(r=2, target_modules=["seq.0"], init_lora_weights="pissa"),
                       key=jax.random.key(0))
    with pytest.raises(lorax.LoraError, match="initial params do not match the trained ones at 'seq.2.kernel'"):
        interop.save_adapter(tmp_path, params, config, initial=other)
    assert not any(tmp_path.iterdir())


@settings(max_examples=8, deadline=None)
@given(d_in=st.integers(2, 12), d_out=st.integers(2, 12), data=st.data(),
       method=st.sampled_from(["pissa", "pissa_niter_6", "olora"]), scale=st.sampled_from([0.5, 2.0]))
def test_decomposition_properties(d_in, d_out, data, method, scale):
    """For any shape and rank: residual + s·a@b is the kernel; PiSSA's residual holds exactly the
    singular values it left out (Eckart-Young: a@b is the best rank-r part); OLoRA's b has
    orthonormal rows (Q's columns)."""
    r = data.draw(st.integers(1, min(d_in, d_out)))
    kernel = np.random.default_rng(d_in * 13 + d_out).standard_normal((d_in, d_out)).astype(np.float32)
    a, b, residual = decompose(jnp.asarray(kernel), r=r, scale=scale, method=method, key=jax.random.key(0))
    a, b, residual = np.asarray(a), np.asarray(b), np.asarray(residual)
    np.testing.assert_allclose(residual + scale * a @ b, kernel, atol=1e-4)
    singular = np.linalg.svd(kernel, compute_uv=False)
    if method == "pissa":
        np.testing.assert_allclose(np.linalg.svd(residual, compute_uv=False)[: len(singular) - r], singular[r:],
                                   atol=1e-4)
    if method == "olora":
        np.testing.assert_allclose(b @ b.T, np.eye(r), atol=1e-5)


@pytest.mark.slow
def test_qpissa_example_on_the_real_minilm():
    """examples/qpissa_minilm.py: on real weights, QPiSSA starts closer to the full-precision
    model than QLoRA, and more so as r grows (the PiSSA paper's quantization-error claim)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "examples" / "qpissa_minilm.py"
    spec = importlib.util.spec_from_file_location("qpissa_minilm", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rows = {(name, r): (weight, hidden) for name, r, weight, hidden in example.main()}
    for r in (8, 32, 64):
        assert rows["QPiSSA", r][0] < rows["QLoRA", r][0]
    assert rows["QPiSSA", 64][1] < 0.9 * rows["QLoRA", 64][1] and rows["QPiSSA", 64][0] < rows["QPiSSA", 8][0]
