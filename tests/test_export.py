"""Merged models out: save_merged writes what transformers loads, with the adapted model's logits
and the same weights as peft's merge_and_unload."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import interop
import lorax
from conftest import sync_into_peft

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2)


@pytest.mark.parametrize("tied", [False, True])
def test_merged_llama_loads_in_transformers(tmp_path, tied):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG, tie_word_embeddings=tied)).eval()
    hf.save_pretrained(tmp_path / "base")
    graphdef, base = lorax.split(interop.from_pretrained(tmp_path / "base", progress=False))
    # A tied model whose embeddings are adapted: with ensure_weight_tying the head sees the adapted
    # table, as it does after merging (one shared table); without it peft's unmerged head keeps the
    # base table (tests/test_tied_head.py), and only the merged model would match.
    config = dict(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], layers_to_transform=None,
                  init_lora_weights=False, ensure_weight_tying=tied)
    params = lorax.lora(base, lorax.LoraConfig(**config), key=jax.random.key(0))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    adapted = np.asarray(lorax.apply(graphdef, params, jnp.asarray(ids.numpy())))

    merged = lorax.merge(params)
    interop.save_merged(tmp_path / "merged", graphdef, merged, max_shard_size=60_000)
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()  # sharded above the limit
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        np.testing.assert_allclose(loaded(ids).logits.numpy(), adapted, atol=1e-4, rtol=1e-4)
    assert loaded.config.tie_word_embeddings == tied

    # peft's merge with ensure_weight_tying adds the tied head's copy of the update to the shared
    # table a second time (peft 0.21); its default merge writes it once, as ours.
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(**{**config, "ensure_weight_tying": False}))
    sync_into_peft(params, peft_model)
    theirs = peft_model.merge_and_unload().state_dict()
    assert loaded.state_dict().keys() == theirs.keys()
    for name, value in loaded.state_dict().items():
        np.testing.assert_allclose(value.numpy(), theirs[name].numpy(), atol=1e-6, err_msg=name)


def test_save_merged_dtype_and_errors(tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(tmp_path / "base")
    graphdef, base = lorax.split(interop.from_pretrained(tmp_path / "base", progress=False))
    params = lorax.lora(base, lorax.LoraConfig(target_modules=["q_proj"]), key=jax.random.key(0))
    with pytest.raises(lorax.LoraError, match=r"still hold adapters: pass lorax.merge\(params\)"):
        interop.save_merged(tmp_path / "out", graphdef, params)
    interop.save_merged(tmp_path / "bf16", graphdef, lorax.merge(params), dtype=jnp.bfloat16)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_merged_save_keeps_the_generation_defaults(tmp_path):
    """The checkpoint's generation_config.json (EOS ids, sampling defaults) is written with the
    merged model, as peft's merge_and_unload().save_pretrained keeps it: transformers reads the same
    generation config from both folders, and interop.generation_tokens the same tokens."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    hf.generation_config = transformers.GenerationConfig(eos_token_id=[2, 3], do_sample=True, temperature=0.7,
                                                         top_p=0.8, repetition_penalty=1.05)
    hf.save_pretrained(tmp_path / "base")
    graphdef, base = lorax.split(interop.from_pretrained(tmp_path / "base", progress=False))
    interop.save_merged(tmp_path / "merged", graphdef, base, progress=False)
    read = [transformers.GenerationConfig.from_pretrained(tmp_path / side).to_dict() for side in ("base", "merged")]
    assert read[0] == read[1] and read[0]["eos_token_id"] == [2, 3] and read[0]["temperature"] == 0.7
    assert interop.generation_tokens(tmp_path / "merged") == interop.generation_tokens(tmp_path / "base") == \
        {"eos_token_id": (2, 3), "pad_token_id": 2}


