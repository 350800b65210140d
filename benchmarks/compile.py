"""Compile time vs depth: the decoder layers run under one `nnx.scan`, so a 32-layer model
compiles about as fast as a 2-layer one (an unrolled Python loop would grow with depth).

Measures `jax.jit(...).lower(...).compile()` of a LoRA training step (forward, backward,
adamw update) for Llama-style configs of 2, 8 and 32 layers (hidden 256, seq 128, batch 4).

    python benchmarks/compile.py

The last line is `compile_32_over_2_layers=<ratio>` (close to 1 is the point).
"""

import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lorax
from lorax.models import LlamaConfig, LlamaForCausalLM
from lorax.train import TrainState, causal_lm_loss, make_train_step


def compile_seconds(layers: int) -> float:
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4)
    graphdef, base = lorax.split(nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0))))
    base = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), base)
    params = lorax.lora(base, lorax.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), key=jax.random.key(0))
    trainable, frozen = lorax.partition(params)
    tx = lorax.optimizer(optax.adamw(1e-4), params)
    step = make_train_step(graphdef, frozen, tx, causal_lm_loss)
    batch = {"input_ids": jnp.zeros((4, 128), jnp.int32)}

    start = time.perf_counter()
    step.jitted.lower(TrainState.create(trainable, tx, jax.random.key(0)), frozen, batch).compile()
    return time.perf_counter() - start


def main():
    compile_seconds(2)  # warm-up: first-use costs of jax itself
    times = {layers: compile_seconds(layers) for layers in (2, 8, 32)}
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; LoRA r=8 q/v train step, hidden 256, seq 128, batch 4")
    for layers, seconds in times.items():
        print(f"{layers:3d} layers: trace + compile {seconds:6.2f} s")
    print(f"compile_32_over_2_layers={times[32] / times[2]:.2f}")


if __name__ == "__main__":
    main()
