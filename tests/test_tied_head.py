"""Models whose output head is tied to the input embeddings (tie_word_embeddings), with the
embeddings adapted: our logits, counts and adapter files against peft's, for both values of
peft's `ensure_weight_tying` (False: the head keeps the frozen table; True: the head's adapter
is tied to the embeddings')."""

import copy
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import interop
import lorax
from conftest import perturb_trained_leaves

# (config, embedding module, a linear module, whether ensure_weight_tying ties them: peft ties
# only modules named like its EMBEDDING_LAYER_NAMES, so GPT-2's `wte` never is).
ARCHITECTURES = {
    "llama": (transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
              "embed_tokens", "q_proj", True),
    "gpt2": (transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4),
             "wte", "c_attn", False),
}
CASES = ("lora", "modules_to_save")


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def tied_model(request, tmp_path_factory):
    """(name, torch model, our graphdef, our base params)."""
    config = ARCHITECTURES[request.param][0]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    graphdef, base = lorax.split(interop.from_pretrained(folder, progress=False))
    return request.param, hf, graphdef, base


def lora_fields(architecture: str, case: str, ensure: bool) -> dict:
    _, embedding, linear, _ = ARCHITECTURES[architecture]
    if case == "lora":
        return dict(r=4, target_modules=[embedding, linear], ensure_weight_tying=ensure)
    return dict(r=4, target_modules=[linear], modules_to_save=[embedding], ensure_weight_tying=ensure)


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(ids).logits.numpy()


def distinct_trainable(model) -> int:
    """Trainable numbers in a torch model, each storage once (peft's tied head adapter is a view of
    the embeddings' factors, which `print_trainable_parameters` counts a second time)."""
    seen = {p.data_ptr(): p.numel() for p in model.parameters() if p.requires_grad}
    return sum(seen.values())


@pytest.mark.parametrize("ensure", [False, True], ids=["untied-adapter", "ensure_weight_tying"])
@pytest.mark.parametrize("case", CASES)
def test_tied_head_matches_peft(tied_model, case, ensure, tmp_path):
    architecture, hf, graphdef, base = tied_model
    fields = lora_fields(architecture, case, ensure)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    params = lorax.lora(base, lorax.LoraConfig(init_lora_weights=False, **fields), key=jax.random.key(1))
    params = perturb_trained_leaves(params, jax.random.key(2))
    ours = np.asarray(lorax.apply(graphdef, params, jnp.asarray(ids.numpy())))

    # Where peft ties, the two settings really differ (so the comparisons below can fail);
    # where it does not, they are the same model.
    other = lorax.lora(base, lorax.LoraConfig(init_lora_weights=False, **{**fields, "ensure_weight_tying": not ensure}),
                       key=jax.random.key(1))
    other = perturb_trained_leaves(other, jax.random.key(2))
    difference = np.abs(np.asarray(lorax.apply(graphdef, other, jnp.asarray(ids.numpy()))) - ours).max()
    assert difference > 1e-2 if ARCHITECTURES[architecture][3] else difference == 0

    # ours -> PeftModel
    interop.save_adapter(tmp_path / "ours", params, lorax.LoraConfig(**fields))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about tied layers in adapters whichever way
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    np.testing.assert_allclose(torch_logits(loaded, ids), ours, rtol=1e-5, atol=1e-4)

    # peft -> ours: peft's own adapter (it also saves the embeddings' base table and, with
    # ensure_weight_tying, the head's tied copies).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(init_lora_weights=False, **fields)).eval()
    with torch.no_grad():
        for parameter in theirs.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    theirs.save_pretrained(tmp_path / "peft")
    ours_from_peft = interop.load_adapter(tmp_path / "peft", base)
    np.testing.assert_allclose(lorax.apply(graphdef, ours_from_peft, jnp.asarray(ids.numpy())),
                               torch_logits(theirs, ids), rtol=1e-5, atol=1e-4)

    trainable, _ = lorax.count_parameters(params)
    assert trainable == distinct_trainable(theirs)
    if not ensure:  # without tied copies peft's own printout agrees too
        assert trainable == theirs.get_nb_trainable_parameters()[0]


def test_tied_head_copies_in_the_file(tied_model, tmp_path):
    """With ensure_weight_tying the adapter file carries the head's tied factors where peft ties
    them (as peft writes them), and a load refuses copies that no longer match the embeddings'."""
    architecture, _, _, base = tied_model
    fields = lora_fields(architecture, "lora", True)
    params = lorax.lora(base, lorax.LoraConfig(init_lora_weights=False, **fields), key=jax.random.key(1))
    interop.save_adapter(tmp_path, params, lorax.LoraConfig(**fields))
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    head = sorted(name for name in tensors if ".lm_head." in name)
    if not ARCHITECTURES[architecture][3]:
        assert head == []
        return
    assert head == ["base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight"]
    tensors["base_model.model.lm_head.lora_A.weight"] += 1.0
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(interop.CheckpointError, match="lm_head.lora_A.weight.*tied to the input embeddings"):
        interop.load_adapter(tmp_path, base)


HEAD_CASES = ("copy of the embeddings", "different head", "head only")


