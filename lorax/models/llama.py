"""The Llama family (Llama 2/3, Mistral, Mixtral, Qwen2/3, Qwen3-MoE, Gemma 1/2/3, Phi-3/4, SmolLM3) as a Flax NNX model whose parameter paths are
Hugging Face's module names: `model.embed_tokens`, `model.layers.3.self_attn.q_proj`, `lm_head`.

The decoder layers are stored stacked, under `model.layers.*` (leading axis = layer), and run
with `nnx.scan`: one compiled layer body whatever the depth. `lorax` reads `*` as "one module
per index", so `model.layers.3.self_attn.q_proj` means the same to LoraConfig as in peft.

>>> config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
...                      num_attention_heads=4, num_key_value_heads=2)
>>> model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
>>> model(jnp.array([[1, 2, 3]])).shape
(1, 3, 64)
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lorax.models.layers import (STACK, RMSNorm, activation, attention, cached_mask, causal_mask, empty_cache,
                                  linear, lm_logits, run_stacked, stacked)
from lorax.models.moe import SparseMoeBlock


ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")
# transformers' config-class defaults for the fields a config.json may leave out, per model_type
# (tests/test_llama.py reads a config.json without them as transformers' classes fill them in).
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": {"hidden_act": "gelu_pytorch_tanh", "head_dim": 256, "tie_word_embeddings": True},
    "gemma2": {"tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh", "head_dim": 256, "sliding_window": 4096,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 256},
    # Gemma 3 4B's config.json (a vision-language one) leaves even the vocabulary and head counts to these.
    "gemma3_text": {"tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh", "head_dim": 256, "sliding_window": 4096,
                    "query_pre_attn_scalar": 256, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
                    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                    "num_attention_heads": 8, "num_key_value_heads": 4},
    "mistral": {"sliding_window": 4096},
    "smollm3": {"vocab_size": 128_256, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                "num_attention_heads": 16, "num_key_value_heads": 4, "rope_theta": 2_000_000.0, "tie_word_embeddings": True},
    "qwen2": {"sliding_window": 4096, "max_window_layers": 28},
    "qwen3": {"head_dim": 128, "sliding_window": 4096, "max_window_layers": 28},
    "qwen3_moe": {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "sliding_window": 4096},
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-5},
    # Phi3Config's own fields: its top-level original_max_position_embeddings wins over LongRoPE's.
    "phi3": {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "original_max_position_embeddings": 4096},
    "ministral3": {"rms_norm_eps": 1e-5, "head_dim": 128, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 1_000_000.0, "factor": 16.0, "original_max_position_embeddings": 16384,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}},
}
ATTENTION_KINDS = ("full_attention", "sliding_attention")  # transformers' layer_types values
# The model types whose transformers modeling file reads config.attention_bias / config.mlp_bias; the
# others (Mistral, Mixtral, Qwen2, Phi-3, Ministral 3) build their projections without them, whatever
# config.json says.
ATTENTION_BIAS_TYPES = ("llama", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "smollm3")
MLP_BIAS_TYPES = ("llama", "smollm3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The fields of transformers' config that change the computation, for the whole family.

    Mistral is Llama with a sliding window on every layer; Qwen2 adds q/k/v biases
    (`qkv_bias=True`); Qwen3 normalizes q and k per head (`qk_norm=True`); Gemma stores its
    norms as offsets from one, scales the embeddings by sqrt(hidden_size) and uses a tanh GELU;
    Gemma 2 adds norms after attention and MLP (`sandwich_norm`), soft-capped scores and logits
    and alternating sliding-window layers; Gemma 3 drops the soft caps, adds q/k norms and gives
    its sliding layers their own RoPE base (`local_rope_theta`); Phi-3 fuses q/k/v into
    `qkv_proj` and gate/up into `gate_up_proj` (`fused_projections`), may rotate only part of
    each head (`partial_rotary_factor`) and uses LongRoPE scaling; Ministral 3 is Mistral with
    YaRN RoPE and a query temperature that grows with the position (`llama_4_scaling_beta`);
    Mixtral is Mistral with a mixture-of-experts MLP (`num_experts`), and Qwen3-MoE is Qwen3 with one;
    SmolLM3 is Llama whose every fourth layer (by default) uses no positional encoding (`rope_layers`).
    `from_hf` sets these switches from config.json's `model_type` and fields, as transformers'
    modeling files do.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # linear / llama3 / longrope / yarn parameters as sorted (key, value) pairs: hashable
    partial_rotary_factor: float = 1.0  # RoPE rotates the first this-fraction of each head's dimensions (Phi-3)
    attention_bias: bool = False  # q, k, v and o biases (Llama's option)
    qkv_bias: bool = False  # q, k, v biases only (Qwen2)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    qk_norm: bool = False  # RMSNorm over each head of q and k, before RoPE (Qwen3, Gemma 3)
    sliding_window: int | None = None  # sliding layers see only the last `sliding_window` keys
    layer_types: tuple[str, ...] | None = None  # per layer, one of ATTENTION_KINDS; None: all full, or
    #                                             all sliding when sliding_window is set (Mistral)
    local_rope_theta: float | None = None  # RoPE base of the sliding layers, unscaled (Gemma 3)
    rope_layers: tuple[bool, ...] | None = None  # per layer, whether it rotates q and k; None: all (SmolLM3's NoPE layers)
    unit_offset_norm: bool = False  # norms scale by (1 + weight) (Gemma)
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    sandwich_norm: bool = False  # post_attention_layernorm on the attention output, pre/post_feedforward_layernorm (Gemma 2/3)
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 instead of head_dim ** -0.5 (Gemma 2/3)
    attn_logit_softcapping: float | None = None  # scores -> cap·tanh(scores / cap) (Gemma 2)
    final_logit_softcapping: float | None = None  # logits -> cap·tanh(logits / cap) (Gemma 2)
    fused_projections: bool = False  # one qkv_proj and one gate_up_proj (Phi-3)
    # queries times 1 + beta·log(1 + floor(position / original_max_position_embeddings)) after RoPE (Ministral 3)
    llama_4_scaling_beta: float | None = None
    # Mixture of experts in every layer's MLP (Mixtral, Qwen3-MoE): 0 = a dense MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 2  # top-k experts per token
    moe_intermediate_size: int | None = None  # each expert's inner size (default: intermediate_size)
    norm_topk_prob: bool = True  # rescale the chosen experts' router probabilities to sum to one
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.llama_4_scaling_beta is not None and "original_max_position_embeddings" not in dict(self.rope_scaling or ()):
            raise ValueError("llama_4_scaling_beta needs RoPE scaling with original_max_position_embeddings")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(ATTENTION_KINDS):
                raise ValueError(f"layer_types must give one of {ATTENTION_KINDS} for each of the "
                                 f"{self.num_hidden_layers} layers, got {self.layer_types}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is None")
        if self.rope_layers is not None and len(self.rope_layers) != self.num_hidden_layers:
            raise ValueError(f"rope_layers must say for each of the {self.num_hidden_layers} layers whether it uses "
                             f"RoPE, got {self.rope_layers}")

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_size(self) -> int:
        return int(self.head_size * self.partial_rotary_factor)

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: whether it attends through the sliding window."""
        if self.layer_types is None:
            return (self.sliding_window is not None,) * self.num_hidden_layers
        return tuple(kind == "sliding_attention" for kind in self.layer_types)

    @property
    def layer_kinds(self) -> tuple[tuple[bool, bool], ...]:
        """Per layer: (whether it slides, whether it uses RoPE), what its mask and RoPE table depend on."""
        return tuple(zip(self.sliding_layers, self.rope_layers or (True,) * self.num_hidden_layers))

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "LlamaConfig":
        """From a config.json dict (transformers 4.x `rope_theta`/`rope_scaling`/`rope_local_base_freq`
        or 5.x `rope_parameters`, also per layer type)."""
        model_type = hf.get("model_type")
        hf = {**HF_DEFAULTS.get(model_type, {}), **hf}
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in fields and k not in ("rope_scaling", "dtype", "layer_types")}
        values["head_dim"] = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        values.update(_rope_fields(hf, model_type))
        values.update(_attention_kinds(hf, model_type))
        gemma = model_type in ("gemma", "gemma2", "gemma3_text")
        # Which field names the activation is the modeling file's choice: Gemma 2's and 3's MLPs read
        # hidden_activation, every other one (Gemma 1 too) hidden_act; the other field is ignored.
        act = (hf.get("hidden_activation") if model_type in ("gemma2", "gemma3_text") else hf.get("hidden_act")) or \
            ("gelu_pytorch_tanh" if gemma else "silu")
        # Gemma 1's config.json says "gelu" but means the tanh approximation (transformers' GemmaConfig maps
        # it; Gemma 2's and 3's configs do not, and their models use the exact GELU).
        values["hidden_act"] = "gelu_pytorch_tanh" if model_type == "gemma" and act == "gelu" else act
        if gemma and hf.get("use_bidirectional_attention"):
            raise NotImplementedError(f"{model_type} with use_bidirectional_attention (an encoder, e.g. EmbeddingGemma) "
                                      "is not supported yet: our Gemma attends causally")
        if model_type == "gemma3_text":
            values["attn_logit_softcapping"] = None  # transformers' Gemma3Attention keeps the field but never applies it
        activation(values["hidden_act"])  # an unsupported activation fails here, by name
        values.update(
            attention_bias=bool(hf.get("attention_bias")) and model_type in ATTENTION_BIAS_TYPES,
            mlp_bias=bool(hf.get("mlp_bias")) and model_type in MLP_BIAS_TYPES,
            fused_projections=model_type == "phi3",
            qkv_bias=model_type == "qwen2",  # Qwen2's q/k/v projections always carry a bias
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
            unit_offset_norm=gemma,
            scale_embeddings=gemma,
            sandwich_norm=model_type in ("gemma2", "gemma3_text"),
        )
        values.update(_experts(hf, model_type))
        values.update(_rope_layers(hf, model_type))
        return cls(**{**values, **overrides})


