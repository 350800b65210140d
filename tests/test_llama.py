"""The Llama family (Llama, Mistral, Ministral 3, Qwen2/3, SmolLM3, Gemma 1/2/3, Phi-3) loaded from
transformers' own save_pretrained folders: logits, generation, LoRA counts and PeftModel outputs
all equal the real libraries'."""

import functools
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import interop
import lorax
from conftest import (SAVES, adapted_paths, logits_of, lorax_line, padded_tokens, peft_line, perturb_constants,
                      perturb_trained_leaves, save_checkpoint, save_each, sync_into_peft)
from lorax.models import LlamaConfig
from lorax.models.generate import generate
from lorax.models.layers import activation

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
# Sliding windows of 4 keys: the test sequences (9 tokens, 15 when generating) are longer.
GEMMA = dict(head_dim=8, sliding_window=4, query_pre_attn_scalar=6)
VARIANTS = {
    "llama3": (transformers.LlamaConfig, dict(rope_scaling=LLAMA3_ROPE)),
    "llama-tied-bias": (transformers.LlamaConfig, dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "mistral": (transformers.MistralConfig, {}),
    "mistral-window": (transformers.MistralConfig, dict(sliding_window=4)),
    "qwen2": (transformers.Qwen2Config, {}),
    # q/k norms; head_dim apart from hidden/heads; sliding from layer 1 on
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    # fused qkv_proj and gate_up_proj; then also a half-width rotary with LongRoPE factors that switch
    # from short to long past 8 positions (the logits' 9 tokens; generation crosses it)
    "phi3": (transformers.Phi3Config, dict(pad_token_id=0, eos_token_id=1, sliding_window=4)),
    "phi3-longrope": (transformers.Phi3Config, dict(
        pad_token_id=0, eos_token_id=1, partial_rotary_factor=0.5, max_position_embeddings=32,
        original_max_position_embeddings=8,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 5.0]})),
    # YaRN (attention factor from its default mscale) and Ministral 3's query temperature, which
    # steps up every 4 positions here
    "qwen3-yarn": (transformers.Qwen3Config, dict(head_dim=16, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8})),
    "ministral3": (transformers.Ministral3Config, dict(head_dim=8, sliding_window=None, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 4, "beta_fast": 8.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False, "llama_4_scaling_beta": 0.1})),
    # no RoPE on every second layer, and those slide
    "smollm3": (transformers.SmolLM3Config, dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, no_rope_layer_interval=2,
                                                 use_sliding_window=True, sliding_window=4)),
    "gemma": (transformers.GemmaConfig, dict(head_dim=8)),
    "gemma2": (transformers.Gemma2Config, dict(**GEMMA, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3": (transformers.Gemma3TextConfig, dict(**GEMMA, rope_local_base_freq=100.0, sliding_window_pattern=2,
                                                   rope_scaling={"rope_type": "linear", "factor": 4.0})),
}
WINDOWED = ["mistral-window", "qwen3", "phi3", "smollm3", "gemma2", "gemma3"]
SHARD_SIZE = "40KB"  # a few shards of the tiny model
# The file formats are read the same way whatever the architecture: each is tried on the first four.
CASES = [(variant, save) for variant in VARIANTS for save in SAVES if save == "safetensors" or variant in
         ("llama3", "llama-tied-bias", "mistral", "qwen2")]


