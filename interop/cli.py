"""`lorax-jax`: fine-tune, merge and inspect Hugging Face models from the shell.

    lorax-jax inspect  --model DIR [--target-modules q_proj,v_proj --r 8]
    lorax-jax finetune --model DIR --data FILE.jsonl --target-modules q_proj,v_proj --r 8 --alpha 16 --out DIR
    lorax-jax merge    --model DIR --adapter DIR --out DIR

Errors print one line (`lorax-jax: error: ...`) and exit with status 2.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np


def _targets(text: str):
    """"q_proj,v_proj" -> a list; "all-linear" and anything with regex characters stay a string."""
    if text == "all-linear" or any(c in text for c in "*+?[]()|\\^$"):
        return text
    return [name for name in text.split(",") if name]


def _init(text: str) -> bool | str:
    """--init-lora-weights: "true"/"false" as booleans, other names as they are."""
    return {"true": True, "false": False}.get(text.lower(), text)


def _config(args):
    import lorax

    return lorax.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                            target_modules=_targets(args.target_modules), task_type=args.task_type,
                            use_dora=args.use_dora, init_lora_weights=_init(args.init_lora_weights))


def _positive(kind):
    """An argparse type: a number of `kind` above zero (and finite), else argparse's one-line error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not (value > 0 and (kind is int or math.isfinite(value))):
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _load(model_dir: str, dtype: str = "float32"):
    import interop
    import lorax

    model = interop.from_pretrained(model_dir, dtype=dtype)
    graphdef, params = lorax.split(model)
    return model, graphdef, params


def inspect(args) -> None:
    import jax

    import lorax
    from lorax.targets import EXPERTS, expert_modules, modules

    model, _, params = _load(args.model)
    print(f"{type(model).__name__} from {args.model}")
    all_modules = modules(params)
    experts = expert_modules(all_modules)
    for path, module in all_modules.items():
        if module.kind:
            shape = module.leaves[module.weight_leaf].shape[-2:]
            print(f"  {path:<48} {module.kind:<9} {shape}")
        elif path in experts:  # a mixture-of-experts layer's parameters (experts, in, out), peft's target_parameters
            for leaf, value in module.leaves.items():
                print(f"  {path + '.' + leaf:<48} {EXPERTS:<9} {value.shape[-3:]}")
    print(f"parameters: {sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)):,d}")
    if args.target_modules:
        head = getattr(model, "output_head", None)
        moe = getattr(model, "moe_names", None)
        targets = lorax.select_targets(_config(args), params, output_head=head, moe_names=moe)
        print(f"a LoRA config with target_modules={args.target_modules!r} adapts {len(targets)} modules:")
        for target in targets:
            print(f"  {target.path} (r={target.r}, alpha={target.lora_alpha})")
        lorax.print_trainable_parameters(lorax.lora(params, _config(args), key=jax.random.key(0), output_head=head,
                                                    moe_names=moe))