def _rope_layers(hf: dict, model_type: str | None) -> dict:
    """SmolLM3's `no_rope_layers` (per layer, 1: RoPE, 0: none), or by default no RoPE on every
    `no_rope_layer_interval`-th layer, as SmolLM3Config fills it in."""
    if model_type != "smollm3":
        return {}
    flags = hf.get("no_rope_layers")
    if flags is None:
        every = hf.get("no_rope_layer_interval", 4)
        flags = [(i + 1) % every != 0 for i in range(hf["num_hidden_layers"])]
    return dict(rope_layers=tuple(bool(flag) for flag in flags))


def _experts(hf: dict, model_type: str | None) -> dict:
    """The mixture-of-experts fields (Mixtral's `num_local_experts`, Qwen3-MoE's `num_experts`).
    Our layers are one scanned stack, so every layer must have the same MLP: Qwen3-MoE configs
    with dense layers among the sparse ones (`decoder_sparse_step` > 1, `mlp_only_layers`) are refused."""
    if model_type not in ("mixtral", "qwen3_moe"):
        return {}
    if model_type == "qwen3_moe" and (hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers")):
        raise NotImplementedError("Qwen3-MoE with dense MLP layers among the expert layers (decoder_sparse_step "
                                  f"{hf.get('decoder_sparse_step')}, mlp_only_layers {hf.get('mlp_only_layers')}) "
                                  "is not supported yet: every layer must be a mixture-of-experts layer")
    return dict(num_experts=hf.get("num_local_experts") or hf["num_experts"],
                num_experts_per_tok=hf["num_experts_per_tok"],
                moe_intermediate_size=hf.get("moe_intermediate_size") or hf["intermediate_size"],
                norm_topk_prob=model_type == "mixtral" or bool(hf.get("norm_topk_prob", False)))


def _rope_type(rope: dict, hf: dict, default_theta: float) -> tuple[float, tuple | None]:
    """(theta, scaling as sorted pairs or None) from one RoPE parameter dict; unsupported types raise."""
    rope = {k: tuple(v) if isinstance(v, list) else v for k, v in rope.items() if k != "partial_rotary_factor"}
    theta = rope.pop("rope_theta", default_theta)
    rope_type = rope.setdefault("rope_type", rope.pop("type", "default"))
    if hf.get("model_type") == "phi3" and rope_type in ("su", "yarn"):
        # Phi3Config reads both older names as LongRoPE (its "yarn" is not YaRN).
        rope_type = rope["rope_type"] = "longrope"
    if rope_type not in ROPE_TYPES:
        raise NotImplementedError(f"rope type {rope_type!r} is not supported yet (supported: {', '.join(ROPE_TYPES)})")
    if rope_type in ("longrope", "yarn"):  # the defaults transformers' _compute_*_parameters fill in
        # Phi-3 keeps its pretraining length outside the RoPE parameters, and transformers prefers that one.
        original = hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") \
            or hf["max_position_embeddings"]
        factor = rope.get("factor") or hf["max_position_embeddings"] / original
        attention = rope.get("attention_factor")
        if attention is None and rope_type == "longrope":
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        elif attention is None:  # YaRN's, from mscale / mscale_all_dim when both are given
            mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
            attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim) if mscale and mscale_all_dim \
                else _yarn_mscale(factor)
        rope.update(original_max_position_embeddings=original, factor=factor, attention_factor=float(attention))
    if rope_type == "yarn":
        rope.update(beta_fast=rope.get("beta_fast") or 32.0, beta_slow=rope.get("beta_slow") or 1.0,
                    truncate=rope.get("truncate", True))
    return theta, (None if rope_type == "default" else tuple(sorted(rope.items())))


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_fields(hf: dict, model_type: str | None = None) -> dict:
    """rope_theta, rope_scaling, local_rope_theta and partial_rotary_factor from any of
    transformers' spellings. Only Phi-3 rotates part of each head: the other models' RoPE
    ignores a partial_rotary_factor in their config.json."""
    # A legacy rope_scaling beside transformers 5's rope_parameters wins, as in its convert_rope_params_to_dict
    # (what a user adding YaRN to a 5.x config.json by Qwen's long-context instructions gets).
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    full = rope.get("full_attention", rope)
    # Ministral 3 keeps its query scaling beside the RoPE parameters; the other keys there are not RoPE's.
    beta = full.get("llama_4_scaling_beta")
    full = {k: v for k, v in full.items() if k not in ("llama_4_scaling_beta", "max_position_embeddings")}
    theta, scaling = _rope_type(full, hf, hf.get("rope_theta", 10000.0))
    local = hf.get("rope_local_base_freq")
    if "sliding_attention" in rope:  # transformers 5's per-layer-type parameters (Gemma 3)
        local, local_scaling = _rope_type(rope["sliding_attention"], hf, local or theta)
        if local_scaling is not None:
            raise NotImplementedError("RoPE scaling on sliding-window layers is not supported yet")
    partial = (full.get("partial_rotary_factor", hf.get("partial_rotary_factor")) or 1.0) if model_type == "phi3" else 1.0
    return dict(rope_theta=theta, rope_scaling=scaling, local_rope_theta=local, partial_rotary_factor=partial,
                llama_4_scaling_beta=beta)