def hf_model(variant, **changes):
    config_class, extra = VARIANTS[variant]
    torch.manual_seed(0)
    config = config_class(**SMALL, **{**extra, **changes})
    return perturb_constants(transformers.AutoModelForCausalLM.from_config(config).eval())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> (torch model, folder saved as safetensors)."""
    return save_each(tmp_path_factory, VARIANTS, hf_model)


tokens = functools.partial(padded_tokens, SMALL["vocab_size"])


@pytest.mark.parametrize("variant,save", CASES)
def test_logits_equal_transformers(variant, save, tmp_path):
    model = hf_model(variant)
    save_checkpoint(model, tmp_path, save, SHARD_SIZE)
    graphdef, params = lorax.split(interop.from_pretrained(tmp_path, progress=False))
    ids, mask = tokens()
    with torch.no_grad():
        plain, padded = model(ids).logits.numpy(), model(ids, attention_mask=mask).logits.numpy()
        if save.endswith("bin"):  # the .bin files are ones transformers reads as this model
            again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
            np.testing.assert_array_equal(again(ids).logits.numpy(), plain)
    np.testing.assert_allclose(logits_of(graphdef, params, ids), plain, atol=1e-4, rtol=1e-4)
    real = mask.numpy().astype(bool)  # padded positions are not compared: both sides compute junk there
    np.testing.assert_allclose(logits_of(graphdef, params, ids, mask)[real], padded[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", WINDOWED)
def test_sliding_window_changes_these_logits(variant):
    """The parity tests above see the window: transformers' logits with a window longer than the
    sequence differ from the windowed model's (same weights: the window is not a parameter)."""
    ids, mask = tokens()
    with torch.no_grad():
        windowed = hf_model(variant)(ids).logits.numpy()
        unwindowed = hf_model(variant, sliding_window=1000)(ids).logits.numpy()
    assert np.abs(windowed[:, :4] - unwindowed[:, :4]).max() < 1e-5  # the first 4 queries see all keys anyway
    assert np.abs(windowed - unwindowed).max() > 1e-2


