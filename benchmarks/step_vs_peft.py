"""LoRA training-step time on CPU: ours (jitted, JAX) vs peft + PyTorch, same model, weights, adapter and data,
with a hand-written plain-JAX step on the same weights as the yardstick for "the library adds no overhead".

Model: a tiny Llama (4 layers, hidden 256, 4 heads, intermediate 688, vocab 32000, untied head,
fp32), batch 8 x 128 tokens, LoRA r=8 (alpha 16, no dropout) on q_proj and v_proj, AdamW
(lr 1e-4, weight decay 0.01), causal-LM loss.

transformers builds the model (random weights, seed 0) and writes it; peft's `get_peft_model`
adds the adapter, and its A and B are written too. Ours loads both files
(`interop.from_pretrained`, `interop.load_adapter`), so all sides start from the same weights
and the same adapter.

- ours: the library's own step, `lorax.train.make_train_step` (forward through `lorax.apply` on
  the stacked-layer `lorax.models` Llama, backward over the trainable half of `lorax.partition`,
  `lorax.optimizer(optax.adamw)`, donated state).
- plain JAX: the same Llama LoRA step written by hand with jnp on the same arrays (no quax, no
  nnx, no optimizer masking): one `lax.scan` over the layers, `optax.adamw` on A and B. What a
  careful user would write without a library; ours should cost the same.
- peft + torch: the usual loop: zero_grad, `model(input_ids, labels=input_ids).loss`, backward,
  `torch.optim.AdamW.step()`.

The first steps check that all three do the same work (their losses agree); they are the
warm-up and are not timed. Then the three are timed step by step, in turn (so that noise from
other processes hits all of them), on the same batches; medians.

    python benchmarks/step_vs_peft.py              # vocab 32000
    python benchmarks/step_vs_peft.py --vocab 1000 # the decoder layers without the large head
    python benchmarks/step_vs_peft.py --use-dora   # DoRA: ours vs peft (the plain-JAX step is LoRA only)

Lines `ours_over_plain_jax_step_time=<ratio>` (library overhead; 1.0 = none) and, last,
`ours_over_peft_step_time=<ratio>` (lower is better).
"""

import argparse
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import interop  # noqa: E402
import lorax  # noqa: E402
from lorax.train import TrainState, causal_lm_loss, make_train_step  # noqa: E402

LAYERS, HIDDEN, HEADS, INTERMEDIATE = 4, 256, 4, 688
BATCH, SEQ, RANK, ALPHA = 8, 128, 8, 16
LEARNING_RATE, WEIGHT_DECAY = 1e-4, 0.01
WARMUP, STEPS = 3, 10
EPS, THETA = 1e-6, 10000.0  # transformers' LlamaConfig defaults


def plain_jax_step(params):
    """A hand-written jitted LoRA step on the arrays of `params`: returns (step, trainable, frozen)."""
    layers = params["model"]["layers"]["*"]
    attn, mlp = layers["self_attn"], layers["mlp"]
    frozen = {
        "embed": params["model"]["embed_tokens"]["embedding"], "head": params["lm_head"]["kernel"],
        "norm": params["model"]["norm"]["weight"], "n1": layers["input_layernorm"]["weight"],
        "n2": layers["post_attention_layernorm"]["weight"], "q": attn["q_proj"]["kernel"].w,
        "k": attn["k_proj"]["kernel"], "v": attn["v_proj"]["kernel"].w, "o": attn["o_proj"]["kernel"],
        "gate": mlp["gate_proj"]["kernel"], "up": mlp["up_proj"]["kernel"], "down": mlp["down_proj"]["kernel"],
    }
    trainable = {name: {"a": attn[f"{name}_proj"]["kernel"].a, "b": attn[f"{name}_proj"]["kernel"].b}
                 for name in ("q", "v")}
    scale, head_dim = ALPHA / RANK, HIDDEN // HEADS
    inv_freq = 1.0 / THETA ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.arange(SEQ, dtype=jnp.float32)[:, None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    causal = jnp.tril(jnp.ones((SEQ, SEQ), bool))

    def rms(x, weight):
        return weight * x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + EPS)

    def rope(x):
        half = head_dim // 2
        return x * cos + jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin

    def layer(h, p):
        batch = h.shape[0]
        x = rms(h, p["n1"])
        q = x @ p["q"] + scale * (x @ p["q_a"]) @ p["q_b"]
        v = x @ p["v"] + scale * (x @ p["v_a"]) @ p["v_b"]
        q, k, v = (t.reshape(batch, SEQ, HEADS, head_dim) for t in (q, x @ p["k"], v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", rope(q), rope(k)) * head_dim**-0.5
        weights = jax.nn.softmax(jnp.where(causal, scores, jnp.finfo(jnp.float32).min), axis=-1)
        h = h + jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, SEQ, HIDDEN) @ p["o"]
        x = rms(h, p["n2"])
        return h + (jax.nn.silu(x @ p["gate"]) * (x @ p["up"])) @ p["down"], None

    def loss(trainable, frozen, input_ids):
        per_layer = {name: frozen[name] for name in ("n1", "n2", "q", "k", "v", "o", "gate", "up", "down")}
        per_layer |= {f"{name}_{part}": trainable[name][part] for name in ("q", "v") for part in ("a", "b")}
        h, _ = jax.lax.scan(layer, frozen["embed"][input_ids], per_layer)
        logits = rms(h, frozen["norm"]) @ frozen["head"]
        log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(log_probs, input_ids[:, 1:, None], axis=-1))

    tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    def step(trainable, opt_state, frozen, input_ids):
        value, grads = jax.value_and_grad(loss)(trainable, frozen, input_ids)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    return jax.jit(step, donate_argnums=(0, 1)), (trainable, tx.init(trainable)), frozen


