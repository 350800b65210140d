"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=8: a LoRA train step on a
(data, fsdp) mesh equals the same step on one device, and so does a QLoRA step whose NF4 bases
are sharded in their packed form, and interop.from_pretrained(..., mesh=) loads onto a mesh.
Prints one line per check."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lorax
from lorax.models import LlamaConfig, LlamaForCausalLM
from lorax.nf4 import QuantConfig
from lorax.sharding import batch_sharding, make_mesh, shard_params

jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 8, jax.devices()

config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
graphdef, base = lorax.split(LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
params = lorax.lora(base, lorax.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False), key=jax.random.key(1))
ids = jax.random.randint(jax.random.key(2), (8, 16), 0, 128)
opt = lorax.optimizer(optax.adamw(1e-2), params)


def step(trainable, frozen, state, ids):
    def loss(t):
        logits = lorax.apply(graphdef, lorax.combine(t, frozen), ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    value, grads = jax.value_and_grad(loss)(trainable)
    updates, state = opt.update(grads, state, trainable)
    return optax.apply_updates(trainable, updates), state, value


MESHES = [(8, 1, False), (1, 8, False), (2, 4, True)]


def run(params, ids, steps=2):
    trainable, frozen = lorax.partition(params)
    state = opt.init(trainable)
    jitted = jax.jit(step)
    for _ in range(steps):
        trainable, state, value = jitted(trainable, frozen, state, ids)
    return trainable, value, frozen


single = jax.devices()[0]
reference, reference_loss, _ = run(jax.device_put(params, single), jax.device_put(ids, single))
for data, fsdp, shard_adapters in MESHES:
    mesh = make_mesh(data=data, fsdp=fsdp)
    trainable, loss, frozen = run(shard_params(params, mesh, shard_adapters=shard_adapters),
                                  jax.device_put(ids, batch_sharding(mesh)))
    np.testing.assert_allclose(loss, reference_loss, rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), trainable, reference)
    kernel = frozen["model"]["layers"]["*"]["mlp"]["up_proj"]["kernel"]
    shards = {shard.data.shape for shard in kernel.addressable_shards}
    expected = {(2, 64, 128 // fsdp)} if fsdp > 1 else {(2, 64, 128)}
    assert shards == expected, (shards, expected)
    print(f"data={data} fsdp={fsdp} shard_adapters={shard_adapters}: equal to one device; "
          f"frozen kernel shards {sorted(shards)}")

# QLoRA: the adapted bases are NF4 (double quantization); the packed bytes are what FSDP splits.
# One mesh with both axes (each mesh compiles its own step, and the suite has a time budget).
qparams = lorax.lora(base, lorax.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False), key=jax.random.key(1),
                     quantize=QuantConfig("nf4", double_quant=True))
reference, reference_loss, _ = run(jax.device_put(qparams, single), jax.device_put(ids, single))
for data, fsdp, shard_adapters in MESHES[2:]:
    mesh = make_mesh(data=data, fsdp=fsdp)
    trainable, loss, frozen = run(shard_params(qparams, mesh, shard_adapters=shard_adapters),
                                  jax.device_put(ids, batch_sharding(mesh)))
    np.testing.assert_allclose(loss, reference_loss, rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), trainable, reference)
    packed = frozen["model"]["layers"]["*"]["mlp"]["down_proj"]["kernel"].w.packed
    shards = {shard.data.shape for shard in packed.addressable_shards}
    expected = {(2, packed.shape[1] // fsdp)}
    assert shards == expected, (shards, expected)
    print(f"QLoRA data={data} fsdp={fsdp} shard_adapters={shard_adapters}: equal to one device; "
          f"packed 4-bit shards {sorted(shards)}")
# Loading straight onto a mesh: every device receives its slices only, and the model is the one
# from_pretrained gives on one device.
import tempfile  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

import interop  # noqa: E402

with tempfile.TemporaryDirectory() as folder:
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).save_pretrained(folder)
    mesh = make_mesh(data=2, fsdp=4)
    _, sharded = lorax.split(interop.from_pretrained(folder, progress=False, mesh=mesh))
    _, plain = lorax.split(interop.from_pretrained(folder, progress=False))
kernel = sharded["model"]["layers"]["*"]["mlp"]["up_proj"]["kernel"]
shards = {shard.data.shape for shard in kernel.addressable_shards}
assert shards == {(2, 64, 128 // 4)}, shards
assert kernel.sharding == shard_params(plain, mesh)["model"]["layers"]["*"]["mlp"]["up_proj"]["kernel"].sharding
jax.tree_util.tree_map(np.testing.assert_array_equal, sharded, plain)  # the same model, placed differently
print(f"from_pretrained data=2 fsdp=4: equal to one device; kernel shards {sorted(shards)}")
sys.exit(0)