@pytest.mark.parametrize("hf_config", [
    (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=4, max_window_layers=2)),
    (transformers.Qwen3Config, dict(use_sliding_window=False, sliding_window=4)),
    (transformers.MistralConfig, dict(sliding_window=4)),
    (transformers.Gemma2Config, dict(sliding_window=4)),
    (transformers.Gemma3TextConfig, dict(sliding_window=4, sliding_window_pattern=3, rope_theta=1e5,
                                         rope_local_base_freq=50.0, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    (transformers.LlamaConfig, dict(rope_theta=5e4)),
    (transformers.SmolLM3Config, dict(use_sliding_window=True, sliding_window=4, no_rope_layer_interval=3)),
    (transformers.Phi3Config, dict(sliding_window=4, partial_rotary_factor=0.5, max_position_embeddings=32,
                                   original_max_position_embeddings=8, rope_theta=500.0,
                                   rope_scaling={"type": "longrope", "short_factor": [1.0] * 2, "long_factor": [3.0] * 2})),
], ids=lambda c: c[0].__name__)
def test_config_json_of_transformers_4_reads_like_transformers(hf_config):
    """A transformers 4.x config.json (no layer_types, rope_theta / rope_local_base_freq /
    rope_scaling): which layers slide and which RoPE bases they use, as transformers 5 reads it."""
    config_class, extra = hf_config
    old = dict(model_type=config_class.model_type, **{**SMALL, "num_hidden_layers": 6}, **extra)
    theirs = config_class(**old)
    ours = LlamaConfig.from_hf(old)
    layer_types = getattr(theirs, "layer_types", None) or ["full_attention"] * 6
    if config_class in (transformers.MistralConfig, transformers.Phi3Config):  # every layer slides, given a window
        layer_types = ["sliding_attention"] * 6
    assert [("sliding_attention" if s else "full_attention") for s in ours.sliding_layers] == list(layer_types)
    assert ours.sliding_window == (theirs.sliding_window if "sliding_attention" in layer_types else None)
    rope = theirs.rope_parameters
    full, sliding = (rope["full_attention"], rope["sliding_attention"]) if "full_attention" in rope else (rope, None)
    assert ours.rope_theta == full["rope_theta"]
    assert ours.local_rope_theta == (sliding and sliding["rope_theta"])
    assert ours.partial_rotary_factor == full.get("partial_rotary_factor", 1.0)
    scaling = dict(ours.rope_scaling or {})
    assert scaling.get("rope_type", "default") == full["rope_type"]
    for key in ("factor", "original_max_position_embeddings", "short_factor", "long_factor"):
        if key in full and key in scaling:
            assert scaling[key] == (tuple(full[key]) if isinstance(full[key], list) else full[key]), key


@pytest.mark.parametrize("config_class", [transformers.GemmaConfig, transformers.Gemma2Config,
                                          transformers.Gemma3TextConfig, transformers.MistralConfig,
                                          transformers.Qwen2Config, transformers.Qwen3Config, transformers.Phi3Config,
                                          transformers.Ministral3Config, transformers.SmolLM3Config],
                         ids=lambda c: c.__name__)
def test_fields_left_out_of_config_json_read_as_transformers_fills_them(config_class):
    """A config.json with only the sizes (and use_sliding_window for Qwen) reads as the full
    config transformers' class makes of it: window, soft caps, scales, activation, RoPE bases."""
    sparse = dict(model_type=config_class.model_type, **{**SMALL, "num_hidden_layers": 30},
                  **({"use_sliding_window": True} if "Qwen" in config_class.__name__ else {}))
    full = config_class(**{k: v for k, v in sparse.items() if k != "model_type"}).to_dict()
    assert LlamaConfig.from_hf(sparse) == LlamaConfig.from_hf(full)


# config.json fields that some of transformers' models ignore or read differently from their names;
# (config class, its fields, fields then written over in config.json as older releases spelled them).
READ_AS_TRANSFORMERS = {
    # only Phi-3 rotates part of each head; these rotate it whole
    "mistral-partial-rotary": (transformers.MistralConfig, dict(partial_rotary_factor=0.5), {}),
    "qwen2-partial-rotary": (transformers.Qwen2Config, dict(partial_rotary_factor=0.5), {}),
    # Gemma 3 keeps Gemma 2's attn_logit_softcapping field but never caps its attention scores
    "gemma3-attn-softcap": (transformers.Gemma3TextConfig, dict(**GEMMA, sliding_window_pattern=2,
                                                               attn_logit_softcapping=0.5), {}),
    # Qwen2 and Mistral build their projections without these biases, whatever config.json says
    "qwen2-bias-fields": (transformers.Qwen2Config, {}, dict(attention_bias=True, mlp_bias=True)),
    "mistral-bias-fields": (transformers.MistralConfig, {}, dict(attention_bias=True, mlp_bias=True)),
    # Phi-3's older names for LongRoPE
    "phi3-su": (transformers.Phi3Config, dict(pad_token_id=0, eos_token_id=1), dict(max_position_embeddings=32, original_max_position_embeddings=8, rope_scaling={
        "type": "su", "short_factor": [1.0, 1.5, 2.0, 1.0], "long_factor": [2.0, 5.0, 1.0, 3.0]})),
    "phi3-yarn-means-longrope": (transformers.Phi3Config, dict(pad_token_id=0, eos_token_id=1), dict(
        max_position_embeddings=32, original_max_position_embeddings=4, rope_scaling={
            "type": "yarn", "short_factor": [1.0, 1.5, 2.0, 1.0], "long_factor": [2.0, 5.0, 1.0, 3.0]})),
}


@pytest.mark.parametrize("case", READ_AS_TRANSFORMERS)
def test_fields_transformers_ignores_or_renames_are_read_as_it_reads_them(case, tmp_path):
    config_class, fields, written = READ_AS_TRANSFORMERS[case]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**SMALL, **fields)).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(written)
    config.pop("rope_parameters", None) if "rope_scaling" in written else None
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = perturb_constants(transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval())
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))  # as written above, not as transformers re-spells it
    ids = torch.randint(0, SMALL["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model(ids).logits.numpy()
    graphdef, params = lorax.split(interop.from_pretrained(tmp_path, progress=False))
    np.testing.assert_allclose(logits_of(graphdef, params, ids), theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config_class", [transformers.GemmaConfig, transformers.Gemma2Config,
                                          transformers.Gemma3TextConfig], ids=lambda c: c.__name__)
@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_gemma_activation_is_the_function_transformers_runs(config_class, act):
    """The GELU our MLP applies is the one transformers' MLP applies for the same config.json ("gelu" is
    the tanh form in Gemma 1 only). Compared on the function itself: in a tiny model's logits the two
    GELUs differ by less than the parity tolerance."""
    field = "hidden_act" if config_class is transformers.GemmaConfig else "hidden_activation"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**SMALL, head_dim=8, **{field: act}))
    ours = LlamaConfig.from_hf(dict(model_type=config_class.model_type, **SMALL, head_dim=8, **{field: act}))
    x = np.linspace(-6, 6, 2001, dtype=np.float32)
    with torch.no_grad():
        theirs = model.model.layers[0].mlp.act_fn(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(activation(ours.hidden_act)(jnp.asarray(x))), theirs,
                               atol=1e-6)


@pytest.mark.parametrize("config_class", [transformers.GemmaConfig, transformers.Gemma2Config,
                                          transformers.Gemma3TextConfig], ids=lambda c: c.__name__)
