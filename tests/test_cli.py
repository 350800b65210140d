"""The lorax-jax command line: inspect prints peft's counts, finetune writes an adapter PeftModel
loads, merge writes a checkpoint transformers loads, bad input is one line."""

import json
import re

import numpy as np
import peft
import pytest
import torch
import transformers

from conftest import peft_line
from interop.cli import main

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(folder)
    return folder


def test_inspect_prints_peft_counts(model_dir, capsys):
    assert main(["inspect", "--model", str(model_dir), "--target-modules", "q_proj,v_proj", "--r", "4"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.self_attn.q_proj" in out and "adapts 4 modules" in out
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    expected = peft_line(peft.get_peft_model(torch_model, peft.LoraConfig(r=4, lora_alpha=16,
                                                                          target_modules=["q_proj", "v_proj"])))
    assert out.strip().splitlines()[-1] == expected
    assert main(["inspect", "--model", str(model_dir), "--target-modules", "q_proj,v_proj", "--r", "4", "--use-dora"]) == 0
    dora = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(model_dir),
                                peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True))
    assert capsys.readouterr().out.strip().splitlines()[-1] == peft_line(dora)


def test_finetune_then_merge(model_dir, tmp_path, capsys):
    """PiSSA with the randomized SVD: the adapter is written as plain LoRA of rank 2r for the
    original model, which PeftModel and our merge both load."""
    rng = np.random.default_rng(0)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"input_ids": rng.integers(0, 64, 10).tolist()}) for _ in range(16)))
    out = tmp_path / "run"
    args = ["finetune", "--model", str(model_dir), "--data", str(data), "--target-modules", "q_proj,v_proj",
            "--r", "4", "--steps", "4", "--batch-size", "4", "--lr", "1e-2", "--save-every", "2",
            "--init-lora-weights", "pissa_niter_2", "--out", str(out)]
    assert main(args) == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "logs" / "curves.png").is_file()
    written = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["init_lora_weights"]) == (8, 32, True)
    assert main(args[:-2] + ["--steps", "6", "--resume", "--out", str(out)]) == 0
    assert "resuming from step 4" in capsys.readouterr().out

    ids = torch.tensor(rng.integers(0, 64, (1, 8)))
    peft_model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(model_dir),
                                                out / "adapter").eval()
    assert main(["merge", "--model", str(model_dir), "--adapter", str(out / "adapter"), "--out", str(tmp_path / "m")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(ids).logits.numpy(), peft_model(ids).logits.numpy(), atol=1e-4)


def test_bad_input_is_one_line(model_dir, tmp_path, capsys):
    assert main(["inspect", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorax-jax: error: no config.json in") and len(err.strip().splitlines()) == 1
    assert main(["inspect", "--model", str(model_dir), "--target-modules", "q_prj"]) == 2
    assert "nearest" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--model", str(model_dir)])
    assert exit_info.value.code == 2
    assert "the following arguments are required" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--loss-chunk-size", "0"), ("--steps", "0"),
                                        ("--accumulation-steps", "-1"), ("--lr", "nan"), ("--lr", "0"),
                                        ("--save-every", "x")])
def test_numbers_out_of_range_are_refused_by_argparse(model_dir, tmp_path, capsys, flag, value):
    """Before, a batch size or loss chunk of 0 ended in ZeroDivisionError tracebacks, and a NaN
    learning rate trained a NaN adapter with exit status 0."""
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--model", str(model_dir), "--data", "x.jsonl", "--out", str(tmp_path / "out"),
              "--target-modules", "q_proj", flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_finetune_refuses_a_model_without_a_language_model_head(tmp_path, capsys):
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=4, intermediate_size=37)).save_pretrained(tmp_path / "bert")
    (tmp_path / "data.jsonl").write_text('{"input_ids": [1, 2, 3]}\n')
    assert main(["finetune", "--model", str(tmp_path / "bert"), "--data", str(tmp_path / "data.jsonl"),
                 "--out", str(tmp_path / "out"), "--target-modules", "query"]) == 2
    err = re.split(r"[\r\n]", capsys.readouterr().err.strip())[-1]
    assert err.startswith("lorax-jax: error: ") and "finetune trains causal language models" in err, err


def test_merge_keeps_the_checkpoints_dtype(tmp_path):
    """A bf16 checkpoint merges into a bf16 checkpoint, as peft's merge_and_unload keeps the model's
    dtype (before: float32, twice the size); --dtype chooses another."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "base")
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    theirs = peft_model.merge_and_unload()
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        np.testing.assert_allclose(ours(ids).logits.float().numpy(), theirs(ids).logits.float().numpy(), atol=0.05)
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "fp32"), "--dtype", "float32"]) == 0
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"


@pytest.mark.parametrize("lines,message", [
    (['{"input_ids": [1, 2, 64]}'], r"data.jsonl, line 1: token id 64 is outside the model's vocabulary \(0..63\)"),
    (['{"input_ids": [1, 2]}', '{"input_ids": [-1]}'], r"line 2: token id -1 is outside"),
    (['{"input_ids": [1, 2]}', "", '{"input_ids": [1, 2'], r"data.jsonl, line 3: not valid JSON"),
    (['[1, 2, 3]'], r"line 1: a record must be a JSON object, not list"),
    (['{"input_ids": "1 2 3"}'], r"line 1: input_ids must be a list of integers"),
    (['{"input_ids": []}'], r"line 1: the record has no tokens"),
    (['\udcff{"input_ids": [1]}'], r"data.jsonl: not UTF-8 text, as JSONL must be"),
])
def test_bad_training_data_is_named_before_training(model_dir, tmp_path, capsys, lines, message):
    """Out-of-vocabulary ids would be clamped by JAX's gather (training on another token) or give a
    NaN loss, with an adapter written and exit code 0; they are refused, with the line, first."""
    data = tmp_path / "data.jsonl"
    data.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))  # \udcff: the byte 0xff
    assert main(["finetune", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "out"),
                 "--target-modules", "q_proj", "--steps", "1"]) == 2
    err = re.split(r"[\r\n]", capsys.readouterr().err.strip())[-1]  # after the loading bar
    assert err.startswith("lorax-jax: error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "out" / "adapter").exists()


def test_finetune_qlora_bf16_remat(model_dir, tmp_path):
    """--quantize nf4 --dtype bfloat16 --remat --loss-chunk-size: a bf16 base stored in 4 bits,
    fp32 adapters, and an adapter that peft loads onto the bf16 model (in fp32, as peft keeps them)."""
    rng = np.random.default_rng(1)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"input_ids": rng.integers(0, 64, 10).tolist()}) for _ in range(8)))
    out = tmp_path / "qlora"
    assert main(["finetune", "--model", str(model_dir), "--data", str(data), "--target-modules", "q_proj,v_proj",
                 "--r", "4", "--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--dtype", "bfloat16",
                 "--quantize", "nf4", "--remat", "--loss-chunk-size", "4", "--out", str(out)]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "logs" / "log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 3 and all(np.isfinite(losses))
    bf16_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    peft_model = peft.PeftModel.from_pretrained(bf16_model, out / "adapter")
    lora_a = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert lora_a.dtype == torch.float32 and bool(lora_a.abs().sum() > 0)
