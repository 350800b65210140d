"""Flax NNX models whose parameter paths are Hugging Face's module names."""

from lorax.models.layers import STACK
from lorax.models.llama import LlamaConfig, LlamaForCausalLM, LlamaModel

__all__ = ["STACK", "LlamaConfig", "LlamaForCausalLM", "LlamaModel"]
