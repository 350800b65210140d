"""Hugging Face checkpoints in: a local transformers folder becomes a Flax NNX model with the
same parameter names, without building the torch model.

Our parameter paths are transformers' module names, so the mapping is mechanical: a kernel
`model.layers.*.self_attn.q_proj.kernel` (stacked, (layers, in, out)) is filled from the tensors
`model.layers.{i}.self_attn.q_proj.weight` (out, in), transposed; `embedding` and norm `weight`s
are copied as they are. Files are memory-mapped; every tensor's name and shape is checked
first, then each is copied once into arrays allocated once (in tiles, on a few threads:
interop/layout_copy.py), so memory stays near the size of the result.

>>> model = interop.from_pretrained(path, progress=False)       # path: the all-MiniLM-L6-v2 folder
>>> graphdef, params = lorax.split(model)
>>> params["encoder"]["layer"]["*"]["attention"]["self"]["query"]["kernel"].shape   # 6 layers, stacked
(6, 384, 384)
"""

import dataclasses
import functools
import json
import math
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from interop.checkpoint import CheckpointError, count_tensors, leaf_at, local_folder, read_json_object, read_tensors
from interop.layout_copy import Copy, copy_all
from interop.prequantized import QuantizedWeights, check_quantization
from lorax.errors import LoraError, listing
from lorax.models import (
    STACK,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForConditionalGeneration,
)
from lorax.sharding import param_shardings


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one transformers architecture maps to ours.

    config_class: builds our config from config.json (`from_hf`).
    model_class: our NNX model.
    fan_in_fan_out: module names whose torch weight is already (in, out) (GPT-2's Conv1D).
    ignored: regexes of checkpoint tensors that are buffers, not parameters.
    checkpoint_overrides: config fields that config.json does not hold but the checkpoint's tensor
        names tell (BERT: whether it has a pooler), as a function of those names.
    text_config: for a vision-language checkpoint loaded text-only, the defaults of its nested
        `text_config` (our config is read from that, with the tying transformers gives it: the
        top-level `tie_word_embeddings` where these defaults name one, else a top-level True or the
        text config's own, as LlavaConfig). None: config.json is read as it is.
    renames: (regex, replacement) pairs from checkpoint tensor names to ours, applied in order
        (transformers' conversion mapping for older saves: `language_model.model.` -> `model.language_model.`).
    skipped: regexes of checkpoint tensors that exist but are not loaded (a vision tower), and
        `skipped_as` what the warning that counts them calls them.
    merged_as: the transformers architecture `save_merged` writes (text-only) for each text model_type,
        with `merged_renames` from our names to its names and `merged_config` over the text config
        (what makes its logits the ones this model computes). None: the architecture itself.
    input_embedding: the embeddings a tied `lm_head` is (None: the model has no head). A tied
        config whose checkpoint stores a different `lm_head.weight` loads untied, and one that
        stores only the head ties the embeddings to it, as transformers does.
    moe_names: for a mixture-of-experts architecture, the family whose transformers 4 expert names
        peft maps onto its fused experts (lorax.targets.MOE_OLD_NAMES, as transformers'
        _MODEL_TO_CONVERSION_PATTERN groups them); kept on the model as `model.moe_names`.
    """

    config_class: type
    model_class: type
    fan_in_fan_out: frozenset[str] = frozenset()
    ignored: tuple[str, ...] = (r".*rotary_emb\.inv_freq",)
    checkpoint_overrides: Callable[[list[str]], dict] | None = None
    text_config: dict[str, Any] | None = None
    renames: tuple[tuple[str, str], ...] = ()
    skipped: tuple[str, ...] = ()
    skipped_as: str = "loads as a text-only model; {count} tensors of its vision tower and projector are not loaded"
    merged_as: dict[str, str] | None = None
    merged_renames: tuple[tuple[str, str], ...] = ()
    merged_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    input_embedding: str | None = "model.embed_tokens.weight"
    moe_names: str | None = None


def _bert_pooler(tensor_names: list[str]) -> dict:
    """transformers' BertModel(add_pooling_layer=...) is not in config.json: a pooler is there if its weights are."""
    return {"add_pooling_layer": any(name.endswith("pooler.dense.weight") for name in tensor_names)}


GPT2_CONV1D = frozenset({"c_attn", "c_proj", "c_fc"})
# Old GPT-2 checkpoints store the causal mask buffers `h.0.attn.bias` / `attn.masked_bias`.
GPT2_BUFFERS = (r"(.*\.)?attn\.(masked_)?bias",)
BERT_BUFFERS = (r"(.*\.)?embeddings\.(position_ids|token_type_ids)",)
# transformers' "llava" conversion mapping (Gemma 3's too): how vision-language checkpoints saved
# before transformers 4.52 (and by 5.x, which writes the old names back) name the language model.
LLAVA_RENAMES = ((r"^language_model\.lm_head\.", "lm_head."), (r"^language_model\.model\.", "model.language_model."))
VISION_PARTS = (r"(model\.)?(vision_tower|multi_modal_projector)\..*", r"(model\.)?image_newline")  # LLaVA-NeXT's


# Mixtral checkpoints name the MoE block `block_sparse_moe` and the expert projections w1 (gate),
# w3 (up), w2 (down); transformers 5's modules (and ours) are `mlp.experts.*`, as Qwen3-MoE's.
MIXTRAL_RENAMES = ((r"\.block_sparse_moe\.", ".mlp."), (r"\.experts\.(\d+)\.w1\.", r".experts.\1.gate_proj."),
                   (r"\.experts\.(\d+)\.w3\.", r".experts.\1.up_proj."), (r"\.experts\.(\d+)\.w2\.", r".experts.\1.down_proj."))
MIXTRAL_NAMES_BACK = ((r"\.mlp\.", ".block_sparse_moe."), (r"\.experts\.(\d+)\.gate_proj\.", r".experts.\1.w1."),
                      (r"\.experts\.(\d+)\.up_proj\.", r".experts.\1.w3."), (r"\.experts\.(\d+)\.down_proj\.", r".experts.\1.w2."))


LLAVA_MERGED_AS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                   "qwen3": "Qwen3ForCausalLM"}


def _text_only(text_config: dict, merged_as: dict[str, str], **fields) -> Architecture:
    """A vision-language checkpoint loaded as its language model (LlamaForConditionalGeneration):
    transformers' "llava" names, the vision parts skipped, saved merged as the text model's causal LM."""
    return Architecture(LlamaConfig, LlamaForConditionalGeneration, text_config=text_config, renames=LLAVA_RENAMES,
                        skipped=VISION_PARTS, merged_as=merged_as,
                        merged_renames=((r"^model\.language_model\.", "model."),),
                        input_embedding="model.language_model.embed_tokens.weight", **fields)


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(LlamaConfig, LlamaForCausalLM),
    "MistralForCausalLM": Architecture(LlamaConfig, LlamaForCausalLM),
    "Qwen2ForCausalLM": Architecture(LlamaConfig, LlamaForCausalLM),
    "Qwen3ForCausalLM": Architecture(LlamaConfig, LlamaForCausalLM),
    "SmolLM3ForCausalLM": Architecture(LlamaConfig, LlamaForCausalLM),
    "GemmaForCausalLM": Architecture(LlamaConfig, LlamaForCausalLM),
    "Gemma2ForCausalLM": Architecture(LlamaConfig, LlamaForCausalLM),
    "Gemma3ForCausalLM": Architecture(LlamaConfig, LlamaForCausalLM),
    "Phi3ForCausalLM": Architecture(LlamaConfig, LlamaForCausalLM),
    "Ministral3ForCausalLM": Architecture(LlamaConfig, LlamaForCausalLM),
    "MixtralForCausalLM": Architecture(LlamaConfig, LlamaForCausalLM, renames=MIXTRAL_RENAMES,
                                       merged_renames=MIXTRAL_NAMES_BACK, moe_names="mixtral"),
    "Qwen3MoeForCausalLM": Architecture(LlamaConfig, LlamaForCausalLM, moe_names="qwen2_moe"),
    # Gemma 3 4B and larger: the language model only (see LlamaForConditionalGeneration).
    "Gemma3ForConditionalGeneration": _text_only(
        {"model_type": "gemma3_text", "tie_word_embeddings": True}, {"gemma3_text": "Gemma3ForCausalLM"},
        # Gemma3ForConditionalGeneration's head never soft-caps; Gemma3ForCausalLM's does if the config says so.
        merged_config={"final_logit_softcapping": None}),
    # Mistral Small 3.1 / 3.2 and Ministral 3: the language model only, as for Gemma 3.
    "Mistral3ForConditionalGeneration": _text_only(
        {"model_type": "mistral", "tie_word_embeddings": True},
        {"mistral": "MistralForCausalLM", "ministral3": "Ministral3ForCausalLM"}),
    # LLaVA 1.5, LLaVA-Interleave (Qwen2), Pixtral 12B (Mistral): the language model only, as above.
    "LlavaForConditionalGeneration": _text_only({"model_type": "llama"}, LLAVA_MERGED_AS),
    # LLaVA-NeXT (1.6) ties only by its top-level field; LLaVA-OneVision falls back to the text config's, as LLaVA.
    "LlavaNextForConditionalGeneration": _text_only({"model_type": "llama", "tie_word_embeddings": False},
                                                    LLAVA_MERGED_AS),
    "LlavaOnevisionForConditionalGeneration": _text_only({"model_type": "qwen2"}, LLAVA_MERGED_AS),
    "GPT2LMHeadModel": Architecture(GPT2Config, GPT2LMHeadModel, GPT2_CONV1D, GPT2_BUFFERS,
                                    input_embedding="transformer.wte.weight"),
    "GPT2Model": Architecture(GPT2Config, GPT2Model, GPT2_CONV1D, GPT2_BUFFERS, input_embedding=None),
    "BertModel": Architecture(BertConfig, BertModel, ignored=BERT_BUFFERS, checkpoint_overrides=_bert_pooler,
                              input_embedding=None),
    # Pretrained BERTs (bert-base-uncased: BertForMaskedLM; the original Google ones: BertForPreTraining)
    # load as their encoder, as transformers' AutoModel loads them, leaving out the pretraining heads.
    **{name: Architecture(BertConfig, BertModel, ignored=BERT_BUFFERS, checkpoint_overrides=_bert_pooler,
                          input_embedding=None, renames=((r"^bert\.", ""),), skipped=(r"cls\..*",),
                          merged_as={"bert": "BertModel"},
                          skipped_as="loads as its encoder (BertModel, as transformers' AutoModel); {count} tensors "
                                     "of its pretraining heads (cls.*) are not loaded")
       for name in ("BertForMaskedLM", "BertForPreTraining")},
    "BertForSequenceClassification": Architecture(BertConfig, BertForSequenceClassification, ignored=BERT_BUFFERS,
                                                  checkpoint_overrides=_bert_pooler, input_embedding=None),
}


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one checkpoint tensor goes: a leaf of our tree, a layer of it, a part of that (one
    expert's half of a fused MoE projection), and its layout."""

    leaf: tuple
    layer: int | None
    transpose: bool
    shape: tuple[int, ...]
    part: tuple = ()

    @property
    def index(self) -> tuple:
        """The index of this tensor's place in the leaf: leaf[slot.index]."""
        return ((self.layer,) if self.layer is not None else ()) + self.part


def _hf_leaf(name: str) -> str:
    return {"kernel": "weight", "embedding": "weight"}.get(name, name)


# transformers 5 fuses a mixture-of-experts layer's experts into 3-D parameters (lorax/models/moe.py),
# but checkpoints keep one Linear per expert: our leaf -> the checkpoint's per-expert modules, in
# the order they sit on the leaf's output axis.
EXPERT_MODULES = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def _expert_tensor(experts: str, expert: int, module: str) -> str:
    """The checkpoint's name for one expert's projection: `...experts.3.gate_proj.weight`."""
    return f"{experts}.{expert}.{module}.weight"


def _leaf_slots(names: list[str], keys: tuple, layer: int | None, shape: tuple, transpose: bool) -> dict[str, Slot]:
    """The checkpoint tensors of one (layer of a) leaf: itself, or one per expert and fused part."""
    if names[-2:-1] == ["experts"] and names[-1] in EXPERT_MODULES and len(shape) == 3:
        parts = EXPERT_MODULES[names[-1]]
        width = shape[2] // len(parts)
        return {_expert_tensor(".".join(names[:-1]), expert, module):
                Slot(keys, layer, True, (width, shape[1]), (expert, slice(None), slice(i * width, (i + 1) * width)))
                for expert in range(shape[0]) for i, module in enumerate(parts)}
    hf = ".".join([*names[:-1], _hf_leaf(names[-1])])
    return {hf: Slot(keys, layer, transpose, tuple(shape[::-1] if transpose else shape))}


def fused_expert_parts(name: str, tensor: np.ndarray, slots: dict[str, Slot]) -> list[tuple[str, np.ndarray]] | None:
    """A mixture-of-experts projection stored fused, as transformers 5's state dict names it
    (`...experts.gate_up_proj` (experts, 2 * intermediate, hidden), `...experts.down_proj`), as the
    per-expert tensors our slots expect: [(slot name, part of `tensor`)]. None if `name` is not one.

    >>> slots = {f"experts.{e}.{m}.weight": Slot((), None, True, (3, 4)) for e in range(2) for m in ("gate_proj", "up_proj")}
    >>> [(n, part.shape) for n, part in fused_expert_parts("experts.gate_up_proj", np.zeros((2, 6, 4)), slots)][:2]
    [('experts.0.gate_proj.weight', (3, 4)), ('experts.0.up_proj.weight', (3, 4))]
    """
    prefix, _, leaf = name.rpartition(".")
    if not prefix.endswith("experts") or leaf not in EXPERT_MODULES:
        return None
    modules = EXPERT_MODULES[leaf]
    experts = 0
    while _expert_tensor(prefix, experts, modules[0]) in slots:
        experts += 1
    if experts == 0:
        return None
    width, fan_in = slots[_expert_tensor(prefix, 0, modules[0])].shape
    expected = (experts, len(modules) * width, fan_in)
    if tuple(tensor.shape) != expected:
        raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {expected} "
                              f"({experts} experts' {' and '.join(modules)}, fused)")
    return [(_expert_tensor(prefix, e, module), tensor[e, i * width:(i + 1) * width])
            for e in range(experts) for i, module in enumerate(modules)]


def checkpoint_slots(abstract: dict, arch: Architecture) -> dict[str, Slot]:
    """checkpoint tensor name -> Slot, for every leaf of our (abstract) parameter tree."""
    slots = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in keypath)
        names = [str(k) for k in keys]
        module = names[-2] if len(names) > 1 else ""
        transpose = names[-1] == "kernel" and module not in arch.fan_in_fan_out
        if STACK in names:
            at = names.index(STACK)
            for layer in range(leaf.shape[0]):
                slots.update(_leaf_slots([*names[:at], str(layer), *names[at + 1:]], keys, layer, leaf.shape[1:],
                                         transpose))
        else:
            slots.update(_leaf_slots(names, keys, None, leaf.shape, transpose))
    return slots


