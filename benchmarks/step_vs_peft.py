"""LoRA training-step time on CPU: ours (jitted, JAX) vs peft + PyTorch, same model, weights, adapter and data.

Model: a tiny Llama (4 layers, hidden 256, 4 heads, intermediate 688, vocab 32000, untied head,
fp32), batch 8 x 128 tokens, LoRA r=8 (alpha 16, no dropout) on q_proj and v_proj, AdamW
(lr 1e-4, weight decay 0.01), causal-LM loss.

transformers builds the model (random weights, seed 0) and writes it; peft's `get_peft_model`
adds the adapter, and its A and B are written too. Ours loads both files
(`interop.from_pretrained`, `interop.load_adapter`), so the two sides start from the same
weights and the same adapter. Ours is one jitted step over the trainable half of
`lorax.partition` (forward through `lorax.apply` on the stacked-layer `lorax.models` Llama,
backward, optax.adamw update; donated buffers). peft's is the usual torch loop: zero_grad,
`model(input_ids, labels=input_ids).loss`, backward, `torch.optim.AdamW.step()`.

The first steps check that both do the same work (their losses agree); they are the warm-up
and are not timed. Then the two are timed step by step, alternately (so that noise from other
processes hits both), on the same batches; medians.

    python benchmarks/step_vs_peft.py              # vocab 32000
    python benchmarks/step_vs_peft.py --vocab 1000 # the decoder layers without the large head

The last line is `ours_over_peft_step_time=<ratio>` (lower is better).
"""

import argparse
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import interop  # noqa: E402
import lorax  # noqa: E402
from lorax.train import causal_lm_loss  # noqa: E402

LAYERS, HIDDEN, HEADS, INTERMEDIATE = 4, 256, 4, 688
BATCH, SEQ, RANK, ALPHA = 8, 128, 8, 16
LEARNING_RATE, WEIGHT_DECAY = 1e-4, 0.01
WARMUP, STEPS = 3, 10


def main(vocab: int):
    transformers.utils.logging.disable_progress_bar()
    # peft calls a transformers property that transformers 5 deprecates; nothing to act on here.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                         num_key_value_heads=HEADS, tie_word_embeddings=False)
    peft_config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                  task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as folder:
        base_dir, adapter_dir = os.path.join(folder, "base"), os.path.join(folder, "adapter")
        torch_model = transformers.LlamaForCausalLM(hf_config)
        torch_model.save_pretrained(base_dir)
        peft_model = peft.get_peft_model(torch_model, peft_config)
        peft_model.save_pretrained(adapter_dir)
        graphdef, base = lorax.split(interop.from_pretrained(base_dir, progress=False))
        params = interop.load_adapter(adapter_dir, base)

    # Ours: the trainable half is differentiated and updated; the frozen half is an argument.
    trainable, frozen = lorax.partition(params)
    opt = lorax.optimizer(optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY), params)
    opt_state = opt.init(trainable)

    def step(trainable, opt_state, frozen, input_ids):
        def loss(trainable):
            logits = lorax.apply(graphdef, lorax.combine(trainable, frozen), input_ids)
            return causal_lm_loss(logits, {"input_ids": input_ids})

        value, grads = jax.value_and_grad(loss)(trainable)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, value

    step = jax.jit(step, donate_argnums=(0, 1))

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
    ours_batches = [jax.device_put(t.astype(np.int32)) for t in tokens]
    torch_batches = [torch.from_numpy(t) for t in tokens]

    print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"Llama {LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, intermediate {INTERMEDIATE}, vocab {vocab}, fp32; "
          f"batch {BATCH} x {SEQ} tokens; LoRA r={RANK} alpha={ALPHA} on q_proj, v_proj; AdamW")
    lorax.print_trainable_parameters(params)
    print("peft:  ", end="")
    peft_model.print_trainable_parameters()

    # Warm-up (ours compiles here): the same start and batches, so the losses must agree.
    print(f"{'warm-up step':>12} {'loss ours':>12} {'loss peft':>12} {'|diff|':>10}")
    largest = 0.0
    for i in range(WARMUP):
        trainable, opt_state, ours_loss = step(trainable, opt_state, frozen, ours_batches[i])
        peft_loss = torch_step(torch_batches[i])
        ours_loss, peft_loss = float(ours_loss), float(peft_loss)
        largest = max(largest, abs(ours_loss - peft_loss))
        print(f"{i + 1:>12} {ours_loss:>12.6f} {peft_loss:>12.6f} {abs(ours_loss - peft_loss):>10.2e}")
    print(f"same work: {'yes' if largest < 1e-4 else 'NO'} (largest loss difference {largest:.2e}, tolerance 1e-4)")

    ours_times, peft_times = [], []
    for i in range(WARMUP, WARMUP + STEPS):
        start = time.perf_counter()
        trainable, opt_state, ours_loss = step(trainable, opt_state, frozen, ours_batches[i])
        jax.block_until_ready((trainable, opt_state, ours_loss))
        ours_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch_step(torch_batches[i])
        peft_times.append(time.perf_counter() - start)

    ours, theirs = statistics.median(ours_times), statistics.median(peft_times)
    print(f"median of {STEPS} steps (min-max):")
    for name, median, times in (("ours (jax)", ours, ours_times), ("peft+torch", theirs, peft_times)):
        print(f"  {name:12} {median * 1e3:8.1f} ms  ({min(times) * 1e3:.1f}-{max(times) * 1e3:.1f})  "
              f"{BATCH * SEQ / median:10,.0f} tokens/s")
    print(f"ours_over_peft_step_time={ours / theirs:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    main(parser.parse_args().vocab)
