"""Shared test fixtures: the same small models built in torch (for peft) and as JAX trees.

Tests compare lorax against the real peft: a torch model and a JAX tree hold the same
weights, peft adapts the torch one, lorax the tree, and the two must agree.
"""

import contextlib
import copy
import io
import re
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import lorax
import numpy as np
import peft
import pytest
import torch
from torch import nn

jax.config.update("jax_default_matmul_precision", "highest")


def use_bitsandbytes_reference_paths_on_this_cpu():
    """Our references are bitsandbytes' bytes and its dequantize-then-matmul forward, as it computes
    them on GPUs and on most CPUs. On CPUs with AVX-512, bitsandbytes 0.50's native CPU kernels
    depart from that in two ways, so the tests steer it back to its own reference code there:

    - with AVX512-BF16, Linear4bit's first inference forward repacks the weight into a CPU-only
      layout (absmax rounded to bf16) and computes in bf16 whatever compute_dtype says
      (bitsandbytes/nn/modules.py, Linear4bit.forward): turned off.
    - the AVX-512 branch of the native 4-bit dequantize is wrong when a row is not a whole number
      of blocks (a 32x48 weight in blocks of 64 comes back off by up to 1.0; the scalar branch and
      CUDA agree with the format): where it disagrees with bitsandbytes' own pure-torch
      `_dequantize_4bit_compute` (its default backend, and the CPU backend's fallback), the CPU op
      is that function.
    """
    import bitsandbytes.functional as F
    import bitsandbytes.nn.modules
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    bitsandbytes.nn.modules.has_avx512bf16 = lambda: False
    reference = _dequantize_4bit_compute.__wrapped__  # without its torch.compile: one compile per shape

    def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
        return reference(A.view(torch.uint8).reshape(-1), absmax, _get_4bit_code(quant_type, A.device), blocksize,
                         shape, dtype)

    weight = torch.randn(32, 48)
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    if not torch.equal(F.dequantize_4bit(packed, state), dequantize_4bit(packed, state.absmax, 64, "nf4", weight.shape,
                                                                         torch.float32)):
        with warnings.catch_warnings():  # "Overriding a previously registered kernel": that is the point
            warnings.simplefilter("ignore", UserWarning)
            torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", dequantize_4bit)
        assert torch.equal(F.dequantize_4bit(packed, state), dequantize_4bit(packed, state.absmax, 64, "nf4",
                                                                             weight.shape, torch.float32))


use_bitsandbytes_reference_paths_on_this_cpu()


class TorchMLP(nn.Module):
    """Seed 000's MLP: 20 -> 2000 -> 200 -> 2, module paths seq.0 / seq.2 / seq.4."""

    def __init__(self, sizes=(20, 2000, 200, 2)):
        super().__init__()
        layers = []
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        layers.append(nn.LogSoftmax(dim=-1))
        self.seq = nn.Sequential(*layers)

    def forward(self, x):
        return self.seq(x)


def jax_mlp(params, x):
    """The same MLP as a plain function of a tree keyed like the torch module."""
    layers = sorted(params["seq"])
    for i in layers:
        x = x @ params["seq"][i]["kernel"] + params["seq"][i]["bias"]
        if i != layers[-1]:
            x = jax.nn.relu(x)
    return jax.nn.log_softmax(x, axis=-1)


class TorchTiny(nn.Module):
    """A tiny decoder-shaped model: embeddings, numbered layers with attention-like
    projections and an MLP, a norm, and an untied head. Paths look like a Llama's."""

    def __init__(self, vocab=50, dim=16, layers=3):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, dim)
        self.model.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            layer.self_attn.q_proj = nn.Linear(dim, dim, bias=True)
            layer.self_attn.v_proj = nn.Linear(dim, dim, bias=False)
            layer.mlp = nn.Module()
            layer.mlp.up_proj = nn.Linear(dim, 2 * dim, bias=False)
            layer.mlp.down_proj = nn.Linear(2 * dim, dim, bias=False)
            layer.norm = nn.LayerNorm(dim)
            self.model.layers.append(layer)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        h = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            a = layer.self_attn
            h = h + torch.tanh(a.q_proj(h)) * a.v_proj(h)
            h = h + layer.mlp.down_proj(torch.relu(layer.mlp.up_proj(layer.norm(h))))
        return self.lm_head(h)


def jax_tiny(params, ids):
    m = params["model"]
    h = m["embed_tokens"]["embedding"][ids]
    for i in sorted(m["layers"]):
        layer = m["layers"][i]
        a = layer["self_attn"]
        q = h @ a["q_proj"]["kernel"] + a["q_proj"]["bias"]
        h = h + jnp.tanh(q) * (h @ a["v_proj"]["kernel"])
        norm = layer["norm"]
        mean = h.mean(-1, keepdims=True)
        var = ((h - mean) ** 2).mean(-1, keepdims=True)
        normed = (h - mean) / jnp.sqrt(var + 1e-5) * norm["scale"] + norm["bias"]
        up = jax.nn.relu(normed @ layer["mlp"]["up_proj"]["kernel"])
        h = h + up @ layer["mlp"]["down_proj"]["kernel"]
    return h @ params["lm_head"]["kernel"]