def renamed(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    """`name` after each (regex, replacement) of `renames` in turn.

    >>> renamed("language_model.model.norm.weight", LLAVA_RENAMES)
    'model.language_model.norm.weight'
    """
    for pattern, replacement in renames:
        name = re.sub(pattern, replacement, name)
    return name


def _normalize(name: str, slots: dict[str, Slot], arch: Architecture) -> str:
    """The architecture's renames, old-style names (LayerNorm gamma/beta) and a missing or extra model prefix."""
    name = renamed(name, arch.renames)
    name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
    if name in slots:
        return name
    for prefix in {s.split(".", 1)[0] + "." for s in slots}:
        if prefix + name in slots:
            return prefix + name
        if name.startswith(prefix) and name[len(prefix):] in slots:
            return name[len(prefix):]
    return name


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json in {folder}: from_pretrained needs a transformers model folder")
    return read_json_object(path, "a JSON {kind}, not a model config (an object of fields)")


def read_model_config(folder: Path, hf_config: dict, arch: Architecture, **fields):
    """Our config from config.json's fields; a field that is missing or of the wrong type is named with the file."""
    path = folder / "config.json"
    try:
        config = arch.config_class.from_hf(model_config(hf_config, arch), **fields)
    except KeyError as error:
        raise CheckpointError(f"{path}: field {error} is missing (needed for {arch.model_class.__name__})") from None
    except NotImplementedError as error:  # a feature our models lack (a rope type, an activation): which file
        raise NotImplementedError(f"{path}: {error}") from None
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as error:
        raise CheckpointError(f"{path}: cannot be read as {arch.model_class.__name__}'s config "
                              f"({type(error).__name__}: {error})") from None
    # The sizes every model needs (the fields without a default) must be positive whole numbers.
    bad = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.type in (int, "int")
           and f.default is dataclasses.MISSING and not (type(getattr(config, f.name)) is int and getattr(config, f.name) > 0)}
    if bad:
        raise CheckpointError(f"{path}: these sizes must be positive integers: {bad}")
    # Numbers (eps, rope_theta, soft caps) are only used inside the jitted forward pass, where a
    # string ("1e-6") would fail far from the file.
    def is_number(value, optional: bool) -> bool:
        return (optional and value is None) or (isinstance(value, (int, float)) and not isinstance(value, bool))

    floats = {f.name: str(f.type) == "float | None" for f in dataclasses.fields(config)
              if str(f.type) in ("<class 'float'>", "float | None")}
    wrong = {name: getattr(config, name) for name, optional in floats.items() if not is_number(getattr(config, name), optional)}
    if wrong:
        raise CheckpointError(f"{path}: these fields must be numbers: {wrong}")
    return config


