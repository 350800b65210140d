"""lorax: LoRA for JAX as a transform of parameter trees.

>>> import jax, lorax
>>> graphdef, params = lorax.split(model)                       # model: any Flax NNX module
>>> params = lorax.lora(params, lorax.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), key=jax.random.key(0))
>>> lorax.print_trainable_parameters(params)
trainable params: ... || all params: ... || trainable%: ...
>>> logits = lorax.apply(graphdef, params, input_ids)
"""

from lorax.apply import ModelDef, apply, split, with_dropout
from lorax.arrays import DoraArray, ExpertLoraArray, LoraArray, TrainableArray, is_adapter
from lorax.config import LoraConfig
from lorax.errors import LoraConfigError, LoraError, TargetError, UnsupportedOpError
from lorax.loraplus import loraplus_optimizer
from lorax.targets import select_targets
from lorax.train import optimizer
from lorax.transform import (
    combine,
    count_parameters,
    disable_adapters,
    lora,
    merge,
    partition,
    print_trainable_parameters,
    trainable,
    trainable_mask,
    unmerge,
)

__all__ = [
    "DoraArray",
    "LoraArray",
    "ExpertLoraArray",
    "LoraConfig",
    "LoraConfigError",
    "LoraError",
    "ModelDef",
    "TargetError",
    "TrainableArray",
    "UnsupportedOpError",
    "apply",
    "combine",
    "count_parameters",
    "disable_adapters",
    "is_adapter",
    "lora",
    "loraplus_optimizer",
    "merge",
    "optimizer",
    "partition",
    "print_trainable_parameters",
    "select_targets",
    "split",
    "trainable",
    "trainable_mask",
    "unmerge",
    "with_dropout",
]

# QLoRA: 4-bit (NF4/FP4) bases, bit-exact with bitsandbytes; lorax.nf4.quantize / dequantize.
from lorax import nf4  # noqa: E402
from lorax.nf4 import Nf4Array, QuantConfig, QuantizationError  # noqa: E402

__all__ += ["Nf4Array", "QuantConfig", "QuantizationError", "nf4"]