def main(vocab: int, use_dora: bool = False):
    transformers.utils.logging.disable_progress_bar()
    # peft calls a transformers property that transformers 5 deprecates; nothing to act on here.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                         num_key_value_heads=HEADS, tie_word_embeddings=False,
                                         rms_norm_eps=EPS, rope_theta=THETA)
    peft_config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                  task_type="CAUSAL_LM", use_dora=use_dora)
    with tempfile.TemporaryDirectory() as folder:
        base_dir, adapter_dir = os.path.join(folder, "base"), os.path.join(folder, "adapter")
        torch_model = transformers.LlamaForCausalLM(hf_config)
        torch_model.save_pretrained(base_dir)
        peft_model = peft.get_peft_model(torch_model, peft_config)
        peft_model.save_pretrained(adapter_dir)
        graphdef, base = lorax.split(interop.from_pretrained(base_dir, progress=False))
        params = interop.load_adapter(adapter_dir, base)

    # Ours: the library's train step (the frozen half is an argument of the compiled step).
    trainable, frozen = lorax.partition(params)
    tx = lorax.optimizer(optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY), params)
    ours_step = make_train_step(graphdef, frozen, tx, causal_lm_loss)
    state = TrainState.create(trainable, tx, jax.random.key(0))

    # Plain JAX on copies of the same arrays (ours donates its own buffers).
    plain_step, plain_state, plain_frozen = plain_jax_step(jax.tree_util.tree_map(jnp.copy, params))

    # peft + torch: the same adapter (peft initialised it), the usual loop.
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LEARNING_RATE,
                                  weight_decay=WEIGHT_DECAY)

    def torch_step(input_ids):
        optimizer.zero_grad(set_to_none=True)
        loss = peft_model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    tokens = np.random.default_rng(0).integers(0, vocab, (WARMUP + STEPS, BATCH, SEQ), dtype=np.int64)
    jax_batches = [jax.device_put(t.astype(np.int32)) for t in tokens]
    torch_batches = [torch.from_numpy(t) for t in tokens]

    def run_ours(i):
        nonlocal state
        state, metrics = ours_step(state, {"input_ids": jax_batches[i]})
        return jax.block_until_ready(metrics["loss"])

    def run_plain(i):
        nonlocal plain_state
        *plain_state, loss = plain_step(*plain_state, plain_frozen, jax_batches[i])
        return jax.block_until_ready(loss)

    def run_peft(i):
        return torch_step(torch_batches[i])

    contestants = {"ours (lorax)": run_ours, "plain JAX": run_plain, "peft+torch": run_peft}
    if use_dora:  # the hand-written step is plain LoRA: not the same work
        del contestants["plain JAX"]
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"Llama {LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, intermediate {INTERMEDIATE}, vocab {vocab}, fp32; "
          f"batch {BATCH} x {SEQ} tokens; {'DoRA' if use_dora else 'LoRA'} r={RANK} alpha={ALPHA} on q_proj, v_proj; "
          "AdamW")
    lorax.print_trainable_parameters(params)
    print("peft:  ", end="")
    peft_model.print_trainable_parameters()

    # Warm-up (the JAX steps compile here): the same start and batches, so the losses must agree.
    print(f"{'warm-up step':>12}" + "".join(f"{'loss ' + name:>22}" for name in contestants))
    largest = 0.0
    for i in range(WARMUP):
        losses = [float(run(i)) for run in contestants.values()]
        largest = max(largest, max(losses) - min(losses))
        print(f"{i + 1:>12}" + "".join(f"{loss:>22.6f}" for loss in losses))
    print(f"same work: {'yes' if largest < 1e-4 else 'NO'} (largest loss difference {largest:.2e}, tolerance 1e-4)")

    times = {name: [] for name in contestants}
    for i in range(WARMUP, WARMUP + STEPS):
        for name, run in contestants.items():
            start = time.perf_counter()
            run(i)
            times[name].append(time.perf_counter() - start)

    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"median of {STEPS} steps (min-max):")
    for name, median in medians.items():
        print(f"  {name:14} {median * 1e3:8.1f} ms  ({min(times[name]) * 1e3:.1f}-{max(times[name]) * 1e3:.1f})  "
              f"{BATCH * SEQ / median:10,.0f} tokens/s")
    if "plain JAX" in medians:
        print(f"plain_jax_over_peft_step_time={medians['plain JAX'] / medians['peft+torch']:.3f}")
        print(f"ours_over_plain_jax_step_time={medians['ours (lorax)'] / medians['plain JAX']:.3f}")
    print(f"ours_over_peft_step_time={medians['ours (lorax)'] / medians['peft+torch']:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    parser.add_argument("--use-dora", action="store_true", help="DoRA instead of LoRA (ours vs peft only)")
    arguments = parser.parse_args()
    main(arguments.vocab, arguments.use_dora)
