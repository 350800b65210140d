"""Vision-language checkpoints loaded text-only (Gemma3ForConditionalGeneration: Gemma 3 4B and
up; Mistral3ForConditionalGeneration: Mistral Small 3.1 / 3.2, Ministral 3; LlavaForConditionalGeneration:
LLaVA 1.5, LLaVA-Interleave, Pixtral 12B; LLaVA-NeXT and LLaVA-OneVision): logits and greedy tokens equal
transformers' full model on text, adapters go both ways with peft on the full model, and the
merged model saves as the causal LM transformers loads."""

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
from safetensors.numpy import load_file, save_file

import interop
import lorax
from conftest import (adapted_paths, logits_of, lorax_line, padded_tokens, perturb_constants, perturb_trained_leaves,
                      sync_into_peft)
from interop.hf import ARCHITECTURES, model_config
from lorax.models import LlamaConfig

# Gemma 3's text model (q/k norms, sandwich norms, sliding layers with their own RoPE base, linear
# RoPE scaling) with windows of 4 keys, shorter than the test sequences; a final soft cap that the
# vision-language head must leave out, as transformers' does.
GEMMA3 = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=6, rope_local_base_freq=100.0,
              sliding_window_pattern=2, rope_scaling={"rope_type": "linear", "factor": 4.0}, final_logit_softcapping=3.0)
MISTRAL = dict(model_type="mistral", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4, rope_theta=1e4)
# Ministral 3 (3B/8B/14B ship as Mistral3ForConditionalGeneration): YaRN and the query temperature.
MINISTRAL3 = dict(MISTRAL, model_type="ministral3", sliding_window=None, rope_parameters={
    "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 4, "beta_fast": 8.0,
    "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1})
SIGLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)
PIXTRAL = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               image_size=28, patch_size=14, head_dim=8)
# LLaVA's language model is any AutoModel: Llama (LLaVA 1.5), Qwen2 (LLaVA-Interleave; tied in its text
# config, which LlavaConfig falls back to), Mistral (Pixtral 12B).
LLAVA_LLAMA = dict(MISTRAL, model_type="llama", sliding_window=None)
LLAVA_QWEN2 = dict(MISTRAL, model_type="qwen2", sliding_window=None, tie_word_embeddings=True)
CLIP = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, image_size=28, patch_size=14, projection_dim=16)
MODELS = {
    "gemma3": lambda **top: transformers.Gemma3Config(text_config=GEMMA3, vision_config=SIGLIP, mm_tokens_per_image=4,
                                                      **top),
    "mistral3": lambda **top: transformers.Mistral3Config(text_config=MISTRAL, vision_config=PIXTRAL, **top),
    "ministral3": lambda **top: transformers.Mistral3Config(text_config=MINISTRAL3, vision_config=PIXTRAL, **top),
    "llava-llama": lambda **top: transformers.LlavaConfig(text_config=LLAVA_LLAMA, vision_config=CLIP, **top),
    "llava-qwen2": lambda **top: transformers.LlavaConfig(text_config=LLAVA_QWEN2, vision_config=CLIP, **top),
    "pixtral": lambda **top: transformers.LlavaConfig(text_config=MISTRAL, vision_config=PIXTRAL, **top),
    "llava-next-qwen2": lambda **top: transformers.LlavaNextConfig(text_config=LLAVA_QWEN2, vision_config=CLIP, **top),
    "onevision": lambda **top: transformers.LlavaOnevisionConfig(
        text_config=LLAVA_QWEN2, vision_config=dict(SIGLIP, model_type="siglip_vision_model"), **top),
}
# variant -> (model, top-level config fields, top-level fields to drop from the saved config.json)
VARIANTS = {
    "gemma3-tied": ("gemma3", {}, ()),
    "gemma3-untied": ("gemma3", dict(tie_word_embeddings=False), ()),
    "ministral3-tied": ("ministral3", {}, ()),
    # As Mistral Small 3.1's config.json: no top-level tie_word_embeddings (transformers 5 reads True)
    # but the checkpoint holds lm_head, which transformers then leaves untied.
    "mistral3-head-stored": ("mistral3", dict(tie_word_embeddings=False), ("tie_word_embeddings",)),
    "llava-llama-untied": ("llava-llama", {}, ()),
    # No top-level tie in config.json: LlavaConfig reads False there, then takes the text config's True.
    "llava-qwen2-tied": ("llava-qwen2", {}, ("tie_word_embeddings",)),
    "pixtral-untied": ("pixtral", {}, ()),
    # LlavaNextConfig has no fallback: its top level's False (the default) wins over the text config's True.
    "llava-next-qwen2-untied": ("llava-next-qwen2", {}, ("tie_word_embeddings",)),
    "onevision-tied": ("onevision", {}, ("tie_word_embeddings",)),
}
TEXT_ONLY = "loads as a text-only model"


