"""Train a LoRA adapter in JAX, hand it to PyTorch: PeftModel loads it and predicts the same tokens.

A tiny Llama is written by transformers itself (random weights: there is no hub to download
from), loaded with `interop.from_pretrained`, fine-tuned with LoRA on q_proj/v_proj for a few
jitted steps to memorise a short token sequence, saved with `interop.save_adapter`, and loaded
with `peft.PeftModel.from_pretrained` on the torch model. Both models' next-token predictions
are printed side by side.

    python examples/export_to_peft.py
"""

import os
import tempfile

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
from lorax.train import TrainState, causal_lm_loss, fit, make_train_step  # noqa: E402


def main():
    folder = tempfile.mkdtemp()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(os.path.join(folder, "base"))

    graphdef, base = lorax.split(interop.from_pretrained(os.path.join(folder, "base")))
    lora_config = lorax.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    params = lorax.lora(base, lora_config, key=jax.random.key(0))
    lorax.print_trainable_parameters(params)

    sequence = np.asarray([[5, 17, 42, 8, 99, 23, 64, 3, 77, 12, 5, 17, 42, 8, 99, 23]], np.int32)
    trainable, frozen = lorax.partition(params)
    tx = lorax.optimizer(optax.adam(3e-2), params)
    step = make_train_step(graphdef, frozen, tx, causal_lm_loss)
    state = fit(step, TrainState.create(trainable, tx, jax.random.key(1)), {"input_ids": sequence}, steps=60,
                batch_size=1)
    params = lorax.combine(state.trainable, frozen)
    sequence = jnp.asarray(sequence)

    adapter = os.path.join(folder, "adapter")
    interop.save_adapter(adapter, params, lora_config, base_model_name_or_path="tiny-llama")
    print(f"saved {sorted(os.listdir(adapter))}")

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(folder, "base"))
    peft_model = peft.PeftModel.from_pretrained(torch_model, adapter).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor(np.asarray(sequence[:, :-1]))).logits.argmax(-1).numpy()[0]
    ours = np.asarray(lorax.apply(graphdef, params, sequence[:, :-1]).argmax(-1))[0]
    base_predictions = np.asarray(lorax.apply(graphdef, base, sequence[:, :-1]).argmax(-1))[0]

    print(f"{'target':>8} {'lorax':>6} {'peft':>6} {'base':>6}")
    for target, a, b, c in zip(np.asarray(sequence)[0, 1:], ours, theirs, base_predictions):
        print(f"{target:>8} {a:>6} {b:>6} {c:>6}")
    print(f"lorax and PeftModel agree on {int((ours == theirs).sum())}/{len(ours)} next tokens; "
          f"the base model alone gets {int((base_predictions == np.asarray(sequence)[0, 1:]).sum())} right")


if __name__ == "__main__":
    main()