def test_bidirectional_gemma_is_refused(config_class, tmp_path):
    """use_bidirectional_attention makes transformers' Gemma an encoder; ours attends causally, so it says so
    rather than load a model whose logits differ."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**SMALL, head_dim=8, use_bidirectional_attention=True))
    model.save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="use_bidirectional_attention"):
        interop.from_pretrained(tmp_path, progress=False)


@pytest.mark.parametrize("variant", ["llama3", "phi3-longrope", "gemma3"])
def test_bf16_compute_is_close(saved, variant):
    """bf16 weights and compute (Gemma's fp32 norms and scaled embeddings, Phi-3's fused
    projections and LongRoPE included) stay near transformers' fp32 logits."""
    model, folder = saved[variant]
    graphdef, params = lorax.split(interop.from_pretrained(folder, dtype=jnp.bfloat16, progress=False))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    ids, _ = tokens()
    with torch.no_grad():
        reference = model(ids).logits.numpy()
    # logits here are about 0.13 (std); bf16 rounding moves them by at most 0.01 (0.003 on Llama)
    np.testing.assert_allclose(logits_of(graphdef, params, ids).astype(np.float32), reference, atol=0.02)


@pytest.mark.parametrize("variant", ["llama3", "mistral-window", "phi3-longrope", "ministral3", "smollm3", "gemma2",
                                     "gemma3"])
def test_greedy_generation_equals_transformers(saved, variant):
    """With a KV cache, sliding windows, soft caps and LongRoPE's switch to its long factors
    included (15 tokens > window of 4, > LongRoPE's 8)."""
    model, folder = saved[variant]
    graphdef, params = lorax.split(interop.from_pretrained(folder, progress=False))
    ids, mask = tokens(length=5, seed=1)
    with torch.no_grad():
        # An explicit all-ones mask: without one, transformers infers a mask from pad_token_id,
        # and these prompts contain token 0.
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                               pad_token_id=0).numpy()
        padded = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0).numpy()
    eos = dict(eos_token_id=model.generation_config.eos_token_id, pad_token_id=0)
    assert_same_generation(generate(graphdef, params, jnp.asarray(ids.numpy()), max_new_tokens=10, **eos), plain)
    assert_same_generation(generate(graphdef, params, jnp.asarray(ids.numpy()), attention_mask=jnp.asarray(mask.numpy()),
                                    max_new_tokens=10, **eos), padded)


def assert_same_generation(ours, theirs, pad_token_id=0):
    """transformers' generate stops once every row has ended (its output is shorter); ours keeps
    the full length, with padding after each row's end."""
    ours = np.asarray(ours)
    np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)
    assert (ours[:, theirs.shape[1]:] == pad_token_id).all()


def test_generation_stops_at_eos_as_transformers(saved):
    """A row that produces EOS is padded from there on, the others go on, as in transformers'
    generate. EOS is chosen among the tokens the model generates, so that it really occurs: a
    token of the first row, and, as a list, also one of the second row's later ones."""
    model, folder = saved["llama3"]
    graphdef, params = lorax.split(interop.from_pretrained(folder, progress=False))
    ids, mask = tokens(length=5, seed=1)
    args = (jnp.asarray(ids.numpy()),)
    free = np.asarray(generate(graphdef, params, *args, attention_mask=jnp.asarray(mask.numpy()), max_new_tokens=10))
    for eos in (int(free[0, 8]), [int(free[0, 8]), int(free[1, 12])]):
        with torch.no_grad():
            theirs = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=7,
                                    eos_token_id=eos).numpy()
        ours = generate(graphdef, params, *args, attention_mask=jnp.asarray(mask.numpy()), max_new_tokens=10,
                        eos_token_id=eos, pad_token_id=7)
        assert_same_generation(ours, theirs, pad_token_id=7)
        ended = np.asarray(ours)[0, 9:]  # the first row ended at its EOS, at 8: only padding after it
        assert (ended == 7).all() and not (free[0, 9:] == 7).all()