def model_config(hf_config: dict, arch: Architecture) -> dict:
    """The config.json fields our config is read from: the file's, or for a vision-language
    checkpoint its `text_config` (with the architecture's defaults and the top-level tying)."""
    if arch.text_config is None:
        return hf_config
    text = {**arch.text_config, **(hf_config.get("text_config") or {})}
    if "tie_word_embeddings" in arch.text_config:  # Gemma 3, Mistral 3: the top level's (default: the architecture's)
        text["tie_word_embeddings"] = hf_config.get("tie_word_embeddings", arch.text_config["tie_word_embeddings"])
    elif hf_config.get("tie_word_embeddings"):  # LLaVA: a top-level True, else the text config's own
        text["tie_word_embeddings"] = True
    return text


# A config.json without "architectures" (written by hand, or by a config class alone) is read as
# transformers' Auto classes read it, by model_type: a decoder as its causal LM, BERT as BertModel.
BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "smollm3": "SmolLM3ForCausalLM", "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
    "ministral3": "Ministral3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
    "gpt2": "GPT2LMHeadModel", "bert": "BertModel",
}


def architecture_of(config: dict) -> tuple[str, Architecture]:
    """config.json's architecture (the first of "architectures" we have), or without that field
    the default one for its model_type."""
    names = config.get("architectures") or []
    names = [names] if isinstance(names, str) else names  # one name, not in a list: as transformers reads it
    for name in names:
        if name in ARCHITECTURES:
            return name, ARCHITECTURES[name]
    if not names and BY_MODEL_TYPE.get(config.get("model_type")) in ARCHITECTURES:
        name = BY_MODEL_TYPE[config["model_type"]]
        return name, ARCHITECTURES[name]
    what = f"architecture {names!r}" if names else f"model_type {config.get('model_type')!r} (no \"architectures\")"
    raise CheckpointError(f"{what} is not supported; supported: {listing(ARCHITECTURES)}")


