"""FLOPs of one training step, LoRA (r=8) vs full fine-tuning, from XLA's cost analysis.

Model: a 2-layer MLP 1024 -> 1024 -> 1024 (bias, relu in between) on 4096 tokens,
loss = mean squared error against a fixed target, one optax adamw update. The LoRA step
differentiates only the trainable half of `lorax.partition(params)`, as a real training
loop does.

Why ~0.6 is the floor: with T tokens and d = 1024, each d x d matmul costs 2*T*d*d FLOPs.
Full fine-tuning does 2 forward matmuls, 2 weight-gradient matmuls and 1 input-gradient
matmul (layer 2's, to reach layer 1; layer 1's input needs no gradient): 5 units. LoRA
skips both weight gradients of the frozen kernels but still needs layer 2's input
gradient: 3 units, plus the rank-8 adapter matmuls (about 8/1024 of a unit each). So the
ratio is a little above 3/5.

Run it (CPU is fine: nothing is executed, only compiled):

    python benchmarks/flops.py

The last line is `lora_over_full_flops=<ratio>`.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import lorax

TOKENS, WIDTH, RANK = 4096, 1024, 8


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
        self.fc2 = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


def flops_of(step, *args) -> float:
    cost = jax.jit(step).lower(*args).compile().cost_analysis()
    # Older jax returns one dict per device program in a list; newer returns the dict.
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])


def main():
    graphdef, params = lorax.split(MLP(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (TOKENS, WIDTH))
    target = jax.random.normal(jax.random.key(2), (TOKENS, WIDTH))

    def loss_fn(params):
        return jnp.mean((lorax.apply(graphdef, params, x) - target) ** 2)

    tx = optax.adamw(1e-3)

    def full_step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    full = flops_of(full_step, params, tx.init(params))

    lora_params = lorax.lora(params, lorax.LoraConfig(r=RANK, target_modules=["fc1", "fc2"]), key=jax.random.key(3))
    trainable, frozen = lorax.partition(lora_params)
    opt = lorax.optimizer(tx, lora_params)

    # `frozen` is an argument, not a closure constant, so XLA cannot fold it away and the
    # count reflects a real step where the base weights live in device memory.
    def lora_step(trainable, frozen, opt_state):
        loss, grads = jax.value_and_grad(lambda t: loss_fn(lorax.combine(t, frozen)))(trainable)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    lora = flops_of(lora_step, trainable, frozen, opt.init(trainable))

    unit = 2 * TOKENS * WIDTH * WIDTH  # one 4096x1024 @ 1024x1024 matmul
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; MLP {WIDTH}->{WIDTH}->{WIDTH}, {TOKENS} tokens, adamw")
    print(f"{'':6}{'FLOPs':>16}{'d x d matmuls':>16}")
    print(f"{'full':6}{full:>16,.0f}{full / unit:>16.3f}")
    print(f"{'LoRA':6}{lora:>16,.0f}{lora / unit:>16.3f}   (r={RANK} on fc1 and fc2)")
    print(f"lora_over_full_flops={lora / full:.4f}")


if __name__ == "__main__":
    main()