def test_interrupted_sharded_save_keeps_the_previous_one(tmp_path, monkeypatch):
    # Shards are written one at a time; a failure while writing the second one leaves the
    # previous save as it was and no temporary files behind.
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(tmp_path / "base")
    graphdef, base = lorax.split(interop.from_pretrained(tmp_path / "base", progress=False))
    interop.save_merged(tmp_path / "out", graphdef, base, max_shard_size=60_000, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert len(before) > 3  # config, index, several shards

    import safetensors.numpy

    written = []

    def save_file(tensors, path, metadata=None):
        if written:
            raise KeyboardInterrupt("killed while writing the second shard")
        written.append(path)
        original(tensors, path, metadata=metadata)

    original = safetensors.numpy.save_file
    monkeypatch.setattr(safetensors.numpy, "save_file", save_file)
    with pytest.raises(KeyboardInterrupt):
        interop.save_merged(tmp_path / "out", graphdef, jax.tree_util.tree_map(lambda x: x + 1, base),
                            max_shard_size=60_000, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


@pytest.mark.parametrize("failing", ["second rename", "last rename"])
def test_save_interrupted_between_renames_restores_the_previous_one(tmp_path, monkeypatch, failing):
    """All files are written, and some already renamed over the previous save's, when the save is
    interrupted: the replaced files are put back and the new ones (here also shards with names the
    previous save did not have) removed, so the folder is the whole previous save, never a mix.
    Files get the mode a plain open() gives (not mkstemp's 0o600)."""
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(tmp_path / "base")
    graphdef, base = lorax.split(interop.from_pretrained(tmp_path / "base", progress=False))
    out = tmp_path / "out"
    interop.save_merged(out, graphdef, base, max_shard_size=120_000, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}

    import interop.checkpoint as checkpoint_module

    renames, original = [], os.replace

    def replace(source, target):
        if str(source).endswith(".tmp"):  # a new file going into place (not a restore)
            renames.append(target)
            if len(renames) == stop_at:
                raise KeyboardInterrupt(f"killed before rename {stop_at}")
        original(source, target)

    new = jax.tree_util.tree_map(lambda x: x + 1, base)
    stop_at = 10 ** 9
    monkeypatch.setattr(checkpoint_module.os, "replace", replace)
    interop.save_merged(tmp_path / "count", graphdef, new, max_shard_size=60_000, progress=False)
    stop_at, count = (2 if failing == "second rename" else len(renames)), len(renames)
    renames.clear()
    assert count > len(before)  # the new save has more shards, with other names
    with pytest.raises(KeyboardInterrupt):
        interop.save_merged(out, graphdef, new, max_shard_size=60_000, progress=False)
    assert len(renames) == stop_at
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    np.testing.assert_array_equal(reloaded.model.norm.weight.detach().numpy(), np.asarray(base["model"]["norm"]["weight"]))


def test_save_merged_refuses_what_transformers_could_not_load(tmp_path):
    """Params of the wrong shape, an integer dtype, a 4-bit (requantized) tree, or a shard size of
    zero would be written as a checkpoint transformers refuses or misreads: refused, nothing written."""
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(tmp_path / "base")
    graphdef, base = lorax.split(interop.from_pretrained(tmp_path / "base", progress=False))
    out = tmp_path / "out"
    narrow = {**base, "lm_head": {"kernel": base["lm_head"]["kernel"][:, :1]}}
    with pytest.raises(lorax.LoraError, match=r"params\['lm_head.kernel'\] has shape \(32, 1\), LlamaForCausalLM needs \(32, 64\)"):
        interop.save_merged(out, graphdef, narrow, progress=False)
    with pytest.raises(lorax.LoraError, match=r"dtype int8 is not a floating-point dtype"):
        interop.save_merged(out, graphdef, base, dtype=jnp.int8, progress=False)
    with pytest.raises(lorax.LoraError, match=r"dtype 'float7' is not a dtype"):
        interop.save_merged(out, graphdef, base, dtype="float7", progress=False)
    with pytest.raises(lorax.LoraError, match=r"max_shard_size must be a positive number of bytes, got 0"):
        interop.save_merged(out, graphdef, base, max_shard_size=0, progress=False)
    qlora = lorax.lora(base, lorax.LoraConfig(target_modules=["q_proj"]), key=jax.random.key(0), quantize="nf4")
    with pytest.raises(lorax.LoraError, match=r"4-bit weights \(model.layers.\*.self_attn.q_proj.kernel\).*without requantize"):
        interop.save_merged(out, graphdef, lorax.merge(qlora, requantize=True), progress=False)
    assert not out.exists()


def test_single_file_save_over_a_sharded_one_removes_its_shards(tmp_path):
    """Otherwise the old shards and index would lie beside the new model.safetensors, and
    transformers would load whichever it looks for first."""
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(tmp_path / "base")
    graphdef, base = lorax.split(interop.from_pretrained(tmp_path / "base", progress=False))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    interop.save_merged(tmp_path / "out", graphdef, base, max_shard_size=60_000, progress=False)
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
    changed = jax.tree_util.tree_map(lambda x: x + 1, base)
    interop.save_merged(tmp_path / "out", graphdef, changed, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "generation_config.json",
                                                                  "model.safetensors", "notes.txt"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    np.testing.assert_array_equal(loaded.model.norm.weight.detach().numpy(), np.asarray(changed["model"]["norm"]["weight"]))
