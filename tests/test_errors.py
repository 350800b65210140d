"""Bad input gets an error that says what was wrong and what would be right."""

import jax
import jax.numpy as jnp
import optax
import pytest

import lorax


def mlp_params():
    sizes = [(20, 30), (30, 10), (10, 2)]
    return {"seq": {2 * i: {"kernel": jnp.ones(s), "bias": jnp.zeros(s[1])} for i, s in enumerate(sizes)},
            "norm": {"scale": jnp.ones(2)}}


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(rank=8, target_modules=["q"]), r"unknown LoraConfig field 'rank' \(did you mean 'r'\?\)"),
        (dict(r=0, target_modules=["q"]), r"r must be a positive integer, got 0"),
        (dict(r=2.5, target_modules=["q"]), r"r must be a positive integer"),
        (dict(target_modules=["q"], rank_pattern={"q": -1}), r"rank_pattern\['q'\] must be a positive integer"),
        (dict(target_modules=["q"], lora_alpha="16"), r"lora_alpha must be a number, got '16'"),
        (dict(target_modules=["q"], alpha_pattern={"q": None}), r"alpha_pattern\['q'\] must be a number, got None"),
        (dict(target_modules=["q"], bias="some"), r"bias must be one of \('none', 'all', 'lora_only'\)"),
        (dict(target_modules=["q"], lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
        (dict(target_modules=["q"], init_lora_weights="loftq"), r"init_lora_weights='loftq' is not supported"),
        (dict(target_modules=["q"], task_type="CAUSAL"), r"task_type must be one of"),
        (dict(), r"target_modules is required"),
        (dict(target_modules=[]), r"non-empty list"),
        (dict(target_modules=r".*q", layers_to_transform=[0]), r"layers_to_transform cannot be used when target_modules is a regex"),
        (dict(target_modules=["q"], layers_pattern="layers"), r"layers_pattern only has a meaning together with layers_to_transform"),
        (dict(target_modules=["q", "head"], modules_to_save=["head"]), r"\['head'\] are in both target_modules and modules_to_save"),
        # The types peft gives its fields: a string "false" would otherwise read as true.
        (dict(target_modules=["q"], use_rslora="false"), r"use_rslora must be a bool \(true or false\), got 'false'"),
        (dict(target_modules=["q"], use_dora="false"), r"use_dora must be a bool"),
        (dict(target_modules=["q"], lora_dropout=None), r"lora_dropout must be a number in \[0, 1\), got None"),
        (dict(target_modules=["q"], lora_dropout="0.1"), r"lora_dropout must be a number"),
        (dict(target_modules=["q"], rank_pattern=[1]), r"rank_pattern must be a dict of module-name patterns"),
        (dict(target_modules=[1]), r"target_modules must be a list of module names or a regex string, got \[1\]"),
        (dict(target_modules=["q"], modules_to_save=[1]), r"modules_to_save must be a list of module names"),
        (dict(target_modules=["q"], modules_to_save="head"), r"modules_to_save must be a list of module names"),
        (dict(target_modules=["q"], layers_to_transform="0"), r"layers_to_transform must be a layer index or a list"),
        (dict(target_modules=["q"], layers_to_transform=[0, True]), r"layers_to_transform must be a layer index"),
        (dict(target_parameters="experts.down_proj"), r"target_parameters must be a list of parameter names"),
        # regexes compiled up front, with the field named
        (dict(target_modules=["q"], exclude_modules="(x"), r"exclude_modules regex '\(x' does not compile"),
        (dict(target_modules=["q"], rank_pattern={"(seq": 2}), r"rank_pattern key '\(seq' is not a valid regex"),
        (dict(target_modules=["q"], alpha_pattern={"(seq": 2}), r"alpha_pattern key '\(seq' is not a valid regex"),
        (dict(target_modules=["q"], layers_to_transform=[0], layers_pattern="(layers"), r"layers_pattern '\(layers' is not a valid regex"),
    ],
)
def test_bad_config_fields(fields, message):
    with pytest.raises(lorax.LoraConfigError, match=message):
        lorax.LoraConfig(**fields)


def test_null_patterns_read_as_empty_as_in_peft():
    """peft types rank_pattern / alpha_pattern as Optional[dict]: null in adapter_config.json is no pattern."""
    config = lorax.LoraConfig(target_modules=["q"], rank_pattern=None, alpha_pattern=None)
    assert config.rank_pattern == {} and config.alpha_pattern == {}


def test_target_parameters_with_modules_to_save_and_no_target_modules():
    config = lorax.LoraConfig(target_parameters=["experts.down_proj"], modules_to_save=["score"])
    assert config.target_modules is None