@pytest.mark.parametrize("source", ["generation_config.json", "config.json"])
def test_generation_tokens_are_transformers_defaults(saved, tmp_path, source):
    """`interop.generation_tokens(folder)` are the EOS and pad tokens transformers' generate takes
    by default (generation_config.json's, else config.json's, padding with the first EOS), so that
    generate called with them stops where transformers' stops when called with nothing. The EOS
    tokens are among those the model generates, so that stopping really happens."""
    model, folder = saved["llama3"]
    graphdef, params = lorax.split(interop.from_pretrained(folder, progress=False))
    ids, mask = tokens(length=5, seed=1)
    args = (graphdef, params, jnp.asarray(ids.numpy()))
    kwargs = dict(attention_mask=jnp.asarray(mask.numpy()), max_new_tokens=10)
    free = np.asarray(generate(*args, **kwargs))
    eos = [int(free[0, 8]), int(free[1, 12])]
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    (tmp_path / "generation_config.json").unlink()
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("eos_token_id", None), config.pop("pad_token_id", None)
    if source == "generation_config.json":
        (tmp_path / source).write_text(json.dumps({"eos_token_id": eos}))
    else:
        config["eos_token_id"] = eos
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False).numpy()
    found = interop.generation_tokens(tmp_path)
    assert found == {"eos_token_id": tuple(eos), "pad_token_id": eos[0]}
    ours = np.asarray(generate(*args, **kwargs, **found))
    assert_same_generation(ours, theirs, pad_token_id=eos[0])
    assert not np.array_equal(ours, free)


def test_generation_tokens_name_a_bad_field(saved, tmp_path):
    _, folder = saved["llama3"]
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(interop.CheckpointError, match=r"generation_config\.json: eos_token_id should be a token id"):
        interop.generation_tokens(tmp_path)


LORA_CONFIGS = [
    dict(r=4, target_modules=["q_proj", "v_proj"]),
    dict(r=2, target_modules="all-linear"),
    dict(r=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2]),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
         rank_pattern={"model.layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3}, use_rslora=True),
    # DoRA on stacked layers, some left out (their magnitude must do nothing), ranks differing
    dict(r=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 2], use_dora=True,
         rank_pattern={"model.layers.2.mlp.down_proj": 2}),
]


def fused_names(config: dict) -> dict:
    """The same LoRA config for Phi-3's fused modules: q_proj -> qkv_proj, v_proj -> gate_up_proj."""
    text = re.sub(r"\bq_proj\b", "qkv_proj", re.sub(r"\bv_proj\b", "gate_up_proj", json.dumps(config)))
    return json.loads(text)


# Every config on Llama and Qwen2; on the newer members the ones that meet what is new in them:
# "all-linear" (their module names, Phi-3's fused ones) and adapted embeddings with patterns
# (Gemma's scaled, tied embeddings).
LORA_CASES = [(variant, config) for variant in ("llama3", "qwen2") for config in LORA_CONFIGS] + [
    (variant, config) for variant in ("qwen3", "phi3", "gemma3") for config in (LORA_CONFIGS[1], LORA_CONFIGS[3])] + [
    ("ministral3", LORA_CONFIGS[1]), ("smollm3", LORA_CONFIGS[1])]


