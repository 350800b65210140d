"""Training: an optimizer that only holds state for trainable leaves, loss functions, a jitted
train step over the trainable half of a LoRA tree, and a `fit` loop with a progress bar,
JSONL logs, a loss-curve PNG and resumable orbax checkpoints.

>>> trainable, frozen = lorax.partition(params)
>>> tx = default_tx(1e-3, total_steps=100)
>>> state = TrainState.create(trainable, tx, jax.random.key(0))
>>> step = make_train_step(graphdef, frozen, tx, causal_lm_loss)
>>> state, metrics = step(state, {"input_ids": input_ids, "attention_mask": jnp.ones_like(input_ids)})
>>> sorted(metrics)
['grad_norm', 'learning_rate', 'loss']
"""

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from lorax.apply import ModelDef, apply
from lorax.errors import LoraError
from lorax.transform import combine, trainable_mask

TRAINABLE, FROZEN = "trainable", "frozen"
IGNORE_INDEX = -100  # transformers' label for "no loss here"


def _labels(params: Any) -> Any:
    return jax.tree_util.tree_map(lambda trained: TRAINABLE if trained else FROZEN, trainable_mask(params))


def optimizer(tx: optax.GradientTransformation, params: Any) -> optax.GradientTransformation:
    """Wrap `tx` so that it updates the trainable leaves of a LoRA tree and nothing else.

    Works on the full tree (frozen leaves get zero updates and no state) and on the
    `trainable` half of `lorax.partition(params)` (the cheap way: the frozen base is never
    differentiated, copied or written).

    Args:
        tx: any optax transformation (adamw, a chain with clipping and a schedule, ...).
        params: the LoRA tree, to check that something is trainable.

    Returns:
        An optax GradientTransformation.

    Example:
        >>> opt = lorax.optimizer(optax.adamw(1e-3), params)
        >>> trainable, frozen = lorax.partition(params)
        >>> opt_state = opt.init(trainable)
        >>> grads = jax.tree_util.tree_map(jnp.ones_like, trainable)        # None (frozen) leaves stay None
        >>> updates, opt_state = opt.update(grads, opt_state, trainable)
    """
    require_trainable(params)
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, _labels)


def require_trainable(params: Any) -> None:
    """Raise LoraError unless `params` has something to train (an optimizer over nothing is a mistake)."""
    if not any(jax.tree_util.tree_leaves(trainable_mask(params))):
        raise LoraError("params have no trainable leaves: call lorax.lora(params, config, key=...) first")