@pytest.mark.parametrize("case", HEAD_CASES)
def test_stored_head_of_a_tied_config_loads_as_transformers_loads_it(tied_model, case, tmp_path):
    """config.json says tied, but the checkpoint stores lm_head.weight: transformers ties them when
    the values are the same, unties them when they differ, and ties the embeddings to the head when
    only the head is stored. Our logits, tying and adapter counts follow transformers'."""
    from safetensors.numpy import load_file, save_file

    architecture, hf, _, _ = tied_model
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    embedding = next(name for name in tensors if name.endswith(f"{ARCHITECTURES[architecture][1]}.weight"))
    head = np.random.default_rng(0).normal(size=tensors[embedding].shape).astype(np.float32)
    tensors["lm_head.weight"] = tensors[embedding].copy() if case == "copy of the embeddings" else head
    if case == "head only":
        del tensors[embedding]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tied = theirs.lm_head.weight.data_ptr() == theirs.get_input_embeddings().weight.data_ptr()
    assert tied == (case != "different head")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = interop.from_pretrained(tmp_path, progress=False)
    assert model.config.tie_word_embeddings == tied
    assert any("different values" in str(w.message) for w in caught) == (not tied)
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    ours = lorax.apply(*lorax.split(model), jnp.asarray(ids.numpy()))
    np.testing.assert_allclose(ours, torch_logits(theirs, ids), atol=1e-4, rtol=1e-4)
    _, params = lorax.split(model)
    config = dict(r=4, target_modules=[ARCHITECTURES[architecture][2]])
    adapted = lorax.lora(params, lorax.LoraConfig(**config), key=jax.random.key(0))
    assert lorax.count_parameters(adapted)[1] == peft.get_peft_model(theirs, peft.LoraConfig(**config)) \
        .get_nb_trainable_parameters()[1]


HEAD_FIELDS = {
    "target": dict(target_modules=["lm_head"]),
    "regex": dict(target_modules=r"(.*\.)?(lm_head|q_proj|c_attn)"),
    "modules_to_save": dict(target_modules=["q_proj", "c_attn"], modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("fields", list(HEAD_FIELDS))
def test_naming_the_tied_head_is_refused_with_what_to_do(tied_model, fields, tmp_path):
    """peft wraps a tied `lm_head` itself (an adapter on the shared weight, or a trained copy: its
    adapter file has lm_head tensors); our tied model has no head weight, so such a config or
    adapter is refused, naming the tie and the embeddings to adapt instead, not adapted less."""
    architecture, hf, _, base = tied_model
    fields = {k: [n for n in v if n in ("lm_head", ARCHITECTURES[architecture][2])] if isinstance(v, list) and k ==
              "target_modules" else v for k, v in HEAD_FIELDS[fields].items()}
    config = peft.LoraConfig(r=4, **fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's own warning about tied layers
        peft.get_peft_model(copy.deepcopy(hf), config).save_pretrained(tmp_path)
    from safetensors.numpy import load_file

    assert any(".lm_head." in name for name in load_file(tmp_path / "adapter_model.safetensors"))
    embeddings = ARCHITECTURES[architecture][1]
    refusal = rf"'lm_head'.* ties to its input embeddings .*{embeddings}"
    with pytest.raises(lorax.TargetError, match=refusal):
        interop.load_adapter(tmp_path, base, output_head="lm_head")
    with pytest.raises(lorax.TargetError, match=refusal):
        lorax.lora(base, lorax.LoraConfig(r=4, **fields), key=jax.random.key(0), output_head="lm_head")


TIED_VIA_HEAD = {
    "target": dict(target_modules=["lm_head", "q_proj"]),
    "regex": dict(target_modules=r"(.*\.)?(lm_head|q_proj)"),
    "modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("fields", list(TIED_VIA_HEAD))
def test_naming_the_tied_head_with_ensure_weight_tying_adapts_the_embeddings(tied_model, fields, tmp_path):
    """With ensure_weight_tying=True peft moves an adapter (or modules_to_save copy) named for a tied
    `lm_head` onto the input embeddings and ties the head to it; so do we, for a model with one
    `embed_tokens` table: peft's trainable numbers, and each side's adapter file gives the other's
    logits. GPT-2's `wte` is not such a table: refused by name there."""
    architecture, hf, graphdef, base = tied_model
    fields = dict(r=4, ensure_weight_tying=True, init_lora_weights=False, **TIED_VIA_HEAD[fields])
    if architecture == "gpt2":
        with pytest.raises(lorax.TargetError, match="ties to its input embeddings"):
            lorax.lora(base, lorax.LoraConfig(**{**fields, "target_modules": ["lm_head", "c_attn"]}
                                              if isinstance(fields["target_modules"], list) else fields),
                       key=jax.random.key(1), output_head="lm_head")
        return
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    params = lorax.lora(base, lorax.LoraConfig(**fields), key=jax.random.key(1), output_head="lm_head")
    params = perturb_trained_leaves(params, jax.random.key(2))
    ours = np.asarray(lorax.apply(graphdef, params, jnp.asarray(ids.numpy())))
    assert np.abs(ours - np.asarray(lorax.apply(graphdef, base, jnp.asarray(ids.numpy())))).max() > 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(**fields)).eval()
    assert lorax.count_parameters(params)[0] == distinct_trainable(theirs)

    interop.save_adapter(tmp_path / "ours", params, lorax.LoraConfig(**fields))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    np.testing.assert_allclose(torch_logits(loaded, ids), ours, rtol=1e-5, atol=1e-4)

    with torch.no_grad():
        for parameter in theirs.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    theirs.save_pretrained(tmp_path / "peft")
    back = interop.load_adapter(tmp_path / "peft", base, output_head="lm_head")
    np.testing.assert_allclose(lorax.apply(graphdef, back, jnp.asarray(ids.numpy())), torch_logits(theirs, ids),
                               rtol=1e-5, atol=1e-4)
    # both files name the embeddings, not the head, as peft rewrites the config
    written = [json.loads((tmp_path / side / "adapter_config.json").read_text()) for side in ("ours", "peft")]
    for field in ("target_modules", "modules_to_save"):
        ours_value, peft_value = (w[field] for w in written)
        assert (ours_value if isinstance(ours_value, str) else set(ours_value or ())) == \
            (peft_value if isinstance(peft_value, str) else set(peft_value or ())), field