@pytest.mark.parametrize("variant,config", LORA_CASES, ids=str)
def test_lora_matches_peft(saved, variant, config):
    """Same targets, same printed counts, and with the same non-zero A/B the same logits as PeftModel."""
    config = fused_names(config) if variant.startswith("phi3") else config
    model, folder = saved[variant]
    graphdef, base = lorax.split(interop.from_pretrained(folder, progress=False))
    ids, mask = tokens()

    at_init = lorax.lora(base, lorax.LoraConfig(**config), key=jax.random.key(0), output_head="lm_head")
    np.testing.assert_allclose(logits_of(graphdef, at_init, ids), logits_of(graphdef, base, ids), atol=1e-6)

    params = lorax.lora(base, lorax.LoraConfig(init_lora_weights=False, **config), key=jax.random.key(1),
                        output_head="lm_head")
    params = perturb_trained_leaves(params, jax.random.key(2))  # DoRA magnitudes too (every layer's)
    peft_model = peft.get_peft_model(hf_model(variant), peft.LoraConfig(init_lora_weights=False, **config))
    sync_into_peft(params, peft_model)
    assert adapted_paths(params) == sorted(peft_model.base_model.targeted_module_names)
    assert lorax_line(params) == peft_line(peft_model)
    with torch.no_grad():
        theirs = peft_model(ids, attention_mask=mask).logits.numpy()
    ours = logits_of(graphdef, params, ids, mask)
    real = mask.numpy().astype(bool)
    assert np.abs(ours - logits_of(graphdef, base, ids, mask))[real].max() > 1e-2, "the adapters must change the logits"
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=1e-4)
    # Against peft's merge, not its unmerged model: with a tied head (Gemma) and adapted embeddings,
    # merging changes the table the head shares, in peft too.
    with torch.no_grad():
        theirs_merged = peft_model.merge_and_unload()(ids, attention_mask=mask).logits.numpy()
    merged = lorax.merge(params)
    np.testing.assert_allclose(logits_of(graphdef, merged, ids, mask)[real], theirs_merged[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["qwen3", "gemma2"])
def test_merged_export_loads_in_transformers(saved, variant, tmp_path):
    """save_merged of the newer members: transformers rebuilds the same architecture (its q/k and
    sandwich norms, windows, soft caps from the config.json we write) and gives our logits."""
    _, folder = saved[variant]
    graphdef, base = lorax.split(interop.from_pretrained(folder, progress=False))
    params = lorax.lora(base, lorax.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
                        key=jax.random.key(0), output_head="lm_head")
    ids, mask = tokens()
    merged = lorax.merge(params)
    interop.save_merged(tmp_path, graphdef, merged)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(hf_model(variant))
    real = mask.numpy().astype(bool)
    with torch.no_grad():
        theirs = loaded(ids, attention_mask=mask).logits.numpy()
    np.testing.assert_allclose(theirs[real], logits_of(graphdef, merged, ids, mask)[real], atol=1e-4, rtol=1e-4)


TRAINED_LEAF_CONFIGS = [
    dict(r=4, target_modules=["q_proj"], modules_to_save=["mlp"]),  # a container, in every layer
    dict(r=4, target_modules=["q_proj"], modules_to_save=["norm"]),  # model.norm and every layer's *_layernorm
    dict(r=4, target_modules=["q_proj", "v_proj"], bias="all"),  # Qwen2's q/k/v biases, stacked
]


@pytest.mark.parametrize("config", TRAINED_LEAF_CONFIGS, ids=str)
def test_trained_leaves_of_stacked_layers_match_peft(saved, config, tmp_path):
    """modules_to_save and biases inside the stacked layers: peft's counts and logits, our adapter
    in PeftModel, and peft's saved adapter back in ours."""
    _, folder = saved["qwen2"]
    graphdef, base = lorax.split(interop.from_pretrained(folder, progress=False))
    lora_config = lorax.LoraConfig(init_lora_weights=False, **config)
    params = lorax.lora(base, lora_config, key=jax.random.key(1), output_head="lm_head")
    params = perturb_trained_leaves(params, jax.random.key(2))
    ids, mask = tokens()
    real = mask.numpy().astype(bool)
    ours = logits_of(graphdef, params, ids, mask)

    peft_model = peft.get_peft_model(hf_model("qwen2"), peft.LoraConfig(init_lora_weights=False, **config))
    sync_into_peft(params, peft_model)
    assert lorax_line(params) == peft_line(peft_model)
    interop.save_adapter(tmp_path / "ours", params, lora_config)
    loaded = peft.PeftModel.from_pretrained(hf_model("qwen2"), tmp_path / "ours").eval()
    with torch.no_grad():
        np.testing.assert_allclose(peft_model(ids, attention_mask=mask).logits.numpy()[real], ours[real], atol=1e-4)
        np.testing.assert_allclose(loaded(ids, attention_mask=mask).logits.numpy()[real], ours[real], atol=1e-4)
    loaded.save_pretrained(tmp_path / "theirs")
    back = interop.load_adapter(tmp_path / "theirs", base, output_head="lm_head")
    np.testing.assert_allclose(logits_of(graphdef, back, ids, mask), ours, atol=1e-5)


def test_lora_training_step_scans_the_stack(saved):
    """A jitted LoRA step on the stacked model: loss falls, only adapters move, dropout is threaded."""
    import optax

    _, folder = saved["llama3"]
    graphdef, base = lorax.split(interop.from_pretrained(folder, progress=False))
    # every linear layer, the head included: a random tiny model learns through its head fastest
    params = lorax.lora(base, lorax.LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"),
                        key=jax.random.key(0))
    trainable, frozen = lorax.partition(params)
    opt = lorax.optimizer(optax.adam(3e-2), params)
    state = opt.init(trainable)
    ids = jnp.asarray(tokens()[0].numpy())

    @jax.jit
    def step(trainable, state, key):
        def loss(t):
            logits = lorax.apply(graphdef, lorax.combine(t, frozen), ids[:, :-1], dropout_key=key)
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        value, grads = jax.value_and_grad(loss)(trainable)
        updates, state = opt.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, value

    losses = []
    for i in range(20):
        trainable, state, value = step(trainable, state, jax.random.key(i))
        losses.append(float(value))
    assert losses[-1] < losses[0] - 0.5
    jaxpr = str(jax.make_jaxpr(step)(trainable, state, jax.random.key(0)))
    assert "scan[" in jaxpr  # the layers run as one scanned body, not an unrolled Python loop


def test_load_errors(saved, tmp_path):
    _, folder = saved["llama3"]
    with pytest.raises(interop.CheckpointError, match="no config.json in"):
        interop.from_pretrained(tmp_path)

    def copy_with(config_change=None, weights=None):
        target = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        target.mkdir()
        config = json.loads((folder / "config.json").read_text())
        config.update(config_change or {})
        (target / "config.json").write_text(json.dumps(config))
        data = (folder / "model.safetensors").read_bytes()
        (target / "model.safetensors").write_bytes(weights(data) if weights else data)
        return target

    with pytest.raises(interop.CheckpointError, match=r"architecture \['GPTNeoForCausalLM'\] is not supported; supported: LlamaForCausalLM"):
        interop.from_pretrained(copy_with({"architectures": ["GPTNeoForCausalLM"]}))
    with pytest.raises(interop.CheckpointError, match=r"tensor 'model.layers.0.mlp.\w+_proj.weight' has shape \(\d+, \d+\), the model expects \((40, 32|32, 40)\)"):
        interop.from_pretrained(copy_with({"intermediate_size": 40}), progress=False)
    with pytest.raises(interop.CheckpointError, match=r"missing tensors: model.layers.3"):
        interop.from_pretrained(copy_with({"num_hidden_layers": 4}), progress=False)
    with pytest.raises(interop.CheckpointError, match=r"unexpected tensors: model.layers.2.\S+, "):
        interop.from_pretrained(copy_with({"num_hidden_layers": 2}), progress=False)
    truncated = copy_with(weights=lambda data: data[: len(data) // 2])
    with pytest.raises(interop.CheckpointError, match=rf"{truncated / 'model.safetensors'}: truncated"):
        interop.from_pretrained(truncated, progress=False)
    garbage = copy_with(weights=lambda data: b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(interop.CheckpointError, match=r"model.safetensors: corrupt safetensors header"):
        interop.from_pretrained(garbage, progress=False)


@pytest.mark.parametrize("variant", ["qwen2", "gemma2"])
def test_config_without_architectures_reads_its_model_type(saved, tmp_path, variant):
    """transformers' AutoModelForCausalLM picks the class from model_type when config.json has no
    "architectures"; so does from_pretrained. An unknown model_type says which field it read."""
    model, folder = saved[variant]
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, _ = tokens()
    with torch.no_grad():
        expected = theirs(ids).logits.numpy()
    np.testing.assert_allclose(logits_of(*lorax.split(interop.from_pretrained(tmp_path, progress=False)), ids), expected,
                               atol=1e-4, rtol=1e-4)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neo"}))
    with pytest.raises(interop.CheckpointError, match=r"model_type 'gpt_neo' \(no \"architectures\"\) is not supported"):
        interop.from_pretrained(tmp_path, progress=False)


def test_unsupported_config_feature_names_the_file(saved, tmp_path):
    _, folder = saved["llama3"]
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    for change, named in [({"hidden_act": "gelu_fast"}, "gelu_fast"),
                          ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "dynamic")]:
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(NotImplementedError, match=rf"config.json: .*{named}"):
            interop.from_pretrained(tmp_path, progress=False)


@pytest.mark.parametrize("stored, config_field", [(torch.bfloat16, "dtype"), (torch.float16, "torch_dtype"),
                                                  (torch.bfloat16, None), (torch.float32, "dtype")])
def test_auto_dtype_is_the_one_transformers_picks(stored, config_field, tmp_path):
    """dtype="auto" (transformers' default): config.json's `dtype`, or the older `torch_dtype`, or
    without either the weights' own; every leaf gets the dtype transformers' parameters get."""
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)).to(stored).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    named = config.pop("dtype", None) or config.pop("torch_dtype", None)
    assert named == str(stored).removeprefix("torch.")
    if config_field is not None:
        config[config_field] = named
    (tmp_path / "config.json").write_text(json.dumps(config))
    theirs = {str(p.dtype).removeprefix("torch.") for p in
              transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto").parameters()}
    params = lorax.split(interop.from_pretrained(tmp_path, dtype="auto", progress=False))[1]
    assert {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(params)} == theirs


@pytest.mark.parametrize("dtype, message", [(jnp.int8, "dtype int8 is not a floating-point dtype"),
                                            ("fp32", "dtype 'fp32' is not a dtype"),
                                            (jnp.float64, "float64 needs jax.config.update")])
def test_bad_dtype_is_named_before_loading(saved, dtype, message):
    _, folder = saved["llama3"]
    with pytest.raises(lorax.LoraError, match=re.escape(message)):
        interop.from_pretrained(folder, dtype=dtype, progress=False)
    with pytest.raises(lorax.LoraError, match=re.escape(message.replace("dtype", "param_dtype", 1))):
        interop.from_pretrained(folder, param_dtype=dtype, progress=False)


@pytest.mark.parametrize("variant, read, ignored", [("gemma", "hidden_act", "hidden_activation"),
                                                    ("gemma2", "hidden_activation", "hidden_act"),
                                                    ("gemma3", "hidden_activation", "hidden_act")])
def test_gemma_activation_is_read_from_the_field_its_model_reads(variant, read, ignored, tmp_path):
    """Gemma 1 configs on the hub carry both hidden_act and hidden_activation; transformers'
    GemmaMLP reads hidden_act, Gemma 2's and 3's read hidden_activation. With the two set
    differently (relu vs silu), our logits follow the field transformers reads."""
    model = hf_model(variant, **{read: "silu"})
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, ignored: "relu"}))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, _ = tokens()
    with torch.no_grad():
        expected = theirs(ids).logits.numpy()
        np.testing.assert_allclose(model(ids).logits.numpy(), expected, atol=1e-6)  # the ignored field is ignored
    graphdef, params = lorax.split(interop.from_pretrained(tmp_path, progress=False))
    np.testing.assert_allclose(logits_of(graphdef, params, ids), expected, atol=1e-4, rtol=1e-4)


