"""The BERT encoder as a Flax NNX model whose parameter paths are Hugging Face's module names:
`embeddings.word_embeddings`, `encoder.layer.3.attention.self.query`, `pooler.dense`.

The layers are stored stacked under `encoder.layer.*` and run with `nnx.scan`, as in llama.py.
The pooler exists when the checkpoint has one (transformers' `add_pooling_layer`; the loader
reads it from the tensor names). all-MiniLM-L6-v2 is this model with a pooler.

>>> config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
...                     intermediate_size=32)
>>> out = BertModel(config, rngs=nnx.Rngs(0))(jnp.array([[1, 2, 3]]))
>>> out.last_hidden_state.shape, out.pooler_output.shape
((1, 3, 16), (1, 16))
"""

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lorax.models.layers import (STACK, LayerNorm, activation, attention, check_positions, linear, padding_mask,
                                  run_stacked, stacked)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of transformers' BertConfig that change the computation (an encoder with absolute
    positions), plus `add_pooling_layer`, which transformers takes as a BertModel argument."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    add_pooling_layer: bool = True
    num_labels: int = 2  # BertForSequenceClassification's outputs (config.json: the size of id2label)
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "BertConfig":
        """From a config.json dict; `add_pooling_layer` is not in it: pass it as an override."""
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise NotImplementedError("BERT as a decoder (is_decoder / add_cross_attention) is not supported yet")
        position_type = hf.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise NotImplementedError(f"position_embedding_type {position_type!r} is not supported yet (supported: absolute)")
        activation(hf.get("hidden_act", "gelu"))  # an unsupported activation fails here, by name
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in fields and k != "dtype"}
        if hf.get("id2label"):  # what transformers' num_labels reads
            values["num_labels"] = len(hf["id2label"])
        return cls(**{**values, **overrides})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BaseModelOutputWithPooling:
    """What BertModel returns (transformers' names): last_hidden_state (b, s, hidden) and
    pooler_output (b, hidden), None when the model has no pooler."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array | None = None


class BertEmbeddings(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        embed = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.word_embeddings = nnx.Embed(config.vocab_size, config.hidden_size, **embed)
        self.position_embeddings = nnx.Embed(config.max_position_embeddings, config.hidden_size, **embed)
        self.token_type_embeddings = nnx.Embed(config.type_vocab_size, config.hidden_size, **embed)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps, config)

    def __call__(self, input_ids, token_type_ids, position_ids):
        h = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(h + self.position_embeddings(position_ids))


class BertSelfAttention(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        hidden = config.hidden_size
        self.query = linear(hidden, hidden, True, config, rngs)
        self.key = linear(hidden, hidden, True, config, rngs)
        self.value = linear(hidden, hidden, True, config, rngs)
        self.heads, self.head = config.num_attention_heads, config.head_size

    def __call__(self, h, mask):
        batch, seq, hidden = h.shape
        q, k, v = (p(h).reshape(batch, seq, self.heads, self.head) for p in (self.query, self.key, self.value))
        return attention(q, k, v, mask, scale=self.head**-0.5).reshape(batch, seq, hidden)


class BertSelfOutput(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.dense = linear(config.hidden_size, config.hidden_size, True, config, rngs)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps, config)

    def __call__(self, attended, residual):
        return self.LayerNorm(self.dense(attended) + residual)


class BertAttention(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.self = BertSelfAttention(config, rngs=rngs)  # transformers' name: the path is attention.self.query
        self.output = BertSelfOutput(config, rngs=rngs)

    def __call__(self, h, mask):
        return self.output(self.self(h, mask), h)


class BertIntermediate(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.dense = linear(config.hidden_size, config.intermediate_size, True, config, rngs)
        self.hidden_act = config.hidden_act

    def __call__(self, h):
        return activation(self.hidden_act)(self.dense(h))


class BertOutput(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.dense = linear(config.intermediate_size, config.hidden_size, True, config, rngs)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps, config)

    def __call__(self, inner, residual):
        return self.LayerNorm(self.dense(inner) + residual)


class BertLayer(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.attention = BertAttention(config, rngs=rngs)
        self.intermediate = BertIntermediate(config, rngs=rngs)
        self.output = BertOutput(config, rngs=rngs)

    def __call__(self, h, mask):
        h = self.attention(h, mask)
        return self.output(self.intermediate(h), h)


class BertEncoder(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.layer = stacked(lambda r: BertLayer(config, rngs=r), config.num_hidden_layers, rngs)
        self.remat = False  # gradient checkpointing of the layers (see layers.scan_layers)

    def __call__(self, h, mask):
        return run_stacked(self.layer[STACK], h, mask, remat=self.remat, in_axes=(None,))


class BertPooler(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.dense = linear(config.hidden_size, config.hidden_size, True, config, rngs)

    def __call__(self, h):
        return jnp.tanh(self.dense(h[:, 0]))  # the first ([CLS]) token


class BertModel(nnx.Module):
    """BERT encoder: `model(input_ids, attention_mask=None, token_type_ids=None, position_ids=None)`
    -> BaseModelOutputWithPooling (last_hidden_state, and pooler_output when there is a pooler).

    attention_mask is (b, s), 0 on padding; token_type_ids default to zeros (one segment).
    """

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = BertEmbeddings(config, rngs=rngs)
        self.encoder = BertEncoder(config, rngs=rngs)
        if config.add_pooling_layer:
            self.pooler = BertPooler(config, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        batch, seq = input_ids.shape
        check_positions(seq, self.config.max_position_embeddings, "max_position_embeddings")
        if token_type_ids is None:
            token_type_ids = jnp.zeros((batch, seq), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
        h = self.encoder(self.embeddings(input_ids, token_type_ids, position_ids), padding_mask(attention_mask, seq))
        pooled = self.pooler(h) if self.config.add_pooling_layer else None
        return BaseModelOutputWithPooling(h, pooled)


def _classifier(config: BertConfig, num_labels: int, rngs: nnx.Rngs) -> nnx.Linear:
    # transformers initialises the head with N(0, 0.02) (initializer_range) and a zero bias.
    return nnx.Linear(config.hidden_size, num_labels, dtype=config.dtype, param_dtype=config.param_dtype,
                      kernel_init=nnx.initializers.normal(0.02), rngs=rngs)


def _classification_config_json(encoder_json: str, num_labels: int) -> str:
    config = json.loads(encoder_json)
    config["architectures"] = ["BertForSequenceClassification"]
    if len(config.get("id2label") or {}) != num_labels:
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    return json.dumps(config, sort_keys=True)


class BertForSequenceClassification(nnx.Module):
    """BERT with a classification head on the pooled [CLS] output, named as transformers names it
    (`bert.*`, `classifier`), so a peft adapter with `modules_to_save=["classifier"]` fits
    transformers' BertForSequenceClassification: `model(input_ids, attention_mask=None,
    token_type_ids=None) -> logits (b, num_labels)`.

    >>> model = BertForSequenceClassification.from_encoder(interop.from_pretrained(path, progress=False), 2,
    ...                                                    rngs=nnx.Rngs(0))
    >>> model(jnp.array([[101, 7592, 102]])).shape
    (1, 2)
    """

    def __init__(self, config: BertConfig, num_labels: int | None = None, *, rngs: nnx.Rngs):
        if not config.add_pooling_layer:
            raise NotImplementedError("sequence classification uses the pooler; this BERT has none")
        # Kept with its num_labels: the config builds this model's tree again (interop.save_merged checks against it).
        self.config = config if num_labels is None else dataclasses.replace(config, num_labels=num_labels)
        self.bert = BertModel(config, rngs=rngs)
        self.classifier = _classifier(config, self.config.num_labels, rngs)

    @classmethod
    def from_encoder(cls, encoder: BertModel, num_labels: int, *, rngs: nnx.Rngs) -> "BertForSequenceClassification":
        """A new head on a loaded encoder (e.g. from interop.from_pretrained). An encoder loaded by
        interop.from_pretrained passes on its config.json, made a BertForSequenceClassification's
        (architectures, id2label), so that interop.save_merged writes a checkpoint that
        transformers' AutoModelForSequenceClassification loads."""
        model = nnx.eval_shape(lambda: cls(encoder.config, num_labels, rngs=nnx.Rngs(0)))
        model.bert = encoder
        model.classifier = _classifier(encoder.config, num_labels, rngs)
        if getattr(encoder, "hf_config_json", None) is not None:
            model.hf_config_json = _classification_config_json(encoder.hf_config_json, num_labels)
        return model

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.classifier(self.bert(input_ids, attention_mask, token_type_ids).pooler_output)
