"""Flax NNX models whose parameter paths are Hugging Face's module names."""

from lorax.models.bert import BaseModelOutputWithPooling, BertConfig, BertForSequenceClassification, BertModel
from lorax.models.gpt2 import GPT2Config, GPT2LMHeadModel, GPT2Model
from lorax.models.layers import STACK
from lorax.models.llama import LlamaConfig, LlamaForCausalLM, LlamaForConditionalGeneration, LlamaModel

__all__ = [
    "STACK",
    "BaseModelOutputWithPooling",
    "BertConfig",
    "BertForSequenceClassification",
    "BertModel",
    "GPT2Config",
    "GPT2LMHeadModel",
    "GPT2Model",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaForConditionalGeneration",
    "LlamaModel",
]