def _attention_kinds(hf: dict, model_type: str | None) -> dict:
    """sliding_window and layer_types as transformers' modeling files use them: Mistral and Phi-3
    slide on every layer; Qwen only with use_sliding_window, from layer max_window_layers on; Gemma 2
    alternates; Gemma 3 slides on all but every sliding_window_pattern-th layer; SmolLM3, with
    use_sliding_window, on its layers without RoPE."""
    window = hf.get("sliding_window")
    if model_type == "smollm3" and window is not None and hf.get("layer_types") is None:
        slides = hf.get("use_sliding_window", False)
        kinds = ["sliding_attention" if slides and not rotates else "full_attention"
                 for rotates in _rope_layers(hf, model_type)["rope_layers"]]
        return dict(sliding_window=window, layer_types=tuple(kinds))
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and not hf.get("use_sliding_window", False):
        window = None
    # Qwen3-MoE, when it slides, slides on every layer (it has no max_window_layers).
    if window is None or model_type in ("mistral", "ministral3", "mixtral", "phi3", "qwen3_moe"):
        return dict(sliding_window=window, layer_types=None)
    layers = hf["num_hidden_layers"]
    kinds = hf.get("layer_types")
    if kinds is None and model_type in ("qwen2", "qwen3"):
        first = hf.get("max_window_layers", layers)
        kinds = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    elif kinds is None and model_type in ("gemma2", "gemma3_text"):
        every = 2 if model_type == "gemma2" else hf.get("sliding_window_pattern", 6)
        kinds = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(layers)]
    return dict(sliding_window=window, layer_types=None if kinds is None else tuple(kinds))


