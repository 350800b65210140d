"""Seed 001's DigitsNet (784 -> 256 -> 128 -> 10): lorax prints peft's lines for the same model,
and those lines, like examples/digits.py, hold the seed's numbers."""

import importlib.util
import pathlib

import jax
import pytest
from flax import nnx
from torch import nn

import lorax
from conftest import lorax_line, peft_line, peft_model_for, torch_to_params

ROOT = pathlib.Path(__file__).parent.parent
LINEARS = ["linear1", "linear2", "linear3"]


def load_example():
    spec = importlib.util.spec_from_file_location("digits_example", ROOT / "examples" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


digits = load_example()


class TorchDigitsNet(nn.Module):
    """The seed's torch model, names and forward as the seed has them."""

    def __init__(self, input_shape=28 * 28, num_classes=10):
        super().__init__()
        self.linear1 = nn.Linear(input_shape, 256)
        self.linear2 = nn.Linear(256, 128)
        self.linear3 = nn.Linear(128, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.linear3(self.linear2(self.linear1(x))))


@pytest.fixture(scope="module")
def torch_digits():
    return TorchDigitsNet().eval()


@pytest.fixture(scope="module")
def jax_digits():
    """The example's NNX DigitsNet as a parameter tree."""
    _, params = lorax.split(digits.DigitsNet(28 * 28, 10, nnx.Rngs(0)))
    return params


def test_same_tree_and_the_seeds_base_count(torch_digits, jax_digits):
    shapes = lambda tree: jax.tree_util.tree_map(lambda leaf: leaf.shape, tree)
    assert shapes(jax_digits) == shapes(torch_to_params(torch_digits))
    # The seed's count_parameters: every parameter of the plain torch model.
    assert sum(p.numel() for p in torch_digits.parameters() if p.requires_grad) == 235_146
    assert lorax.count_parameters(jax_digits) == (0, 235_146)


@pytest.mark.parametrize("bias, trainable", [("none", 3_124), ("all", 3_518)])
def test_lorax_prints_peft_line_with_the_seeds_numbers(torch_digits, jax_digits, bias, trainable):
    config = dict(r=2, lora_alpha=1, target_modules=LINEARS, bias=bias)
    theirs = peft_line(peft_model_for(torch_digits, **config))
    ours = lorax_line(lorax.lora(jax_digits, lorax.LoraConfig(**config), key=jax.random.key(0)))
    assert ours == theirs
    assert f"trainable params: {trainable:,} || all params: 238,270 ||" in theirs


def test_example_prints_the_seeds_numbers(capsys):
    digits.show_counts()
    out = capsys.readouterr().out
    assert "DigitsNet(784 -> 256 -> 128 -> 10): 235,146 parameters" in out
    assert 'bias="none": 3,124 trainable of 238,270 (1.32% of the base)' in out
    assert 'bias="all": 3,518 trainable of 238,270 (1.49% of the base)' in out
    assert "trainable params: 3,124 || all params: 238,270 || trainable%: 1.3111" in out
    assert "trainable params: 3,518 || all params: 238,270 || trainable%: 1.4765" in out