def test_target_that_matches_nothing_lists_modules_and_nearest():
    with pytest.raises(lorax.TargetError, match=r"target_modules entry 'seq.O' matches no module.*nearest: \[[^]]*'seq.0'") as error:
        lorax.lora(mlp_params(), lorax.LoraConfig(target_modules=["seq.O"]), key=jax.random.key(0))
    assert "Module paths: norm, seq, seq.0, seq.2, seq.4" in str(error.value)


def test_regex_that_matches_nothing_lists_adaptable_modules():
    with pytest.raises(lorax.TargetError, match=r"matched no adaptable module.*Linear and embedding modules: seq.0, seq.2, seq.4"):
        lorax.lora(mlp_params(), lorax.LoraConfig(target_modules=r".*q_proj"), key=jax.random.key(0))


def test_target_on_a_module_lora_cannot_adapt():
    with pytest.raises(lorax.TargetError, match=r"target 'norm' matched a module that LoRA cannot adapt \(leaves: scale\)"):
        lorax.lora(mlp_params(), lorax.LoraConfig(target_modules=["norm"]), key=jax.random.key(0))
    with pytest.raises(lorax.TargetError, match=r"target 'seq' matched a module that LoRA cannot adapt"):
        lorax.lora(mlp_params(), lorax.LoraConfig(target_modules="seq"), key=jax.random.key(0))


def test_modules_to_save_that_matches_nothing():
    with pytest.raises(lorax.TargetError, match=r"modules_to_save entry 'head' matches no module"):
        lorax.lora(mlp_params(), lorax.LoraConfig(target_modules=["seq.0"], modules_to_save=["head"]), key=jax.random.key(0))


def test_root_kernel_error_says_how_to_fix():
    with pytest.raises(lorax.TargetError, match=r"put the layer under a named attribute"):
        lorax.lora({"kernel": jnp.ones((3, 3))}, lorax.LoraConfig(target_modules=".*"), key=jax.random.key(0))


def test_adapting_twice_is_refused():
    params = lorax.lora(mlp_params(), lorax.LoraConfig(target_modules=["seq.0"]), key=jax.random.key(0))
    with pytest.raises(lorax.LoraError, match=r"already hold adapters; call lorax.merge"):
        lorax.lora(params, lorax.LoraConfig(target_modules=["seq.2"]), key=jax.random.key(0))


def test_optimizer_without_trainable_leaves():
    with pytest.raises(lorax.LoraError, match=r"no trainable leaves: call lorax.lora"):
        lorax.optimizer(optax.adamw(1e-3), mlp_params())


def test_pattern_keys_and_layers_that_change_nothing_are_warned():
    """A rank_pattern / alpha_pattern key that reaches no adapted module, or a layers_to_transform
    index past the model's layers, changes nothing: most likely a typo. Warned (with peft's words
    for the patterns), and the rest adapted, as in peft."""
    params = {"model": {"layers": [{"q_proj": {"kernel": jnp.ones((4, 4))}} for _ in range(2)]}}
    with pytest.warns(RuntimeWarning, match=r"rank_pattern keys did not match any targeted module .*\['sq_proj'\]"):
        lorax.select_targets(lorax.LoraConfig(target_modules=["q_proj"], rank_pattern={"sq_proj": 2}), params)
    with pytest.warns(RuntimeWarning, match=r"alpha_pattern keys did not match .*\['layers\.5'\]"):
        lorax.select_targets(lorax.LoraConfig(target_modules=["q_proj"], alpha_pattern={"layers.5": 2}), params)
    with pytest.warns(RuntimeWarning, match=r"layers_to_transform \[7\] name no layer of this model \(its layers: 0..1\)"):
        targets = lorax.select_targets(lorax.LoraConfig(target_modules=["q_proj"], layers_to_transform=[1, 7]), params)
    assert [t.path for t in targets] == ["model.layers.1.q_proj"]


def test_peft_warns_about_the_same_pattern_key():
    import warnings

    import peft
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.get_peft_model(model, peft.LoraConfig(target_modules=["0"], rank_pattern={"9": 2}))
    assert any("rank_pattern keys did not match any targeted module and were ignored: ['9']" in str(w.message)
               for w in caught)
    with pytest.warns(RuntimeWarning, match=r"rank_pattern keys did not match any targeted module and were ignored: \['9'\]"):
        lorax.select_targets(lorax.LoraConfig(target_modules=["0"], rank_pattern={"9": 2}),
                             {"0": {"kernel": jnp.ones((4, 4))}, "1": {"kernel": jnp.ones((4, 4))}})
