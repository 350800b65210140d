"""The training loop: the loss equals transformers', resuming from an orbax checkpoint repeats an
uninterrupted run bit for bit, gradient accumulation, logs and curves."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

import interop
import lorax
from lorax.train import (Checkpoints, TrainState, causal_lm_loss, default_tx, fit, learning_rate_of, make_eval_step,
                         make_train_step)

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)


def tiny_llama(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    model.save_pretrained(tmp_path / "base")
    graphdef, base = lorax.split(interop.from_pretrained(tmp_path / "base", progress=False))
    return model, graphdef, base


def dataset(n=32, length=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CONFIG["vocab_size"], (n, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[: n // 2, :3] = 0  # left padding on half the rows
    labels = np.where(mask == 1, ids, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_causal_lm_loss_equals_transformers(tmp_path):
    model, graphdef, base = tiny_llama(tmp_path)
    batch = dataset(n=4)
    # The first real token of a left-padded row is predicted from a padding position, whose
    # logits are arbitrary (both libraries compute junk there, differently): leave it out.
    batch["labels"][:2, 3] = -100
    logits = lorax.apply(graphdef, base, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(batch["input_ids"]).long(),
                       attention_mask=torch.tensor(batch["attention_mask"]).long(),
                       labels=torch.tensor(batch["labels"]).long()).loss.item()
    np.testing.assert_allclose(causal_lm_loss(logits, batch), theirs, rtol=1e-5)


def make_run(graphdef, base, accumulation_steps=1):
    config = lorax.LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    params = lorax.lora(base, config, key=jax.random.key(0))
    trainable, frozen = lorax.partition(params)
    tx = lorax.optimizer(default_tx(1e-2, 8, warmup_steps=2, accumulation_steps=accumulation_steps), params)
    state = TrainState.create(trainable, tx, jax.random.key(1))
    return state, make_train_step(graphdef, frozen, tx, causal_lm_loss), frozen


def test_resume_repeats_an_uninterrupted_run_bit_for_bit(tmp_path):
    _, graphdef, base = tiny_llama(tmp_path)
    data = dataset()
    state, step, _ = make_run(graphdef, base)
    straight = fit(step, state, data, steps=6, batch_size=8, progress=False)

    state, step, _ = make_run(graphdef, base)
    first = fit(step, state, data, steps=3, batch_size=8, progress=False,
                checkpoints=Checkpoints(tmp_path / "ckpt", keep=2))
    del first  # "killed": only the checkpoint survives
    fresh, step, _ = make_run(graphdef, base)
    restored = Checkpoints(tmp_path / "ckpt").restore(fresh)
    assert int(restored.step) == 3
    resumed = fit(step, restored, data, steps=6, batch_size=8, progress=False)
    for a, b in zip(jax.tree_util.tree_leaves((straight.trainable, straight.opt_state)),
                    jax.tree_util.tree_leaves((resumed.trainable, resumed.opt_state))):
        np.testing.assert_array_equal(a, b)


def test_checkpoints_keep_the_last_k_and_hold_no_base(tmp_path):
    _, graphdef, base = tiny_llama(tmp_path)
    state, step, _ = make_run(graphdef, base)
    checkpoints = Checkpoints(tmp_path / "ckpt", keep=2)
    fit(step, state, dataset(), steps=4, batch_size=8, progress=False, checkpoints=checkpoints, save_every=1)
    assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == [3, 4]
    size = sum(f.stat().st_size for f in (tmp_path / "ckpt" / "4").rglob("*") if f.is_file())
    base_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(base))
    assert size < base_bytes  # adapters, adam moments and orbax's metadata; the frozen base is not in it


def test_gradient_accumulation_updates_every_k_steps(tmp_path):
    _, graphdef, base = tiny_llama(tmp_path)
    state, step, _ = make_run(graphdef, base, accumulation_steps=2)
    data = dataset()
    b_of = lambda s: s.trainable["model"]["layers"]["*"]["self_attn"]["q_proj"]["kernel"].b  # noqa: E731
    initial = np.asarray(b_of(state))
    one = fit(step, state, data, steps=1, batch_size=8, progress=False)
    np.testing.assert_array_equal(b_of(one), initial)  # accumulated, not applied yet
    two = fit(step, one, data, steps=2, batch_size=8, progress=False)
    assert not np.array_equal(b_of(two), initial)


def test_fit_logs_evaluates_and_plots(tmp_path):
    _, graphdef, base = tiny_llama(tmp_path)
    state, step, frozen = make_run(graphdef, base)
    data = dataset()
    evaluate = make_eval_step(graphdef, frozen, causal_lm_loss)
    eval_fn = lambda s: {"loss": evaluate(s.trainable, {k: v[:8] for k, v in data.items()})[0]}  # noqa: E731
    final = fit(step, state, data, steps=8, batch_size=8, eval_fn=eval_fn, eval_every=4, log_dir=tmp_path / "logs",
                progress=False)
    records = [json.loads(line) for line in (tmp_path / "logs" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    # The rate each update used, read from the optimizer state: default_tx's warmup + cosine.
    schedule = optax.warmup_cosine_decay_schedule(1e-2 / 2, 1e-2, 2, 8)
    np.testing.assert_allclose([r["learning_rate"] for r in records], [schedule(i) for i in range(8)], rtol=1e-6)
    assert "eval_loss" in records[3] and "eval_loss" in records[7]
    assert records[-1]["loss"] < records[0]["loss"]
    assert (tmp_path / "logs" / "curves.png").stat().st_size > 1000
    assert int(final.step) == 8


def test_train_state_leaves_the_callers_params_alone(tmp_path):
    """The step donates its state; TrainState.create copies, so params and key stay usable."""
    _, graphdef, base = tiny_llama(tmp_path)
    params = lorax.lora(base, lorax.LoraConfig(r=4, target_modules=["q_proj"]), key=jax.random.key(0))
    trainable, frozen = lorax.partition(params)
    tx = lorax.optimizer(default_tx(1e-2, 2), params)
    key = jax.random.key(1)
    state = TrainState.create(trainable, tx, key)
    make_train_step(graphdef, frozen, tx, causal_lm_loss)(state, {"input_ids": jnp.asarray(dataset()["input_ids"][:2])})
    lorax.merge(params)  # would raise "Array has been deleted" had the step consumed the caller's arrays
    jax.random.split(key)


def test_accumulation_schedule_spans_the_updates_as_transformers_does():
    """total_steps counts train-step calls; with accumulation_steps=k there are total_steps / k
    updates, and the cosine spans them (before: it spanned total_steps updates, so the rate never
    decayed). After warmup, each update's rate equals transformers' get_cosine_schedule_with_warmup
    over the optimizer's steps (its warmup starts at 0, ours at lr / warmup)."""
    calls, k, warmup_calls, lr = 16, 2, 4, 1e-2
    tx = default_tx(lr, calls, warmup_steps=warmup_calls, accumulation_steps=k, clip_norm=None)
    params = {"w": jnp.zeros(3)}
    state, rates = tx.init(params), []
    for call in range(calls):
        _, state = tx.update({"w": jnp.ones(3)}, state, params)
        if (call + 1) % k == 0:
            rates.append(float(learning_rate_of(state)))
    torch_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=lr)
    scheduler = transformers.get_cosine_schedule_with_warmup(torch_opt, warmup_calls // k, calls // k)
    theirs = []
    for _ in range(calls // k):
        theirs.append(scheduler.get_last_lr()[0])
        torch_opt.step()
        scheduler.step()
    assert len(rates) == calls // k
    np.testing.assert_allclose(rates[warmup_calls // k:], theirs[warmup_calls // k:], rtol=1e-5, atol=1e-9)
    assert rates[-1] < 0.1 * lr  # decayed by the end of the run


def test_accumulation_steps_must_be_positive():
    with pytest.raises(lorax.LoraError, match="accumulation_steps must be a positive integer, got 0"):
        default_tx(1e-3, 10, accumulation_steps=0)
