"""Memory of one AdamW training step, full fine-tuning vs LoRA vs QLoRA, from XLA's memory analysis.

Model: a Llama-style config (hidden 768, 12 layers, 12 heads, intermediate 2048, vocab 32000,
untied head: 134.1M parameters), batch 1 x 256 tokens, fp32, causal-LM loss
(`lorax.train.causal_lm_loss`), one `optax.adamw` update, everything in one jitted step.

- full: gradients of every weight, AdamW moments for every weight.
- LoRA: r=8 on q_proj and v_proj; only the trainable half of `lorax.partition(params)` is
  differentiated and optimized, the frozen half is an argument of the step.
- QLoRA: the same LoRA built with `lorax.lora(..., quantize=QuantConfig("nf4", double_quant=True))`,
  which stores the adapted (q_proj, v_proj) bases in 4 bits.
- QLoRA, all linears 4-bit: as bitsandbytes loads a model for QLoRA, every frozen linear of the
  decoder layers is 4-bit (k, o, gate, up, down quantized here with `QuantConfig.quantize_kernel`);
  embeddings, norms and the head stay fp32. A reference row: the last lines use the QLoRA above.

Memory of a step = arguments + outputs + temporaries - aliased (`compiled.memory_analysis()`).
Each step donates what it replaces (params and optimizer state; trainable half and optimizer
state), so the updated buffers alias their inputs and count once. Nothing is allocated or run:
the parameters are shapes (`nnx.eval_shape`, `jax.eval_shape` around `lorax.lora`).

Why 0.25 is the floor for LoRA: full fine-tuning holds weights, gradients and two AdamW moments
(4 copies); LoRA holds the frozen weights once. Activations, the logits and their gradient
come on top of both and pull the ratio up (see benchmarks/RESULTS.md).

Run it (CPU is fine: the steps are only compiled):

    python benchmarks/memory.py

The last two lines are `qlora_over_full_memory=<ratio>` and `lora_over_full_memory=<ratio>`.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lorax
from lorax.models import LlamaConfig, LlamaForCausalLM
from lorax.nf4 import QuantConfig
from lorax.targets import dotted
from lorax.train import causal_lm_loss

CONFIG = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=12)
BATCH, TOKENS, RANK = 1, 256, 8
LORA = lorax.LoraConfig(r=RANK, lora_alpha=16, target_modules=["q_proj", "v_proj"])
QUANT = QuantConfig("nf4", double_quant=True)
GB = 1e9


def memory_of(step, donate_argnums, *args) -> dict[str, int]:
    """XLA's memory analysis of the compiled step: argument, output, temporary and aliased bytes."""
    stats = jax.jit(step, donate_argnums=donate_argnums).lower(*args).compile().memory_analysis()
    # Some jax versions return one entry per device program.
    if isinstance(stats, (list, tuple)):
        stats = stats[0]
    sizes = {name: int(getattr(stats, f"{name}_size_in_bytes")) for name in ("argument", "output", "temp", "alias")}
    sizes["total"] = sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]
    return sizes


def quantize_frozen_linears(params, quant: QuantConfig):
    """Every plain linear kernel of the decoder layers as a 4-bit Nf4Array (bitsandbytes'
    QLoRA layout); adapted kernels are already 4-bit inside their LoraArray."""

    def quantize(keypath, leaf):
        path = dotted(keypath)
        if path.startswith("model.layers.") and path.endswith(".kernel") and not isinstance(leaf, lorax.LoraArray):
            return quant.quantize_kernel(leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(quantize, params, is_leaf=lambda x: isinstance(x, lorax.LoraArray))


def full_weight_bytes(params) -> int:
    """Weights + gradients + two AdamW moments of full fine-tuning, in bytes."""
    return 4 * sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))


def main():
    graphdef, params = lorax.split(nnx.eval_shape(lambda: LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))))
    input_ids = jax.ShapeDtypeStruct((BATCH, TOKENS), jnp.int32)
    tx = optax.adamw(1e-4)

    def loss_fn(params, input_ids):
        return causal_lm_loss(lorax.apply(graphdef, params, input_ids), {"input_ids": input_ids})

    def full_step(params, opt_state, input_ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, input_ids)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rows = {"full fine-tuning": (memory_of(full_step, (0, 1), params, jax.eval_shape(tx.init, params), input_ids),
                                 lorax.count_parameters(params)[1], lorax.count_parameters(params)[1])}

    key = jax.random.key(0)
    lora_params = jax.eval_shape(lambda p, k: lorax.lora(p, LORA, key=k), params, key)
    qlora_params = jax.eval_shape(lambda p, k: lorax.lora(p, LORA, key=k, quantize=QUANT), params, key)
    qlora_all_params = jax.eval_shape(lambda p: quantize_frozen_linears(p, QUANT), qlora_params)
    frozen_bytes = {}
    for name, adapted in (("LoRA", lora_params), ("QLoRA", qlora_params), ("QLoRA, all linears 4-bit", qlora_all_params)):
        trainable, frozen = lorax.partition(adapted)
        opt = lorax.optimizer(tx, adapted)

        # `frozen` is an argument, not a closure constant: the base lives in device memory, as in training.
        def lora_step(trainable, frozen, opt_state, input_ids):
            loss, grads = jax.value_and_grad(lambda t: loss_fn(lorax.combine(t, frozen), input_ids))(trainable)
            updates, opt_state = opt.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, loss

        sizes = memory_of(lora_step, (0, 2), trainable, frozen, jax.eval_shape(opt.init, trainable), input_ids)
        rows[name] = (sizes, *lorax.count_parameters(adapted))
        frozen_bytes[name] = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(frozen))

    full = rows["full fine-tuning"][0]["total"]
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; Llama hidden {CONFIG.hidden_size}, "
          f"{CONFIG.num_hidden_layers} layers, vocab {CONFIG.vocab_size}, untied head; batch {BATCH} x {TOKENS} "
          f"tokens, fp32, adamw; LoRA r={RANK} on q_proj, v_proj; QLoRA: NF4 + double quant, blocksize 64")
    header = ("step", "trainable", "all params", "arguments", "outputs", "temporaries", "aliased", "total bytes",
              "GB", "/full")
    print(f"{header[0]:26}" + "".join(f"{h:>14}" for h in header[1:-2]) + f"{header[-2]:>8}{header[-1]:>8}")
    for name, (sizes, trainable, total) in rows.items():
        figures = (trainable, total, sizes["argument"], sizes["output"], sizes["temp"], sizes["alias"], sizes["total"])
        print(f"{name:26}" + "".join(f"{v:>14,d}" for v in figures)
              + f"{sizes['total'] / GB:>8.3f}{sizes['total'] / full:>8.4f}")
    print("weights-only floor (frozen bytes / (4 x full weight bytes), no activations): "
          + ", ".join(f"{name} {frozen_bytes[name] / full_weight_bytes(params):.4f}" for name in frozen_bytes))
    print(f"qlora_over_full_memory={rows['QLoRA'][0]['total'] / full:.4f}")
    print(f"lora_over_full_memory={rows['LoRA'][0]['total'] / full:.4f}")


if __name__ == "__main__":
    main()