def _records(path: str) -> list[dict]:
    """The JSON objects of a JSONL file, one per non-empty line; a bad line is named by its number."""
    from lorax.errors import LoraError

    records = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise LoraError(f"{path}: not UTF-8 text, as JSONL must be ({error})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise LoraError(f"{path}, line {number}: not valid JSON ({error})") from None
        if not isinstance(record, dict):
            raise LoraError(f"{path}, line {number}: a record must be a JSON object, not {type(record).__name__}")
        records.append((number, record))
    if not records:
        raise LoraError(f"{path} holds no records")
    return records


def _dataset(path: str, model_dir: str, max_length: int, vocab_size: int) -> dict:
    """JSONL records with "input_ids" (token lists) or "text" (tokenized with the model's tokenizer.json).
    Token ids outside the model's vocabulary are refused: JAX would clamp them silently (and train on
    another token), or the loss would turn NaN."""
    from lorax.errors import LoraError

    numbered = _records(path)
    records = [record for _, record in numbered]
    if all("input_ids" in r for r in records):
        for number, record in numbered:
            ids = record["input_ids"]
            if not (isinstance(ids, list) and all(type(i) is int for i in ids)):
                raise LoraError(f"{path}, line {number}: input_ids must be a list of integers")
        sequences = [list(r["input_ids"])[:max_length] for r in records]
    elif all("text" in r for r in records):
        tokenizer_file = Path(model_dir) / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise LoraError(f"{path} has text records but {model_dir} has no tokenizer.json; give input_ids instead")
        for number, record in numbered:
            if not isinstance(record["text"], str):
                raise LoraError(f"{path}, line {number}: text must be a string")
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        sequences = [e.ids[:max_length] for e in tokenizer.encode_batch([r["text"] for r in records])]
    else:
        raise LoraError(f"every record of {path} needs an \"input_ids\" list or a \"text\" string")
    for (number, _), sequence in zip(numbered, sequences):
        if not sequence:
            raise LoraError(f"{path}, line {number}: the record has no tokens")
        outside = [i for i in sequence if not 0 <= i < vocab_size]
        if outside:
            raise LoraError(f"{path}, line {number}: token id {outside[0]} is outside the model's vocabulary "
                            f"(0..{vocab_size - 1})")
    length = max(len(s) for s in sequences)
    ids = np.zeros((len(sequences), length), np.int32)
    mask = np.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)], mask[row, : len(sequence)] = sequence, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100)}


def finetune(args) -> None:
    import jax

    import interop
    import lorax
    from lorax.config import is_decomposition
    from lorax.errors import LoraError
    from lorax.train import Checkpoints, TrainState, causal_lm_loss, default_tx, fit, make_train_step

    model, graphdef, base = _load(args.model, args.dtype)
    if getattr(model, "output_head", None) is None:
        raise LoraError(f"{args.model}: finetune trains causal language models (next-token loss), and this is a "
                        f"{type(model).__name__}; train it with lorax.train and a loss of your own")
    data = _dataset(args.data, args.model, args.max_length, model.config.vocab_size)
    config = _config(args)
    quantize = lorax.QuantConfig(args.quantize, double_quant=True) if args.quantize else None
    params = lorax.lora(base, config, key=jax.random.key(args.seed), output_head=getattr(model, "output_head", None),
                        moe_names=getattr(model, "moe_names", None),
                        quantize=quantize)
    lorax.print_trainable_parameters(params)
    trainable, frozen = lorax.partition(params)
    tx = lorax.optimizer(default_tx(args.lr, args.steps, accumulation_steps=args.accumulation_steps), params)
    state = TrainState.create(trainable, tx, jax.random.key(args.seed + 1))
    out = Path(args.out)
    checkpoints = Checkpoints(out / "checkpoints", keep=args.keep)
    if args.resume:
        state = checkpoints.restore(state)
        print(f"resuming from step {int(state.step)}")
    state = fit(make_train_step(graphdef, frozen, tx, causal_lm_loss, remat=args.remat,
                                 loss_chunk_size=args.loss_chunk_size), state, data, steps=args.steps,
                batch_size=min(args.batch_size, len(data["input_ids"])), seed=args.seed, log_dir=out / "logs",
                checkpoints=checkpoints, save_every=args.save_every)
    # A PiSSA/OLoRA adapter is written as plain LoRA (rank 2r) for the original model, so that
    # loading it needs no recomputed residual.
    initial = params if is_decomposition(config.init_lora_weights) else None
    interop.save_adapter(out / "adapter", lorax.combine(state.trainable, frozen), config,
                         base_model_name_or_path=str(Path(args.model).absolute()), initial=initial)
    print(f"adapter written to {out / 'adapter'} (peft format); logs and curves in {out / 'logs'}")