def torch_to_params(module: nn.Module) -> dict:
    """A torch module's parameters as a JAX tree in our layout: Linear weight -> kernel (in, out),
    Embedding weight -> embedding, LayerNorm weight -> scale; numbered children get int keys."""
    kinds = {name: type(m) for name, m in module.named_modules()}
    params: dict = {}
    for name, tensor in module.state_dict().items():
        module_path, _, leaf = name.rpartition(".")
        value = tensor.detach().numpy()
        kind = kinds[module_path]
        if leaf == "weight":
            if issubclass(kind, nn.Linear):
                leaf, value = "kernel", value.T
            elif issubclass(kind, nn.Embedding):
                leaf = "embedding"
            elif issubclass(kind, nn.LayerNorm):
                leaf = "scale"
        node = params
        for part in module_path.split("."):
            node = node.setdefault(int(part) if part.isdigit() else part, {})
        node[leaf] = jnp.asarray(value)
    return params


def peft_line(peft_model) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        peft_model.print_trainable_parameters()
    return out.getvalue().strip()


def lorax_line(params) -> str:
    import lorax

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        lorax.print_trainable_parameters(params)
    return out.getvalue().strip()


def perturb_constants(model):
    """Move the parameters that transformers initializes to constants away from them: norm weights
    (ones, or zeros for Gemma's offsets; q/k norms too), LayerNorm biases and every bias of a
    Linear/Conv1D (zeros). Otherwise a test cannot see whether they are loaded and used (a model
    that ignored every bias would pass). Returns `model`."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.lower() or re.search(r"(^|\.)ln_", name) or name.endswith("bias"):
                param.add_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    return model


def save_each(tmp_path_factory, variants, hf_model) -> dict:
    """variant -> (torch model from `hf_model(variant)`, the folder transformers saved it to as safetensors)."""
    out = {}
    for variant in variants:
        model = hf_model(variant)
        folder = tmp_path_factory.mktemp(variant)
        model.save_pretrained(folder)
        out[variant] = (model, folder)
    return out


# How a test saves a transformers model: transformers 5's save_pretrained writes safetensors only
# (safe_serialization=False is ignored), so the .bin saves hold the very tensors it wrote, under
# the names and in the files (pytorch_model.bin, or pytorch_model-0000k-of-0000n.bin with
# pytorch_model.bin.index.json) that transformers 4 wrote and transformers 5 still reads.
SAVES = ("safetensors", "bin", "sharded", "sharded-bin")


def save_checkpoint(model, folder, save: str, max_shard_size: str = "40KB"):
    """`model.save_pretrained(folder)` in one of SAVES' formats. Returns `folder`."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(folder)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if save.startswith("sharded") else {}))
    index = folder / "model.safetensors.index.json"
    assert index.is_file() == save.startswith("sharded"), f"{save}: {sorted(p.name for p in folder.iterdir())}"
    if not save.endswith("bin"):
        return folder
    if save == "bin":
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
        return folder
    content = json.loads(index.read_text())
    shards = {name: name.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
              for name in set(content["weight_map"].values())}
    for name, bin_name in shards.items():
        torch.save(load_file(folder / name), folder / bin_name)
        (folder / name).unlink()
    content["weight_map"] = {tensor: shards[name] for tensor, name in content["weight_map"].items()}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(content, indent=2))
    index.unlink()
    return folder


def padded_tokens(vocab_size: int, batch=2, length=9, seed=0):
    """Random token ids (torch) and an attention mask whose first row is left-padded by 3."""
    ids = torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on the first row
    return ids, mask


def logits_of(graphdef, params, ids, mask=None):
    """Our jitted logits for torch ids (and mask), as numpy."""
    args = (jnp.asarray(ids.numpy()),) + (() if mask is None else (jnp.asarray(mask.numpy()),))
    return np.asarray(jax.jit(lambda p, *a: lorax.apply(graphdef, p, *a))(params, *args))


def peft_model_for(torch_model, **config):
    return peft.get_peft_model(copy.deepcopy(torch_model), peft.LoraConfig(**config))


# Scripts that tests run in a subprocess (with their own XLA flags); not test or doctest modules.
collect_ignore = ["scripts"]

@pytest.fixture(scope="session")
def torch_mlp():
    torch.manual_seed(0)
    return TorchMLP().eval()


@pytest.fixture(scope="session")
def torch_tiny():
    torch.manual_seed(0)
    return TorchTiny().eval()


TORCH_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "weight": "weight", "bias": "bias"}


def _torch_value(leaf_name, array):
    value = np.asarray(array)
    return torch.from_numpy((value.T if leaf_name == "kernel" else value).copy())