def rewritten(tmp_path, model, change) -> tuple:
    """`model` saved, its config.json changed by `change(config)`: (transformers' model from that folder, ours)."""
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    change(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    return theirs, lorax.split(interop.from_pretrained(tmp_path, progress=False))


def assert_same_logits(theirs, ours, length=9):
    ids, mask = tokens(length=length)
    with torch.no_grad():
        expected = theirs(ids, attention_mask=mask).logits.numpy()
    real = mask.numpy().astype(bool)
    np.testing.assert_allclose(logits_of(*ours, ids, mask)[real], expected[real], atol=1e-4, rtol=1e-4)


def test_legacy_rope_scaling_beside_rope_parameters_wins(tmp_path):
    """A 4.x-style rope_scaling added to a config.json transformers 5 wrote (rope_parameters, no
    scaling): transformers applies the rope_scaling, and so do we."""
    def add_linear_scaling(config):
        config["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
        assert config["rope_parameters"]["rope_type"] == "default"
    theirs, ours = rewritten(tmp_path, hf_model("mistral"), add_linear_scaling)
    assert theirs.config.rope_parameters["rope_type"] == "linear"
    assert_same_logits(theirs, ours)


@pytest.mark.parametrize("dropped", [("original_max_position_embeddings",),
                                     ("original_max_position_embeddings", "max_position_embeddings")])
def test_phi3_without_position_fields_reads_phi3config_defaults(dropped, tmp_path):
    """Phi-3's LongRoPE dict carries its own original_max_position_embeddings (8), but Phi3Config's
    top-level field (default 4096) wins in transformers; without it and max_position_embeddings,
    both load with Phi3Config's defaults. Logits past 8 positions tell them apart."""
    def drop(config):
        for field in dropped:
            config.pop(field)
    theirs, ours = rewritten(tmp_path, hf_model("phi3-longrope"), drop)
    assert_same_logits(theirs, ours, length=12)