def merge(args) -> None:
    import interop
    import lorax

    model, graphdef, base = _load(args.model, args.dtype)
    params = interop.load_adapter(args.adapter, base, output_head=getattr(model, "output_head", None),
                                  moe_names=getattr(model, "moe_names", None))
    interop.save_merged(args.out, graphdef, lorax.merge(params))
    print(f"merged model written to {args.out} (transformers format)")


DTYPES = ["float32", "bfloat16", "float16", "auto"]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="lorax-jax", description="LoRA for JAX with Hugging Face / peft interop.")
    commands = top.add_subparsers(dest="command", required=True)

    def lora_options(p, required):
        p.add_argument("--target-modules", required=required, default=None,
                       help='comma-separated module names (q_proj,v_proj), a regex, or "all-linear"')
        p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
        p.add_argument("--alpha", type=float, default=16, help="lora_alpha (default 16)")
        p.add_argument("--dropout", type=float, default=0.0, help="lora_dropout (default 0)")
        p.add_argument("--task-type", default="CAUSAL_LM", help="peft task_type recorded in the adapter")
        p.add_argument("--use-dora", action="store_true", help="DoRA: a trained magnitude per output feature")
        p.add_argument("--init-lora-weights", default="true",
                       help='true (default), gaussian, orthogonal, or pissa / pissa_niter_<n> / olora: adapters from the '
                            "weights' SVD / QR, the base replaced by the residual")

    p = commands.add_parser("inspect", help="list a model's module paths and what a LoRA config would adapt")
    p.add_argument("--model", required=True, help="a local Hugging Face model folder")
    lora_options(p, required=False)
    p.set_defaults(run=inspect)

    p = commands.add_parser("finetune", help="LoRA fine-tune a causal LM on a JSONL file and write a peft adapter")
    p.add_argument("--model", required=True, help="a local Hugging Face model folder")
    p.add_argument("--data", required=True, help='JSONL: one {"text": ...} or {"input_ids": [...]} per line')
    p.add_argument("--out", required=True, help="output folder: adapter/, checkpoints/, logs/")
    lora_options(p, required=True)
    p.add_argument("--steps", type=_positive(int), default=100, help="training steps (default 100)")
    p.add_argument("--batch-size", type=_positive(int), default=8, help="batch size (default 8)")
    p.add_argument("--lr", type=_positive(float), default=2e-4, help="peak learning rate (default 2e-4)")
    p.add_argument("--accumulation-steps", type=_positive(int), default=1, help="gradient accumulation (default 1)")
    p.add_argument("--max-length", type=_positive(int), default=256, help="truncate sequences to this many tokens")
    p.add_argument("--save-every", type=_positive(int), default=50, help="checkpoint every N steps (default 50)")
    p.add_argument("--keep", type=_positive(int), default=3, help="checkpoints to keep (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="the base model's dtype and compute dtype (auto: the checkpoint's, as transformers' "
                        "default); adapters and optimizer state stay float32 (default float32)")
    p.add_argument("--quantize", choices=["nf4", "fp4"], default=None,
                   help="QLoRA: store the adapted base weights in 4 bits (double quantization, blocksize 64)")
    p.add_argument("--remat", action="store_true", help="recompute activations in the backward pass (less memory)")
    p.add_argument("--loss-chunk-size", type=_positive(int), default=None,
                   help="compute the output head and the loss this many positions at a time (less memory; "
                        "Llama-family and GPT-2 models)")
    p.set_defaults(run=finetune)

    p = commands.add_parser("merge", help="merge a peft adapter into its base and write a transformers checkpoint")
    p.add_argument("--model", required=True, help="the base model folder")
    p.add_argument("--adapter", required=True, help="a peft LoRA adapter folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="dtype to merge in and write (default auto: the checkpoint's own, as peft's merge keeps it)")
    p.set_defaults(run=merge)
    return top


def main(argv: list[str] | None = None) -> int:
    from lorax.errors import LoraError

    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (LoraError, OSError, ValueError, NotImplementedError) as error:
        print(f"lorax-jax: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