def rope_frequencies(config: LlamaConfig, sliding: bool = False, long: bool = False) -> jax.Array:
    """Inverse frequencies (rotary_size/2,), with linear, llama3, LongRoPE or YaRN scaling when
    configured (as transformers; `long`: LongRoPE's factors for sequences past the pretraining
    length); a sliding layer with its own base (`local_rope_theta`) is unscaled."""
    dim = config.rotary_size
    local = sliding and config.local_rope_theta is not None
    theta = config.local_rope_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if not config.rope_scaling or local:
        return inv_freq
    scaling = dict(config.rope_scaling)
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    if scaling["rope_type"] == "longrope":
        return inv_freq / jnp.asarray(scaling["long_factor" if long else "short_factor"], jnp.float32)
    if scaling["rope_type"] == "yarn":
        return _yarn_frequencies(inv_freq, theta, dim, scaling)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return jnp.where(medium, smoothed, scaled)


def _yarn_frequencies(inv_freq: jax.Array, theta: float, dim: int, scaling: dict) -> jax.Array:
    """YaRN: the frequencies that turn fewer than beta_slow times over the pretraining length are
    interpolated (divided by the factor), those that turn more than beta_fast times are kept, and a
    linear ramp blends the ones between."""
    original = scaling["original_max_position_embeddings"]

    def correction_dim(rotations):  # the dimension whose frequency turns `rotations` times over `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling["beta_fast"]), correction_dim(scaling["beta_slow"])
    if scaling["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high  # as transformers: no division by zero
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    kept = 1 - ramp  # 1 where the frequency is extrapolated (kept as it is)
    return inv_freq / scaling["factor"] * (1 - kept) + inv_freq * kept


def rope_cos_sin(config: LlamaConfig, position_ids: jax.Array, sliding: bool) -> tuple[jax.Array, jax.Array]:
    """cos and sin (batch, seq, rotary_size) for these positions, in the compute dtype. LongRoPE
    takes its long factors when the furthest position passes the pretraining length (per call,
    as transformers' dynamic update); LongRoPE and YaRN scale both by their attention factor."""
    def angles(long):
        freqs = position_ids[..., None].astype(jnp.float32) * rope_frequencies(config, sliding, long)
        return jnp.concatenate([freqs, freqs], axis=-1)

    scaling = dict(config.rope_scaling or ())
    if sliding and config.local_rope_theta is not None:
        both, factor = angles(False), 1.0
    elif scaling.get("rope_type") != "longrope":
        both, factor = angles(False), scaling.get("attention_factor", 1.0)
    else:
        long = jnp.max(position_ids) + 1 > scaling["original_max_position_embeddings"]
        both, factor = jnp.where(long, angles(True), angles(False)), scaling["attention_factor"]
    return (jnp.cos(both) * factor).astype(config.dtype), (jnp.sin(both) * factor).astype(config.dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate (batch, seq, heads, head_dim) by position, in transformers' half-split layout; with
    partial rotary (cos narrower than a head) the rest of each head passes through."""
    rotary = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary], x[..., rotary:]
    half = rotary // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = (x_rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)
    return out if rotary == x.shape[-1] else jnp.concatenate([out, x_pass], axis=-1)


class LlamaAttention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        hidden, heads, kv_heads, head = config.hidden_size, config.num_attention_heads, config.kv_heads, config.head_size
        qkv_bias = config.attention_bias or config.qkv_bias
        if config.fused_projections:
            self.qkv_proj = linear(hidden, (heads + 2 * kv_heads) * head, qkv_bias, config, rngs)
        else:
            self.q_proj = linear(hidden, heads * head, qkv_bias, config, rngs)
            self.k_proj = linear(hidden, kv_heads * head, qkv_bias, config, rngs)
            self.v_proj = linear(hidden, kv_heads * head, qkv_bias, config, rngs)
        self.fused = config.fused_projections
        self.o_proj = linear(heads * head, hidden, config.attention_bias, config, rngs)
        if config.qk_norm:
            self.q_norm = norm(head, config)
            self.k_norm = norm(head, config)
        self.heads, self.kv_heads, self.head = heads, kv_heads, head
        self.qk_norm = config.qk_norm
        self.scale = (config.query_pre_attn_scalar or head) ** -0.5
        self.softcap = config.attn_logit_softcapping

    def __call__(self, h, cos, sin, mask, q_scale=None, cache=None, cache_index=None):
        """`q_scale` (batch, seq), if not None, multiplies the rotated queries (Ministral 3)."""
        batch, seq, _ = h.shape
        if self.fused:  # Phi-3's qkv_proj: q, k, v side by side on the output axis
            q, k, v = jnp.split(self.qkv_proj(h), [self.heads * self.head, (self.heads + self.kv_heads) * self.head], -1)
        else:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        q = q.reshape(batch, seq, self.heads, self.head)
        k = k.reshape(batch, seq, self.kv_heads, self.head)
        v = v.reshape(batch, seq, self.kv_heads, self.head)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if q_scale is not None:
            q = q * q_scale[:, :, None, None].astype(q.dtype)
        if cache is not None:
            k, v = (jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), cache_index, axis=1)
                    for c, new in zip(cache, (k, v)))
            cache = (k, v)
        out = attention(q, k, v, mask, scale=self.scale, softcap=self.softcap)
        return self.o_proj(out.reshape(batch, seq, self.heads * self.head)), cache


class LlamaMLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        hidden, inner = config.hidden_size, config.intermediate_size
        if config.fused_projections:
            self.gate_up_proj = linear(hidden, 2 * inner, config.mlp_bias, config, rngs)
        else:
            self.gate_proj = linear(hidden, inner, config.mlp_bias, config, rngs)
            self.up_proj = linear(hidden, inner, config.mlp_bias, config, rngs)
        self.down_proj = linear(inner, hidden, config.mlp_bias, config, rngs)
        self.hidden_act = config.hidden_act
        self.fused = config.fused_projections

    def __call__(self, h):
        if self.fused:  # Phi-3's gate_up_proj: gate, then up, on the output axis
            gate, up = jnp.split(self.gate_up_proj(h), 2, axis=-1)
        else:
            gate, up = self.gate_proj(h), self.up_proj(h)
        return self.down_proj(activation(self.hidden_act)(gate) * up)


def norm(size: int, config: LlamaConfig) -> RMSNorm:
    return RMSNorm(size, config.rms_norm_eps, config, unit_offset=config.unit_offset_norm)


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm attention and MLP blocks; with `sandwich_norm` (Gemma 2/3) their outputs are
    normed too, and transformers' `post_attention_layernorm` is that output norm (the MLP's input
    norm is then `pre_feedforward_layernorm`)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.self_attn = LlamaAttention(config, rngs=rngs)
        if config.num_experts:
            self.mlp = SparseMoeBlock(hidden=config.hidden_size,
                                      intermediate=config.moe_intermediate_size or config.intermediate_size,
                                      num_experts=config.num_experts, top_k=config.num_experts_per_tok,
                                      norm_topk_prob=config.norm_topk_prob, act=config.hidden_act, dtype=config.dtype,
                                      param_dtype=config.param_dtype, rngs=rngs)
        else:
            self.mlp = LlamaMLP(config, rngs=rngs)
        self.input_layernorm = norm(config.hidden_size, config)
        self.post_attention_layernorm = norm(config.hidden_size, config)
        if config.sandwich_norm:
            self.pre_feedforward_layernorm = norm(config.hidden_size, config)
            self.post_feedforward_layernorm = norm(config.hidden_size, config)
        self.sandwich_norm = config.sandwich_norm

    def __call__(self, h, kind, cos, sin, mask, q_scale=None, cache=None, cache_index=None):
        """`kind` indexes the leading axis of cos, sin and mask: this layer's attention kind."""
        attended, cache = self.self_attn(self.input_layernorm(h), cos[kind], sin[kind], mask[kind], q_scale, cache,
                                         cache_index)
        if not self.sandwich_norm:
            h = h + attended
            return h + self.mlp(self.post_attention_layernorm(h)), cache
        h = h + self.post_attention_layernorm(attended)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h))), cache