# XLA:CPU adopts a host buffer without copying only when it is 64-byte aligned; numpy's large
# allocations are 16-byte aligned.
ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """np.empty, 64-byte aligned, so that `jax.device_put(..., may_alias=True)` keeps it as is on CPU.

    >>> aligned_empty((3, 5), np.float32).ctypes.data % ALIGNMENT
    0
    """
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    raw = np.empty(size + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + size].view(dtype).reshape(shape)


@functools.lru_cache(maxsize=16)
def abstract_model(model_class: type, config) -> tuple[nnx.GraphDef, dict]:
    """The graphdef and parameter shapes (a pure dict of ShapeDtypeStructs) of `model_class(config)`,
    nothing allocated. Cached per (class, config): tracing a model's constructor costs about as
    much as copying a small checkpoint, and loading the same architecture again should not pay it.
    Callers must not modify the returned dict."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0))))
    return graphdef, nnx.to_pure_dict(state)


@dataclasses.dataclass
class _Plan:
    """What loading a checkpoint into one config will do: the arrays, the copies into them, and
    what did not fit. Nothing is copied until `copy_all(plan.copies)`."""

    graphdef: nnx.GraphDef
    arrays: dict
    slots: dict[str, Slot]
    copies: list[Copy] = dataclasses.field(default_factory=list)
    sources: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # our tensor name -> the file's
    names: dict[str, str] = dataclasses.field(default_factory=dict)  # our tensor name -> the file's name for it
    unexpected: list[str] = dataclasses.field(default_factory=list)
    stored_head: np.ndarray | None = None  # lm_head.weight of a tied model's checkpoint
    skipped: int = 0

    def fill(self, key: str, tensor: np.ndarray, name: str | None = None):
        """Copy the checkpoint's tensor `name` (default: `key`) into our tensor `key`, once it is checked."""
        slot = self.slots[key]
        if key in self.names:  # e.g. "bert.x" and "x", or "x.gamma" and "x.weight": which one would be loaded?
            raise CheckpointError(f"tensors {self.names[key]!r} and {name or key!r} both load into the model's {key!r}")
        self.names[key] = name or key
        target = leaf_at(self.arrays, slot.leaf)
        if _floating(target.dtype) and not _floating(tensor.dtype):
            raise CheckpointError(f"tensor {name or key!r} has dtype {tensor.dtype}, the model expects floating-point "
                                  "weights")
        if tuple(tensor.shape) != slot.shape:
            raise CheckpointError(f"tensor {name or key!r} has shape {tuple(tensor.shape)}, the model expects {slot.shape} "
                                  f"(config.json and the weights disagree)")
        self.copies.append(Copy(target[slot.index], tensor, slot.transpose))
        self.sources[key] = tensor

    def check(self, folder: Path, arch: Architecture):
        missing = sorted(set(self.slots) - set(self.sources))
        if missing or self.unexpected:
            raise CheckpointError(
                f"{folder} does not match {arch.model_class.__name__}: "
                + (f"missing tensors: {listing(missing)}. " if missing else "")
                + (f"unexpected tensors: {listing(self.unexpected)}." if self.unexpected else "")
            )