def hf_model(variant):
    """The transformers model, made from its config with norms moved away from their init."""
    name, top, _ = VARIANTS[variant]
    torch.manual_seed(0)
    return perturb_constants(transformers.AutoModelForImageTextToText.from_config(MODELS[name](**top)).eval())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> folder, saved by transformers (which writes the pre-4.52 names: language_model.model.*)."""
    out = {}
    for variant, (_, _, dropped) in VARIANTS.items():
        out[variant] = tmp_path_factory.mktemp(variant)
        hf_model(variant).save_pretrained(out[variant])
        config = json.loads((out[variant] / "config.json").read_text())
        for field in dropped:
            del config[field]
        (out[variant] / "config.json").write_text(json.dumps(config))
    return out


def hf_from(folder):
    """The transformers model as its users load it from the folder."""
    return transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()


def load(folder):
    with pytest.warns(UserWarning, match=TEXT_ONLY):
        return lorax.split(interop.from_pretrained(folder, progress=False))


tokens = functools.partial(padded_tokens, GEMMA3["vocab_size"])


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.numpy()


def assert_close_unpadded(ours, theirs, mask, atol=1e-4):
    real = mask.numpy().astype(bool)  # padded positions are not compared: both sides compute junk there
    np.testing.assert_allclose(ours[real], theirs[real], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("variant,names", [("gemma3-tied", "pre-4.52"), ("gemma3-untied", "current"),
                                           ("ministral3-tied", "current"), ("mistral3-head-stored", "pre-4.52"),
                                           ("llava-llama-untied", "current"), ("llava-qwen2-tied", "pre-4.52"),
                                           ("pixtral-untied", "pre-4.52"), ("llava-next-qwen2-untied", "current"),
                                           ("onevision-tied", "pre-4.52")])
def test_logits_equal_transformers(saved, variant, names, tmp_path):
    """Text logits equal the full model's, from either naming of the checkpoint (transformers
    4.52-4.57 wrote `model.language_model.*`, `model.vision_tower.*`); the vision tensors are
    skipped with a warning, and our parameter paths are transformers' module names."""
    folder = saved[variant]
    if names == "current":
        tensors = load_file(folder / "model.safetensors")
        renamed = {re.sub(r"^language_model\.model\.", "model.language_model.",
                          re.sub(r"^language_model\.lm_head\.", "lm_head.",
                                 re.sub(r"^(vision_tower|multi_modal_projector)\.", r"model.\1.", name))): value
                   for name, value in tensors.items()}
        assert any(name.startswith("model.vision_tower.") for name in renamed)
        save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
        (tmp_path / "config.json").write_text((folder / "config.json").read_text())
        folder = tmp_path
    graphdef, params = load(folder)
    model = hf_from(saved[variant])
    language_linear = {name for name, module in model.named_modules()
                       if isinstance(module, torch.nn.Linear) and ".language_model." in name}
    assert {t.path for t in lorax.select_targets(lorax.LoraConfig(target_modules="all-linear"), params,
                                                 output_head="lm_head")} == language_linear
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert ("lm_head" in params) == (not tied) == variant.endswith(("untied", "head-stored"))
    ids, mask = tokens()
    assert_close_unpadded(logits_of(graphdef, params, ids, mask), torch_logits(model, ids, mask), mask)


def test_config_json_of_gemma_3_4b_reads_like_transformers():
    """Gemma 3 4B's config.json gives its text_config only the sizes (no vocabulary, head counts,
    windows' RoPE base...): the rest reads as transformers' Gemma3Config fills it in."""
    arch = ARCHITECTURES["Gemma3ForConditionalGeneration"]
    sparse = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": {"hidden_size": 64, "intermediate_size": 96, "model_type": "gemma3_text",
                              "num_hidden_layers": 12, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                              "sliding_window": 16},
              "vision_config": {"model_type": "siglip_vision_model"}}
    full = transformers.Gemma3Config(text_config=sparse["text_config"]).to_dict()
    ours = LlamaConfig.from_hf(model_config(sparse, arch))
    assert ours == LlamaConfig.from_hf(model_config(full, arch))
    assert (ours.vocab_size, ours.num_attention_heads, ours.num_key_value_heads, ours.tie_word_embeddings) == \
        (262_208, 8, 4, True)


