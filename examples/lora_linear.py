"""LoRA on a single 768x768 linear layer: ~2% of the parameters, and a no-op at init.

The worked example from the LoRA notes: a 768x768 layer with bias at rank 8 has
589,824 + 768 frozen parameters and only 8*768 + 8*768 = 12,288 trainable ones.
Because B starts at zero, the adapted layer computes exactly what the base layer does.

Run it:

    python examples/lora_linear.py

Expected output:

    12288 602880 2.04
    True
"""

import jax
import jax.numpy as jnp
from flax import nnx

import lorax


class Wrapped(nnx.Module):
    # A bare nnx.Linear splits into {"kernel", "bias"} at the root, whose module path is
    # the empty string, and target_modules can only name modules. Giving the layer an
    # attribute name makes it the module "layer".
    def __init__(self, rngs: nnx.Rngs):
        self.layer = nnx.Linear(768, 768, rngs=rngs)

    def __call__(self, x):
        return self.layer(x)


def main():
    graphdef, base = lorax.split(Wrapped(nnx.Rngs(0)))
    params = lorax.lora(base, lorax.LoraConfig(r=8, lora_alpha=16, target_modules=["layer"]), key=jax.random.key(1))

    trainable, total = lorax.count_parameters(params)
    print(trainable, total, round(100 * trainable / total, 2))

    x = jax.random.normal(jax.random.key(2), (2, 768))
    print(bool(jnp.allclose(lorax.apply(graphdef, params, x), lorax.apply(graphdef, base, x))))


if __name__ == "__main__":
    main()