def default_tx(learning_rate: float, total_steps: int, *, warmup_steps: int | None = None, weight_decay: float = 0.0,
               clip_norm: float | None = 1.0, accumulation_steps: int = 1) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay, global-norm clipping, and optional gradient
    accumulation (optax.MultiSteps: one update every `accumulation_steps` calls). The learning
    rate is kept in the optimizer state (optax.inject_hyperparams), so the train step reports
    the rate of each update and `fit` shows and logs it.

    `total_steps` and `warmup_steps` count train-step calls, as `fit(steps=...)` does; with
    accumulation the schedule advances once per update, so it spans total_steps //
    accumulation_steps updates (warmup likewise), and its cosine ends with the run, as
    transformers' get_cosine_schedule_with_warmup over the Trainer's optimizer steps does. The
    accumulated gradient is the mean of the micro-batches' gradients, each micro-batch's mean loss
    counting equally (transformers' Trainer weights them by their label tokens instead).
    """
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise LoraError(f"accumulation_steps must be a positive integer, got {accumulation_steps!r}")
    warmup = warmup_steps if warmup_steps is not None else max(1, total_steps // 10)
    updates = max(1, total_steps // accumulation_steps)
    warmup = max(1, warmup // accumulation_steps) if warmup else 0
    # Warmup starts at lr/warmup, not 0: a first update with learning rate 0 would be wasted.
    schedule = optax.warmup_cosine_decay_schedule(learning_rate / max(warmup, 1), learning_rate, warmup,
                                                  max(updates, warmup + 1))
    tx = optax.inject_hyperparams(optax.adamw)(learning_rate=schedule, weight_decay=weight_decay)
    if clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    return optax.MultiSteps(tx, accumulation_steps) if accumulation_steps > 1 else tx


def learning_rate_of(opt_state: Any) -> jax.Array | None:
    """The learning rate of the latest update, when the optimizer keeps it in its state
    (`optax.inject_hyperparams`, as `default_tx` does); None otherwise.

    >>> tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)
    >>> float(learning_rate_of(tx.init({"w": jnp.zeros(2)})))
    0.5
    """
    return optax.tree_utils.tree_get(opt_state, "learning_rate",
                                     filtering=lambda path, value: isinstance(value, jax.Array))


def _next_tokens(batch: dict) -> tuple[jax.Array, jax.Array]:
    """(labels, weights), both (batch, seq - 1): the token each position predicts (0 where it
    does not count) and whether it counts (label not -100, attention_mask not 0)."""
    labels = batch.get("labels", batch["input_ids"])[:, 1:]
    weights = labels != IGNORE_INDEX
    if "attention_mask" in batch:
        weights &= batch["attention_mask"][:, 1:].astype(bool)
    return jnp.where(weights, labels, 0), weights


def causal_lm_loss(logits: jax.Array, batch: dict) -> jax.Array:
    """Mean next-token cross-entropy (fp32). Tokens whose label is -100, or whose
    attention_mask is 0, do not count. Labels default to input_ids (shifted here)."""
    labels, weights = _next_tokens(batch)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), labels)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1)


def chunked_causal_lm_loss(hidden: jax.Array, logits_fn: Callable[[jax.Array], jax.Array], batch: dict,
                           chunk_size: int) -> jax.Array:
    """`causal_lm_loss(logits_fn(hidden), batch)`, without ever holding the whole logits.

    The output head and the cross-entropy run `chunk_size` positions at a time (a `lax.scan`),
    each chunk under `jax.checkpoint`: the forward pass keeps one chunk's logits, and the
    backward pass recomputes each chunk's logits before taking their gradient. The full
    (batch, seq, vocab) logits and their gradient (with a 32,000-token vocabulary in fp32,
    2 x 128 KB per position) are never materialised; the price is a second pass of the head.

    Args:
        hidden: (batch, seq, hidden) final hidden states.
        logits_fn: the output head, (batch, n, hidden) -> (batch, n, vocab).
        batch: input_ids, and optionally labels and attention_mask, as for `causal_lm_loss`.
        chunk_size: positions per chunk; seq - 1 is padded up to a multiple (padding does not count).

    Returns:
        The same scalar as `causal_lm_loss` (up to the order of the fp32 sum).

    Example:
        >>> h = model.hidden_states(input_ids)                        # (1, 8, hidden), model: a Llama
        >>> loss = chunked_causal_lm_loss(h, model.logits, {"input_ids": input_ids}, 4)
        >>> bool(jnp.allclose(loss, causal_lm_loss(model(input_ids), {"input_ids": input_ids}), rtol=1e-5))
        True
    """
    labels, weights = _next_tokens(batch)
    batch_size, positions = labels.shape
    chunks = -(-positions // chunk_size)
    pad = chunks * chunk_size - positions

    def split(x):  # (batch, positions, ...) -> (chunks, batch, chunk_size, ...)
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(batch_size, chunks, chunk_size, *x.shape[2:]), 1, 0)

    # prevent_cse=False: inside a scan the recomputation cannot be merged with the forward pass.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_loss(hidden, labels, weights):
        losses = optax.softmax_cross_entropy_with_integer_labels(logits_fn(hidden).astype(jnp.float32), labels)
        return jnp.sum(losses * weights)

    def add_chunk(total, chunk):
        return total + chunk_loss(*chunk), None

    total, _ = jax.lax.scan(add_chunk, jnp.zeros((), jnp.float32),
                            (split(hidden[:, :-1]), split(labels), split(weights)))
    return total / jnp.maximum(jnp.sum(weights), 1)


def classification_loss(logits: jax.Array, batch: dict) -> jax.Array:
    """Mean cross-entropy of (batch, classes) logits against integer `labels`."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["labels"]).mean()