def sync_into_peft(params, peft_model) -> None:
    """Give the peft model our adapter values: A/B (peft: lora_A (r, in), lora_B (out, r)),
    modules_to_save copies and trained biases, so both compute with the same weights."""
    state = dict(peft_model.named_parameters())
    # A modules_to_save wrapper may sit on a container (`...attention.output`) above the leaf's
    # module: its copy is `<container>.modules_to_save.default.<rest>`.
    saved = {name.replace(".modules_to_save.default", ""): name for name in state if ".modules_to_save.default." in name}
    with torch.no_grad():
        for keypath, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=lorax.is_adapter)[0]:
            if isinstance(leaf, lorax.LoraArray):
                for path, a, b in per_module_factors(leaf):
                    prefix = f"base_model.model.{path}"
                    a_name, b_name = f"{prefix}.lora_A.default.weight", f"{prefix}.lora_B.default.weight"
                    if a_name not in state:  # embeddings
                        a_name, b_name = f"{prefix}.lora_embedding_A.default", f"{prefix}.lora_embedding_B.default"
                    state[a_name].copy_(torch.from_numpy(a.T.copy()))
                    state[b_name].copy_(torch.from_numpy(b.T.copy()))
                if isinstance(leaf, lorax.DoraArray):
                    m = np.asarray(leaf.m)
                    for path, layer in per_module_layers(leaf):
                        state[f"base_model.model.{path}.lora_magnitude_vector.default.weight"].copy_(
                            torch.from_numpy((m if layer is None else m[layer]).copy()))
            elif isinstance(leaf, lorax.TrainableArray):
                path = lorax.targets.dotted(keypath)
                stored_module, _, name = path.rpartition(".")
                per_layer = [(stored_module, leaf.value)]
                if lorax.targets.STACK in stored_module.split("."):
                    # a trained bias of stacked layers is one array; in torch, layer i is its own module
                    per_layer = [(stored_module.replace(lorax.targets.STACK, str(i)), value)
                                 for i, value in enumerate(leaf.value)]
                for module, value in per_layer:
                    plain = f"base_model.model.{module}.{TORCH_LEAF[name]}"
                    candidates = [saved.get(plain), f"base_model.model.{module}.base_layer.{TORCH_LEAF[name]}", plain]
                    target = next(c for c in candidates if c in state)
                    state[target].copy_(_torch_value(name, value))


def perturb_trained_leaves(params, key):
    """Move trained biases and modules_to_save copies away from their originals, and DoRA
    magnitudes away from their initial norms, so a test can tell whether a model used them."""
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=lorax.is_adapter)
    keys = jax.random.split(key, len(leaves))

    def moved(leaf, key):
        if isinstance(leaf, lorax.TrainableArray):
            return eqx.tree_at(lambda l: l.value, leaf, leaf.value + 0.1 * jax.random.normal(key, leaf.value.shape))
        if isinstance(leaf, lorax.DoraArray):  # a magnitude that no longer equals the norm it started at
            return eqx.tree_at(lambda l: l.m, leaf, leaf.m * (1 + 0.2 * jax.random.normal(key, leaf.m.shape)))
        return leaf

    return jax.tree_util.tree_unflatten(treedef, [moved(leaf, k) for leaf, k in zip(leaves, keys)])


def per_module_factors(leaf):
    """(module path, a (in, r), b (r, out)) for each module a LoraArray holds (one per adapted
    layer of a stack, padding removed)."""
    a, b = np.asarray(leaf.a), np.asarray(leaf.b)
    if leaf.ranks is None:
        return [(leaf.path, a, b)]
    return [(leaf.path.replace("*", str(i)), a[i, :, :r], b[i, :r]) for i, r in enumerate(leaf.ranks) if r]


def per_module_layers(leaf):
    """(module path, layer or None) for each module a LoraArray holds, as per_module_factors lists them."""
    if leaf.ranks is None:
        return [(leaf.path, None)]
    return [(leaf.path.replace("*", str(i)), i) for i, r in enumerate(leaf.ranks) if r]


def adapted_paths(params):
    """Module paths with an adapter, one per layer for stacked weights (peft's targeted_module_names)."""
    return sorted(path for leaf in jax.tree_util.tree_leaves(params, is_leaf=lorax.is_adapter)
                  if isinstance(leaf, lorax.LoraArray) for path, _, _ in per_module_factors(leaf))


@pytest.fixture(params=["whole", "blocked"])
def dense_blocks(request, monkeypatch):
    """Run a test with 4-bit weights dequantized whole, and again a block of output features at
    a time (`lorax.nf4.DENSE_BLOCK_ELEMENTS` lowered so that small test weights are cut up)."""
    if request.param == "blocked":
        monkeypatch.setattr(lorax.nf4, "DENSE_BLOCK_ELEMENTS", 1024)
    return request.param
