"""LoRA+: lorax.loraplus_optimizer trains like peft's create_loraplus_optimizer with torch's AdamW
(same groups, learning rates and weight decay), step for step on the same model and data."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer

import lorax
from conftest import jax_tiny, perturb_trained_leaves, peft_model_for, sync_into_peft, torch_to_params
from lorax.loraplus import A, B, B_NO_DECAY, EMBEDDING, FROZEN, loraplus_labels

STEPS = 3
SETTINGS = dict(learning_rate=2e-3, loraplus_lr_ratio=16, loraplus_lr_embedding=3e-3, loraplus_weight_decay=0.1)


@pytest.mark.parametrize("use_dora", [False, True])
def test_training_follows_peft(torch_tiny, use_dora):
    """Embeddings, linear LoRA (DoRA magnitudes too), trained biases and a modules_to_save head:
    every group moves at its own rate, and after a few AdamW steps both sides hold the same weights."""
    config = dict(r=2, target_modules=["embed_tokens", "q_proj", "up_proj"], modules_to_save=["lm_head"],
                  bias="lora_only", use_dora=use_dora, init_lora_weights=False)
    params = lorax.lora(torch_to_params(torch_tiny), lorax.LoraConfig(**config), key=jax.random.key(1))
    params = perturb_trained_leaves(params, jax.random.key(2))
    peft_model = peft_model_for(torch_tiny, **config)
    sync_into_peft(params, peft_model)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    weights = torch.rand(2, 7, 50, generator=torch.Generator().manual_seed(1))

    torch_opt = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=SETTINGS["learning_rate"],
                                          loraplus_lr_ratio=SETTINGS["loraplus_lr_ratio"],
                                          loraplus_lr_embedding=SETTINGS["loraplus_lr_embedding"],
                                          loraplus_weight_decay=SETTINGS["loraplus_weight_decay"])
    peft_model.train()
    for _ in range(STEPS):
        torch_opt.zero_grad()
        (peft_model(ids) * weights).sum().backward()
        torch_opt.step()

    tx = lorax.loraplus_optimizer(params, **SETTINGS)
    trainable, frozen = lorax.partition(params)
    state = tx.init(trainable)
    loss = lambda t: (lorax.apply(jax_tiny, lorax.combine(t, frozen), jnp.asarray(ids.numpy())) * weights.numpy()).sum()

    @jax.jit
    def step(trainable, state):
        updates, state = tx.update(jax.grad(loss)(trainable), state, trainable)
        return optax.apply_updates(trainable, updates), state

    for _ in range(STEPS):
        trainable, state = step(trainable, state)
    trained = lorax.combine(trainable, frozen)

    theirs = dict(peft_model.named_parameters())
    pairs = {
        "model.embed_tokens.lora_embedding_B.default": trained["model"]["embed_tokens"]["embedding"].b.T,
        "model.layers.1.self_attn.q_proj.lora_A.default.weight": trained["model"]["layers"][1]["self_attn"]["q_proj"]["kernel"].a.T,
        "model.layers.1.self_attn.q_proj.lora_B.default.weight": trained["model"]["layers"][1]["self_attn"]["q_proj"]["kernel"].b.T,
        "model.layers.1.self_attn.q_proj.base_layer.bias": trained["model"]["layers"][1]["self_attn"]["q_proj"]["bias"].value,
        "lm_head.modules_to_save.default.weight": trained["lm_head"]["kernel"].value.T,
    }
    if use_dora:
        pairs["model.layers.2.mlp.up_proj.lora_magnitude_vector.default.weight"] = \
            trained["model"]["layers"][2]["mlp"]["up_proj"]["kernel"].m
    start = params["model"]["layers"][1]["self_attn"]["q_proj"]
    starts = {"model.layers.1.self_attn.q_proj.lora_B.default.weight": np.asarray(start["kernel"].b.T),
              "model.layers.1.self_attn.q_proj.base_layer.bias": np.asarray(start["bias"].value)}
    for name, ours in pairs.items():
        before = starts.get(name)
        np.testing.assert_allclose(np.asarray(ours), theirs[f"base_model.model.{name}"].detach().numpy(),
                                   rtol=1e-3, atol=1e-4, err_msg=name)  # Adam (B at lr 0.032) amplifies float noise
        assert before is None or np.abs(np.asarray(ours) - before).max() > 1e-4, f"{name} must have moved"
    with torch.no_grad():
        np.testing.assert_allclose(lorax.apply(jax_tiny, trained, jnp.asarray(ids.numpy())),
                                   peft_model(ids).detach().numpy(), rtol=1e-3, atol=1e-3)


def test_groups(torch_tiny):
    params = lorax.lora(torch_to_params(torch_tiny), lorax.LoraConfig(
        r=2, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"], bias="lora_only", use_dora=True),
        key=jax.random.key(0))
    labels = loraplus_labels(params)
    q = labels["model"]["layers"][0]["self_attn"]["q_proj"]
    assert (q["kernel"].a, q["kernel"].b, q["kernel"].m, q["kernel"].w) == (A, B, B, FROZEN)
    assert q["bias"].value == B_NO_DECAY
    embed = labels["model"]["embed_tokens"]["embedding"]
    assert (embed.a, embed.b, embed.m) == (EMBEDDING, EMBEDDING, B)
    assert labels["lm_head"]["kernel"].value == A and labels["lm_head"]["kernel"].original == FROZEN
    assert labels["model"]["layers"][0]["mlp"]["up_proj"]["kernel"] == FROZEN


def test_groups_of_stacked_layers_are_peft_groups(tmp_path):
    """A model from interop.from_pretrained stores its layers stacked (`model.layers.*`): a stacked
    bias is 2-D but one bias per layer, so it is in peft's no-decay B group (before: group A, at
    1/16 of peft's rate and decayed), and a stacked norm copy in group B. Each leaf's rate and
    decay are those of the group peft puts every layer's parameter in."""
    import transformers

    import interop

    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    fields = dict(r=2, target_modules=["q_proj"], bias="lora_only", modules_to_save=["input_layernorm"])
    params = lorax.lora(lorax.split(interop.from_pretrained(tmp_path, progress=False))[1], lorax.LoraConfig(**fields),
                        key=jax.random.key(0))
    peft_model = peft.get_peft_model(transformers.Qwen2ForCausalLM.from_pretrained(tmp_path), peft.LoraConfig(**fields))
    torch_opt = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=SETTINGS["learning_rate"],
                                          loraplus_lr_ratio=SETTINGS["loraplus_lr_ratio"],
                                          loraplus_lr_embedding=SETTINGS["loraplus_lr_embedding"],
                                          loraplus_weight_decay=SETTINGS["loraplus_weight_decay"])
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in torch_opt.param_groups for p in g["params"]}
    theirs = {name: by_id[id(p)] for name, p in peft_model.named_parameters() if p.requires_grad}
    ratio, decay = SETTINGS["loraplus_lr_ratio"], SETTINGS["loraplus_weight_decay"]
    rates = {A: (SETTINGS["learning_rate"], decay), B: (SETTINGS["learning_rate"] * ratio, decay),
             B_NO_DECAY: (SETTINGS["learning_rate"] * ratio, 0.0)}
    labels = loraplus_labels(params)["model"]["layers"]["*"]
    ours = {"self_attn.q_proj.lora_A.default.weight": labels["self_attn"]["q_proj"]["kernel"].a,
            "self_attn.q_proj.lora_B.default.weight": labels["self_attn"]["q_proj"]["kernel"].b,
            "self_attn.q_proj.base_layer.bias": labels["self_attn"]["q_proj"]["bias"].value,
            "input_layernorm.modules_to_save.default.weight": labels["input_layernorm"]["weight"].value}
    for layer in range(config.num_hidden_layers):
        for name, label in ours.items():
            assert rates[label] == pytest.approx(theirs[f"base_model.model.model.layers.{layer}.{name}"]), name
    assert len(theirs) == len(ours) * config.num_hidden_layers


def test_a_schedule_must_also_schedule_adapted_embeddings(torch_tiny):
    """A torch scheduler scales every group, the embeddings' too; a constant embedding rate beside a
    scheduled one would silently differ from that, so it is refused where embeddings are adapted."""
    schedule = optax.linear_schedule(0.0, 2e-3, 4)
    params = lorax.lora(torch_to_params(torch_tiny), lorax.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]),
                        key=jax.random.key(0))
    with pytest.raises(lorax.LoraConfigError, match="loraplus_lr_embedding a constant, and embeddings are adapted"):
        lorax.loraplus_optimizer(params, learning_rate=schedule, loraplus_lr_ratio=16)
    lorax.loraplus_optimizer(params, learning_rate=schedule, loraplus_lr_ratio=16,
                             loraplus_lr_embedding=lambda step: 1e-6 * schedule(step) / 2e-3)
    plain = lorax.lora(torch_to_params(torch_tiny), lorax.LoraConfig(r=2, target_modules=["q_proj"]), key=jax.random.key(0))
    lorax.loraplus_optimizer(plain, learning_rate=schedule, loraplus_lr_ratio=16)