class LlamaModel(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=config.dtype,
                                      param_dtype=config.param_dtype, rngs=rngs)
        self.layers = stacked(lambda r: LlamaDecoderLayer(config, rngs=r), config.num_hidden_layers, rngs)
        self.norm = norm(config.hidden_size, config)
        # Gradient checkpointing of the decoder layers (`model.set_attributes(remat=True)`, or
        # `make_train_step(..., remat=True)`): the backward pass keeps each layer's input and
        # recomputes the rest of the layer, layer by layer, instead of keeping every activation.
        self.remat = False

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, cache_index=None):
        """Hidden states (b, s, hidden). With a KV cache (`init_cache`), the tokens are written at
        `cache_index` and attend to everything before them; returns (hidden, new cache) then."""
        config = self.config
        batch, seq = input_ids.shape
        if position_ids is None:
            start = 0 if cache_index is None else cache_index
            position_ids = jnp.broadcast_to(start + jnp.arange(seq), (batch, seq))
        # One RoPE table and mask per layer kind (full or sliding, with or without RoPE) in use,
        # stacked; each layer picks its own by index, so the scanned layer body stays the same for
        # every layer. A layer without RoPE rotates by cos 1, sin 0: exactly the identity.
        kinds = sorted(set(config.layer_kinds))
        cos, sin, masks = [], [], []
        for sliding, rotates in kinds:
            kind_cos, kind_sin = rope_cos_sin(config, position_ids, sliding)
            if not rotates:
                kind_cos, kind_sin = jnp.ones_like(kind_cos), jnp.zeros_like(kind_sin)
            cos.append(kind_cos)
            sin.append(kind_sin)
            window = config.sliding_window if sliding else None
            if cache is None:
                masks.append(causal_mask(seq, attention_mask, window))
            else:
                masks.append(cached_mask(seq, cache[0].shape[2], cache_index, attention_mask, window))
        layer_kind = jnp.asarray([kinds.index(kind) for kind in config.layer_kinds], jnp.int32)
        h = self.embed_tokens(input_ids)
        if config.scale_embeddings:
            h = h * jnp.asarray(config.hidden_size**0.5, h.dtype)

        q_scale = None
        if config.llama_4_scaling_beta is not None:  # Ministral 3's position-dependent query temperature
            original = dict(config.rope_scaling)["original_max_position_embeddings"]
            q_scale = 1 + config.llama_4_scaling_beta * jnp.log1p(jnp.floor(position_ids / original))
        h, cache = run_stacked(self.layers[STACK], h, layer_kind, jnp.stack(cos), jnp.stack(sin), jnp.stack(masks),
                               q_scale, cache, cache_index, remat=self.remat, in_axes=(0, None, None, None, None, 0, None),
                               out_axes=(nnx.Carry, 0))
        h = self.norm(h)
        return h if cache is None else (h, cache)

    def init_cache(self, batch: int, max_length: int, dtype=None):
        """An empty KV cache: (keys, values), each (layers, batch, max_length, kv_heads, head_dim)."""
        c = self.config
        return empty_cache(c.num_hidden_layers, batch, max_length, c.kv_heads, c.head_size, dtype or c.dtype)