def model_inputs(batch: dict) -> dict:
    """The keyword arguments a model takes from a batch (labels are for the loss)."""
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids", "position_ids")}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything that changes during training: the trainable half, optimizer state, step, rng."""

    trainable: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array

    @classmethod
    def create(cls, trainable: Any, tx: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
        """A fresh state. The train step donates its state (its buffers become the new state's),
        so `trainable` and `rng` are copied here: the caller's params and key stay usable."""
        trainable, rng = jax.tree_util.tree_map(jnp.copy, (trainable, rng))
        return cls(trainable, tx.init(trainable), jnp.zeros((), jnp.int32), rng)


def make_train_step(model, frozen: Any, tx: optax.GradientTransformation, loss_fn: Callable, *,
                    remat: bool = False, loss_chunk_size: int | None = None) -> Callable:
    """A jitted `step(state, batch) -> (state, metrics)`.

    Args:
        model: a graphdef from `lorax.split` (or any `fn(params, **inputs)`).
        frozen: the frozen half of `lorax.partition(params)`; closed over, never differentiated.
        tx: the optax transformation (e.g. `lorax.optimizer(default_tx(...), params)`).
        loss_fn: `loss_fn(logits, batch) -> scalar`, e.g. `causal_lm_loss`.
        remat: gradient checkpointing, for an NNX model whose layers support it (a `remat`
            attribute: the Llama, GPT-2 and BERT models of `lorax.models`). The backward pass keeps each
            layer's input and recomputes the rest of the layer, one layer at a time: activation
            memory drops from every intermediate of every layer to one (batch, seq, hidden)
            array per layer, for about one more forward pass of compute.
        loss_chunk_size: with `loss_fn=causal_lm_loss` and a model that has `hidden_states` and
            `logits` methods (`LlamaForCausalLM`, `GPT2LMHeadModel`): compute the output head and the loss this many
            positions at a time (`chunked_causal_lm_loss`), so the (batch, seq, vocab) logits and
            their gradient never exist whole. Same loss and gradients, one more pass of the head.

    The state is donated: its buffers are reused for the new state. The frozen half is passed
    to the compiled step as an argument on every call (never baked into the program).
    lora_dropout draws its randomness from `fold_in(state.rng, state.step)`, so a resumed run
    repeats it exactly.

    Example:
        >>> trainable, frozen = lorax.partition(params)
        >>> tx = lorax.optimizer(optax.adamw(1e-3), params)
        >>> step = make_train_step(graphdef, frozen, tx, causal_lm_loss, remat=True, loss_chunk_size=4)
    """
    if loss_chunk_size is not None and loss_fn is not causal_lm_loss:
        raise LoraError(f"loss_chunk_size={loss_chunk_size} chunks causal_lm_loss only (got loss_fn={loss_fn!r}); "
                        "leave loss_chunk_size=None for other losses")
    module_loss = None
    if remat or loss_chunk_size is not None:
        module_loss = functools.partial(_module_loss, _model_def(model, remat, loss_chunk_size), loss_fn, remat,
                                        loss_chunk_size)

    def loss(trainable, frozen, batch, key):
        params = combine(trainable, frozen)
        if module_loss is not None:
            return apply(module_loss, params, batch, dropout_key=key)
        return loss_fn(apply(model, params, dropout_key=key, **model_inputs(batch)), batch)

    def step(state: TrainState, frozen: Any, batch: dict):
        key = jax.random.fold_in(state.rng, state.step)
        value, grads = jax.value_and_grad(loss)(state.trainable, frozen, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": value, "grad_norm": optax.global_norm(grads)}
        rate = learning_rate_of(opt_state)
        if rate is not None:
            metrics["learning_rate"] = rate
        return TrainState(trainable, opt_state, state.step + 1, state.rng), metrics

    # `frozen` is an argument of the compiled step, never a closed-over constant: jit would
    # otherwise embed the whole frozen base in the program as literals.
    jitted = jax.jit(step, donate_argnums=0)

    def train_step(state: TrainState, batch: dict):
        return jitted(state, frozen, batch)

    train_step.jitted = jitted  # e.g. train_step.jitted.lower(state, frozen, batch) for cost analysis
    return train_step


def _model_def(model, remat: bool, loss_chunk_size: int | None) -> ModelDef:
    if isinstance(model, nnx.GraphDef):
        return ModelDef(model)
    if not isinstance(model, ModelDef):
        raise LoraError(f"make_train_step(remat={remat}, loss_chunk_size={loss_chunk_size}) needs an NNX model "
                        "from lorax.split (e.g. lorax.models.LlamaForCausalLM), not a plain function; for a plain "
                        "function, wrap its layer body in jax.checkpoint yourself and leave both options off")
    return model


def _module_loss(model: ModelDef, loss_fn: Callable, remat: bool, loss_chunk_size: int | None, params: Any,
                 batch: dict) -> jax.Array:
    """The loss of `batch`, run by `apply` (LoRA and NF4 leaves are implicit arrays in here)."""
    module = model.module(params)
    if remat:
        # The NNX idiom of `set_attributes(deterministic=True)`: the model's layer scan checkpoints.
        try:
            module.set_attributes(remat=True)
        except ValueError as error:
            raise LoraError(f"make_train_step(remat=True): {type(module).__name__} has no module with a `remat` "
                            "attribute (models that have one: the Llama, GPT-2 and BERT models of lorax.models); "
                            "use remat=False") from error
    inputs = model_inputs(batch)
    if loss_chunk_size is None:
        return loss_fn(module(**inputs), batch)
    if not (hasattr(module, "hidden_states") and hasattr(module, "logits")):
        raise LoraError(f"make_train_step(loss_chunk_size={loss_chunk_size}): {type(module).__name__} has no "
                        "`hidden_states` and `logits` methods (models that have them: "
                        "lorax.models.LlamaForCausalLM, GPT2LMHeadModel); use loss_chunk_size=None")
    return chunked_causal_lm_loss(module.hidden_states(**inputs), module.logits, batch, loss_chunk_size)


def make_eval_step(model, frozen: Any, loss_fn: Callable) -> Callable:
    """A jitted `eval_step(trainable, batch) -> (loss, logits)` without dropout."""

    @jax.jit
    def evaluate(trainable, frozen, batch):
        logits = apply(model, combine(trainable, frozen), **model_inputs(batch))
        return loss_fn(logits, batch), logits

    def eval_step(trainable, batch):
        return evaluate(trainable, frozen, batch)

    return eval_step


def batches(data: dict, batch_size: int, *, seed: int = 0, start: int = 0) -> Iterator[dict]:
    """Endless shuffled batches of a dict of equal-length arrays, each epoch in a fresh order.
    Batch number `i` depends only on (seed, i): resuming from `start` gives the same batches."""
    size = len(next(iter(data.values())))
    per_epoch = size // batch_size
    if per_epoch == 0:
        raise LoraError(f"batch_size {batch_size} is larger than the dataset ({size} examples)")
    index = start
    while True:
        epoch, position = divmod(index, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(size)
        rows = order[position * batch_size:(position + 1) * batch_size]
        yield {k: np.asarray(v)[rows] for k, v in data.items()}
        index += 1


class Checkpoints:
    """Resumable training checkpoints with orbax: the trainable half, optimizer state, step and
    rng (the frozen base is not written again). Keeps the last `keep`; orbax writes each to a
    temporary folder and renames it when complete, so a killed save leaves the previous one."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    @staticmethod
    def _flat(state: TrainState) -> dict:
        # Leaves by index: a plain dict orbax can write whatever the tree holds (None halves, LoraArrays).
        leaves = jax.tree_util.tree_leaves((state.trainable, state.opt_state))
        return {"leaves": {str(i): leaf for i, leaf in enumerate(leaves)}, "step": state.step,
                "rng": jax.random.key_data(state.rng)}

    def save(self, state: TrainState) -> None:
        self.manager.save(int(state.step), args=self._ocp.args.StandardSave(self._flat(state)))
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, like: TrainState, step: int | None = None) -> TrainState:
        """The saved state, shaped like `like` (a freshly created TrainState)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise LoraError(f"no checkpoint to resume from in {self.manager.directory}")
        restored = self.manager.restore(step, args=self._ocp.args.StandardRestore(self._flat(like)))
        treedef = jax.tree_util.tree_structure((like.trainable, like.opt_state))
        leaves = [restored["leaves"][str(i)] for i in range(treedef.num_leaves)]
        trainable, opt_state = jax.tree_util.tree_unflatten(treedef, leaves)
        return TrainState(trainable, opt_state, jnp.asarray(restored["step"], jnp.int32),
                          jax.random.wrap_key_data(restored["rng"]))


def fit(step_fn: Callable, state: TrainState, data: dict, *, steps: int, batch_size: int, seed: int = 0,
        eval_fn: Callable | None = None, eval_every: int = 0, log_dir: str | os.PathLike | None = None,
        checkpoints: Checkpoints | None = None, save_every: int = 0, learning_rate: Callable | None = None,
        progress: bool = True) -> TrainState:
    """Train for `steps` steps (counted from state.step, so a restored state continues where it stopped).

    Args:
        step_fn: from `make_train_step`.
        state: a TrainState (fresh, or from `Checkpoints.restore`).
        data: a dict of equal-length arrays (input_ids, attention_mask, labels, ...).
        steps: the total number of steps of the run.
        batch_size, seed: batching (see `batches`); the data position is the step.
        eval_fn: `eval_fn(state) -> dict of metrics`, called every `eval_every` steps and at the end.
        log_dir: where `log.jsonl` (one line per step) and `curves.png` go.
        checkpoints, save_every: save every `save_every` steps and at the end.
        learning_rate: the schedule, to log and plot the learning rate (by default, the rate the
            step reports: see `learning_rate_of`).
    """
    log = None
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        log = open(Path(log_dir) / "log.jsonl", "a")
    start = int(state.step)
    data_iter = batches(data, batch_size, seed=seed, start=start)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="training", disable=not progress)
    history = []
    try:
        for step in bar:
            batch = next(data_iter)
            began = time.perf_counter()
            state, metrics = step_fn(state, batch)
            loss = float(metrics["loss"])  # one host sync per step, outside the jitted step
            tokens = int(np.prod(batch["input_ids"].shape)) if "input_ids" in batch else batch_size
            record = {"step": step + 1, "loss": loss, "grad_norm": float(metrics["grad_norm"]),
                      "tokens_per_s": tokens / (time.perf_counter() - began)}
            if learning_rate is not None:
                record["learning_rate"] = float(learning_rate(step))
            elif "learning_rate" in metrics:
                record["learning_rate"] = float(metrics["learning_rate"])
            if eval_fn is not None and eval_every and (step + 1) % eval_every == 0:
                record.update({f"eval_{k}": float(v) for k, v in eval_fn(state).items()})
            bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "learning_rate", "tokens_per_s")},
                            refresh=False)
            history.append(record)
            if log is not None:
                log.write(json.dumps(record) + "\n")
            if checkpoints is not None and save_every and (step + 1) % save_every == 0:
                checkpoints.save(state)
    finally:
        bar.close()
        if log is not None:
            log.close()
    if checkpoints is not None and int(state.step) != checkpoints.latest_step():
        checkpoints.save(state)
    if log_dir is not None and history:
        plot_curves(history, Path(log_dir) / "curves.png")
    return state


def plot_curves(history: list[dict], path: Path) -> Path | None:
    """Loss (and learning rate) against step, as a PNG; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["step"] for r in history]
    figure, axes = plt.subplots(1, 2 if "learning_rate" in history[0] else 1, figsize=(10, 4), squeeze=False)
    axes[0][0].plot(steps, [r["loss"] for r in history], label="train loss")
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if evals:
        axes[0][0].plot(*zip(*evals), "o-", label="eval loss")
    axes[0][0].set(xlabel="step", ylabel="loss", title="loss")
    axes[0][0].legend()
    if "learning_rate" in history[0]:
        axes[0][1].plot(steps, [r["learning_rate"] for r in history])
        axes[0][1].set(xlabel="step", ylabel="learning rate", title="learning rate")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
