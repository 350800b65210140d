"""Memory of one AdamW training step, full fine-tuning vs LoRA vs QLoRA, from XLA's memory analysis.

Model: a Llama-style config (hidden 768, 12 layers, 12 heads, intermediate 2048, vocab 32000,
untied head: 134.1M parameters), batch 1 x 256 tokens, fp32, causal-LM loss, one `optax.adamw`
update. Every row is the library's own step, `lorax.train.make_train_step(...)`, lowered with
`step.jitted.lower(state, frozen, batch)` and compiled; nothing is allocated or run (the
parameters are shapes: `nnx.eval_shape`, `jax.eval_shape` around `lorax.lora`).

- full: every weight trained (the whole tree is the trainable half; AdamW moments for all).
- LoRA: r=8 on q_proj and v_proj; the frozen half is an argument of the step.
- QLoRA q/v: the same LoRA with `lorax.lora(..., quantize=QuantConfig("nf4", double_quant=True))`,
  which stores the adapted bases in 4 bits.
- QLoRA, all linears 4-bit (the QLoRA of the headline): as bitsandbytes/peft load a model for
  QLoRA, every frozen linear of the decoder layers is NF4 + double quant (k, o, gate, up, down
  quantized here with `QuantConfig.quantize_kernel`); embeddings, norms and the head stay fp32.

Options of `make_train_step`, shown in the `options` column:
- remat: `remat=True`, the scanned decoder layers are checkpointed (each keeps its input; the
  backward pass recomputes the layer, one at a time).
- chunks: `loss_chunk_size=64`, the head and the loss run 64 positions at a time, so the
  (256, 32000) logits and their gradient never exist whole.
- none: the plain step, as a reference.

The headline ratios compare like with like: LoRA / QLoRA with remat + chunks over full
fine-tuning with remat (full fine-tuning's smallest figure: chunking adds the accumulation of
the head's gradient there). Without remat on either side the ratios are lower still, because
activations weigh more in the denominator; those rows are printed as references.

Memory of a step = arguments + outputs + temporaries - aliased (`compiled.memory_analysis()`).
The state is donated, so the updated trainable half and optimizer state alias their inputs
and count once.

Why 0.25 is the floor for LoRA: full fine-tuning holds weights, gradients and two AdamW moments
(4 copies); LoRA holds the frozen weights once. Activations come on top of both.

Run it (CPU is fine: the steps are only compiled):

    python benchmarks/memory.py

The last two lines are `qlora_over_full_memory=<ratio>` (all linears 4-bit, remat + chunks, over
full with remat) and `lora_over_full_memory=<ratio>` (remat + chunks, over full with remat).
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lorax
from lorax.models import LlamaConfig, LlamaForCausalLM
from lorax.nf4 import QuantConfig
from lorax.targets import dotted
from lorax.train import TrainState, causal_lm_loss, make_train_step

CONFIG = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=12)
BATCH, TOKENS, RANK, LOSS_CHUNK = 1, 256, 8, 64
LORA = lorax.LoraConfig(r=RANK, lora_alpha=16, target_modules=["q_proj", "v_proj"])
QUANT = QuantConfig("nf4", double_quant=True)
OPTIONS = {"none": {}, "remat": {"remat": True}, "remat + chunks": {"remat": True, "loss_chunk_size": LOSS_CHUNK}}
GB = 1e9


def step_memory(graphdef, trainable, frozen, tx, options: dict) -> dict[str, int]:
    """XLA's memory analysis of `make_train_step`'s compiled step: argument, output, temporary
    and aliased bytes, and their total."""
    step = make_train_step(graphdef, frozen, tx, causal_lm_loss, **options)
    state = jax.eval_shape(lambda t: TrainState.create(t, tx, jax.random.key(0)), trainable)
    batch = {"input_ids": jax.ShapeDtypeStruct((BATCH, TOKENS), jnp.int32)}
    stats = step.jitted.lower(state, frozen, batch).compile().memory_analysis()
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


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def main():
    graphdef, params = lorax.split(nnx.eval_shape(lambda: LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))))
    tx = optax.adamw(1e-4)
    total = lorax.count_parameters(params)[1]
    rows = {}
    # Full fine-tuning: the whole tree is trained, nothing is frozen.
    nothing_frozen = jax.tree_util.tree_map(lambda _: None, params)
    for option in OPTIONS:
        rows["full fine-tuning", option] = (step_memory(graphdef, params, nothing_frozen, tx, OPTIONS[option]),
                                            total, total)

    key = jax.random.key(0)
    lora_params = jax.eval_shape(lambda p, k: lorax.lora(p, LORA, key=k), params, key)
    qlora_params = jax.eval_shape(lambda p, k: lorax.lora(p, LORA, key=k, quantize=QUANT), params, key)
    qlora_all_params = jax.eval_shape(lambda p: quantize_frozen_linears(p, QUANT), qlora_params)
    frozen_bytes = {}
    for name, adapted in (("LoRA", lora_params), ("QLoRA q/v 4-bit", qlora_params),
                          ("QLoRA all linears 4-bit", qlora_all_params)):
        trainable, frozen = lorax.partition(adapted)
        opt = lorax.optimizer(tx, adapted)
        for option in ("none", "remat + chunks"):
            rows[name, option] = (step_memory(graphdef, trainable, frozen, opt, OPTIONS[option]),
                                  *lorax.count_parameters(adapted))
        frozen_bytes[name] = nbytes(frozen)

    full = rows["full fine-tuning", "remat"][0]["total"]
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; Llama hidden {CONFIG.hidden_size}, "
          f"{CONFIG.num_hidden_layers} layers, vocab {CONFIG.vocab_size}, untied head; batch {BATCH} x {TOKENS} "
          f"tokens, fp32, adamw; LoRA r={RANK} on q_proj, v_proj; QLoRA: NF4 + double quant, blocksize 64; "
          f"lorax.train.make_train_step; chunks = loss_chunk_size={LOSS_CHUNK}")
    header = ("step", "options", "trainable", "all params", "arguments", "outputs", "temporaries", "aliased",
              "total bytes", "GB", "/full remat")
    print(f"{header[0]:24}{header[1]:>16}" + "".join(f"{h:>14}" for h in header[2:-2])
          + f"{header[-2]:>8}{header[-1]:>12}")
    for (name, option), (sizes, trainable, total) in rows.items():
        figures = (trainable, total, sizes["argument"], sizes["output"], sizes["temp"], sizes["alias"], sizes["total"])
        print(f"{name:24}{option:>16}" + "".join(f"{v:>14,d}" for v in figures)
              + f"{sizes['total'] / GB:>8.3f}{sizes['total'] / full:>12.4f}")
    print("weights-only floor (frozen bytes / (4 x full weight bytes), no activations): "
          + ", ".join(f"{name} {frozen_bytes[name] / (4 * nbytes(params)):.4f}" for name in frozen_bytes))
    print(f"qlora_over_full_memory={rows['QLoRA all linears 4-bit', 'remat + chunks'][0]['total'] / full:.4f}")
    print(f"lora_over_full_memory={rows['LoRA', 'remat + chunks'][0]['total'] / full:.4f}")


if __name__ == "__main__":
    main()