class LlamaForCausalLM(nnx.Module):
    """Causal LM: `model(input_ids, attention_mask=None, position_ids=None) -> logits` (b, s, vocab).

    The call is `logits(hidden_states(...))`; the two halves are methods so that a loss can run
    the output head a few positions at a time (`lorax.train.chunked_causal_lm_loss`).
    """

    output_head = "lm_head"
    backbone = LlamaModel  # what `self.model` is (transformers' `model`)
    softcaps_logits = True  # whether the head applies the config's final_logit_softcapping

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = self.backbone(config, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = linear(config.hidden_size, config.vocab_size, False, config, rngs)

    @property
    def decoder(self) -> LlamaModel:
        """The decoder stack (embeddings, layers, final norm): `self.model` here."""
        return self.model

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, cache_index=None):
        out = self.decoder(input_ids, attention_mask, position_ids, cache, cache_index)
        h, cache = (out, None) if cache is None else out
        logits = self.logits(h)
        return logits if cache is None else (logits, cache)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None):
        """The final (normed) hidden states (b, s, hidden) that the output head reads."""
        return self.decoder(input_ids, attention_mask, position_ids)

    def logits(self, h):
        """The output head: (..., hidden) -> (..., vocab), `lm_head` or the tied embeddings
        (soft-capped when the config says so)."""
        logits = lm_logits(h, self.decoder.embed_tokens, None if self.config.tie_word_embeddings else self.lm_head)
        cap = self.config.final_logit_softcapping if self.softcaps_logits else None
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    def init_cache(self, batch: int, max_length: int, dtype=None):
        return self.decoder.init_cache(batch, max_length, dtype)

    @property
    def cache_recompute_length(self) -> int | None:
        """With LongRoPE, the sequence length past which the KV cache holds keys rotated by the
        wrong (short) factors: transformers' Phi-3 generate recomputes the cache once when the
        input reaches one token more than this (`lorax.models.generate` does the same)."""
        scaling = dict(self.config.rope_scaling or ())
        return scaling["original_max_position_embeddings"] if scaling.get("rope_type") == "longrope" else None


class LanguageModelOnly(nnx.Module):
    """The `model` of a transformers *ForConditionalGeneration (Gemma3Model, Mistral3Model)
    without its vision tower and projector: just `language_model`."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.language_model = LlamaModel(config, rngs=rngs)


class LlamaForConditionalGeneration(LlamaForCausalLM):
    """The text half of a vision-language checkpoint whose language model is one of ours
    (Gemma 3 4B and up, Mistral Small 3.1 / 3.2, LLaVA): text in, logits out, under transformers'
    module names `model.language_model.layers.3.self_attn.q_proj` and `lm_head`, so that
    adapters trained here load into peft on the full model and the other way round. There is no
    vision tower: images are not supported, only text fine-tuning.

    >>> config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
    ...                      num_attention_heads=2)
    >>> model = LlamaForConditionalGeneration(config, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((1, 3), jnp.int32)).shape
    (1, 3, 16)
    >>> sorted(nnx.to_pure_dict(nnx.state(model))["model"])
    ['language_model']
    """

    backbone = LanguageModelOnly
    # transformers' *ForConditionalGeneration heads leave out the text model's final_logit_softcapping.
    softcaps_logits = False

    @property
    def decoder(self) -> LlamaModel:
        return self.model.language_model