def counts(peft_model) -> tuple[int, int]:
    return peft_model.get_nb_trainable_parameters()


def lorax_counts(params) -> tuple[int, int]:
    numbers = re.findall(r"[\d,]+", lorax_line(params).replace("trainable%", ""))
    return int(numbers[0].replace(",", "")), int(numbers[1].replace(",", ""))


# Targets named by a regex over the language model, as peft users write them for vision-language
# models (a plain list like ["q_proj"] would also adapt the vision tower's q_proj in peft).
LORA_CONFIGS = [
    dict(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj|down_proj|embed_tokens)",
         rank_pattern={"model.language_model.layers.1.self_attn.q_proj": 2}, use_rslora=True),
    dict(r=2, target_modules=r".*language_model.*_proj", use_dora=True),
]


@pytest.mark.parametrize("variant,config", [("gemma3-tied", LORA_CONFIGS[0]), ("gemma3-tied", LORA_CONFIGS[1]),
                                            ("mistral3-head-stored", LORA_CONFIGS[0]), ("ministral3-tied", LORA_CONFIGS[1]),
                                            ("llava-llama-untied", LORA_CONFIGS[0]), ("llava-qwen2-tied", LORA_CONFIGS[1]),
                                            ("llava-next-qwen2-untied", LORA_CONFIGS[1]), ("onevision-tied", LORA_CONFIGS[0])],
                         ids=str)
def test_adapters_match_peft_on_the_full_model(saved, variant, config, tmp_path):
    """Same targets and trainable count as peft on the full model (the total differs by exactly
    the vision tower and projector we do not load), the same logits; our adapter loads in
    PeftModel on the full model, peft's in ours, and the merged model saves as the causal LM
    (Gemma3ForCausalLM, MistralForCausalLM) with peft's merged logits."""
    graphdef, base = load(saved[variant])
    lora_config = lorax.LoraConfig(init_lora_weights=False, **config)
    params = lorax.lora(base, lora_config, key=jax.random.key(1), output_head="lm_head")
    params = perturb_trained_leaves(params, jax.random.key(2))
    peft_model = peft.get_peft_model(hf_from(saved[variant]), peft.LoraConfig(init_lora_weights=False, **config))
    sync_into_peft(params, peft_model)
    assert adapted_paths(params) == sorted(peft_model.base_model.targeted_module_names)
    vision = sum(p.numel() for name, p in peft_model.base_model.model.model.named_parameters()
                 if name.startswith(("vision_tower.", "multi_modal_projector.", "image_newline")))
    trainable, total = lorax_counts(params)
    assert (trainable, total + vision) == counts(peft_model)

    ids, mask = tokens()
    ours = logits_of(graphdef, params, ids, mask)
    assert np.abs(ours - logits_of(graphdef, base, ids, mask)).max() > 1e-2, "the adapters must change the logits"
    assert_close_unpadded(ours, torch_logits(peft_model, ids, mask), mask)

    interop.save_adapter(tmp_path / "ours", params, lora_config)
    loaded = peft.PeftModel.from_pretrained(hf_from(saved[variant]), tmp_path / "ours").eval()
    assert_close_unpadded(ours, torch_logits(loaded, ids, mask), mask)
    peft_model.save_pretrained(tmp_path / "theirs")
    back = interop.load_adapter(tmp_path / "theirs", base, output_head="lm_head")
    np.testing.assert_allclose(logits_of(graphdef, back, ids, mask), ours, atol=1e-5)

    interop.save_merged(tmp_path / "merged", graphdef, lorax.merge(params), progress=False)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged) is type(transformers.AutoModelForCausalLM.from_config(peft_model.config.text_config))
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["architectures"] == [type(merged).__name__]
    # The full model's head has no final soft cap; Gemma3ForCausalLM's follows its config, which says so.
    assert getattr(merged.config, "final_logit_softcapping", None) is None
    assert_close_unpadded(torch_logits(merged, ids, mask), torch_logits(peft_model.merge_and_unload(), ids, mask), mask)


@pytest.mark.parametrize("variant", ["gemma3-untied", "mistral3-head-stored", "ministral3-tied", "llava-qwen2-tied",
                                     "pixtral-untied"])