def _plan(folder: Path, arch: Architecture, config, quantized_names: list[str] | None, progress: bool) -> _Plan:
    """Match every checkpoint tensor (names and shapes; the weights are not read) to our model for `config`."""
    try:
        graphdef, abstract = abstract_model(arch.model_class, config)
    except NotImplementedError as error:  # e.g. an activation our layers lack, found while building the model
        raise NotImplementedError(f"{folder / 'config.json'}: {error}") from None
    slots = checkpoint_slots(abstract, arch)
    # np.empty only reserves memory: a kernel that turns out to be 4-bit quantized never touches its pages.
    plan = _Plan(graphdef, jax.tree_util.tree_map(lambda leaf: aligned_empty(leaf.shape, leaf.dtype), abstract), slots)
    four_bit = QuantizedWeights(quantized_names) if quantized_names is not None else None
    tensors = tqdm(read_tensors(folder), total=count_tensors(folder), desc=f"loading {folder.name}", unit="tensor",
                   disable=not progress, leave=False)
    for name, tensor in tensors:
        if any(re.fullmatch(pattern, name) for pattern in arch.skipped):  # a 4-bit vision weight's parts too
            plan.skipped += 1
            continue
        if four_bit is not None and four_bit.take(name, tensor):
            continue
        key = _normalize(name, slots, arch)
        if key in slots:
            plan.fill(key, tensor, name)
        elif (fused := fused_expert_parts(key, tensor, slots)) is not None:  # transformers 5's own fused experts: each part fills its expert's slot
            for part_key, part in fused:
                plan.fill(part_key, part, name)
        elif key == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            if arch.input_embedding is not None:  # else a head the model does not have (GPT2Model)
                plan.stored_head = tensor
        elif not any(re.fullmatch(pattern, name) for pattern in arch.ignored):
            plan.unexpected.append(name)
    if four_bit is not None:  # bitsandbytes 4-bit weights become Nf4Array kernels, as stored
        quantized_filled, quantized_unexpected = four_bit.place(plan.arrays, slots,
                                                                lambda name: _normalize(name, slots, arch))
        plan.sources.update(dict.fromkeys(quantized_filled))
        plan.unexpected += quantized_unexpected
    return plan