def test_greedy_generation_equals_transformers(saved, variant):
    """The KV-cache path through the language model (sliding layers included: 15 tokens > window)."""
    from lorax.models.generate import generate

    graphdef, params = load(saved[variant])
    ids, mask = tokens(length=5)
    with torch.no_grad():
        theirs = hf_from(saved[variant]).generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                             pad_token_id=0).numpy()
    ours = generate(graphdef, params, jnp.asarray(ids.numpy()), attention_mask=jnp.asarray(mask.numpy()),
                    max_new_tokens=10)
    np.testing.assert_array_equal(ours, theirs)


def test_adapter_on_the_vision_tower_is_refused_by_name(saved, tmp_path):
    """A peft adapter trained with a plain target list also adapts the vision tower's q_proj: the
    error lists those tensors and says why they cannot load."""
    peft_model = peft.get_peft_model(hf_from(saved["gemma3-tied"]), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path)
    _, base = load(saved["gemma3-tied"])
    with pytest.raises(interop.CheckpointError, match=r"vision_tower.*text-only model does not have"):
        interop.load_adapter(tmp_path, base)


def test_bitsandbytes_4bit_checkpoint_loads_text_only(saved, tmp_path):
    """transformers' 4-bit Gemma 3 (vision tower quantized too): the language model's kernels come
    in as Nf4Arrays with bnb's logits; the quantized vision weights are skipped, parts and all."""
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                             bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    bnb = transformers.Gemma3ForConditionalGeneration.from_pretrained(
        saved["gemma3-untied"], device_map="cpu", dtype=torch.float32, quantization_config=config).eval()
    bnb.save_pretrained(tmp_path)
    graphdef, params = load(tmp_path)
    assert isinstance(params["model"]["language_model"]["layers"]["*"]["mlp"]["down_proj"]["kernel"], lorax.Nf4Array)
    ids, mask = tokens()
    assert_close_unpadded(logits_of(graphdef, params, ids, mask), torch_logits(bnb, ids, mask), mask)


def test_generation_tokens_of_the_text_config(saved, tmp_path):
    """A vision-language config.json keeps its EOS in `text_config`: `interop.generation_tokens`
    reads it there, as transformers does without a generation_config.json, and generation stops
    at the same place. The EOS is a token the model generates, so that stopping really happens."""
    from lorax.models.generate import generate

    shutil.copytree(saved["gemma3-untied"], tmp_path, dirs_exist_ok=True)
    graphdef, params = load(tmp_path)
    ids, mask = tokens(length=5)
    args = (graphdef, params, jnp.asarray(ids.numpy()))
    kwargs = dict(attention_mask=jnp.asarray(mask.numpy()), max_new_tokens=10)
    free = np.asarray(generate(*args, **kwargs))
    eos = int(free[0, 8])
    (tmp_path / "generation_config.json").unlink()
    config = json.loads((tmp_path / "config.json").read_text())
    for fields in (config, config["text_config"]):
        fields.pop("eos_token_id", None), fields.pop("pad_token_id", None)
    config["text_config"]["eos_token_id"] = eos
    (tmp_path / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        theirs = hf_from(tmp_path).generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False).numpy()
    found = interop.generation_tokens(tmp_path)
    assert found == {"eos_token_id": (eos,), "pad_token_id": eos}
    ours = np.asarray(generate(*args, **kwargs, **found))
    np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)
    assert not np.array_equal(ours, free)


def test_merged_text_model_keeps_the_top_level_special_tokens(saved, tmp_path):
    """A composite config.json may set its EOS at the top level, over text_config's; the merged
    causal LM's config (text_config's fields) keeps the top level's, so that transformers reads the
    same generation tokens from the merged folder as from the original (without generation_config.json)."""
    shutil.copytree(saved["gemma3-untied"], tmp_path / "base", dirs_exist_ok=True)
    (tmp_path / "base" / "generation_config.json").unlink()
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config["eos_token_id"], config["text_config"]["eos_token_id"] = [1, 5], 1
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    graphdef, params = load(tmp_path / "base")
    interop.save_merged(tmp_path / "merged", graphdef, params, progress=False)
    read = [transformers.GenerationConfig.from_model_config(transformers.AutoConfig.from_pretrained(tmp_path / side))
            for side in ("base", "merged")]
    assert read[0].eos_token_id == read[1].eos_token_id == [1, 5]
    assert interop.generation_tokens(tmp_path / "merged") == interop.generation_tokens(tmp_path / "base")