def _floating(dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype == jnp.bfloat16


def _same_values(a: np.ndarray, b: np.ndarray) -> bool:
    """torch.equal, as transformers decides whether a stored head is the tied embeddings (same bytes)."""
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def float_dtype(dtype: Any, what: str = "dtype") -> np.dtype:
    """`dtype` as a numpy floating dtype, or a LoraError naming the argument `what`.

    >>> float_dtype("bfloat16")
    dtype(bfloat16)
    """
    try:
        resolved = np.dtype(jnp.dtype(dtype))
    except TypeError:
        raise LoraError(f"{what} {dtype!r} is not a dtype; use float32, bfloat16 or float16") from None
    if not jnp.issubdtype(resolved, jnp.floating):
        raise LoraError(f"{what} {resolved} is not a floating-point dtype; use float32, bfloat16 or float16")
    return resolved


def stored_dtype(folder: Path, hf_config: dict) -> np.dtype:
    """What transformers' dtype="auto" loads as: config.json's `dtype` (or the older `torch_dtype`),
    else the first floating-point tensor's, else float32."""
    named = hf_config.get("dtype") or hf_config.get("torch_dtype")
    if named is not None:
        try:
            return float_dtype(str(named).removeprefix("torch."))
        except LoraError as error:
            raise CheckpointError(f"{folder / 'config.json'}: dtype {named!r} cannot be loaded ({error})") from None
    for _, tensor in read_tensors(folder):
        if _floating(tensor.dtype):
            return np.dtype(tensor.dtype)
    return np.dtype(np.float32)


def _requested_dtype(dtype: Any, what: str, folder: Path, hf_config: dict) -> np.dtype | None:
    """from_pretrained's `dtype` / `param_dtype` argument (named `what`) as a numpy dtype: None stays None, "auto" is
    the checkpoint's."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype == "auto":
        return stored_dtype(folder, hf_config)
    return float_dtype(dtype, what)


def from_pretrained(path: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = None,
                    progress: bool = True, mesh: Mesh | None = None) -> nnx.Module:
    """Load a local Hugging Face model folder as our NNX model.

    Args:
        path: a folder with config.json and model.safetensors, a sharded
            model.safetensors.index.json, or pytorch_model.bin / a sharded
            pytorch_model.bin.index.json (read with torch.load(weights_only=True)); or a repo id
            ("org/name") already in the Hugging Face cache (nothing is downloaded).
        dtype: the compute dtype (float32, bfloat16 or float16), or "auto": the checkpoint's, as
            transformers' dtype="auto" (its default) reads it: config.json's `dtype`/`torch_dtype`,
            else the weights'.
        param_dtype: the stored parameter dtype (or "auto"); defaults to `dtype`.
        progress: show a tqdm bar while tensors stream in.
        mesh: place the parameters on this mesh (`lorax.sharding.make_mesh`), FSDP-sharded as
            `lorax.sharding.param_shardings` shards them: each device receives only its slices,
            so a model larger than one device's memory loads. Default: the default device.

    Returns:
        The model (e.g. `LlamaForCausalLM`), its parameters loaded. A checkpoint saved by
        transformers from a bitsandbytes 4-bit model (config.json's quantization_config)
        keeps its quantized kernels as `lorax.Nf4Array`s, dequantizing to `param_dtype`
        (see interop/prequantized.py); other quantization methods raise CheckpointError.

    Raises:
        CheckpointError: missing files, unsupported architecture or quantization, missing or unexpected
            tensors (listed), a shape that does not fit (tensor named, both shapes), or a
            truncated/corrupt file (named).
    """
    folder = local_folder(path)
    hf_config = read_config(folder)
    architecture, arch = architecture_of(hf_config)
    quantized = check_quantization(hf_config)
    # Checked before any weight is read; flax's own error for an integer dtype comes from deep in a layer's init.
    dtype = _requested_dtype(dtype, "dtype", folder, hf_config)
    param_dtype = _requested_dtype(param_dtype, "param_dtype", folder, hf_config) or dtype
    if np.dtype(np.float64) in (dtype, param_dtype) and not jax.config.jax_enable_x64:
        raise LoraError("float64 needs jax.config.update('jax_enable_x64', True) first; JAX would use float32")
    # Only the names are read here (safetensors headers; a .bin is memory-mapped), not the weights.
    names = [name for name, _ in read_tensors(folder)] if arch.checkpoint_overrides or quantized else []
    overrides = arch.checkpoint_overrides(names) if arch.checkpoint_overrides else {}
    config = read_model_config(folder, hf_config, arch, dtype=dtype, param_dtype=param_dtype, **overrides)
    plan = _plan(folder, arch, config, names if quantized else None, progress)
    if plan.stored_head is not None:
        embedding = plan.sources.get(arch.input_embedding)
        if embedding is None:
            # Only the head is stored: transformers ties the other way round, the embeddings are the head.
            plan.fill(arch.input_embedding, plan.stored_head, "lm_head.weight")
        elif not _same_values(embedding, plan.stored_head):
            warnings.warn(f"{folder}: config.json ties lm_head to {arch.input_embedding}, but the checkpoint stores "
                          "both with different values; they are loaded untied, as transformers does (set "
                          "tie_word_embeddings=False in config.json to silence this)", stacklevel=2)
            config = dataclasses.replace(config, tie_word_embeddings=False)
            plan = _plan(folder, arch, config, names if quantized else None, progress)
    plan.check(folder, arch)
    if plan.skipped:
        warnings.warn(f"{folder}: {architecture} " + arch.skipped_as.format(count=plan.skipped),
                      stacklevel=2)
    graphdef, arrays, copies = plan.graphdef, plan.arrays, plan.copies
    # Every tensor is checked before any is copied; the copy is most of the load time.
    copy_all(copies, progress=progress, desc=f"copying {folder.name}")
    if mesh is not None:
        placed = jax.device_put(arrays, param_shardings(arrays, mesh))
    else:
        # The arrays were allocated here and nothing else holds them: JAX may use their memory as is
        # (on CPU this skips a full copy of the model).
        placed = jax.tree_util.tree_map(lambda a: jax.device_put(a, may_alias=True), arrays)
    model = nnx.merge(graphdef, placed)
    # Kept (as a string: static and hashable) so that save_merged can write a config.json transformers reads.
    model.hf_config_json = json.dumps(hf_config, sort_keys=True)
    # And generation_config.json as it is (EOS ids, sampling defaults), for save_merged to write back.
    generation = folder / "generation_config.json"
    try:
        model.hf_generation_json = generation.read_text(encoding="utf-8") if generation.is_file() else None
    except (OSError, UnicodeDecodeError):  # unreadable: generation_tokens names it; the weights load regardless
        model.hf_generation_json = None
    # For lorax.lora(..., moe_names=model.moe_names): which old expert names peft maps (None: not MoE).
    model.moe_names = arch.moe_names
    return model


def architecture_for(model: nnx.Module) -> Architecture:
    """The Architecture `model` was loaded as (config.json's, remembered by from_pretrained), or
    the entry whose model class built it."""
    if getattr(model, "hf_config_json", None) is not None:
        return architecture_of(json.loads(model.hf_config_json))[1]
    for arch in ARCHITECTURES.values():
        if type(model) is arch.model_class:
            return arch
    raise CheckpointError(f"{type(model).__name__} has no Hugging Face mapping; supported: {listing(ARCHITECTURES)}")
